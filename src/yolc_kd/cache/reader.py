"""Read side of the cache (zarr + numpy only): manifest, image id + variant -> sample index, and one
concurrent gather of every array of a sample. Picklable: the zarr arrays are opened lazily per process."""
from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import zarr

from yolc_kd.cache.arrays import IMAGE_IDS, SHARD_DONE, map_names, names as array_names, sample_names
from yolc_kd.cache.manifest import read_manifest
from yolc_kd.cache.schema import SCHEMA_VERSION, Layout, decode_fingerprint, sample_index
from yolc_kd.cache.shard_windows import ShardWindows
from yolc_kd.errors import UserError


class CacheError(UserError):
    """Cache data that cannot be used: damaged (checksum), not written yet, or skipped at precompute."""


def open_manifest(path: Any) -> Dict[str, Any]:
    """The manifest of the cache at path; UserError when it is no cache or of an unknown schema."""
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise UserError(f"{path} is not a yolc-kd cache (no zarr.json): run `yolc-kd precompute --out {path}` first")
    try:
        group = zarr.open_group(str(path), mode="r", zarr_format=3)
    except Exception as exc:
        raise UserError(f"{path} is not a readable Zarr v3 group ({type(exc).__name__}: {exc})") from None
    manifest = read_manifest(group.attrs)
    if manifest is None:
        raise UserError(f"{path} has no yolc-kd manifest: its creation did not finish; rerun yolc-kd precompute")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise UserError(f"{path} has cache schema version {version}; this yolc-kd reads version {SCHEMA_VERSION}")
    return manifest


class CacheReader:
    """An opened cache for reading: its manifest and layout, image id + variant -> sample index, and reads of a
    sample's arrays (map arrays through shard windows). Picklable; each process opens the arrays again.

    Args:
        path: the cache directory; UserError when it is no cache, of another schema or unfinished, CacheError
            when its image id array is damaged.
    """

    def __init__(self, path: Any):
        self.path = Path(path)
        self.manifest = open_manifest(self.path)
        self.layout = Layout.from_dict(self.manifest["layout"])
        self._arrays: Optional[Dict[str, zarr.Array]] = None
        self._windows: Dict[str, Optional[ShardWindows]] = {}  # map arrays read past zarr (shard_windows.py)
        self._pid: Optional[int] = None
        self._done: set = set()
        arrays = self._open()
        try:
            self.image_ids = np.asarray(arrays[IMAGE_IDS][:], dtype=np.int64)
        except Exception as exc:
            raise CacheError(f"{self.path}: array '{IMAGE_IDS}' is damaged ({exc})") from None
        self._position = {int(x): i for i, x in enumerate(self.image_ids.tolist())}

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"], state["_pid"], state["_windows"] = None, None, {}
        return state

    def _open(self) -> Dict[str, zarr.Array]:
        if self._arrays is None or self._pid != os.getpid():
            try:
                group = zarr.open_group(str(self.path), mode="r", zarr_format=3)
                present = set(group.array_keys())
            except Exception as exc:
                raise CacheError(f"{self.path}: the cache's arrays cannot be opened ({exc})") from None
            missing = [name for name in array_names() if name not in present]
            if missing:
                raise CacheError(f"{self.path} has no array {', '.join(missing)} (cache/arrays.py lists it): it was "
                                 f"made by a yolc-kd without it or damaged; `yolc-kd verify {self.path}` says which, "
                                 f"and a new precompute into another folder makes a complete cache")
            self._arrays = {name: group[name] for name in array_names()}
            self._windows = {name: ShardWindows.open(self._arrays[name]) for name in map_names()}
            self._pid = os.getpid()
        return self._arrays

    # ------------------------------------------------------------------ manifest
    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete", False))

    @property
    def num_variants(self) -> int:
        return self.layout.variants

    @property
    def num_samples(self) -> int:
        return self.layout.num_samples

    def index_of(self, image_id: int, variant: int) -> int:
        """Sample index of (image id, variant): position of the id in `image_ids` * variants + variant."""
        try:
            pos = self._position[int(image_id)]
        except (KeyError, TypeError, ValueError):
            raise KeyError(f"image id {image_id!r} is not in the cache {self.path}") from None
        return sample_index(pos, int(variant), self.layout.variants)

    def has_image(self, image_id: Any) -> bool:
        try:
            return int(image_id) in self._position
        except (TypeError, ValueError):
            return False

    def shard_done(self, j: int) -> bool:
        if self.complete or j in self._done:
            return True
        try:
            ok = int(self._open()[SHARD_DONE][j]) == 1
        except Exception:
            ok = False
        if ok:
            self._done.add(j)
        return ok

    # ------------------------------------------------------------------ samples
    def read_sample(self, index: int, names: Optional[List[str]] = None) -> Dict[str, np.ndarray]:
        """Every per-sample array (or `names`) at row `index`, fetched concurrently. Raises CacheError when
        the shard is not committed or a chunk fails its crc32c check (naming the array)."""
        return self.read_parts(index, {name: () for name in (names or sample_names())})

    def read_parts(self, index: int, parts: Mapping[str, Tuple[Any, ...]]) -> Dict[str, np.ndarray]:
        """Part of row `index` of several arrays, fetched concurrently: {name: selection after the row axis}
        (e.g. a window of a map, `()` for the whole row); only the chunks a selection covers are read.
        Raises CacheError as read_sample."""
        if not 0 <= index < self.layout.num_samples:
            raise IndexError(f"sample {index} outside 0..{self.layout.num_samples - 1}")
        j = index // self.layout.shard_size
        if not self.shard_done(j):
            raise CacheError(f"sample {index} of {self.path} is in shard {j}, which is not written yet "
                             f"(rerun yolc-kd precompute)")
        names = list(parts)
        arrays = self._open()
        results = _gather([arrays[n] for n in names], [(index, *parts[n]) for n in names])
        out: Dict[str, np.ndarray] = {}
        for name, res in zip(names, results):
            if isinstance(res, BaseException):
                raise CacheError(f"{self.path}: array '{name}' is damaged at sample {index} (shard {j}): "
                                 f"{type(res).__name__}: {str(res).splitlines()[0] if str(res) else ''}") from None
            out[name] = np.asarray(res)
        return out

    def read_requests(self, requests: List[Tuple[str, Tuple[Any, ...]]]) -> List[np.ndarray]:
        """[(array name, full selection incl. the row axis)] -> their values: the map arrays straight from their
        shard files (ShardWindows), the others in one concurrent zarr gather (the rows' shards must be committed:
        check with shard_done). Raises CacheError naming the array."""
        if not requests:
            return []
        arrays = self._open()
        direct = [self._windows.get(name) for name, _ in requests]
        via_zarr = [k for k, w in enumerate(direct) if w is None]
        results: List[Any] = [None] * len(requests)
        if via_zarr:
            for k, res in zip(via_zarr, _gather([arrays[requests[k][0]] for k in via_zarr],
                                                [requests[k][1] for k in via_zarr])):
                results[k] = res
        for k, windows in enumerate(direct):
            if windows is not None:
                results[k] = _safe(lambda w=windows, sel=requests[k][1]: w.read(sel))
        for (name, sel), res in zip(requests, results):
            if isinstance(res, BaseException):
                raise CacheError(f"{self.path}: array '{name}' is damaged at {sel[0]}: {type(res).__name__}: "
                                 f"{str(res).splitlines()[0] if str(res) else ''}") from None
        return [np.asarray(r) for r in results]

    def fingerprint(self, sample: Dict[str, np.ndarray]) -> str:
        return decode_fingerprint(sample["fingerprint"])


def _gather(arrays: List[zarr.Array], selections: List[Tuple[Any, ...]]) -> List[Any]:
    """Read one selection of every array in one concurrent gather on zarr's event loop (exceptions returned)."""
    try:
        from zarr.core.sync import sync
        asyncs = [a._async_array for a in arrays]
    except (ImportError, AttributeError):  # another zarr 3 layout: read one by one
        return [_safe(lambda a=a, sel=sel: a[sel]) for a, sel in zip(arrays, selections)]

    async def run() -> List[Any]:
        return await asyncio.gather(*(a.getitem(sel) for a, sel in zip(asyncs, selections)),
                                    return_exceptions=True)

    return sync(run())


def _safe(fn) -> Any:
    try:
        return fn()
    except Exception as exc:
        return exc
