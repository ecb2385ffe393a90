"""On-disk schema of the teacher soft-label cache (Zarr v3): version, manifest key, layout (shapes of both kinds)
and sample index; the arrays themselves are the table in cache/arrays.py, their value codecs cache/codec.py.
Plain numpy + zarr (no torch): the format is specified in data_schema.md."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Mapping, Tuple

import numpy as np

from yolc_kd.cache.arrays import FINGERPRINT_BYTES, sample_specs

SCHEMA_VERSION = 2                      # 2: box maps as int16 fixed point (1: float16)
MANIFEST_KEY = "yolc_kd_cache"          # root group attribute holding the manifest
ALL_SHARD_FILES = "all_shard_files"     # manifest flag: every committed shard has a file in every array
WRITE_CONFIG = {"write_empty_chunks": True}  # zarr runtime config of every write: all-fill chunks are stored too
DEFAULT_SHARD_SIZE = 16                 # samples per shard (one shard file per array)

# the two kinds of cache (data_schema.md): "view" holds the teacher's targets on each augmented view the student
# will see (row = image x variant, exact: bit-identical to online KD); "image" holds the teacher's targets on each
# whole training image at a few scales (row = image x scale), moved into every fresh view at training time
CACHE_KINDS = ("view", "image")


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
        """Shape of one sample of every per-sample array (the array is (num_samples, *shape)): the table's
        shape rules (cache/arrays.py)."""
        return {s.name: s.shape(self) for s in sample_specs()}

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


PAD_DIVISOR = 32  # an image-kind row's teacher input: its scaled image padded to multiples of this


def padded(n: int) -> int:
    """n rounded up to a multiple of PAD_DIVISOR (a side of an image-kind row's teacher input)."""
    return -(-int(n) // PAD_DIVISOR) * PAD_DIVISOR


def sample_index(image_index: int, variant: int, variants: int) -> int:
    """The cache row of (image at position image_index in the COCO file, variant)."""
    if not 0 <= variant < variants:
        raise IndexError(f"variant {variant} outside 0..{variants - 1}")
    return image_index * variants + variant


def encode_fingerprint(hex_digest: str) -> np.ndarray:
    raw = bytes.fromhex(hex_digest)
    if len(raw) != FINGERPRINT_BYTES:
        raise ValueError(f"fingerprint must be {FINGERPRINT_BYTES} bytes, got {len(raw)}")
    return np.frombuffer(raw, dtype=np.uint8).copy()


def decode_fingerprint(raw: np.ndarray) -> str:
    return np.asarray(raw, dtype=np.uint8).tobytes().hex()
