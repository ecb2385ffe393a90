"""Integrity check of a soft-label cache (data_schema.md), with zarr + numpy only (no torch, no models).

`check_cache(path, deep)` returns the faults it finds, one line each, every line naming the array (or the
manifest) and the samples (rows) concerned (an empty list means the cache is sound), and notes on what it could
not check. Both kinds of cache (view: K augmented views per image; image: the whole
image at K = len(scales) scales) are checked for

* the manifest: present and parseable, a known schema version and kind, its fields consistent with each other
  (kind / scales / variants / shard size / classes / patch canvas vs the layout; view kind also input size
  and crop slots = distill.max_patches_per_img; image kind: variants = len(scales), scales positive and
  increasing, a row canvas of whole 256-pixel map tiles at one map stride) and, once complete, its counts and
  its `skipped` list consistent with the `status` array;
* the arrays' metadata: present, dtype, shape, shard and inner-chunk shapes, a crc32c in the inner-chunk and
  the shard-index codecs;
* the files: one per committed shard and array (`shard_done` markers vs files), no empty files (zarr reads an
  empty shard file as all-zero without complaint), no stray or `*.partial` files;
* checksums: the small per-sample arrays, `image_ids` and `shard_done` are read whole (every chunk's crc32c);
  the shard index of every map file (`heatmap`, `coarse`, `refine`) is checked (crc32c, offsets inside the
  file); with deep=True every map chunk is read and decoded as well;
* values: `status` in {1, 2} in committed shards, `image_id`/`variant`/`seed` agree with
  index = image_index * K + variant (every sample written exactly once, at its place), unique `image_ids`,
  fingerprints set exactly for stored samples, crop boxes integral and inside the row's image, scales in
  (0, upscale], `num_valid_patches == patch_valid.sum(1)` <= crop slots; with deep=True also zero maps for
  skipped samples and zero `refine` in invalid slots;
* view kind: `aug_params` JSON whose key is (seed, image_id, variant); crop boxes inside the view;
* image kind: `aug_params` an image row of its place (kind 'image', scale = layout.scales[variant // mirrors],
  mirrored for odd variants of a mirrored layout, scaled_hw = round(ori_hw * scale) inside the row canvas,
  ori_hw = the annotation file's height and width when the verifier has that file), the rows of one image
  agreeing on ori_hw and fingerprint; crop boxes inside the scaled image; with deep=True the heatmap zero outside the scaled image and the coarse maps zero
  beyond the teacher's input (the scaled image padded to 32).

A missing shard file of a committed shard is a fault in a cache whose manifest has `all_shard_files: true`
(its writer stored all-zero shards too), and so is an inner map chunk absent from a committed shard's index.
In an older cache (no such flag: zarr skipped all-zero shards) a missing file is only a fault where the data
it would hold cannot all be the fill value: never for the maps (a weak teacher's maps can quantise to zero),
nor e.g. `seed` of a cache made with seed 0; `status` and `aug_params` always (each array's rule is its
`may_be_fill` in the table, cache/arrays.py).

The arrays, their dtypes, shapes, chunks, codecs and value checks are those of the table (cache/arrays.py). The
checks live in verify_manifest.py (the manifest), verify_structure.py (metadata, files, checksums, deep map reads)
and verify_values.py (the table's value checks, the rows' augmentation and crops, the counts).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple

import numpy as np
import zarr

from yolc_kd.cache.schema import Layout
from yolc_kd.cache.verify_manifest import ManifestChecks, annotation_sizes
from yolc_kd.cache.verify_structure import StructureChecks
from yolc_kd.cache.verify_values import ValueChecks, format_ranges
from yolc_kd.progress import progress_bar

__all__ = ["annotation_sizes", "check_cache", "format_ranges"]


def check_cache(path: Any, deep: bool = False, progress: bool = False,
                annotations: Any = None) -> Tuple[List[str], List[str]]:
    """(faults, notes) of the cache at `path`: the faults, one line each (empty: sound), and lines saying what
    was not checked. deep=True decodes every map chunk too. An image-kind cache's rows are checked against the image sizes of `annotations` (a COCO file), or, when
    None, of the manifest's annotation file if it is still the file the cache was made from (same sha256)."""
    v = _Verifier(Path(path), deep, progress, annotations)
    return v.run(), v.notes


class _Verifier(ManifestChecks, StructureChecks, ValueChecks):
    """One check_cache run over the cache at `path`: manifest (verify_manifest.py), then structure
    (verify_structure.py), then values (verify_values.py); faults and notes collected in order.

    Args:
        path: the cache folder.
        deep: decode every map chunk too.
        progress: show a progress bar.
        annotations: a COCO file whose image sizes an image-kind cache's rows must match (check_cache).
    """

    def __init__(self, path: Path, deep: bool, progress: bool, annotations: Any = None):
        self.path, self.deep, self.progress = path, deep, progress
        self.annotations = Path(annotations) if annotations is not None else None
        self.faults: List[str] = []
        self.notes: List[str] = []                     # what was not checked, and why
        self._deep_hw: Optional[np.ndarray] = None     # image kind, deep: content_hw of the rows
        self.manifest: Dict[str, Any] = {}
        self.layout: Optional[Layout] = None
        self.usable: Dict[str, zarr.Array] = {}        # arrays whose metadata is as the schema says
        self.missing_files: Dict[str, Set[int]] = {}   # array -> shards without a file (or an empty one)
        self.empty_files: Dict[str, Set[int]] = {}     # array -> shards with an empty file (reported)
        self.data: Dict[str, np.ndarray] = {}          # decoded small arrays (+ image_ids, shard_done)
        self.ok_rows: Dict[str, np.ndarray] = {}       # rows of data[name] that decoded (bool per sample)
        self.committed: Optional[np.ndarray] = None    # per shard: shard_done == 1 (decoded)
        self.exact = False                             # manifest all_shard_files: every committed shard has files

    # ------------------------------------------------------------------ helpers
    def fault(self, what: str) -> None:
        self.faults.append(what)

    def sample_fault(self, name: str, rows: Iterable[int], what: str) -> None:
        rows = sorted(set(int(r) for r in rows))
        if not rows:
            return
        lay = self.layout
        shards = sorted({r // lay.shard_size for r in rows})
        where = f"sample{'s' if len(rows) > 1 else ''} {format_ranges(rows)}"
        where += f" (shard{'s' if len(shards) > 1 else ''} {format_ranges(shards, 3)})"
        self.fault(f"array '{name}', {where}: {what}")

    def _bar(self, total: int, desc: str):
        return progress_bar(total=total, desc=desc, unit="shard", disable=not self.progress, leave=False)

    # ------------------------------------------------------------------ run
    def run(self) -> List[str]:
        if not self._check_manifest():
            return self.faults
        if self.layout.kind == "image":
            self._load_annotation_sizes()
        self._check_metadata()
        self._check_files()
        self._read_small()
        self._check_map_indexes()
        self._check_missing_files()
        self._check_values()
        self._check_counts()
        return self.faults
