"""`yolc-kd precompute`: cached targets equal a live teacher, resume after kill -9 is bit-identical,
mismatched reruns are refused, torchrun shards equal a single process, unreadable images are recorded."""
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import zarr

from conftest import REPO, tiny_model_cfg
from yolc_kd.cache.reader import CacheReader
from yolc_kd.cache.schema import (ALL_ARRAYS, STATUS_OK, STATUS_SKIPPED, dequantize_heatmap, box_tolerance, dequantize_boxes,
                                  heatmap_tolerance)
from yolc_kd.checkpoint import save_checkpoint
from yolc_kd.cli import main
from yolc_kd.config import load_config
from yolc_kd.data.augment import AugmentConfig, TrainAugment
from yolc_kd.data.coco import CocoDetection
from yolc_kd.data.synth import make_synthetic_dataset
from yolc_kd.models import build_detector
from yolc_kd.models.distill import build_teacher
from yolc_kd.precompute.run import deterministic_numerics

SEED, VARIANTS, SHARD, BATCH = 3, 2, 2, 2


def teacher_model_cfg() -> dict:
    cfg = tiny_model_cfg(num_classes=3)
    cfg["test_cfg"]["lsm"] = dict(topk_cells=60)  # a random teacher's heatmap is flat: let LSM find patches
    return cfg


def save_random_teacher(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = build_detector(teacher_model_cfg()).eval()
    with torch.no_grad():  # spread the head's outputs so heatmap, boxes and crops are not constant
        for name, p in model.named_parameters():
            if name.startswith("bbox_head"):
                p.add_(torch.randn_like(p) * 0.3)
        model.bbox_head.local_head[-1].bias.fill_(-3.0)
    return save_checkpoint(path, model)


def make_setup(root: Path, n_images: int = 6) -> SimpleNamespace:
    data = make_synthetic_dataset(root / "data", n_images, seed=1, size=(128, 96), num_classes=3)
    ckpt = save_random_teacher(root / "teacher.pth", 0)
    config = root / "student.py"
    config.write_text(f"""
model = {teacher_model_cfg()!r}
classes = ('pedestrian', 'people', 'bicycle')
seed = {SEED}
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='PhotoMetricDistortion'),
    dict(type='RandomCenterCropPad', crop_size=(128, 96), ratios=(1.0,), border=32, mean=[0, 0, 0], std=[1, 1, 1],
         to_rgb=True, test_pad_mode=None),
    dict(type='Resize', img_scale=(128, 96), keep_ratio=True),
    dict(type='RandomFlip', flip_ratio=0.5),
    dict(type='Normalize', mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True),
]
data = dict(samples_per_gpu=2, workers_per_gpu=0,
            train=dict(ann_file={str(data / 'annotations.json')!r}, img_prefix={str(data)!r}))
distill_cfg = dict(teacher_config=None, max_patches_per_img=2, min_patch_size=16)
""")
    return SimpleNamespace(root=root, data=data, ann=data / "annotations.json", ckpt=ckpt, config=config)


def cli_args(s: SimpleNamespace, out: Path, *extra: str) -> list:
    return ["precompute", "--config", str(s.config), "--ckpt", str(s.ckpt), "--out", str(out), "--variants",
            str(VARIANTS), "--shard-size", str(SHARD), "--batch-size", str(BATCH), "--no-progress", *extra]


def read_all(path: Path) -> dict:
    g = zarr.open_group(str(path), mode="r")
    return {name: g[name][:] for name in ALL_ARRAYS}


def assert_same_arrays(a: Path, b: Path) -> None:
    x, y = read_all(a), read_all(b)
    for name in ALL_ARRAYS:
        u, v = x[name], y[name]
        assert u.shape == v.shape and u.dtype == v.dtype, name
        if u.dtype.kind in "fiub":
            assert u.tobytes() == v.tobytes(), f"array {name} differs"
        else:
            assert list(u) == list(v), f"array {name} differs"


def subprocess_env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("precompute"))


@pytest.fixture(scope="module")
def ref_cache(setup):
    out = setup.root / "ref"
    assert main(cli_args(setup, out)) == 0
    return out


def test_cached_targets_equal_live_teacher(setup, ref_cache):
    with deterministic_numerics("cpu", 1):  # the cache's numerics (and no oversubscribed cores)
        _compare_with_live_teacher(setup, ref_cache)


def _compare_with_live_teacher(setup, ref_cache):
    cfg = load_config(setup.config, with_defaults=True)
    dcfg = cfg["distill_cfg"]
    teacher = build_teacher(dcfg, cfg["model"], ckpt=str(setup.ckpt))
    augment = TrainAugment(AugmentConfig.from_pipeline(cfg["train_pipeline"]))
    coco = CocoDetection(setup.ann, setup.data)
    reader = CacheReader(ref_cache)
    m = reader.manifest
    assert m["complete"] and m["counts"]["samples_written"] == len(coco) * VARIANTS and m["skipped"] == []
    assert m["variants"] == VARIANTS and m["seed"] == SEED and m["classes"] == list(coco.classes)
    patches = 0
    for i in range(len(coco)):
        image_id = coco.image_info(i)["id"]
        boxes, labels = coco.annotations(i)
        for v in range(VARIANTS):
            view = augment(coco.load_image(i), boxes, labels, (SEED, image_id, v))
            live = teacher.kd_targets(view.img[None], [view.meta], dcfg)
            index = reader.index_of(image_id, v)
            assert index == i * VARIANTS + v
            s = reader.read_sample(index)
            assert int(s["status"]) == STATUS_OK and int(s["image_id"]) == image_id and int(s["variant"]) == v
            assert int(s["seed"]) == SEED and reader.fingerprint(s) == view.fingerprint
            p = live.heatmap[0].numpy()
            assert s["heatmap"].dtype == np.uint8
            assert (np.abs(dequantize_heatmap(s["heatmap"]) - p) <= heatmap_tolerance(p) + 1e-5).all()
            assert (s["heatmap"][p < 1 / 255 - 1e-5] == 0).all()
            for name in ("coarse", "refine"):
                x = getattr(live, name)[0].numpy()
                assert s[name].dtype == np.int16
                assert (np.abs(dequantize_boxes(s[name]) - x) <= box_tolerance(x) + 1e-5).all(), name
            np.testing.assert_array_equal(s["patch_valid"], live.patch_valid[0].numpy())
            np.testing.assert_array_equal(s["patch_boxes"], live.patch_boxes[0].numpy())
            np.testing.assert_array_equal(s["patch_scales"], live.patch_scales[0].numpy())
            assert int(s["num_valid_patches"]) == int(live.patch_valid.sum())
            # the documented decode gives the regression-grid boxes within the fixed-point error
            dec = teacher.bbox_head.decode_xywh_to_bbox
            got, want = dec(torch.from_numpy(dequantize_boxes(s["coarse"][None]))), dec(live.coarse)
            assert (torch.abs(got - want) <= torch.from_numpy(box_tolerance(live.coarse.numpy())).permute(0, 2, 3, 1)
                    .reshape(got.shape) + 1e-5).all()
            patches += int(live.patch_valid.sum())
    assert patches > 0, "the test teacher should produce crops"


def test_kill_9_then_rerun_is_bit_identical(setup, ref_cache, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "yolc_kd", *cli_args(setup, out)]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = out / "shard_done" / "c"
    deadline = time.time() + 120
    while not (first.is_dir() and any(first.iterdir())) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(random.uniform(0.0, 0.05))  # somewhere inside the next shards
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"finished before the kill: {proc.stderr.read().decode()[-500:]}"
    partial = CacheReader(out)
    done = [j for j in range(partial.layout.num_shards) if partial.shard_done(j)]
    print(f"killed with shards {done} of {partial.layout.num_shards} committed")
    assert not partial.complete and 0 < len(done) < partial.layout.num_shards
    res = subprocess.run(cmd, env=subprocess_env(), capture_output=True)
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    assert CacheReader(out).complete and not list(out.rglob("*.partial"))
    assert_same_arrays(out, ref_cache)


def test_rerun_with_other_checkpoint_and_variants_is_refused(setup, ref_cache, capsys):
    other = save_random_teacher(setup.root / "other.pth", 1)
    args = cli_args(setup, ref_cache)
    args[args.index("--ckpt") + 1] = str(other)
    args[args.index("--variants") + 1] = "3"
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "teacher.ckpt_sha256" in err and "variants" in err and len(err.strip().splitlines()) == 1
    assert main(cli_args(setup, ref_cache)) == 0  # the same command again: nothing to do
    assert "this run wrote 0 views" in capsys.readouterr().out


def test_torchrun_two_ranks_equal_single_process(setup, ref_cache, tmp_path):
    out = tmp_path / "dist"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "yolc_kd", *cli_args(setup, out)]
    res = subprocess.run(cmd, env=subprocess_env(), capture_output=True, timeout=300)
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    m = CacheReader(out).manifest
    assert m["complete"] and m["run"]["world_size"] == 2
    assert_same_arrays(out, ref_cache)


def test_unreadable_image_is_skipped_and_recorded(setup, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(setup.data, data)
    (data / "images" / "000002.png").write_bytes(b"not a png")
    args = cli_args(setup, tmp_path / "out", "--ann", str(data / "annotations.json"), "--images", str(data))
    assert main(args) == 0
    reader = CacheReader(tmp_path / "out")
    m = reader.manifest
    assert m["counts"]["images_skipped"] == 1 and m["counts"]["samples_skipped"] == VARIANTS
    assert m["skipped"][0]["image_id"] == 3 and "000002.png" in m["skipped"][0]["reason"]
    assert int(reader.read_sample(reader.index_of(3, 1))["status"]) == STATUS_SKIPPED
    assert int(reader.read_sample(reader.index_of(4, 0))["status"]) == STATUS_OK
    strict = cli_args(setup, tmp_path / "strict", "--ann", str(data / "annotations.json"), "--images", str(data),
                      "--strict")
    assert main(strict) == 1
    assert "000002.png" in capsys.readouterr().err
