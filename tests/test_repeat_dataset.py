"""mmdet's RepeatDataset means what it means in mmdet: one epoch is `times` passes over every image, and the
schedule (epochs, lr steps, cached views) counts those epochs."""
import json
import math
from collections import Counter

import pytest
from conftest import REPO, write_config

from yolc_kd.config import load_config
from yolc_kd.data.loading import data_paths, dataset_repeats
from yolc_kd.data.synth import make_synthetic_dataset
from yolc_kd.errors import UserError
from yolc_kd.train.data import VariantSampler
from yolc_kd.train.schedule import schedule_iters, schedule_passes, views_needed

pytestmark = pytest.mark.usefixtures("one_thread")


def repeat_cfg(times, inner=None) -> dict:
    inner = inner or dict(type="CocoDataset", ann_file="a.json", img_prefix="imgs/")
    return dict(data=dict(samples_per_gpu=4, train=dict(type="RepeatDataset", times=times, dataset=inner)),
                runner=dict(type="EpochBasedRunner", max_epochs=2), lr_config=dict(step=[1]))


def test_repeat_dataset_unwraps_and_multiplies():
    assert data_paths(repeat_cfg(3))[:2] == ("a.json", "imgs/")
    assert dataset_repeats(repeat_cfg(3)) == 3
    assert dataset_repeats(repeat_cfg(2, repeat_cfg(3)["data"]["train"])) == 6  # nested wrappers multiply
    assert dataset_repeats(dict(data=dict(train=dict(ann_file="a.json")))) == 1
    assert dataset_repeats({}) == 1


@pytest.mark.parametrize("train, message", [
    (dict(type="ConcatDataset", datasets=[dict(ann_file="a.json")]), "'ConcatDataset' is not supported"),
    (dict(type="ClassBalancedDataset", oversample_thr=1e-3, dataset=dict(ann_file="a.json")), "ClassBalancedDataset"),
    (dict(type="RepeatDataset", times=0, dataset=dict(ann_file="a.json")), r"data\.train\.times must be an integer"),
    (dict(type="RepeatDataset", times=2.5, dataset=dict(ann_file="a.json")), r"times must be an integer >= 1"),
    (dict(ann_file=["a.json", "b.json"], img_prefix="x"), "lists several files"),
])
def test_unsupported_wrappers_are_one_line(train, message):
    with pytest.raises(UserError, match=message):
        data_paths(dict(data=dict(train=train)))


def test_yolc_visdrone_schedule_is_240_passes_with_steps_at_90_and_120():
    cfg = load_config(REPO / "configs" / "yolc_hrnet_w18_visdrone_kd.py", with_defaults=True)
    assert dataset_repeats(cfg) == 5
    images, batch = 6471, int(cfg["data"]["samples_per_gpu"])
    per_epoch = math.ceil(images * 5 / batch)
    total, steps = schedule_iters(cfg["schedule"], per_epoch, None)
    assert total == 48 * per_epoch
    assert [s * 5 / per_epoch for s in steps] == [90, 120]
    assert schedule_passes(cfg, images, batch) == 240
    assert views_needed(cfg, images, batch, flip=False) == 240 and views_needed(cfg, images, batch, flip=True) == 120


def test_sampler_epoch_is_times_passes_each_with_its_own_view():
    sampler = VariantSampler(8, seed=0, repeats=3)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        items = list(sampler)
        assert len(items) == len(sampler) == 24
        assert Counter(i for i, _ in items) == {i: 3 for i in range(8)}  # every image 3 times
        for i in range(8):  # ... each time in another pass: a fresh view
            assert sorted(v for j, v in items if j == i) == [3 * epoch, 3 * epoch + 1, 3 * epoch + 2]
    cached = VariantSampler(8, seed=0, num_variants=4, repeats=3)
    cached.set_epoch(1)  # passes 3, 4, 5 of a 4-view cache: views 3, 0, 1
    assert Counter(v for _, v in cached) == {3: 8, 0: 8, 1: 8}


def test_sampler_without_repeats_is_unchanged():
    """repeats=1 is the earlier sampler exactly (caches and seeds keep their meaning)."""
    from torch.utils.data.distributed import DistributedSampler

    for epoch in (0, 5):
        sampler, base = VariantSampler(10, seed=3), DistributedSampler(range(10), num_replicas=1, rank=0, seed=3)
        sampler.set_epoch(epoch)
        base.set_epoch(epoch)
        assert list(sampler) == [(i, epoch) for i in base]


def test_repeat_dataset_times_3_trains_mmdets_iterations(tmp_path, capsys):
    """RepeatDataset(times=3), 2 epochs, 8 images at batch 4: 3 x 8 / 4 = 6 iterations per epoch, 12 in all
    (mmdet's count), and the log says 6 passes per image."""
    data = make_synthetic_dataset(tmp_path / "d", 8, seed=2, size=(128, 96), num_classes=3)
    train = dict(type="RepeatDataset", times=3,
                 dataset=dict(ann_file=str(data / "annotations.json"), img_prefix=str(data)))
    cfg = write_config(tmp_path / "c.py", f"data = dict(samples_per_gpu=4, workers_per_gpu=0, train={train!r})\n"
                                          "runner = dict(type='EpochBasedRunner', max_epochs=2)\n"
                                          "checkpoint_config = dict(interval=1)\n")
    from yolc_kd.cli import main

    assert main(["train", "--config", cfg, "--work-dir", str(tmp_path / "w"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "12 iteration(s) at batch 4" in out and "2 epoch(s) of 3 passes (RepeatDataset) = 6 passes per image" in out
    assert "trained to iteration 12 (6 passes per image, no KD" in out
    logged = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["iter"] == 12 and logged[-1]["epoch"] == 1
    assert sorted(p.name for p in (tmp_path / "w").glob("iter_*.pth")) == ["iter_12.pth", "iter_6.pth"]  # per epoch
