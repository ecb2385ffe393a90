"""KD losses and the online teacher."""
import numpy as np
import pytest
import torch

from conftest import plain_metas, tiny_model_cfg
from yolc_kd.checkpoint import save_checkpoint
from yolc_kd.config import DISTILL_DEFAULTS
from yolc_kd.kd import KDTargets, heatmap_kd, kd_losses
from yolc_kd.models import build_detector

DCFG = dict(DISTILL_DEFAULTS, max_patches_per_img=2, min_patch_size=16, kd_weight_global_hm=2.0,
            kd_weight_global_coarse=0.5, kd_weight_local_refine=0.25)


def _targets(b=2, c=3, h=32, w=48, k=2, valid=((True, False), (False, False))):
    ph, pw = 16, 24
    return KDTargets(heatmap=torch.rand(b, c, h, w), coarse=torch.randn(b, 4, h // 4, w // 4),
                     patch_boxes=torch.tensor([[[0., 0., 20., 20.]] * k] * b),
                     patch_scales=torch.ones(b, k), patch_valid=torch.tensor(valid),
                     refine=torch.randn(b, k, 4, ph // 4, pw // 4))


def _decode(x):
    return build_detector(tiny_model_cfg()).bbox_head.decode_xywh_to_bbox(x)


def test_kd_loss_formulas():
    t = _targets()
    hm_s = torch.rand_like(t.heatmap, requires_grad=True)
    coarse_s = torch.randn_like(t.coarse, requires_grad=True)
    ref_s = torch.randn(1, 4, 4, 6, requires_grad=True)
    losses = kd_losses(hm_s, coarse_s, ref_s, t, DCFG, _decode)
    torch.testing.assert_close(losses["loss_kd_global_hm"], 2.0 * ((hm_s - t.heatmap) ** 2).mean())
    torch.testing.assert_close(losses["loss_kd_global_coarse"],
                               0.5 * ((_decode(coarse_s) - _decode(t.coarse)) ** 2).mean())
    torch.testing.assert_close(losses["loss_kd_local_refine"],
                               0.25 * ((_decode(ref_s) - _decode(t.refine[0, :1])) ** 2).mean())
    sum(losses.values()).backward()
    assert hm_s.grad is not None and coarse_s.grad is not None and ref_s.grad is not None


def test_local_refine_averages_over_patches():
    t = _targets(valid=((True, True), (True, False)))
    ref_s = torch.randn(3, 4, 4, 6)
    loss = kd_losses(torch.rand_like(t.heatmap), torch.randn_like(t.coarse), ref_s, t, DCFG, _decode)
    per_patch = [((_decode(ref_s[i:i + 1]) - _decode(t.patch_refine[i:i + 1])) ** 2).mean() for i in range(3)]
    torch.testing.assert_close(loss["loss_kd_local_refine"], 0.25 * sum(per_patch) / 3)


def test_zero_patches_give_zero_not_nan():
    t = _targets(valid=((False, False), (False, False)))
    hm_s = torch.rand_like(t.heatmap, requires_grad=True)
    losses = kd_losses(hm_s, torch.randn_like(t.coarse), torch.zeros(0, 4, 4, 6), t, DCFG, _decode)
    assert float(losses["loss_kd_local_refine"].detach()) == 0.0
    sum(losses.values()).backward()


def test_shape_mismatch_names_the_tensor():
    t = _targets()
    with pytest.raises(ValueError, match="heatmap"):
        kd_losses(torch.rand(2, 3, 32, 40), t.coarse, torch.zeros(1, 4, 4, 6), t, DCFG, _decode)
    with pytest.raises(ValueError, match="refine"):
        kd_losses(t.heatmap, t.coarse, torch.zeros(2, 4, 4, 6), t, DCFG, _decode)


def test_kl_heatmap_kd_zero_for_equal_and_positive_otherwise():
    p = torch.rand(2, 3, 8, 8)
    assert float(heatmap_kd(p, p, "kl", 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(heatmap_kd(torch.rand(2, 3, 8, 8), p, "kl", 2.0)) > 0


@pytest.fixture()
def teacher_ckpt(tmp_path):
    torch.manual_seed(1)
    teacher = build_detector(tiny_model_cfg(num_classes=3))
    return save_checkpoint(tmp_path / "teacher.pth", teacher), teacher


def test_online_teacher_is_frozen_and_outside_the_student(teacher_ckpt):
    path, _ = teacher_ckpt
    model = build_detector(tiny_model_cfg(num_classes=3), distill_cfg=DCFG, online_teacher=True,
                           teacher_ckpt=str(path)).train()
    assert model.teacher is not None and not model.teacher.training
    assert all(not p.requires_grad for p in model.teacher.parameters())
    assert not any(k.startswith("teacher") for k in model.state_dict())
    img = torch.randn(2, 3, 96, 128)
    gt_b = [torch.tensor([[10., 10., 30., 26.]]), torch.tensor([[40., 30., 60., 52.]])]
    gt_l = [torch.tensor([0]), torch.tensor([2])]
    losses = model(img, plain_metas(2, 96, 128), gt_bboxes=gt_b, gt_labels=gt_l)
    assert {"loss_kd_global_hm", "loss_kd_global_coarse", "loss_kd_local_refine"} <= set(losses)
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.teacher.parameters())


def test_teacher_equal_to_student_gives_zero_kd(teacher_ckpt):
    path, teacher = teacher_ckpt
    model = build_detector(tiny_model_cfg(num_classes=3), distill_cfg=DCFG, online_teacher=True, teacher_ckpt=str(path))
    model.load_state_dict(teacher.state_dict())
    model.eval()  # same weights and BN statistics: student outputs equal the teacher's
    img = torch.randn(1, 3, 96, 128)
    losses = model.forward_train(img, plain_metas(1, 96, 128), [torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.long)])
    for key in ("loss_kd_global_hm", "loss_kd_global_coarse", "loss_kd_local_refine"):
        assert float(losses[key].detach()) == pytest.approx(0.0, abs=1e-8), key


def test_use_teacher_crop_false_uses_student_regions(teacher_ckpt):
    path, _ = teacher_ckpt
    dcfg = dict(DCFG, use_teacher_crop=False)
    model = build_detector(tiny_model_cfg(num_classes=3), distill_cfg=dcfg, online_teacher=True, teacher_ckpt=str(path))
    calls = []
    original = model.teacher.kd_targets
    model.teacher.kd_targets = lambda img, metas, d, coords=None: calls.append(coords) or original(img, metas, d, coords)
    model.train().forward_train(torch.randn(1, 3, 96, 128), plain_metas(1, 96, 128), [torch.zeros(0, 4)],
                                [torch.zeros(0, dtype=torch.long)])
    assert calls and calls[0] is not None and isinstance(calls[0][0], np.ndarray)


def test_missing_teacher_checkpoint_is_a_clear_error():
    from yolc_kd.errors import UserError

    with pytest.raises(UserError, match="teacher checkpoint"):
        build_detector(tiny_model_cfg(), distill_cfg=DCFG, online_teacher=True)
