"""Mixed precision (--amp) on the CPU with bfloat16 and float16 autocast: teacher targets come out float32, a
saturated heatmap still gives finite gradients, the DCN sampling is float32, and precompute, verify --recompute and
the three kinds of training run through the CLI."""
import json

import pytest
import torch

from conftest import cli_args, make_setup, plain_metas, teacher_model_cfg
from yolc_kd.cache.reader import CacheReader
from yolc_kd.checkpoint import read_checkpoint
from yolc_kd.cli import main
from yolc_kd.errors import UserError
from yolc_kd.kd import KDLoss, student_losses
from yolc_kd.models import build_detector
from yolc_kd.models.deform import DeformConv2d
from yolc_kd.models.detector import YOLC
from yolc_kd.models.yolc_head import YOLCHead
from yolc_kd.runtime import amp_dtype, mixed_precision
from yolc_kd.settings import DistillSettings
from yolc_kd.teacher import teacher_targets
from yolc_kd.train.loop import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

DCFG = DistillSettings(max_patches_per_img=2, min_patch_size=16)
LOW = (torch.bfloat16, torch.float16)


def _teacher() -> YOLC:
    """The tiny random teacher of the precompute tests (its LSM finds patches)."""
    torch.manual_seed(0)
    model = build_detector(teacher_model_cfg()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("bbox_head"):
                p.add_(torch.randn_like(p) * 0.3)
        model.bbox_head.local_head[-1].bias.fill_(-3.0)
    return model


def _batch(n: int = 2):
    torch.manual_seed(1)
    gt_b = [torch.tensor([[10., 10., 30., 26.]]), torch.tensor([[40., 30., 60., 52.]])][:n]
    gt_l = [torch.tensor([0]), torch.tensor([2])][:n]
    return torch.randn(n, 3, 96, 128), plain_metas(n, 96, 128), gt_b, gt_l


def test_amp_dtype_defaults_and_bad_names():
    assert amp_dtype("cpu", True) == torch.bfloat16
    assert amp_dtype("cpu", True, "float16") == torch.float16
    assert amp_dtype("cpu", True, torch.bfloat16) == torch.bfloat16
    assert amp_dtype("cpu", False, "float16") is None
    for bad in ("float32", "int8", torch.float64):
        with pytest.raises(UserError, match="--amp-dtype must be one of float16, bfloat16"):
            mixed_precision("cpu", True, bad)


@pytest.mark.parametrize("dtype", LOW)
def test_teacher_targets_under_autocast_are_float32(dtype):
    teacher = _teacher()
    img, metas, _, _ = _batch()
    with torch.no_grad():
        full = teacher_targets(teacher, img, metas, DCFG)
        with mixed_precision("cpu", True, dtype):
            low = teacher_targets(teacher, img, metas, DCFG)  # the refine slots took the patch output's dtype
    assert low.patch_valid.any()
    for name in ("heatmap", "coarse", "refine", "patch_boxes", "patch_scales"):
        assert getattr(low, name).dtype == torch.float32, name
    assert (low.heatmap - full.heatmap).abs().max() < 0.05  # the same teacher, rounded


@pytest.mark.parametrize("bias", (30.0, -30.0))
@pytest.mark.parametrize("dtype", LOW)
def test_saturated_heatmap_gives_finite_gradients(bias, dtype):
    """Logits of +-30: a float16 sigmoid is exactly 1 (0 from about -17), where log(1 - p + 1e-12) and the KD
    logs had infinite gradients and NaN came through the sigmoid's backward while every loss stayed finite."""
    teacher = _teacher()
    img, metas, gt_b, gt_l = _batch()
    with torch.no_grad():
        targets = teacher_targets(teacher, img, metas, DCFG)
    torch.manual_seed(2)
    student = build_detector(teacher_model_cfg()).train()
    with torch.no_grad():
        student.bbox_head.local_head[-1].bias.fill_(bias)
    total = 0
    with mixed_precision("cpu", True, dtype):
        heat = student.bbox_head.forward_heatmap(student.extract_feat(img)[0])
        for mode in ("soft_focal", "kl", "mse"):  # one backward through all three heatmap KD formulas
            losses = student_losses(student, img, metas, gt_b, gt_l, targets, KDLoss(DCFG.replace(hm_kd=mode)))
            assert all(torch.isfinite(v) for v in losses.values()), (mode, {k: float(v) for k, v in losses.items()})
            total = total + sum(losses.values())
    total.backward()
    bad = [n for n, p in student.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not bad, bad[:3]
    assert heat.dtype == torch.float32 and bool((heat == 1.0).any()) == (bias > 0)  # saturated in float32 too


@pytest.mark.parametrize("dtype", LOW)
def test_dcn_offsets_and_sampling_under_autocast_equal_float32(dtype):
    """Grid coordinates up to 255 (a 1024-pixel-wide input): in float16 the offsets were off by up to 0.23 cells,
    in bfloat16 by 1.8; under autocast they are now the float32 ones of the same (rounded) inputs."""
    head = YOLCHead(in_channel=8, feat_channel=8, num_classes=3)
    torch.manual_seed(3)
    h, w = 160, 256
    coarse = torch.cat([torch.rand(2, 2, h, w) - 0.5, torch.rand(2, 2, h, w) * 8], 1).to(dtype)
    offset = torch.rand(2, 18, h, w).to(dtype)
    with mixed_precision("cpu", True, dtype):
        got = head.gen_dcn_offset(coarse, offset)
    want = head.gen_dcn_offset(coarse.float(), offset.float())
    assert got.dtype == torch.float32 and torch.equal(got, want)

    conv = DeformConv2d(8, 4, 3, padding=1, bias=False)
    x = torch.randn(1, 8, 24, 256).to(dtype)
    off = (torch.randn(1, 18, 24, 256) * 3).float()
    with mixed_precision("cpu", True, dtype):
        y = conv(x, off)
    assert y.dtype == torch.float32 and torch.equal(y, conv(x.float(), off))


# ----------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def amp_setup(tmp_path_factory):
    """A bfloat16 precompute (--amp on the CPU) through the CLI: the cache the training tests read."""
    s = make_setup(tmp_path_factory.mktemp("amp"), n_images=4)
    s.cache = s.root / "soft_amp"
    assert main(cli_args(s, s.cache, "--amp", "--device", "cpu")) == 0
    return s


def test_precompute_amp_records_its_dtype_and_verify_recomputes_with_it(amp_setup, capsys):
    s = amp_setup
    m = CacheReader(s.cache).manifest
    assert m["complete"] and m["amp"] == "bfloat16" and m["counts"]["samples_written"] == 8
    capsys.readouterr()
    assert main(["verify", str(s.cache), "--recompute", "3", "--config", str(s.config), "--ckpt", str(s.ckpt),
                 "--device", "cpu", "--no-progress"]) == 0, capsys.readouterr().out
    # a rerun with another dtype would mix two numerics in one cache: refused, one line
    capsys.readouterr()
    assert main(cli_args(s, s.cache, "--amp", "--amp-dtype", "float16", "--device", "cpu")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "amp" in err[0], err


def test_amp_dtype_without_amp_is_one_line(amp_setup, tmp_path, capsys):
    s = amp_setup
    assert main(cli_args(s, tmp_path / "c", "--amp-dtype", "float16")) == 1
    assert main(["train", "--config", str(s.config), "--work-dir", str(tmp_path / "w"), "--amp-dtype", "bfloat16",
                 "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"yolc-kd {cmd}: error: --amp-dtype needs --amp" for cmd in ("precompute", "train")], err


@pytest.mark.parametrize("kind", ("supervised", "supervised_fp16", "cache", "online"))
def test_train_amp_two_iterations_with_finite_gradients(amp_setup, tmp_path, monkeypatch, kind):
    s = amp_setup
    seen = []
    step, forward_train = Trainer.step, YOLC.forward_train

    def checked_step(self, batch, it):
        out = step(self, batch, it)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        seen.append(dict(finite=bool(grads) and all(bool(torch.isfinite(g).all()) for g in grads),
                         scaler=self.scaler.is_enabled()))
        return out

    def recorded_forward(self, *args, **kwargs):
        seen.append(dict(autocast=torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None))
        return forward_train(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "step", checked_step)
    monkeypatch.setattr(YOLC, "forward_train", recorded_forward)
    extra = {"supervised": [], "supervised_fp16": ["--amp-dtype", "float16"], "cache": ["--cache", str(s.cache)],
             "online": ["--online", "--teacher-ckpt", str(s.ckpt)]}[kind]
    config = s.config
    if kind.startswith("supervised"):  # the setup's config distils
        config = tmp_path / "supervised.py"
        config.write_text(f"_base_ = {str(s.config)!r}\ndistill_cfg = dict(enable=False)\n")
    work = tmp_path / "w"
    assert main(["train", "--config", str(config), "--work-dir", str(work), "--max-iters", "2", "--amp",
                 "--device", "cpu", "--log-interval", "1", "--no-progress", *extra]) == 0
    dtype = torch.float16 if kind == "supervised_fp16" else torch.bfloat16
    assert [x for x in seen if "autocast" in x] == [dict(autocast=dtype)] * 2
    assert [x for x in seen if "finite" in x] == [dict(finite=True, scaler=False)] * 2  # no loss scaling on CPU
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(abs(v) < float("inf") for v in losses)
    if kind in ("cache", "online"):
        assert all("loss_kd_global_hm" in r for r in records if "loss" in r)


@pytest.mark.cuda
def test_cuda_float16_precompute_verify_and_train_with_loss_scaling(cuda_device, tmp_path, monkeypatch):
    """On a GPU (YOLC_KD_TEST_DEVICE=cuda): --amp is float16 with the GradScaler; precompute records it and verify
    --recompute repeats it; train --cache and --online take 2 steps and save finite weights."""
    s = make_setup(tmp_path / "setup", n_images=4)
    dev = str(cuda_device)
    cache = tmp_path / "soft"
    assert main(cli_args(s, cache, "--amp", "--deterministic", "--device", dev)) == 0
    assert CacheReader(cache).manifest["amp"] == "float16"
    assert main(["verify", str(cache), "--recompute", "3", "--config", str(s.config), "--ckpt", str(s.ckpt),
                 "--device", dev, "--no-progress"]) == 0
    scaled = []
    step = Trainer.step

    def recorded_step(self, batch, it):
        scaled.append(self.scaler.is_enabled())
        return step(self, batch, it)

    monkeypatch.setattr(Trainer, "step", recorded_step)
    for i, extra in enumerate((["--cache", str(cache)], ["--online", "--teacher-ckpt", str(s.ckpt)])):
        work = tmp_path / f"w{i}"
        assert main(["train", "--config", str(s.config), "--work-dir", str(work), "--max-iters", "2", "--amp",
                     "--device", dev, "--no-progress", *extra]) == 0
        weights, _, _ = read_checkpoint(work / "latest.pth", False)
        assert all(bool(torch.isfinite(v).all()) for v in weights.values() if v.is_floating_point())
    assert scaled == [True] * 4
