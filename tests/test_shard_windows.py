"""cache/shard_windows.py: windows read straight from shard files equal zarr's own reads of the same arrays, for
both kinds' codecs, partial edge shards, inner chunks never written and shards never written; damage is an error,
and an array in another layout is left to zarr."""
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import ZstdCodec

from yolc_kd.cache.arrays import spec
from yolc_kd.cache.shard_windows import DamagedShard, ShardWindows


def _array(root: Path, name: str, shape, chunks, shards, dtype, kind: str, empty_chunks: bool = False):
    group = zarr.open_group(str(root), mode="a", zarr_format=3)
    return group.create_array(name, shape=shape, chunks=chunks, shards=shards, dtype=dtype, fill_value=0,
                              compressors=spec("heatmap").compressors(kind),
                              config={"write_empty_chunks": not empty_chunks})


def _random_windows(rng, shape, n=40):
    for _ in range(n):
        sel = [int(rng.integers(0, shape[0]))]
        for size in shape[1:]:
            a = int(rng.integers(0, size))
            sel.append(slice(a, int(rng.integers(a, size + 1))))
        yield tuple(sel)


@pytest.mark.parametrize("kind,dtype", [("image", "uint8"), ("image", "int16"), ("view", "int16")])
def test_windows_equal_zarr(tmp_path, kind, dtype):
    rng = np.random.default_rng(0)
    # 7 rows in shards of 3 (the last shard partial), 48x64 maps in 16x16 inner chunks
    arr = _array(tmp_path, "m", (7, 3, 48, 64), (1, 3, 16, 16), (3, 3, 48, 64), dtype, kind)
    info = np.iinfo(dtype)
    data = rng.integers(info.min, info.max, size=arr.shape, endpoint=True).astype(dtype)
    data[:, :, :20, :20] = 0  # some all-zero inner chunks
    arr[:] = data
    windows = ShardWindows.open(arr)
    assert windows is not None
    for sel in _random_windows(rng, arr.shape):
        got = windows.read(sel)
        assert got.dtype == np.dtype(dtype) and np.array_equal(got, arr[sel]), sel
    assert np.array_equal(windows.read((6,)), data[6])
    assert np.array_equal(windows.read((-1, 1, slice(3, 40), slice(None))), data[-1, 1, 3:40])
    assert windows.read((2, slice(None), slice(10, 10), slice(None))).shape == (3, 0, 64)


def test_chunks_and_shards_never_written_read_as_fill(tmp_path):
    arr = _array(tmp_path, "m", (6, 2, 32, 32), (1, 2, 16, 16), (3, 2, 32, 32), "uint8", "image", empty_chunks=True)
    arr[0, :, :16, :16] = 7  # one inner chunk of shard 0; every other chunk of shard 0 and all of shard 1 unwritten
    windows = ShardWindows.open(arr)
    assert np.array_equal(windows.read((0,)), arr[0])
    assert int(windows.read((0,)).sum()) == 7 * 2 * 16 * 16
    assert not windows.read((4,)).any() and not arr[4].any()


def test_damaged_shard_is_an_error(tmp_path):
    arr = _array(tmp_path, "m", (3, 1, 16, 16), (1, 1, 16, 16), (3, 1, 16, 16), "uint8", "image")
    arr[:] = np.arange(3 * 256, dtype=np.uint8).reshape(arr.shape)
    windows = ShardWindows.open(arr)
    shard = tmp_path / "m" / arr.metadata.encode_chunk_key((0, 0, 0, 0))
    raw = bytearray(shard.read_bytes())
    raw[5] ^= 0xFF  # a byte inside the first inner chunk
    shard.write_bytes(bytes(raw))
    with pytest.raises(DamagedShard, match="checksum"):
        windows.read((0,))
    shard.write_bytes(bytes(raw[:10]))  # truncated: shorter than its index
    with pytest.raises(DamagedShard, match="shorter than its index"):
        windows.read((1,))


def test_other_layouts_are_left_to_zarr(tmp_path):
    group = zarr.open_group(str(tmp_path), mode="a", zarr_format=3)
    plain = group.create_array("plain", shape=(4, 8), chunks=(1, 8), dtype="uint8", compressors=[ZstdCodec()])
    assert ShardWindows.open(plain) is None
    in_memory = zarr.create_array(zarr.storage.MemoryStore(), shape=(4, 8), chunks=(1, 8), shards=(2, 8),
                                  dtype="uint8", compressors=spec("heatmap").compressors("image"))
    assert ShardWindows.open(in_memory) is None
