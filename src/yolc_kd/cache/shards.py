"""The chunk files of a cache array, named by zarr's own chunk key encoding, and the check of a shard's index.

zarr 3 has no public call that reads a shard index without decoding the shard (the sharding codec's index
reader is private), so `index_problem` reads it here: its layout (chunks per shard, index location,
endianness) comes from the array's metadata, its format (16-byte offset/length pairs + a 4-byte crc32c) from
the `bytes` + `crc32c` index codecs that verify requires."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import ShardingCodec

EMPTY = 2 ** 64 - 1                        # offset and length of an absent inner chunk
_CRC_BYTES = 4


def chunk_files(arr: zarr.Array) -> Dict[str, Tuple[int, ...]]:
    """Store key (relative to the array's folder, e.g. 'c/3/0/0/0') -> grid position, for every chunk (a shard
    in a sharded array) the array's shape implies."""
    meta = arr.metadata
    return {meta.encode_chunk_key(coords): coords for coords in meta.chunk_grid.all_chunk_coords(arr.shape)}


def shard_key(arr: zarr.Array, j: int) -> str:
    """Store key of the j-th chunk (shard) along the sample axis; the other axes hold a single chunk."""
    return arr.metadata.encode_chunk_key((j,) + (0,) * (arr.ndim - 1))


def _sharding(arr: zarr.Array) -> ShardingCodec:
    codec = arr.metadata.codecs[0]
    if not isinstance(codec, ShardingCodec):
        raise TypeError(f"{arr.name} is not sharded")
    return codec


@dataclass(frozen=True)
class IndexLayout:
    """Where a shard's index is and how it reads (from the array's metadata).

    Args:
        per_shard: inner chunks per shard along each axis.
        nbytes: the index's size (16 bytes per inner chunk + the crc32c).
        at_start: the index precedes the chunks (else it ends the file).
        dtype: the offsets' and lengths' numpy dtype (uint64 of the index codec's byte order).
    """
    per_shard: Tuple[int, ...]
    nbytes: int
    at_start: bool
    dtype: str

    @classmethod
    def of(cls, arr: zarr.Array) -> "IndexLayout":
        codec = _sharding(arr)
        per_shard = tuple(s // c for s, c in zip(arr.metadata.chunk_grid.chunk_shape, codec.chunk_shape))
        endian = getattr(codec.index_codecs[0], "endian", None)
        return cls(per_shard, 16 * math.prod(per_shard) + _CRC_BYTES, codec.index_location.value == "start",
                   ">u8" if endian is not None and endian.value == "big" else "<u8")

    def table(self, raw: bytes) -> Optional[np.ndarray]:
        """The (*per_shard, 2) offsets and lengths of an index's bytes, or None when its crc32c fails."""
        payload, stored = raw[:-_CRC_BYTES], raw[-_CRC_BYTES:]
        if np.uint32(google_crc32c.value(payload)).tobytes() != stored:
            return None
        return np.frombuffer(payload, dtype=self.dtype).reshape(*self.per_shard, 2)


def index_problem(arr: zarr.Array, path: Path, rows: int, exact: bool) -> Optional[str]:
    """Why the shard index of shard file `path` of `arr` is damaged (None when it is sound). `rows`: samples
    the shard holds; exact=True: every inner chunk inside the array must be present (a cache whose writer
    stored all-fill chunks too, data_schema.md)."""
    codec = _sharding(arr)
    lay = IndexLayout.of(arr)
    n_chunks, index_bytes, at_start = math.prod(lay.per_shard), lay.nbytes, lay.at_start
    size = path.stat().st_size
    if size < index_bytes:
        return f"file is {size} bytes, shorter than its shard index ({index_bytes} bytes): truncated"
    with open(path, "rb") as fh:
        if not at_start:
            fh.seek(size - index_bytes)
        raw = fh.read(index_bytes)
    table = lay.table(raw)
    if table is None:
        return "shard index fails its crc32c check"
    data_start, data_end = (index_bytes, size) if at_start else (0, size - index_bytes)
    for k, (off, nbytes) in enumerate(table.reshape(n_chunks, 2).tolist()):
        if off == EMPTY and nbytes == EMPTY:
            continue
        if off < data_start or off + nbytes > data_end or nbytes < _CRC_BYTES:
            return f"shard index entry {k} points outside the file (offset {off}, {nbytes} bytes): truncated?"
    if exact:
        inside = table[:math.ceil(rows / codec.chunk_shape[0])]  # inner chunks along the sample axis in the array
        absent = np.flatnonzero((inside[..., 0] == EMPTY).reshape(inside.shape[0], -1).any(axis=1))
        if absent.size:
            at = ", ".join(str(int(k) * codec.chunk_shape[0]) for k in absent[:3]) + (", ..." * (absent.size > 3))
            return f"shard index has no inner chunk at sample offset(s) {at} of the shard (zarr would read zeros)"
    return None
