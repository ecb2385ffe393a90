"""The table of the cache's arrays (both kinds): name, dtype, shape rule, chunking, compressors, value codec and
value check of each. The writer creates, the reader opens and verify checks exactly the arrays of `TABLE`, so an
array is added to the cache by one entry here plus the code that produces its rows. Plain numpy + zarr (no
torch); data_schema.md describes the same table in prose."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, List, Optional, Tuple

import numpy as np
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec, ZstdCodec

from yolc_kd.cache.codec import BOXES, HEATMAP, ValueCodec, cast

ZSTD_LEVEL = 3
FINGERPRINT_BYTES = 16
IMAGE_MAP_TILE = 256  # image kind: maps are chunked in 256x256-pixel tiles, so a view reads only what it covers
STATUS_MISSING, STATUS_OK, STATUS_SKIPPED = 0, 1, 2
IMAGE_IDS, SHARD_DONE = "image_ids", "shard_done"

# a value check: the verifier (its layout, manifest, decoded arrays `data`) -> [(bool per row, what is wrong)];
# the verifier reports the rows that are also committed and decoded in the array and in the check's `needs`
Check = Callable[[Any], Iterable[Tuple[np.ndarray, str]]]


@dataclass(frozen=True)
class ArraySpec:
    """One array of the cache.

    Args:
        name: the array's name in the group (and the KDTargets field of a target array).
        dtype: numpy dtype of the stored values; 'str' is zarr's variable-length UTF-8.
        shape: the layout -> the shape after the leading axis (a sample's shape for the per-sample arrays).
        axis: the leading axis: "sample" (rows, sharded by layout.shard_size), "image" (one per image, one
            chunk) or "shard" (one per shard, one chunk each).
        map: a big per-sample map: one row per inner chunk (image kind: image_chunks), blosc compression; else
            the whole shard in one inner chunk, zstd.
        image_chunks: a map's inner chunk in an image-kind cache: "tile" (256x256-pixel tiles of a row, at the
            map's stride) or "slot" (one crop slot of a row).
        codec: how the teacher's float values are stored (cache/codec.py); None: stored as they are.
        target: a KD target (KDTargets field): precompute stores it, training reads it.
        check: the value check verify runs on the decoded array (small arrays only: maps are checked by the
            verifier's deep read); needs: the other arrays it reads.
        may_be_fill: (verifier, shard j) -> whether a committed shard's rows may all be fill values, so that a
            cache written before `all_shard_files` (zarr skipped all-fill shards) may lack its file; verify
            reports a missing file only where this is false. Default: never (the array is always written).
        meaning: one line on what the array holds.
    """
    name: str
    dtype: str
    shape: Callable[[Any], Tuple[int, ...]]
    axis: str = "sample"
    map: bool = False
    image_chunks: str = "tile"
    codec: Optional[ValueCodec] = None
    target: bool = False
    check: Optional[Check] = None
    needs: Tuple[str, ...] = ()
    may_be_fill: Callable[[Any, int], bool] = lambda v, j: False
    meaning: str = ""

    def length(self, lay: Any) -> int:
        """Size of the leading axis."""
        return {"sample": lay.num_samples, "image": lay.num_images, "shard": lay.num_shards}[self.axis]

    def chunks(self, lay: Any) -> Tuple[int, ...]:
        """Inner chunk (per-sample arrays) or chunk (the others): one row per map chunk (image kind: image_chunks),
        the whole shard for the small per-sample arrays (tens of bytes each: one chunk keeps the shard index and
        codec overhead negligible), all of image_ids, one flag of shard_done."""
        shape = self.shape(lay)
        if self.axis == "image":
            return (max(1, lay.num_images), *shape)
        if self.axis == "shard":
            return (1, *shape)
        if not self.map:
            return (lay.shard_size, *shape)
        if lay.kind != "image":
            return (1, *shape)
        if self.image_chunks == "slot":
            return (1, 1, *shape[1:])
        tile = IMAGE_MAP_TILE * shape[1] // lay.input_hw[0]  # the same pixels at the map's stride
        return (1, shape[0], tile, tile)

    def shards(self, lay: Any) -> Optional[Tuple[int, ...]]:
        """Shard shape (layout.shard_size rows), or None for an unsharded array."""
        return (lay.shard_size, *self.shape(lay)) if self.axis == "sample" else None

    def compressors(self, kind: str = "view") -> List[Any]:
        """Bytes-to-bytes codecs of every (inner) chunk: compression, then a crc32c checksum.
        Maps of a per-view cache: blosc-zstd + bitshuffle, 13-40% smaller than plain zstd on uint8 heatmaps and
        box maps (measured, data_schema.md). Maps of an image-level cache: blosc-lz4 + byte shuffle, which decodes
        about 7x (heatmap) and 3x (box maps) faster for about 1.6x the bytes: every training view reads its
        window of them, and the cache is small whatever the schedule. The small arrays: plain zstd; shard_done
        (one byte a chunk): none."""
        if self.axis == "shard":
            return [Crc32cCodec()]
        if self.map and kind == "image":
            return [BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.shuffle), Crc32cCodec()]
        if self.map:
            return [BloscCodec(cname="zstd", clevel=ZSTD_LEVEL, shuffle=BloscShuffle.bitshuffle), Crc32cCodec()]
        return [ZstdCodec(level=ZSTD_LEVEL), Crc32cCodec()]

    @property
    def zarr_dtype(self) -> str:
        """The data_type of the array's zarr.json."""
        return "string" if self.dtype == "str" else self.dtype

    @property
    def fill_value(self) -> Any:
        return "" if self.dtype == "str" else 0

    def dimension_names(self, lay: Any) -> Tuple[str, ...]:
        return (self.axis,) + tuple(f"d{i}" for i in range(len(self.shape(lay))))

    def empty(self, n: int, lay: Any) -> np.ndarray:
        """n rows of fill values in the stored dtype (an object array of '' for strings)."""
        if self.dtype == "str":
            return np.full(n, "", dtype=object)
        return np.zeros((n, *self.shape(lay)), self.dtype)


# ---------------------------------------------------------------------------------------------- value checks
def _status(v: Any) -> Iterable[Tuple[np.ndarray, str]]:
    st = v.data["status"]
    return [(st == STATUS_MISSING, "status 0 (never written) in a committed shard"),
            (~np.isin(st, (STATUS_MISSING, STATUS_OK, STATUS_SKIPPED)), "status values other than 0/1/2")]


def _image_id(v: Any) -> Iterable[Tuple[np.ndarray, str]]:
    want = v.data[IMAGE_IDS][np.arange(v.layout.num_samples) // v.layout.variants]
    return [(v.data["image_id"] != want, "image_id disagrees with image_ids[index // variants] (sample written at "
                                         "the wrong place or twice)")]


def _variant(v: Any) -> Iterable[Tuple[np.ndarray, str]]:
    what = "scale index" if v.layout.kind == "image" else "variant"
    index = np.arange(v.layout.num_samples)
    return [(v.data["variant"] != index % v.layout.variants,
             f"{what} disagrees with index % variants (sample written at the wrong place or twice)")]


def _seed(v: Any) -> Iterable[Tuple[np.ndarray, str]]:
    seed = v.manifest.get("seed")
    if not isinstance(seed, int):
        return []
    return [(v.data["seed"] != seed, f"seed differs from the manifest's seed {seed}")]


def _fingerprint(v: Any) -> Iterable[Tuple[np.ndarray, str]]:
    st, nonzero = v.data["status"], v.data["fingerprint"].any(axis=1)
    return [((st == STATUS_OK) & ~nonzero, "all-zero fingerprint for a stored sample"),
            ((st == STATUS_SKIPPED) & nonzero, "fingerprint set for a skipped sample")]


def _num_valid_patches(v: Any) -> Iterable[Tuple[np.ndarray, str]]:
    nvp, slots = v.data["num_valid_patches"].astype(np.int64), v.layout.max_patches
    return [(nvp > slots, f"more than max_patches={slots} valid patches"),
            (nvp != v.data["patch_valid"].astype(bool).sum(axis=1), "disagrees with patch_valid.sum(1)")]


def _patch_valid(v: Any) -> Iterable[Tuple[np.ndarray, str]]:
    return [((v.data["status"] == STATUS_SKIPPED) & v.data["patch_valid"].astype(bool).any(axis=1),
             "valid patches for a skipped sample")]


def _patch_scales(v: Any) -> Iterable[Tuple[np.ndarray, str]]:
    scales, valid = v.data["patch_scales"].astype(np.float64), v.data["patch_valid"].astype(bool)
    finite = np.isfinite(scales).all(axis=1)
    upscale = (v.manifest.get("crop") or {}).get("upscale")
    with np.errstate(invalid="ignore"):
        bad = scales <= 0
        if isinstance(upscale, (int, float)) and np.isfinite(upscale):
            bad |= scales > float(upscale) * (1 + 1e-6)
    return [(~finite, "NaN or inf values"),
            (finite & (valid & bad).any(axis=1), f"valid patch scale outside (0, upscale={upscale}]")]


# ---------------------------------------------------------------------- may a shard be all fill (no file in old caches)
def _all_skipped(v: Any, j: int) -> bool:
    status = v.shard_values("status", j)
    return status is not None and bool((status == STATUS_SKIPPED).all())


def _no_crops(*others: str) -> Callable[[Any, int], bool]:
    """No valid crop in the shard, by the first of `others` whose values are known, else every row skipped."""
    def rule(v: Any, j: int) -> bool:
        for other in others:
            values = v.shard_values(other, j)
            if values is not None:
                return not values.any()
        return _all_skipped(v, j)
    return rule


def _first_variants(v: Any, j: int) -> bool:
    return all(r % v.layout.variants == 0 for r in range(*v.layout.shard_range(j)))


def _image_ids_zero(v: Any, j: int) -> bool:  # COCO id 0 is possible (for one image at most)
    if IMAGE_IDS not in v.data:
        return False
    rows = range(*v.layout.shard_range(j))
    return bool((v.data[IMAGE_IDS][[r // v.layout.variants for r in rows]] == 0).all())


def _always(v: Any, j: int) -> bool:  # a weak teacher's maps can quantise to all zero: no telling from a lost file
    return True


# ---------------------------------------------------------------------------------------------- the table
def _maps(lay: Any) -> Tuple[int, ...]:
    return (lay.num_classes, *lay.input_hw)


TABLE: Tuple[ArraySpec, ...] = (
    ArraySpec("heatmap", "uint8", _maps, map=True, codec=HEATMAP, target=True, may_be_fill=_always,
              meaning="class probabilities at input resolution, quantised"),
    ArraySpec("coarse", "int16", lambda lay: (4, *lay.coarse_hw), map=True, codec=BOXES, target=True,
              may_be_fill=_always,
              meaning="the teacher's raw coarse xywh maps (stride 4), fixed point"),
    ArraySpec("patch_boxes", "float32", lambda lay: (lay.max_patches, 4), target=True,
              may_be_fill=_no_crops("patch_valid", "num_valid_patches"),
              meaning="LSM crops [x, y, w, h] in input pixels (exact integers)"),
    ArraySpec("patch_scales", "float32", lambda lay: (lay.max_patches,), target=True, check=_patch_scales,
              needs=("patch_valid",), may_be_fill=_no_crops("patch_valid", "num_valid_patches"),
              meaning="resize factor crop -> patch"),
    ArraySpec("patch_valid", "bool", lambda lay: (lay.max_patches,), target=True, check=_patch_valid,
              needs=("status",), may_be_fill=_no_crops("num_valid_patches"), meaning="slot holds a crop"),
    ArraySpec("refine", "int16", lambda lay: (lay.max_patches, 4, *lay.refine_hw), map=True, image_chunks="slot",
              codec=BOXES, target=True, may_be_fill=_always,
              meaning="the teacher's raw refine maps on each patch, fixed point"),
    ArraySpec("num_valid_patches", "uint8", lambda lay: (), check=_num_valid_patches, needs=("patch_valid",),
              may_be_fill=_no_crops("patch_valid"), meaning="patch_valid.sum(1)"),
    ArraySpec("image_id", "int64", lambda lay: (), check=_image_id, needs=(IMAGE_IDS,), may_be_fill=_image_ids_zero,
              meaning="COCO image id of the row"),
    ArraySpec("variant", "int32", lambda lay: (), check=_variant, may_be_fill=_first_variants,
              meaning="variant (image kind: row of the image)"),
    ArraySpec("seed", "int64", lambda lay: (), check=_seed, may_be_fill=lambda v, j: v.manifest.get("seed") == 0,
              meaning="the config seed in the augmentation key"),
    ArraySpec("fingerprint", "uint8", lambda lay: (FINGERPRINT_BYTES,), check=_fingerprint, needs=("status",),
              may_be_fill=_all_skipped, meaning="blake2b-16 of the view (image kind: of the image)"),
    ArraySpec("aug_params", "str", lambda lay: (), meaning="JSON of the view's augmentation, or {'skipped': reason}"),
    ArraySpec("status", "uint8", lambda lay: (), check=_status, meaning="0 never written, 1 stored, 2 skipped"),
    ArraySpec(IMAGE_IDS, "int64", lambda lay: (), axis="image", meaning="COCO id of each image position"),
    ArraySpec(SHARD_DONE, "uint8", lambda lay: (), axis="shard", meaning="1 once shard j is completely written"),
)


def specs() -> Tuple[ArraySpec, ...]:
    """Every array of the cache, in creation order (TABLE, read when called)."""
    return TABLE


def sample_specs() -> Tuple[ArraySpec, ...]:
    """The per-sample arrays (leading axis: the rows)."""
    return tuple(s for s in TABLE if s.axis == "sample")


def spec(name: str) -> ArraySpec:
    for s in TABLE:
        if s.name == name:
            return s
    raise KeyError(f"the cache has no array {name!r}")


def names() -> Tuple[str, ...]:
    return tuple(s.name for s in TABLE)


def sample_names() -> Tuple[str, ...]:
    return tuple(s.name for s in sample_specs())


def map_names() -> Tuple[str, ...]:
    """The big per-sample maps (one row per inner chunk)."""
    return tuple(s.name for s in TABLE if s.map)


def row_map_names(targets: bool = False) -> Tuple[str, ...]:
    """The maps over a whole row: the view (view kind) or the row canvas (image kind: chunked in tiles, the row's
    image top-left, zeros beyond); targets=True: only those that are KD targets (the teacher's maps)."""
    return tuple(s.name for s in TABLE if s.map and s.image_chunks == "tile" and (s.target or not targets))


def target_specs() -> Tuple[ArraySpec, ...]:
    """The arrays that are KD targets (KDTargets fields), in table order."""
    return tuple(s for s in TABLE if s.target)


def quantization() -> dict:
    """The manifest's `quantization`: every codec of the table described once (cache/codec.py describe)."""
    out: dict = {}
    for codec in dict.fromkeys(s.codec for s in TABLE if s.codec is not None):
        out.update(codec.describe())
    return out


def quantize_targets(t: Any) -> Any:
    """KDTargets (float, torch, on any device) -> the cache's stored dtypes: each target array through its codec
    (bit for bit the writer's numpy codes, tests/test_codec.py), the others cast to their dtype; masks unchanged.
    A live teacher's targets go through it and dequantize_targets (distill_cfg.online_targets "cached"), so
    online KD trains on exactly what offline KD reads."""
    return replace(t, **{s.name: s.codec.encode(getattr(t, s.name)) if s.codec is not None else
                         cast(getattr(t, s.name), s.dtype) for s in target_specs()})


def dequantize_targets(t: Any) -> Any:
    """KDTargets as stored (codes) -> float32 targets with the codecs' decode, best after batching and moving to
    the device. Float targets (a live teacher's) pass through unchanged."""
    coded = {s.name: s.codec.decode(getattr(t, s.name)) for s in target_specs()
             if s.codec is not None and s.codec.encoded(getattr(t, s.name))}
    return replace(t, **coded) if coded else t
