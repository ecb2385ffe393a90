"""The table of the cache's arrays (cache/arrays.py) is what the writer creates, the reader reads and verify checks:
an array added as one table entry plus the code that produces its rows goes through precompute, the reader and
verify (metadata, files, checksums, its value check) with nothing else changed; and the table describes the
arrays as they are on disk."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import zarr

from conftest import SHARD, VARIANTS, cli_args, make_setup, verify_cache
from yolc_kd.cache import arrays
from yolc_kd.cache.arrays import IMAGE_IDS, STATUS_OK, STATUS_SKIPPED, ArraySpec, sample_names, spec
from yolc_kd.cache.codec import HEATMAP
from yolc_kd.cache.reader import CacheReader
from yolc_kd.cache.schema import WRITE_CONFIG, Layout
from yolc_kd.cli import main
from yolc_kd.precompute import run

pytestmark = pytest.mark.usefixtures("one_thread")


def _no_negative(v):
    return [((v.data["dummy_counts"] < 0).any(axis=1), "negative dummy counts")]


# a small per-sample array with a value check, and a big map stored through a codec
DUMMIES = (
    ArraySpec("dummy_counts", "int16", lambda lay: (3,), check=_no_negative, meaning="a test array"),
    ArraySpec("dummy_map", "uint8", lambda lay: (1, *lay.coarse_hw), map=True, codec=HEATMAP,
              meaning="a test map"),
)


def _counts(index: int) -> np.ndarray:
    return np.array([index, 2 * index, 7], np.int16)


def _map(index: int, hw) -> np.ndarray:
    return (np.arange(hw[0] * hw[1], dtype=np.float32).reshape(1, *hw) * (index + 1) / (hw[0] * hw[1] * 20))


@pytest.fixture
def with_dummies(monkeypatch):
    """The table with the dummy arrays, and their producer in precompute's rows."""
    monkeypatch.setattr(arrays, "TABLE", arrays.TABLE + DUMMIES)
    rows = run._rows

    def produce(targets, records, seed):
        out = rows(targets, records, seed)
        for rec, row in zip(records, out):
            row["dummy_counts"] = _counts(rec["index"])
            if targets is not None:
                row["dummy_map"] = HEATMAP.encode(_map(rec["index"], targets.coarse.shape[2:]))
        return out

    monkeypatch.setattr(run, "_rows", produce)


def test_an_array_is_one_table_entry_plus_its_producer(tmp_path, with_dummies):
    s = make_setup(tmp_path)
    cache = s.root / "soft"
    assert main(cli_args(s, cache)) == 0
    reader = CacheReader(cache)
    n = reader.num_samples
    assert n == 6 * VARIANTS and {"dummy_counts", "dummy_map"} <= set(sample_names())
    for i in range(n):
        got = reader.read_sample(i)
        np.testing.assert_array_equal(got["dummy_counts"], _counts(i))
        want = _map(i, reader.layout.coarse_hw)
        assert got["dummy_map"].dtype == np.uint8
        assert (np.abs(HEATMAP.decode(got["dummy_map"]) - want) <= HEATMAP.tolerance(want)).all()
    window = reader.read_requests([("dummy_map", (3, 0, slice(1, 3), slice(2, 5)))])[0]  # map reads past zarr
    np.testing.assert_array_equal(window, reader.read_sample(3)["dummy_map"][0, 1:3, 2:5])
    meta = json.loads((cache / "dummy_map" / "zarr.json").read_text())
    assert meta["codecs"][0]["configuration"]["chunk_shape"] == [1, 1, *reader.layout.coarse_hw]
    assert verify_cache(cache, deep=True) == []

    zarr.open_group(str(cache), mode="r+")["dummy_counts"].with_config(WRITE_CONFIG)[5] = [1, -1, 7]
    assert verify_cache(cache) == [f"array 'dummy_counts', sample 5 (shard {5 // SHARD}): negative dummy counts"]
    (cache / "dummy_map" / "c" / "1" / "0" / "0" / "0").unlink()
    assert verify_cache(cache)[0] == ("array 'dummy_map', samples 2..3 (shard 1): shard file dummy_map/c/1/0/0/0 is "
                                      "missing although shard 1 is committed")


def test_a_cache_without_a_table_array_fails_verify(tmp_path, monkeypatch):
    """verify checks what the table lists: a cache made before an array was added misses it."""
    s = make_setup(tmp_path)
    cache = s.root / "soft"
    assert main(cli_args(s, cache)) == 0
    assert verify_cache(cache) == []
    monkeypatch.setattr(arrays, "TABLE", arrays.TABLE + DUMMIES)
    assert verify_cache(cache) == ["array 'dummy_counts' is missing (no dummy_counts/zarr.json)",
                                   "array 'dummy_map' is missing (no dummy_map/zarr.json)"]


@pytest.mark.parametrize("kind", ["view", "image"])
def test_the_table_is_the_arrays_on_disk(kind, tmp_path):
    """Every array's zarr.json has the table's dtype, shape, chunks, shards and compressors."""
    s = make_setup(tmp_path, n_images=2)
    cache = s.root / "soft"
    args = cli_args(s, cache)
    if kind == "image":
        del args[args.index("--variants"):args.index("--variants") + 2]
        args += ["--kind", "image", "--scales", "0.8,1.2"]
    assert main(args) == 0
    lay = CacheReader(cache).layout
    group = zarr.open_group(str(cache), mode="r")
    assert sorted(group.array_keys()) == sorted(arrays.names())
    for name in arrays.names():
        a, t = group[name], spec(name)
        assert str(a.dtype) in (t.dtype, "StringDType()") and a.shape == (t.length(lay), *t.shape(lay)), name
        assert a.chunks == t.chunks(lay) and a.shards == t.shards(lay), name
        assert [type(c) for c in a.compressors] == [type(c) for c in t.compressors(kind)], name


def test_which_shards_may_lack_a_file_in_a_cache_before_all_shard_files():
    """The table's may_be_fill rules: verify accepts a missing shard file of an older cache only where the rows
    could all be fill values."""
    lay = Layout(num_images=2, variants=2, shard_size=1, num_classes=1, input_hw=(8, 8), coarse_hw=(2, 2),
                 max_patches=2, refine_hw=(2, 2))

    def verifier(seed=3, **values):
        return SimpleNamespace(layout=lay, manifest=dict(seed=seed), data={IMAGE_IDS: np.array([0, 5])},
                               shard_values=lambda name, j: values.get(name))

    v = verifier()
    assert not spec("status").may_be_fill(v, 0) and not spec("aug_params").may_be_fill(v, 0)
    assert all(spec(n).may_be_fill(v, 3) for n in arrays.map_names())
    assert spec("variant").may_be_fill(v, 2) and not spec("variant").may_be_fill(v, 3)  # rows 2, 3: variants 0, 1
    assert spec("seed").may_be_fill(verifier(seed=0), 1) and not spec("seed").may_be_fill(v, 1)
    assert spec("image_id").may_be_fill(v, 1) and not spec("image_id").may_be_fill(v, 2)  # image ids 0, 5
    skipped, stored = np.array([STATUS_SKIPPED]), np.array([STATUS_OK])
    assert spec("fingerprint").may_be_fill(verifier(status=skipped), 0)
    assert not spec("fingerprint").may_be_fill(verifier(status=stored), 0) and not spec("fingerprint").may_be_fill(v, 0)
    none, one = np.zeros((1, 2), bool), np.array([[True, False]])
    for name in ("patch_boxes", "patch_scales"):
        assert spec(name).may_be_fill(verifier(patch_valid=none, num_valid_patches=np.ones(1)), 0)  # patch_valid first
        assert not spec(name).may_be_fill(verifier(patch_valid=one), 0)
        assert spec(name).may_be_fill(verifier(num_valid_patches=np.zeros(1)), 0)
        assert spec(name).may_be_fill(verifier(status=skipped), 0) and not spec(name).may_be_fill(v, 0)
    assert spec("patch_valid").may_be_fill(verifier(num_valid_patches=np.zeros(1)), 0)
    assert not spec("num_valid_patches").may_be_fill(verifier(patch_valid=one, status=skipped), 0)
    assert spec("num_valid_patches").may_be_fill(verifier(status=skipped), 0)
