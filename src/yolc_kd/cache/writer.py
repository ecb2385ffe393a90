"""Writable side of the cache: create or reopen the Zarr v3 store, write whole shards from a background
thread, commit each shard by its done marker (written last), and finalise the manifest.
Crash-safety protocol (data_schema.md): a shard counts only once shard_done[j] == 1."""
from __future__ import annotations

import json
import os
import queue
import threading
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set

import numpy as np
import zarr

from yolc_kd.cache.arrays import (IMAGE_IDS, SHARD_DONE, STATUS_OK, STATUS_SKIPPED, names, sample_names, sample_specs,
                                  specs)
from yolc_kd.cache.manifest import RESUME_FIELDS, diff_fields, read_manifest, with_kind
from yolc_kd.cache.schema import ALL_SHARD_FILES, MANIFEST_KEY, WRITE_CONFIG, Layout
from yolc_kd.diskio import write_errors
from yolc_kd.errors import UserError


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # every write stores its chunk, all-fill ones too (WRITE_CONFIG)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _entries(path: Path) -> List[str]:
    return [p.name for p in path.iterdir()] if path.is_dir() else []


def remove_partials(path: Path) -> int:
    """Delete temporary files a killed zarr write left behind (`*.partial`); returns how many."""
    n = 0
    for p in Path(path).rglob("*.partial"):
        p.unlink(missing_ok=True)
        n += 1
    return n


def open_existing(path: Path) -> Optional[tuple]:
    """(group, manifest) of a cache whose creation finished, or None."""
    if not (path / "zarr.json").is_file():
        return None
    try:
        group = zarr.open_group(str(path), mode="r+", zarr_format=3)
    except Exception:  # a half-created store: its root metadata may be missing or not a group
        return None
    manifest = read_manifest(group.attrs)
    return (group, manifest) if manifest is not None else None


class CacheStore:
    """An opened cache for writing. `prepare` (rank 0) creates or checks it; `attach` (other ranks) checks it.

    Args:
        path: the cache directory.
        group: its opened Zarr v3 root group.
        manifest: its manifest (the layout is read from manifest["layout"]).
    """

    def __init__(self, path: Path, group: zarr.Group, manifest: Dict[str, Any]):
        self.path, self.group, self.manifest = Path(path), group, manifest
        self.layout = Layout.from_dict(manifest["layout"])
        self.arrays = {name: group[name].with_config(WRITE_CONFIG) for name in names()}

    @classmethod
    def prepare(cls, path: Any, manifest: Mapping[str, Any], image_ids: Sequence[int]) -> "CacheStore":
        path = Path(path)
        found = open_existing(path)
        if found is not None:
            group, old = found
            _refuse_if_different(path, old, manifest)
            remove_partials(path)
            return cls(path, group, old)
        stray = [e for e in _entries(path) if e not in names() + ("zarr.json",) and not e.endswith(".partial")]
        if stray:
            raise UserError(f"--out {path} exists and is not a yolc-kd cache (it holds {stray[0]!r}): "
                            f"choose a new or empty folder")
        manifest = {**manifest, ALL_SHARD_FILES: True}  # at creation only: a resumed older cache keeps its manifest
        with write_errors(path):  # a store cut short has no manifest yet: a rerun creates it afresh
            group = _create(path, manifest, image_ids)
        return cls(path, group, manifest)

    @classmethod
    def attach(cls, path: Any, manifest: Mapping[str, Any]) -> "CacheStore":
        path = Path(path)
        found = open_existing(path)
        if found is None:
            raise UserError(f"{path} is not a yolc-kd cache (rank 0 did not create it)")
        _refuse_if_different(path, found[1], manifest)
        return cls(path, found[0], found[1])

    # ------------------------------------------------------------------ shards
    def done_shards(self) -> Set[int]:
        arr = self.arrays[SHARD_DONE]
        try:
            flags = np.asarray(arr[:])
        except Exception:  # a damaged marker: look at them one by one
            flags = np.zeros(arr.shape, np.uint8)
            for j in range(arr.shape[0]):
                try:
                    flags[j] = arr[j]
                except Exception:
                    flags[j] = 0
        return set(np.flatnonzero(flags == 1).tolist())

    def write_shard(self, j: int, block: Mapping[str, np.ndarray]) -> None:
        """Write shard j of every array in one call each, flush them to disk, then set its done marker."""
        a, b = self.layout.shard_range(j)
        # a failed write (a full disk) is one line; zarr removes its temporary file, and the shard stays
        # uncommitted (no marker), so a rerun writes it again
        for name in sample_names():
            with write_errors(self._chunk_file(name, j)):
                self.arrays[name][a:b] = block[name]
        for name in sample_names():
            with write_errors(self._chunk_file(name, j)):
                _fsync(self._chunk_file(name, j))
        marker = self._chunk_file(SHARD_DONE, j)
        with write_errors(marker):
            self.arrays[SHARD_DONE][j] = 1
            _fsync(marker)
            _fsync(marker.parent)  # the marker's directory entry

    def _chunk_file(self, name: str, j: int) -> Path:
        arr = self.arrays[name]
        return self.path / name / arr.metadata.encode_chunk_key((j,) + (0,) * (arr.ndim - 1))

    # ------------------------------------------------------------------ manifest
    def finalize(self, image_info: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
        """After every shard is done: counts and skipped images into the manifest, `complete` set."""
        lay = self.layout
        missing = lay.num_shards - len(self.done_shards())
        if missing:
            raise UserError(f"{missing} of {lay.num_shards} shards of {self.path} are not written: "
                            f"rerun the same command to finish them")
        status = np.asarray(self.arrays["status"][:])
        skipped_idx = np.flatnonzero(status == STATUS_SKIPPED)
        params = self.arrays["aug_params"]
        by_image: Dict[int, Dict[str, Any]] = {}
        for idx in skipped_idx.tolist():
            i, v = divmod(idx, lay.variants)
            entry = by_image.setdefault(i, dict(image_id=int(self.arrays[IMAGE_IDS][i]),
                                                file_name=str(image_info[i].get("file_name", "")),
                                                variants=[], reason=""))
            entry["variants"].append(v)
            if not entry["reason"]:
                entry["reason"] = str(json.loads(str(params[idx])).get("skipped", ""))
        manifest = dict(self.manifest)
        manifest.update(complete=True, skipped=list(by_image.values()), counts=dict(
            samples=lay.num_samples, samples_written=int((status == STATUS_OK).sum()),
            samples_skipped=int(len(skipped_idx)), images=lay.num_images, images_skipped=len(by_image),
            shards=lay.num_shards, bytes=_folder_bytes(self.path)))
        with write_errors(self.path / "zarr.json"):  # zarr replaces the file whole: a failure keeps the old one
            self.group.update_attributes({MANIFEST_KEY: manifest})
            _fsync(self.path / "zarr.json")
        self.manifest = manifest
        return manifest


def _refuse_if_different(path: Path, old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
    diffs = diff_fields(with_kind(old), with_kind(new), RESUME_FIELDS)
    if diffs:
        shown = "; ".join(diffs[:8]) + (f"; +{len(diffs) - 8} more" if len(diffs) > 8 else "")
        raise UserError(f"{path} was made with different settings: {shown} "
                        f"(use another --out, or delete it to start over)")


def _create(path: Path, manifest: Dict[str, Any], image_ids: Sequence[int]) -> zarr.Group:
    """A new store with every array of the table (cache/arrays.py), image_ids filled, the manifest last."""
    lay = Layout.from_dict(manifest["layout"])
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    for s in specs():
        shape = s.shape(lay)
        group.create_array(s.name, shape=(s.length(lay), *shape), chunks=s.chunks(lay), shards=s.shards(lay),
                           dtype=str if s.dtype == "str" else s.dtype, compressors=s.compressors(lay.kind),
                           fill_value=s.fill_value, config=WRITE_CONFIG, dimension_names=s.dimension_names(lay))
    group[IMAGE_IDS].with_config(WRITE_CONFIG)[:] = np.asarray(image_ids, dtype=np.int64)
    group.update_attributes({MANIFEST_KEY: manifest})  # last: a store without a manifest is recreated
    return group


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


class ShardBuffer:
    """One shard's rows in memory (preallocated), filled sample by sample, written in one call per array.

    Args:
        layout: the cache's layout (shard size, array shapes).
        j: the shard's index.
    """

    def __init__(self, layout: Layout, j: int):
        self.j = j
        self.start, stop = layout.shard_range(j)
        n = stop - self.start
        self.data: Dict[str, np.ndarray] = {s.name: s.empty(n, layout) for s in sample_specs()}
        self.filled = np.zeros(n, dtype=bool)

    def put(self, index: int, row: Mapping[str, Any]) -> None:
        r = index - self.start
        for name, value in row.items():
            self.data[name][r] = value
        self.filled[r] = True

    @property
    def full(self) -> bool:
        return bool(self.filled.all())


class BackgroundWriter:
    """Writes shard buffers on a thread beside the teacher; the bounded queue caps the memory in flight.

    Args:
        store: the cache the shards go to.
        max_pending: shard buffers queued at most before a put waits.
    """

    def __init__(self, store: CacheStore, max_pending: int = 2):
        self.store = store
        self._queue: "queue.Queue[Optional[ShardBuffer]]" = queue.Queue(maxsize=max_pending)
        self._error: Optional[BaseException] = None
        self.written = 0
        self._thread = threading.Thread(target=self._run, name="yolc-kd-cache-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            buf = self._queue.get()
            if buf is None:
                return
            if self._error is None:
                try:
                    self.store.write_shard(buf.j, buf.data)
                    self.written += 1
                except BaseException as exc:  # handed to the main thread on its next submit/close
                    self._error = exc

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, buf: ShardBuffer) -> None:
        while True:
            self._check()
            try:
                self._queue.put(buf, timeout=0.5)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Wait for every submitted shard; re-raise a write error."""
        self._queue.put(None)
        self._thread.join()
        self._check()
