"""Integrity check of a cache: manifest, array shapes, committed shards; with deep=True every chunk is
read back (crc32c). Returns the faults found, one line each (empty: the cache is sound)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, List

import zarr

from yolc_kd.cache.reader import open_manifest
from yolc_kd.cache.schema import ALL_ARRAYS, IMAGE_IDS, SAMPLE_ARRAYS, SHARD_DONE, Layout
from yolc_kd.errors import UserError


def verify_cache(path: Any, deep: bool = False) -> List[str]:
    path = Path(path)
    try:
        manifest = open_manifest(path)
        layout = Layout.from_dict(manifest["layout"])
        group = zarr.open_group(str(path), mode="r", zarr_format=3)
    except (UserError, KeyError, TypeError, ValueError) as exc:
        return [f"{path}: {exc}"]
    faults: List[str] = []
    if not manifest.get("complete"):
        faults.append(f"{path}: incomplete (the precompute run did not finish)")
    shapes = layout.sample_shapes()
    expected = {name: (layout.num_samples, *shapes[name]) for name in SAMPLE_ARRAYS}
    expected.update({IMAGE_IDS: (layout.num_images,), SHARD_DONE: (layout.num_shards,)})
    arrays = {}
    for name in ALL_ARRAYS:
        try:
            arrays[name] = group[name]
        except KeyError:
            faults.append(f"array '{name}' is missing")
            continue
        if tuple(arrays[name].shape) != expected[name]:
            faults.append(f"array '{name}' has shape {tuple(arrays[name].shape)}, expected {expected[name]}")
    if SHARD_DONE in arrays:
        for j in range(layout.num_shards):
            try:
                if int(arrays[SHARD_DONE][j]) != 1:
                    faults.append(f"shard {j} is not committed (shard_done[{j}] = 0)")
            except Exception as exc:
                faults.append(f"array '{SHARD_DONE}' is damaged at shard {j}: {_first_line(exc)}")
    if deep:
        for name, arr in arrays.items():
            if name == SHARD_DONE or tuple(arr.shape) != expected[name]:
                continue
            step = layout.shard_size if name in SAMPLE_ARRAYS else max(1, arr.shape[0])
            for a in range(0, arr.shape[0], step):
                try:
                    arr[a:a + step]
                except Exception as exc:
                    where = f"samples {a}..{min(a + step, arr.shape[0]) - 1} (shard {a // step})" \
                        if name in SAMPLE_ARRAYS else "its only chunk"
                    faults.append(f"array '{name}' is damaged in {where}: {_first_line(exc)}")
    return faults


def _first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
