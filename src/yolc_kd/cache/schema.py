"""On-disk schema of the teacher soft-label cache (Zarr v3): array names, dtypes, codecs, quantisation,
sample index. Plain numpy + zarr (no torch): the format is specified in data_schema.md."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec, ZstdCodec

SCHEMA_VERSION = 2                      # 2: box maps as int16 fixed point (1: float16)
MANIFEST_KEY = "yolc_kd_cache"          # root group attribute holding the manifest
ALL_SHARD_FILES = "all_shard_files"     # manifest flag: every committed shard has a file in every array
WRITE_CONFIG = {"write_empty_chunks": True}  # zarr runtime config of every write: all-fill chunks are stored too
DEFAULT_SHARD_SIZE = 16                 # samples per shard (one shard file per array)
ZSTD_LEVEL = 3

HEATMAP_LEVELS = 255                    # q = floor(255 p + 1/2), p = q / 255
HEATMAP_ZERO_BELOW = 1.0 / 255          # p < 1/255 is stored as 0 (sparse background compresses to nothing)
HEATMAP_MAX_ERROR = 1.0 / 510           # |p - q/255| for p >= 1/255 (below: p itself, < 1/255)
BOX_STEP = 2.0 ** -6                    # box maps: x = q * 2^-6 grid cells (1/16 input pixel at stride 4), q int16
BOX_Q_MAX = 32767                       # |q| <= 32767: |x| up to 511.98 cells (2047 input pixels at stride 4)
BOX_MAX = BOX_Q_MAX * BOX_STEP
BOX_MAX_ERROR = BOX_STEP / 2            # |x - q * step| inside +-BOX_MAX (outside, x is clipped to it)

STATUS_MISSING, STATUS_OK, STATUS_SKIPPED = 0, 1, 2
FINGERPRINT_BYTES = 16

# per-sample arrays: name -> numpy dtype ('str' = zarr variable-length UTF-8); all have a leading sample axis
SAMPLE_ARRAYS: Dict[str, str] = {
    "heatmap": "uint8", "coarse": "int16", "patch_boxes": "float32", "patch_scales": "float32",
    "patch_valid": "bool", "refine": "int16", "num_valid_patches": "uint8", "image_id": "int64",
    "variant": "int32", "seed": "int64", "fingerprint": "uint8", "aug_params": "str", "status": "uint8",
}
IMAGE_IDS, SHARD_DONE = "image_ids", "shard_done"
ALL_ARRAYS: Tuple[str, ...] = tuple(SAMPLE_ARRAYS) + (IMAGE_IDS, SHARD_DONE)


# the two kinds of cache (data_schema.md): "view" holds the teacher's targets on each augmented view the student
# will see (row = image x variant, exact: bit-identical to online KD); "image" holds the teacher's targets on each
# whole training image at a few scales (row = image x scale), moved into every fresh view at training time
CACHE_KINDS = ("view", "image")
IMAGE_MAP_TILE = 256  # image kind: maps are chunked in 256x256-pixel tiles, so a view reads only what it covers


@dataclass(frozen=True)
class Layout:
    """Shapes of the cache: row (sample) index = image_index * variants + variant, shard j = rows [jS, (j+1)S).

    Args:
        num_images, variants: images, and rows per image (view kind: cached views; image kind: scales).
        shard_size: rows per shard.
        num_classes: heatmap channels.
        input_hw: (H, W) of the heatmap: the network input (view kind) or the largest scaled image, padded to a
            multiple of 32 (image kind: each row holds its image top-left, zeros beyond).
        coarse_hw: (h, w) of the stride-4 coarse maps.
        max_patches: crop slots per row (view kind: the view's KD crops; image kind: every crop LSM found).
        refine_hw: (ph/4, pw/4) of the refine maps on the patch canvas.
        kind: "view" or "image" (CACHE_KINDS).
        scales: image kind: the image scales of the rows of an image.
        mirrored: image kind: every scale also as the mirrored image (a mirrored view takes its targets from it:
            the teacher is not mirror-symmetric). Variant v is scales[v // mirrors], mirrored when v is odd.
    """
    num_images: int
    variants: int
    shard_size: int
    num_classes: int
    input_hw: Tuple[int, int]
    coarse_hw: Tuple[int, int]
    max_patches: int
    refine_hw: Tuple[int, int]
    kind: str = "view"
    scales: Tuple[float, ...] = ()
    mirrored: bool = False

    @property
    def mirrors(self) -> int:
        """Rows per image and scale (image kind): 2 with mirrored rows, else 1."""
        return 2 if self.mirrored else 1

    def row_scale(self, variant: int) -> float:
        """Image kind: the image scale of an image's row `variant`."""
        return float(self.scales[int(variant) // self.mirrors])

    def row_mirrored(self, variant: int) -> bool:
        """Image kind: whether an image's row `variant` holds the mirrored image."""
        return self.mirrored and int(variant) % 2 == 1

    def row_variant(self, scale_index: int, mirrored: bool) -> int:
        """Image kind: the row of an image at scales[scale_index], mirrored if asked and the cache has those
        (otherwise the plain one)."""
        return int(scale_index) * self.mirrors + int(bool(mirrored) and self.mirrored)

    def image_rows(self) -> Tuple[Tuple[float, bool], ...]:
        """Image kind: (scale, mirrored) of each row of an image, in variant order."""
        return tuple((self.row_scale(v), self.row_mirrored(v)) for v in range(self.variants))

    @property
    def num_samples(self) -> int:
        return self.num_images * self.variants

    @property
    def num_shards(self) -> int:
        return max(1, math.ceil(self.num_samples / self.shard_size))

    def sample_shapes(self) -> Dict[str, Tuple[int, ...]]:
        """Shape of one sample of every per-sample array (the array is (num_samples, *shape))."""
        k = self.max_patches
        return dict(heatmap=(self.num_classes, *self.input_hw), coarse=(4, *self.coarse_hw), patch_boxes=(k, 4),
                    patch_scales=(k,), patch_valid=(k,), refine=(k, 4, *self.refine_hw), num_valid_patches=(),
                    image_id=(), variant=(), seed=(), fingerprint=(FINGERPRINT_BYTES,), aug_params=(), status=())

    def shard_range(self, j: int) -> Tuple[int, int]:
        return j * self.shard_size, min((j + 1) * self.shard_size, self.num_samples)

    def to_dict(self) -> Dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Layout":
        def value(k: str, v: Any) -> Any:
            if k == "kind":
                return str(v)
            if k == "mirrored":
                return bool(v)
            if k == "scales":
                return tuple(float(x) for x in v)
            return tuple(int(x) for x in v) if isinstance(v, list) else int(v)
        return cls(**{k: value(k, v) for k, v in d.items()})

    def chunk_shape(self, name: str) -> Tuple[int, ...]:
        """Inner chunk of a per-sample array: one row per map chunk (image kind: 256x256-pixel tiles of a row,
        refine one crop a chunk), the whole shard for the small per-sample arrays (tens of bytes each; one chunk
        keeps the shard index and codec overhead negligible)."""
        shape = self.sample_shapes()[name]
        if name not in MAP_ARRAYS:
            return (self.shard_size, *shape)
        if self.kind != "image":
            return (1, *shape)
        if name == "refine":
            return (1, 1, *shape[1:])
        tile = IMAGE_MAP_TILE * shape[1] // self.input_hw[0]  # the same pixels at the map's stride
        return (1, shape[0], tile, tile)


MAP_ARRAYS = ("heatmap", "coarse", "refine")  # big per-sample maps (Layout.chunk_shape)
PAD_DIVISOR = 32  # an image-kind row's teacher input: its scaled image padded to multiples of this


def scaled_hw(hw: Sequence[int], scale: float) -> Tuple[int, int]:
    """(h, w) of an image resized by scale (at least one pixel, Python's round): an image-kind row's frame."""
    return max(1, round(int(hw[0]) * scale)), max(1, round(int(hw[1]) * scale))


def padded(n: int) -> int:
    """n rounded up to a multiple of PAD_DIVISOR (a side of an image-kind row's teacher input)."""
    return -(-int(n) // PAD_DIVISOR) * PAD_DIVISOR


def sample_index(image_index: int, variant: int, variants: int) -> int:
    """The cache row of (image at position image_index in the COCO file, variant)."""
    if not 0 <= variant < variants:
        raise IndexError(f"variant {variant} outside 0..{variants - 1}")
    return image_index * variants + variant


def compressors(name: str, kind: str = "view") -> List[Any]:
    """Bytes-to-bytes codecs of every (inner) chunk: compression, then a crc32c checksum.
    Maps of a per-view cache: blosc-zstd + bitshuffle, 13-40% smaller than plain zstd on uint8 heatmaps and box
    maps (measured, data_schema.md). Maps of an image-level cache: blosc-lz4 + byte shuffle, which decodes about
    7x (heatmap) and 3x (box maps) faster for about 1.6x the bytes: every training view reads its window of
    them, and the cache is small whatever the schedule. The small arrays: plain zstd."""
    if name in MAP_ARRAYS and kind == "image":
        return [BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.shuffle), Crc32cCodec()]
    if name in MAP_ARRAYS:
        return [BloscCodec(cname="zstd", clevel=ZSTD_LEVEL, shuffle=BloscShuffle.bitshuffle), Crc32cCodec()]
    return [ZstdCodec(level=ZSTD_LEVEL), Crc32cCodec()]


def quantize_heatmap(p: np.ndarray) -> np.ndarray:
    """Probabilities -> uint8: q = floor(255 p + 0.5) clipped to 0..255, and q = 0 where p < 1/255."""
    p = np.nan_to_num(np.asarray(p, dtype=np.float32), nan=0.0)
    q = np.clip(np.floor(p.astype(np.float64) * HEATMAP_LEVELS + 0.5), 0, HEATMAP_LEVELS).astype(np.uint8)
    q[p < HEATMAP_ZERO_BELOW] = 0
    return q


def dequantize_heatmap(q: np.ndarray) -> np.ndarray:
    """uint8 -> float32 probabilities p = q / 255."""
    return np.asarray(q, dtype=np.float32) / np.float32(HEATMAP_LEVELS)


def heatmap_tolerance(p: np.ndarray) -> np.ndarray:
    """Worst-case |p - dequantize(quantize(p))| for each p (1/510, or p itself where it is zeroed)."""
    p = np.asarray(p, dtype=np.float64)
    return np.where(p < HEATMAP_ZERO_BELOW, np.maximum(p, 0.0), HEATMAP_MAX_ERROR) + 1e-7


def quantize_boxes(x: np.ndarray) -> np.ndarray:
    """Raw box maps (grid cells) -> int16 fixed point q = round(x / 2^-6), clipped to +-32767; NaN -> 0.
    Fixed point compresses 2.6x better than float16 on a teacher's maps (the low float16 bits are noise)."""
    x = np.nan_to_num(np.asarray(x, dtype=np.float32), nan=0.0, posinf=BOX_MAX, neginf=-BOX_MAX)
    return np.clip(np.rint(x.astype(np.float64) / BOX_STEP), -BOX_Q_MAX, BOX_Q_MAX).astype(np.int16)


def dequantize_boxes(q: np.ndarray) -> np.ndarray:
    """int16 -> float32 grid cells x = q * 2^-6 (exact in float32)."""
    return np.asarray(q, dtype=np.float32) * np.float32(BOX_STEP)


def box_tolerance(x: np.ndarray) -> np.ndarray:
    """Worst-case |x - dequantize_boxes(quantize_boxes(x))| for each x (half a step; more where x is clipped)."""
    a = np.abs(np.asarray(x, dtype=np.float64))
    return np.where(a <= BOX_MAX, BOX_MAX_ERROR, a - BOX_MAX + BOX_MAX_ERROR) + 1e-7


def encode_fingerprint(hex_digest: str) -> np.ndarray:
    raw = bytes.fromhex(hex_digest)
    if len(raw) != FINGERPRINT_BYTES:
        raise ValueError(f"fingerprint must be {FINGERPRINT_BYTES} bytes, got {len(raw)}")
    return np.frombuffer(raw, dtype=np.uint8).copy()


def decode_fingerprint(raw: np.ndarray) -> str:
    return np.asarray(raw, dtype=np.uint8).tobytes().hex()
