"""The cache format: quantisation bounds, plain-zarr readability, crash-safe shard commits, crc32c damage
detection, and the trainer's CacheTargetSource (config check, shapes, worker processes)."""
import copy
import json
import pickle
import shutil

import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader

from conftest import cli_args, make_setup, verify_cache
from yolc_kd.cache.arrays import dequantize_targets, sample_names
from yolc_kd.cache.codec import BOXES, HEATMAP
from yolc_kd.cache.reader import CacheError, CacheReader
from yolc_kd.cache.schema import SCHEMA_VERSION, Layout
from yolc_kd.cache.writer import CacheStore, ShardBuffer
from yolc_kd.cli import main
from yolc_kd.config import load_config
from yolc_kd.data.augment import AugmentConfig, TrainAugment
from yolc_kd.data.coco import CocoDetection
from yolc_kd.errors import UserError
from yolc_kd.train.cache_source import open_cache_source
from yolc_kd.train.data import TrainSamples, collate_train


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    s = make_setup(tmp_path_factory.mktemp("cache"))
    s.cache = s.root / "soft"
    assert main(cli_args(s, s.cache)) == 0
    s.cfg = load_config(s.config, with_defaults=True)
    s.coco = CocoDetection(s.ann, s.data, classes=s.cfg["classes"])
    return s


def test_heatmap_quantisation_error_is_bounded():
    p = np.concatenate([np.random.default_rng(0).random(100_000, dtype=np.float32),
                        np.array([0, 1 / 510, 1 / 255 - 1e-7, 1 / 255, 0.5 / 255 + 0.5, 1.0], np.float32)])
    q = HEATMAP.encode(p)
    err = np.abs(HEATMAP.decode(q) - p)
    assert q.dtype == np.uint8 and (err <= HEATMAP.tolerance(p)).all()
    assert (q[p < 1 / 255] == 0).all() and err[p >= 1 / 255].max() <= HEATMAP.max_error + 1e-7
    assert q[-1] == 255 and HEATMAP.encode(np.array([np.nan, -0.1, 1.5]))[2] == 255


def test_box_maps_fixed_point_error_is_bounded():
    x = np.random.default_rng(1).standard_normal(100_000).astype(np.float32) * np.float32(50)
    x[:5] = [1e-6, -3e-9, 700.0, -1e9, 1 / 128]
    q = BOXES.encode(x)
    y = BOXES.decode(q)
    assert q.dtype == np.int16 and y.dtype == np.float32
    assert (np.abs(y.astype(np.float64) - x) <= BOXES.tolerance(x)).all()  # clipped values included
    assert np.abs(y - x)[5:].max() <= 1 / 128 + 1e-6 and y[2] == 32767 / 64 and y[3] == -32767 / 64
    assert BOXES.encode(np.array([np.nan, np.inf], np.float32)).tolist() == [0, 32767]


def test_plain_zarr_and_numpy_read_a_sample(made):
    root = zarr.open_group(str(made.cache), mode="r")  # no yolc_kd code below this line
    m = root.attrs["yolc_kd_cache"]
    k = m["variants"]
    image_ids = root["image_ids"][:]
    i = int(np.flatnonzero(image_ids == 4)[0]) * k + 1  # image id 4, variant 1
    heat = root["heatmap"][i].astype(np.float32) / 255.0
    coarse = root["coarse"][i].astype(np.float32) / 64  # raw xywh maps in grid cells
    valid = root["patch_valid"][i]
    boxes = root["patch_boxes"][i][valid]
    params = json.loads(str(root["aug_params"][i]))
    assert (int(root["image_id"][i]), int(root["variant"][i])) == (4, 1) and params["key"] == [m["seed"], 4, 1]
    assert heat.shape == (3, 96, 128) and coarse.shape == (4, 24, 32) and boxes.shape[1] == 4
    assert root["fingerprint"][i].tobytes().hex() == CacheReader(made.cache).fingerprint(
        {"fingerprint": root["fingerprint"][i]})
    assert int(root["shard_done"][i // m["shard_size"]]) == 1


def test_target_source_shapes_fingerprints_and_workers(made):
    aug_cfg = AugmentConfig.from_pipeline(made.cfg["train_pipeline"])
    source = open_cache_source(made.cache, made.cfg, aug_cfg, made.coco)
    assert source.num_variants == 2
    fp, t = source.read(2, 1)
    assert len(fp) == 32 and t.heatmap.dtype == torch.uint8  # stored dtypes; the trainer dequantises a batch
    shapes = {k: tuple(getattr(t, k).shape) for k in ("heatmap", "coarse", "patch_boxes", "patch_scales",
                                                         "patch_valid", "refine")}
    assert shapes == dict(heatmap=(1, 3, 96, 128), coarse=(1, 4, 24, 32), patch_boxes=(1, 2, 4), patch_scales=(1, 2),
                          patch_valid=(1, 2), refine=(1, 2, 4, 8, 16))
    assert t.patch_valid.dtype == torch.bool and t.refine.dtype == torch.int16
    f = dequantize_targets(t)
    assert f.heatmap.dtype == f.coarse.dtype == f.refine.dtype == torch.float32
    np.testing.assert_array_equal(f.heatmap.numpy(), HEATMAP.decode(t.heatmap.numpy()))
    np.testing.assert_array_equal(f.refine.numpy(), BOXES.decode(t.refine.numpy()))
    assert dequantize_targets(f) is f  # float targets (a live teacher's) pass through
    again = pickle.loads(pickle.dumps(source))
    assert torch.equal(again.read(2, 1)[1].heatmap, t.heatmap)
    # the trainer's dataset replays each view and checks it against the cached fingerprint, in a worker process
    samples = TrainSamples(made.coco, TrainAugment(aug_cfg), int(made.cfg["seed"]), source)
    loader = DataLoader(samples, batch_size=2, sampler=[(0, 0), (1, 1), (5, 0)], num_workers=1,
                        collate_fn=collate_train)
    batches = list(loader)
    assert [b["kd_targets"].heatmap.shape[0] for b in batches] == [2, 1]
    assert batches[0]["keys"] == [(1, 0), (2, 1)]


def test_cache_source_refuses_another_augmentation(made):
    cfg = copy.deepcopy(made.cfg)
    flip = next(t for t in cfg["train_pipeline"] if t["type"] == "RandomFlip")
    flip["flip_ratio"] = 0.0
    cfg["distill"] = cfg["distill"].replace(min_patch_size=8)
    aug_cfg = AugmentConfig.from_pipeline(cfg["train_pipeline"])
    with pytest.raises(UserError) as exc:
        open_cache_source(made.cache, cfg, aug_cfg, made.coco)
    msg = str(exc.value)
    assert "augment.flip_ratio (cache 0.5, config 0.0)" in msg and "distill.min_patch_size" in msg
    assert "\n" not in msg


def test_flipped_byte_is_detected_naming_the_array(made, tmp_path):
    cache = tmp_path / "soft"
    shutil.copytree(made.cache, cache)
    shard = cache / "heatmap" / "c" / "1" / "0" / "0" / "0"  # samples 2..3
    data = bytearray(shard.read_bytes())
    data[40] ^= 0x5A  # inside the first inner chunk (sample 2)
    shard.write_bytes(bytes(data))
    reader = CacheReader(cache)
    reader.read_sample(3)  # the other chunk of that shard is intact
    with pytest.raises(CacheError, match="array 'heatmap' is damaged at sample 2"):
        reader.read_sample(2)
    faults = verify_cache(cache, deep=True)
    assert len(faults) == 1 and "'heatmap'" in faults[0]
    assert verify_cache(made.cache, deep=True) == []


def _layout(n_images: int = 5) -> Layout:
    return Layout(num_images=n_images, variants=2, shard_size=4, num_classes=2, input_hw=(8, 12), coarse_hw=(2, 3),
                  max_patches=2, refine_hw=(1, 2))


def _fill(store: CacheStore, j: int) -> None:
    buf = ShardBuffer(store.layout, j)
    a, b = store.layout.shard_range(j)
    for index in range(a, b):
        buf.put(index, dict(heatmap=np.full((2, 8, 12), index, np.uint8), image_id=index // 2, variant=index % 2,
                            status=1, aug_params="{}"))
    assert buf.full
    store.write_shard(j, buf.data)


def test_uncommitted_shards_are_never_read(tmp_path):
    lay = _layout()
    manifest = dict(schema_version=SCHEMA_VERSION, layout=lay.to_dict(), complete=False)
    store = CacheStore.prepare(tmp_path / "c", manifest, image_ids=range(10, 15))
    assert lay.num_samples == 10 and lay.num_shards == 3
    _fill(store, 2)  # the last, partial shard
    torn = tmp_path / "c" / "heatmap" / "c" / "0" / "0" / "0" / "0.deadbeef.partial"  # a killed zarr write
    torn.parent.mkdir(parents=True)
    torn.write_bytes(b"torn")
    reader = CacheReader(tmp_path / "c")
    assert int(reader.read_sample(9)["heatmap"][0, 0, 0]) == 9 and reader.index_of(14, 1) == 9
    with pytest.raises(CacheError, match="not written yet"):
        reader.read_sample(0)
    # a rerun reopens it, drops the torn temp file, and sees shard 2 as done
    again = CacheStore.prepare(tmp_path / "c", manifest, image_ids=range(10, 15))
    assert again.done_shards() == {2} and not list((tmp_path / "c").rglob("*.partial"))
    _fill(again, 0)
    _fill(again, 1)
    final = again.finalize([dict(file_name=f"{i}.png") for i in range(5)])
    assert final["complete"] and final["counts"]["samples_written"] == 10
    assert set(sample_names()) <= set(zarr.open_group(str(tmp_path / "c"), mode="r").array_keys())


def test_writer_refuses_a_foreign_folder_and_other_settings(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    manifest = dict(schema_version=SCHEMA_VERSION, layout=_layout().to_dict(), complete=False, variants=2)
    with pytest.raises(UserError, match="not a yolc-kd cache"):
        CacheStore.prepare(tmp_path, manifest, image_ids=range(5))
    CacheStore.prepare(tmp_path / "c", manifest, image_ids=range(5))
    other = dict(manifest, variants=3, layout=_layout(6).to_dict())
    with pytest.raises(UserError, match=r"variants \(cache 2, now 3\)"):
        CacheStore.prepare(tmp_path / "c", other, image_ids=range(6))


def test_a_cache_without_an_array_of_the_table_is_one_line_naming_it(made, tmp_path):
    """A cache made before an array joined cache/arrays.py (or one that lost its folder): the reader names the
    missing array instead of failing on another."""
    cache = tmp_path / "soft"
    shutil.copytree(made.cache, cache)
    shutil.rmtree(cache / "patch_scales")
    with pytest.raises(CacheError, match="has no array patch_scales") as exc:
        CacheReader(cache)
    assert "\n" not in str(exc.value) and "image_ids" not in str(exc.value)


def test_reader_needs_a_cache(tmp_path):
    with pytest.raises(UserError, match="not a yolc-kd cache"):
        CacheReader(tmp_path)
    assert "not a yolc-kd cache" in verify_cache(tmp_path)[0]


def test_half_created_store_is_recreated(tmp_path):
    half = tmp_path / "c"
    zarr.open_group(str(half), mode="w").create_array("heatmap", shape=(1,), dtype="uint8")  # killed before the manifest
    manifest = dict(schema_version=SCHEMA_VERSION, layout=_layout().to_dict(), complete=False)
    store = CacheStore.prepare(half, manifest, image_ids=range(5))
    assert store.done_shards() == set() and CacheReader(half).layout == _layout()


def test_inference_only_crop_settings_are_no_part_of_a_caches_identity(made):
    """patch_budget bounds inference patches only: a cache made without it fits a teacher config that has it
    (and the reverse); a KD crop setting (enlarge) still counts."""
    from yolc_kd.cache.manifest import TRAIN_FIELDS, diff_fields, target_identity

    def identity(**crop):
        model = copy.deepcopy(made.cfg["model"])
        model["test_cfg"]["crop"] = dict(model["test_cfg"].get("crop") or {}, **crop)
        return target_identity(teacher_model=model, augment={}, input_size=(128, 96), classes=["a"],
                               distill=made.cfg["distill"].to_dict(), crop=dict(enlarge=1.2, upscale=1.5),
                               patch_canvas=(48, 64), seed=0)

    plain = identity()
    assert diff_fields(plain, identity(patch_budget=0.34), TRAIN_FIELDS, now="config") == []
    assert "patch_budget" not in json.dumps(identity(patch_budget=0.34))
    assert diff_fields(plain, identity(enlarge=1.5), TRAIN_FIELDS, now="config")
    model = made.cfg["model"]
    identity(patch_budget=0.5)
    assert "patch_budget" not in (model["test_cfg"].get("crop") or {})  # the caller's config is not changed
