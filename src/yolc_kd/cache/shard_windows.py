"""Windows of the cache's sharded map arrays, read straight from their shard files.

Why not zarr's own read: its asynchronous codec pipeline costs about 1 ms per inner chunk on this project's
2-core machine, ten times the chunk's blosc decode (BENCHMARKS.md, "Image-level cache: bytes and loader rate"), and
one training view of the image-level cache touches 30-50 inner chunks. This module implements the read side of the
zarr v3 sharding codec for exactly the layout the writer makes (sharding_indexed; inner codecs bytes, blosc,
crc32c; index bytes + crc32c at the end of the shard, read as verify reads it: cache/shards.py IndexLayout) on a
local store: one open per shard file, the index and the needed inner chunks read with pread, each chunk's crc32c
checked (google_crc32c, as zarr checks it) and decoded by numcodecs' Blosc (zarr's own codec library). An array in any other layout is not eligible
(`ShardWindows.open` returns None) and is read through zarr."""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import google_crc32c
import numpy as np
from numcodecs import Blosc

from yolc_kd.cache.shards import EMPTY, IndexLayout

_BLOSC = Blosc()  # decoding reads the typesize and shuffle from each chunk's own header


class DamagedShard(ValueError):
    """A shard file that cannot be read as the layout says (short, bad checksum, bad index)."""


def _checked(data: bytes, what: str) -> np.ndarray:
    """data without its trailing crc32c (a uint8 view), after checking it."""
    if len(data) < 4:
        raise DamagedShard(f"{what}: {len(data)} bytes, shorter than its checksum")
    body = np.frombuffer(data, dtype=np.uint8)[:-4]
    if int(google_crc32c.value(body)).to_bytes(4, "little") != bytes(data[-4:]):
        raise DamagedShard(f"{what}: checksum mismatch")
    return body


@dataclass(frozen=True)
class ShardWindows:
    """Reader of windows (basic selections: ints and unit-step slices) of one sharded zarr array.

    Args:
        folder: the array's folder on the local store.
        key_of: zarr's chunk-key encoder of the array (shard grid coordinates -> relative key).
        shape: the array's shape.
        shard: the shard (outer chunk) shape.
        inner: the inner chunk shape.
        dtype: the stored dtype with its byte order.
        fill: the fill value of chunks never written.
        index: the shard index's layout (cache/shards.py, which verify uses too).
    """
    folder: Path
    key_of: Any
    shape: Tuple[int, ...]
    shard: Tuple[int, ...]
    inner: Tuple[int, ...]
    dtype: np.dtype
    fill: Any
    index: IndexLayout

    @classmethod
    def open(cls, array: Any) -> Optional["ShardWindows"]:
        """The reader of a zarr array in the writer's sharded layout on a LocalStore, else None."""
        try:
            meta = array.metadata.to_dict()
            root = getattr(array.store, "root", None)
            (codec,) = meta["codecs"]
            conf = codec["configuration"]
            inner_codecs = [c["name"] for c in conf["codecs"]]
            index_codecs = [c["name"] for c in conf["index_codecs"]]
            endian = conf["codecs"][0].get("configuration", {}).get("endian", "little")
        except (AttributeError, KeyError, TypeError, ValueError):
            return None
        if root is None or codec["name"] != "sharding_indexed" or inner_codecs != ["bytes", "blosc", "crc32c"] \
                or index_codecs != ["bytes", "crc32c"] or conf.get("index_location", "end") != "end" \
                or conf["index_codecs"][0].get("configuration", {}).get("endian", "little") != "little" \
                or meta.get("chunk_grid", {}).get("name") != "regular" or meta.get("storage_transformers"):
            return None
        dtype = np.dtype(array.dtype).newbyteorder("<" if endian == "little" else ">")
        return cls(Path(root) / array.path, array.metadata.encode_chunk_key, tuple(array.shape),
                   tuple(meta["chunk_grid"]["configuration"]["chunk_shape"]), tuple(conf["chunk_shape"]), dtype,
                   array.fill_value, IndexLayout.of(array))

    def _ranges(self, selection: Sequence[Any]) -> Tuple[List[Tuple[int, int]], List[bool]]:
        """Per axis (start, stop) and whether the axis is dropped (an int index)."""
        sel = tuple(selection) + (slice(None),) * (len(self.shape) - len(selection))
        if len(sel) != len(self.shape):
            raise IndexError(f"{len(selection)} indices for {len(self.shape)} axes")
        ranges, dropped = [], []
        for s, n in zip(sel, self.shape):
            if isinstance(s, slice):
                start, stop, step = s.indices(n)
                if step != 1:
                    raise IndexError("only unit-step slices")
                ranges.append((start, max(start, stop)))
                dropped.append(False)
            else:
                i = int(s) + (n if int(s) < 0 else 0)
                if not 0 <= i < n:
                    raise IndexError(f"index {int(s)} out of range for axis of size {n}")
                ranges.append((i, i + 1))
                dropped.append(True)
        return ranges, dropped

    def read(self, selection: Sequence[Any]) -> np.ndarray:
        """The array's values at selection, as numpy's basic indexing of the whole array would give them."""
        ranges, dropped = self._ranges(selection)
        out = np.empty([b - a for a, b in ranges], dtype=self.dtype.newbyteorder("="))  # every part is written
        if out.size:
            shard_axes = [range(a // s, -(-b // s)) for (a, b), s in zip(ranges, self.shard)]
            for shard_pos in itertools.product(*shard_axes):
                self._read_shard(shard_pos, ranges, out)
        return out.reshape([n for n, d in zip(out.shape, dropped) if not d])

    def _read_shard(self, shard_pos: Tuple[int, ...], ranges: List[Tuple[int, int]], out: np.ndarray) -> None:
        path = self.folder / self.key_of(shard_pos)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # a shard never written reads as the fill value, as in zarr
            self._place(self.fill, [p * s for p, s in zip(shard_pos, self.shard)], ranges, out, self.shard)
            return
        try:
            size = os.fstat(fd).st_size
            origin = [p * s for p, s in zip(shard_pos, self.shard)]
            grid = [-(-min(s, n - o) // c) for s, n, o, c in zip(self.shard, self.shape, origin, self.inner)]
            index_bytes = self.index.nbytes
            if size < index_bytes:
                raise DamagedShard(f"{path}: {size} bytes, shorter than its index")
            index = self.index.table(os.pread(fd, index_bytes, size - index_bytes))
            if index is None:
                raise DamagedShard(f"{path} index: checksum mismatch")
            axes = []
            for (a, b), o, c, g in zip(ranges, origin, self.inner, grid):
                lo, hi = max(a, o), min(b, o + c * g)
                axes.append(range((lo - o) // c, -(-(hi - o) // c)) if hi > lo else range(0))
            for pos in itertools.product(*axes):
                offset, nbytes = index[pos]
                start = [o + p * c for o, p, c in zip(origin, pos, self.inner)]
                if offset == EMPTY and nbytes == EMPTY:  # an inner chunk never written: the fill value
                    self._place(self.fill, start, ranges, out, self.inner)
                    continue
                if int(offset) + int(nbytes) > size - index_bytes:
                    raise DamagedShard(f"{path}: inner chunk {pos} lies outside the file")
                body = _checked(os.pread(fd, int(nbytes), int(offset)), f"{path} inner chunk {pos}")
                chunk = np.frombuffer(_BLOSC.decode(body), dtype=self.dtype).reshape(self.inner)
                self._place(chunk, start, ranges, out, self.inner)
        finally:
            os.close(fd)

    @staticmethod
    def _place(chunk: Any, start: List[int], ranges: List[Tuple[int, int]], out: np.ndarray,
               shape: Sequence[int]) -> None:
        """Copy the part inside ranges of a block of `shape` whose first element is at array position start
        (chunk: its values, or one value for all) into out."""
        src, dst = [], []
        for s0, n, (a, b) in zip(start, shape, ranges):
            lo, hi = max(a, s0), min(b, s0 + n)
            if hi <= lo:
                return
            src.append(slice(lo - s0, hi - s0))
            dst.append(slice(lo - a, hi - a))
        out[tuple(dst)] = chunk[tuple(src)] if isinstance(chunk, np.ndarray) else chunk
