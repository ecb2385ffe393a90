"""The CUDA paths, on a GPU: skipped unless YOLC_KD_TEST_DEVICE=cuda (conftest.py), e.g.

    YOLC_KD_TEST_DEVICE=cuda python -m pytest -q -m cuda

What holds on one GPU: target building and the KD patch plan read the device a fixed number of times, the torch
codec's bytes equal numpy's, precompute --deterministic repeats bit for bit and `verify --recompute` on the same
GPU compares exactly, a CPU cache recomputed on the GPU passes within the cross-device tolerance, and KD training
runs from the cache and from a live teacher on the GPU."""
import warnings

import numpy as np
import pytest
import torch

from conftest import assert_same_arrays, cli_args, make_setup
from yolc_kd.cli import main

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("cuda"), n_images=4)


def _device_reads(fn) -> int:
    """Host syncs CUDA reports while fn runs (torch.cuda.set_sync_debug_mode)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def test_the_device_and_its_numerics(cuda_device):
    from yolc_kd.runtime import numerics, resolve_device

    assert resolve_device("cuda").type == "cuda"
    with numerics(cuda_device, 1, deterministic=True):
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    with numerics(cuda_device, 1):
        assert torch.backends.cudnn.benchmark


def test_targets_on_the_gpu_equal_the_cpu_with_few_reads(cuda_device):
    from yolc_kd.models.targets import yolc_targets

    gen = torch.Generator().manual_seed(0)
    boxes, labels = [], []
    for _ in range(2):
        xy = torch.rand(200, 2, generator=gen) * torch.tensor([220.0, 140.0])
        boxes.append(torch.cat([xy, xy + 2 + torch.rand(200, 2, generator=gen) * 30], 1))
        labels.append(torch.randint(0, 3, (200,), generator=gen))
    cpu, _ = yolc_targets(boxes, labels, (2, 4, 40, 64), (160, 256, 3), 3)
    gb, gl = [b.to(cuda_device) for b in boxes], [lab.to(cuda_device) for lab in labels]
    gpu, _ = yolc_targets(gb, gl, (2, 4, 40, 64), (160, 256, 3), 3)
    for name, value in cpu.items():
        torch.testing.assert_close(gpu[name].cpu(), value, rtol=1e-6, atol=1e-6)
    assert torch.equal(gpu["xywh_target_weight"].cpu(), cpu["xywh_target_weight"])
    assert _device_reads(lambda: yolc_targets(gb, gl, (2, 4, 40, 64), (160, 256, 3), 3)) <= 3  # not per object


def test_the_kd_patch_plan_reads_the_device_once(cuda_device):
    from yolc_kd import crops

    coords = [np.array([[10, 10, 60, 40], [100, 50, 70, 70]])] * 2
    plan = crops.plan_kd_patches(coords, (160, 256), 2, 16, 1.2, 1.5)
    img = torch.randn(2, 3, 160, 256)
    cpu = crops.KDPatchPlan.from_targets(plan.boxes, plan.scales, plan.valid, (160, 256)).cut(img)
    on = [t.to(cuda_device) for t in (plan.boxes, plan.scales, plan.valid)]
    gpu_plan = crops.KDPatchPlan.from_targets(*on, (160, 256))
    torch.testing.assert_close(gpu_plan.cut(img.to(cuda_device)).cpu(), cpu, rtol=1e-5, atol=1e-5)
    fresh = crops.KDPatchPlan.from_targets(*on, (160, 256))
    assert _device_reads(lambda: fresh.cut(img.to(cuda_device))) <= 2


def test_precompute_rows_from_the_gpu_have_the_cpu_bytes(cuda_device):
    from yolc_kd.kd import KDTargets
    from yolc_kd.precompute.run import _rows

    gen = torch.Generator().manual_seed(1)
    t = KDTargets(heatmap=torch.rand(2, 3, 32, 48, generator=gen).pow(6), coarse=torch.randn(2, 4, 8, 12) * 30,
                  patch_boxes=torch.rand(2, 2, 4) * 10, patch_scales=torch.rand(2, 2),
                  patch_valid=torch.tensor([[True, False], [True, True]]), refine=torch.randn(2, 2, 4, 4, 6) * 30)
    records = [dict(status=1, image_id=i, variant=0, fingerprint="0" * 64, params="{}") for i in range(2)]
    for a, b in zip(_rows(t, records, 0), _rows(t.to(cuda_device), records, 0)):
        for name in ("heatmap", "coarse", "refine", "patch_boxes", "patch_scales", "patch_valid"):
            assert a[name].dtype == b[name].dtype and a[name].tobytes() == b[name].tobytes(), name


def test_deterministic_precompute_repeats_and_recomputes_exactly(setup, cuda_device, capsys):
    first, second = setup.root / "det1", setup.root / "det2"
    for out in (first, second):
        assert main(cli_args(setup, out, "--device", "cuda", "--deterministic")) == 0
    assert_same_arrays(first, second)  # one GPU, --deterministic: the teacher's forward repeats bit for bit
    capsys.readouterr()
    assert main(["verify", str(first), "--recompute", "4", "--config", str(setup.config), "--ckpt", str(setup.ckpt),
                 "--device", "cuda", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "note: recompute compared within" not in out  # the cache's own numerics: the exact comparison


def test_a_cpu_cache_recomputed_on_the_gpu_passes_within_the_tolerance(setup, cuda_device, capsys):
    cpu = setup.root / "cpu"
    assert main(cli_args(setup, cpu, "--device", "cpu")) == 0
    capsys.readouterr()
    rc = main(["verify", str(cpu), "--recompute", "4", "--config", str(setup.config), "--ckpt", str(setup.ckpt),
               "--device", "cuda", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "the cache was made on cpu, this run uses cuda" in out


def test_kd_training_on_the_gpu_from_the_cache_and_online(setup, cuda_device, tmp_path):
    import json

    cache = setup.root / "train_cache"
    assert main(cli_args(setup, cache, "--device", "cuda", "--deterministic")) == 0
    common = ["--config", str(setup.config), "--device", "cuda", "--batch-size", "2", "--max-iters", "2",
              "--log-interval", "1", "--no-progress", "--deterministic"]
    assert main(["train", *common, "--cache", str(cache), "--workers", "1", "--work-dir", str(tmp_path / "off")]) == 0
    assert main(["train", *common, "--online", "--teacher-ckpt", str(setup.ckpt), "--work-dir",
                 str(tmp_path / "on")]) == 0
    for run in ("off", "on"):
        losses = [json.loads(x)["loss"] for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        assert len(losses) == 2 and all(np.isfinite(losses)), (run, losses)
