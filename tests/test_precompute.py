"""`yolc-kd precompute`: cached targets equal a live teacher, resume after kill -9 is bit-identical,
mismatched reruns are refused, torchrun shards equal a single process, unreadable images are recorded."""
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import (SEED, VARIANTS, assert_same_arrays, cli_args, kill_9_inside_precompute, make_setup,
                      save_random_teacher, subprocess_env)
from yolc_kd.cache.arrays import STATUS_OK, STATUS_SKIPPED
from yolc_kd.cache.codec import BOXES, HEATMAP
from yolc_kd.cache.reader import CacheReader
from yolc_kd.cli import main
from yolc_kd.config import load_config
from yolc_kd.data.augment import AugmentConfig, TrainAugment
from yolc_kd.data.coco import CocoDetection
from yolc_kd.runtime import numerics
from yolc_kd.teacher import build_teacher, teacher_targets

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("precompute"))


@pytest.fixture(scope="module")
def ref_cache(setup):
    out = setup.root / "ref"
    assert main(cli_args(setup, out)) == 0
    return out


def test_cached_targets_equal_live_teacher(setup, ref_cache):
    with numerics("cpu", 1):  # the cache's numerics (and no oversubscribed cores)
        _compare_with_live_teacher(setup, ref_cache)


def _compare_with_live_teacher(setup, ref_cache):
    cfg = load_config(setup.config, with_defaults=True)
    dcfg = cfg["distill"]
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
            live = teacher_targets(teacher, view.img[None], [view.meta], dcfg)
            index = reader.index_of(image_id, v)
            assert index == i * VARIANTS + v
            s = reader.read_sample(index)
            assert int(s["status"]) == STATUS_OK and int(s["image_id"]) == image_id and int(s["variant"]) == v
            assert int(s["seed"]) == SEED and reader.fingerprint(s) == view.fingerprint
            p = live.heatmap[0].numpy()
            assert s["heatmap"].dtype == np.uint8
            assert (np.abs(HEATMAP.decode(s["heatmap"]) - p) <= HEATMAP.tolerance(p) + 1e-5).all()
            assert (s["heatmap"][p < 1 / 255 - 1e-5] == 0).all()
            for name in ("coarse", "refine"):
                x = getattr(live, name)[0].numpy()
                assert s[name].dtype == np.int16
                assert (np.abs(BOXES.decode(s[name]) - x) <= BOXES.tolerance(x) + 1e-5).all(), name
            np.testing.assert_array_equal(s["patch_valid"], live.patch_valid[0].numpy())
            np.testing.assert_array_equal(s["patch_boxes"], live.patch_boxes[0].numpy())
            np.testing.assert_array_equal(s["patch_scales"], live.patch_scales[0].numpy())
            assert int(s["num_valid_patches"]) == int(live.patch_valid.sum())
            # the documented decode gives the regression-grid boxes within the fixed-point error
            dec = teacher.bbox_head.decode_xywh_to_bbox
            got, want = dec(torch.from_numpy(BOXES.decode(s["coarse"][None]))), dec(live.coarse)
            assert (torch.abs(got - want) <= torch.from_numpy(BOXES.tolerance(live.coarse.numpy())).permute(0, 2, 3, 1)
                    .reshape(got.shape) + 1e-5).all()
            patches += int(live.patch_valid.sum())
    assert patches > 0, "the test teacher should produce crops"


def test_kill_9_then_rerun_is_bit_identical(setup, ref_cache, tmp_path):
    out = tmp_path / "killed"
    kill_9_inside_precompute(cli_args(setup, out), out)
    partial = CacheReader(out)
    done = [j for j in range(partial.layout.num_shards) if partial.shard_done(j)]
    print(f"killed with shards {done} of {partial.layout.num_shards} committed")
    assert not partial.complete and 0 < len(done) < partial.layout.num_shards
    res = subprocess.run([sys.executable, "-m", "yolc_kd", *cli_args(setup, out)], env=subprocess_env(),
                         capture_output=True)
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
