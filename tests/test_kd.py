"""KD losses."""
import math
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model_cfg
from yolc_kd.cache.codec import HEATMAP
from yolc_kd.errors import UserError
from yolc_kd.kd import (KDTargets, box_distance, cell_weights, heatmap_kd, kd_losses, patch_cell_weights,
                        soft_focal_heatmap_kd, teacher_peak_count, weighted_box_kd)
from yolc_kd.models import build_detector
from yolc_kd.models.losses import GWDLoss, L1Loss
from yolc_kd.settings import HM_KD_MODES, DistillSettings

# the seed's formulas (selected by name); the normalised defaults are tested in the second half of this file
DCFG = DistillSettings(max_patches_per_img=2, min_patch_size=16, kd_weight_global_hm=2.0,
            kd_weight_global_coarse=0.5, kd_weight_local_refine=0.25, hm_kd="mse", box_kd="mse")


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
    assert float(heatmap_kd(p, p, DistillSettings(hm_kd="kl", hm_kd_temperature=2.0))) == pytest.approx(0.0, abs=1e-6)
    assert float(heatmap_kd(torch.rand(2, 3, 8, 8), p, DistillSettings(hm_kd="kl", hm_kd_temperature=2.0))) > 0


# ---------------------------------------------------------------- normalised losses (the defaults)
NORM = DistillSettings(kd_weight_global_hm=1.0, kd_weight_global_coarse=1.0, kd_weight_local_refine=1.0)
DEFAULT = DistillSettings()


def _bce(p, t):
    return -(t * math.log(p) + (1 - t) * math.log(1 - p))


def test_defaults_are_the_normalised_losses_and_seed_stays_selectable():
    assert (DEFAULT.hm_kd, DEFAULT.box_kd) == ("soft_focal", "weighted")
    assert DEFAULT.box_kd_distance == "gwd_l1" and DEFAULT.hm_kd_beta == 2.0
    out = DistillSettings.from_config(dict(hm_kd="mse", box_kd="mse", box_kd_distance="mse", hm_kd_beta=1,
                                           hm_kd_peak_thr=0.5))
    assert (out.hm_kd, out.box_kd, out.box_kd_distance) == ("mse", "mse", "mse")


@pytest.mark.parametrize("key,value,match", [
    ("hm_kd", "focal", r"'distill_cfg\.hm_kd' must be one of " + re.escape(", ".join(map(repr, HM_KD_MODES)))
     + ", got 'focal'"),
    ("box_kd", "l2", r"'distill_cfg\.box_kd' must be one of 'weighted', 'mse'"),
    ("box_kd_distance", "iou", r"'distill_cfg\.box_kd_distance' must be one of 'mse', 'gwd_l1'"),
    ("hm_kd_beta", -1.0, r"hm_kd_beta' must be in 0\.\.8"),
    ("hm_kd_peak_thr", 1.0, r"hm_kd_peak_thr' must be in \(0, 1\)"),
    ("hm_kd_beta", "2", r"hm_kd_beta' must be int/float, got str"),
    ("box_kd", 1, r"box_kd' must be str, got int"),
    ("kd_weight_local_refine", -0.5, r"kd_weight_local_refine' must be >= 0"),
])
def test_bad_kd_options_are_one_line_errors(key, value, match):
    with pytest.raises(UserError, match=match) as err:
        DistillSettings.from_config({key: value}, "cfg.py")
    assert "\n" not in str(err.value) and "cfg.py" in str(err.value)


def test_soft_focal_is_zero_where_student_equals_teacher():
    p = torch.rand(2, 3, 8, 8, requires_grad=True)
    loss = heatmap_kd(p, p.detach(), DistillSettings(hm_kd="soft_focal"))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.isfinite(p.grad).all()


def test_soft_focal_single_hot_cell_by_hand():
    p_t = torch.zeros(1, 2, 6, 6)
    p_t[0, 1, 2, 3] = 1.0  # one peak: normaliser 1
    p_s = torch.full_like(p_t, 0.2, requires_grad=True)
    n = p_t.numel()
    expected = _bce(0.2, 1.0) * 0.8 ** 2 + (n - 1) * _bce(0.2, 0.0) * 0.2 ** 2
    loss = soft_focal_heatmap_kd(p_s, p_t, beta=2.0, peak_threshold=0.3)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    assert float(soft_focal_heatmap_kd(p_s, p_t, beta=0.0, peak_threshold=0.3).detach()) == pytest.approx(
        _bce(0.2, 1.0) + (n - 1) * _bce(0.2, 0.0), rel=1e-5)  # beta 0: plain soft BCE
    loss.backward()
    assert torch.isfinite(p_s.grad).all()
    assert float(p_s.grad[0, 1, 2, 3]) < 0 < float(p_s.grad[0, 0, 0, 0])  # up at the peak, down elsewhere


def test_soft_focal_normaliser_counts_teacher_peaks():
    p_t = torch.zeros(2, 1, 9, 9)
    p_t[0, 0, 2, 2], p_t[0, 0, 6, 6], p_t[1, 0, 4, 4] = 0.9, 0.5, 0.7
    p_t[1, 0, 0, 8] = 0.2  # below hm_kd_peak_thr 0.3: not an object
    assert float(teacher_peak_count(p_t, 0.3)) == 3.0
    assert float(teacher_peak_count(torch.zeros(1, 2, 4, 4), 0.3)) == 1.0  # empty scene: clamped at 1
    p_s = torch.full_like(p_t, 0.1)
    num = sum(_bce(0.1, float(t)) * abs(0.1 - float(t)) ** 2 for t in p_t.flatten())
    assert float(soft_focal_heatmap_kd(p_s, p_t, DEFAULT.hm_kd_beta, DEFAULT.hm_kd_peak_thr)) == pytest.approx(num / 3, rel=1e-5)


def test_soft_focal_is_stable_at_saturated_probabilities():
    logits = torch.tensor([-200.0, -30.0, 0.0, 30.0, 200.0]).view(1, 1, 1, 5).requires_grad_()
    p_t = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0]).view(1, 1, 1, 5)
    loss = soft_focal_heatmap_kd(logits.sigmoid(), p_t, DEFAULT.hm_kd_beta, DEFAULT.hm_kd_peak_thr)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_heatmap_kd_is_unchanged_by_padding_with_background():
    p_t = torch.zeros(1, 3, 16, 16)
    p_t[0, 0, 4:7, 4:7], p_t[0, 2, 10, 11] = torch.tensor([[.2, .5, .2], [.5, .9, .5], [.2, .5, .2]]), 0.8
    p_s = torch.rand_like(p_t) * 0.3
    small = soft_focal_heatmap_kd(p_s, p_t, DEFAULT.hm_kd_beta, DEFAULT.hm_kd_peak_thr)
    big = soft_focal_heatmap_kd(F.pad(p_s, (0, 48, 0, 32)), F.pad(p_t, (0, 48, 0, 32)),  # student agrees: 0 there
                                DEFAULT.hm_kd_beta, DEFAULT.hm_kd_peak_thr)
    assert float(big) == pytest.approx(float(small), abs=1e-5)


def test_cell_weights_follow_the_decode_cell_of_each_pixel():
    heat = torch.zeros(1, 2, 16, 24)
    heat[0, 1, 5, 9] = 0.7    # pixel (y=5, x=9) -> cell (1, 2), as YOLCHead.decode_heatmap reads it
    heat[0, 0, 5, 10] = 0.4   # same cell, other class: the max wins
    w = cell_weights(heat, (4, 6)).view(4, 6)
    expected = torch.zeros(4, 6)
    expected[1, 2] = 0.7
    torch.testing.assert_close(w, expected)
    with pytest.raises(ValueError, match="not 4x the regression grid"):
        cell_weights(heat, (4, 5))


def test_weighted_box_kd_single_hot_cell_by_hand():
    box_t, box_s = torch.zeros(1, 6, 4), torch.randn(1, 6, 4) * 5
    box_s[0, 3] = torch.tensor([1.0, -2.0, 0.5, 0.0])
    w = torch.zeros(1, 6)
    w[0, 3] = 0.6  # only this cell counts; weights below a total of 1 are not blown up
    assert float(weighted_box_kd(box_s, box_t, w, "mse")) == pytest.approx(0.6 * (1 + 4 + 0.25))
    w[0, 1] = 1.4  # total 2: a weighted mean
    d1 = float((box_s[0, 1] ** 2).sum())
    assert float(weighted_box_kd(box_s, box_t, w, "mse")) == pytest.approx((0.6 * 5.25 + 1.4 * d1) / 2.0, rel=1e-5)


def test_gwd_l1_distance_is_yolcs_box_loss():
    box_s, box_t, w = torch.randn(2, 10, 4), torch.randn(2, 10, 4), torch.rand(2, 10) * 0.5
    norm = float(w.sum().clamp(min=1))
    l1_w = w[..., None] * torch.tensor([1.0, 1.0, 0.2, 0.2])
    expected = GWDLoss(loss_weight=2.0)(box_s, box_t, w, avg_factor=norm) + L1Loss(loss_weight=0.5)(
        box_s, box_t, l1_w, avg_factor=norm)
    torch.testing.assert_close(weighted_box_kd(box_s, box_t, w, "gwd_l1"), expected, rtol=1e-5, atol=1e-6)


def test_gwd_l1_gradient_is_finite_where_student_equals_teacher():
    box = torch.randn(1, 5, 4, requires_grad=True)
    loss = weighted_box_kd(box, box.detach().clone(), torch.ones(1, 5), "gwd_l1")
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.isfinite(box.grad).all()
    with pytest.raises(ValueError, match="box_kd_distance"):
        box_distance(box, box, "iou")


@pytest.mark.parametrize("distance", ["mse", "gwd_l1"])
def test_coarse_kd_is_unchanged_by_padding_with_background(distance):
    t = _targets(b=1, valid=((True, False),))
    t.heatmap.zero_()
    t.heatmap[0, 1, 9, 14], t.heatmap[0, 2, 20, 30] = 0.9, 0.6
    coarse_s = torch.randn_like(t.coarse)
    dcfg = NORM.replace(box_kd_distance=distance)
    small = kd_losses(torch.rand_like(t.heatmap), coarse_s, torch.zeros(1, 4, 4, 6), t, dcfg, _decode)
    # bottom/right background: zero teacher confidence, student and teacher boxes free to disagree there
    big_t = KDTargets(heatmap=F.pad(t.heatmap, (0, 32, 0, 16)), coarse=F.pad(t.coarse, (0, 8, 0, 4), value=3.0),
                      patch_boxes=t.patch_boxes, patch_scales=t.patch_scales, patch_valid=t.patch_valid,
                      refine=t.refine)
    big = kd_losses(torch.rand_like(big_t.heatmap), F.pad(coarse_s, (0, 8, 0, 4), value=-5.0), torch.zeros(1, 4, 4, 6),
                    big_t, dcfg, _decode)
    for key in ("loss_kd_global_coarse", "loss_kd_local_refine"):
        assert float(big[key]) == pytest.approx(float(small[key]), abs=1e-5), key


def test_empty_scene_gives_zero_box_kd_with_finite_gradients():
    t = _targets(valid=((True, True), (True, False)))
    t.heatmap.zero_()
    coarse_s = torch.randn_like(t.coarse, requires_grad=True)
    ref_s = torch.randn(3, 4, 4, 6, requires_grad=True)
    hm_s = torch.rand_like(t.heatmap, requires_grad=True)
    losses = kd_losses(hm_s, coarse_s, ref_s, t, NORM, _decode)
    assert float(losses["loss_kd_global_coarse"].detach()) == 0.0
    assert float(losses["loss_kd_local_refine"].detach()) == 0.0
    sum(losses.values()).backward()
    assert all(torch.isfinite(x.grad).all() for x in (hm_s, coarse_s, ref_s))


def test_patch_weights_are_the_teacher_heatmap_cut_like_the_patch():
    heat = torch.zeros(1, 2, 64, 64)  # patch canvas 32x32 -> refine grid 8x8
    heat[0, 1, 21, 13] = 0.8
    t = KDTargets(heatmap=heat, coarse=torch.zeros(1, 4, 16, 16),
                  patch_boxes=torch.tensor([[[8., 12., 24., 20.], [0., 0., 16., 16.]]]),
                  patch_scales=torch.tensor([[1.0, 2.0]]), patch_valid=torch.tensor([[True, True]]),
                  refine=torch.zeros(1, 2, 4, 8, 8))
    w = patch_cell_weights(t, (8, 8)).view(2, 8, 8)
    expected = torch.zeros(8, 8)
    expected[(21 - 12) // 4, (13 - 8) // 4] = 0.8  # scale 1: the pixel's cell in the patch frame
    torch.testing.assert_close(w[0], expected)
    assert float(w[1].sum()) == 0.0  # the other patch does not contain the pixel
    t.patch_boxes[0, 1] = torch.tensor([4., 8., 16., 16.])  # scale 2: the pixel lands near (2*(21-8), 2*(13-4))
    w = patch_cell_weights(t, (8, 8)).view(2, 8, 8)
    assert w[1].argmax() == (2 * (21 - 8) // 4) * 8 + 2 * (13 - 4) // 4 and float(w[1].max()) > 0.3


def test_weighted_refine_by_hand_and_invalid_slots_ignored():
    t = _targets(valid=((True, False), (False, True)))
    t.heatmap.zero_()
    t.patch_boxes[:] = torch.tensor([0., 0., 24., 16.])
    t.heatmap[0, 0, 5, 9] = 1.0   # view 0 -> its patch's refine cell (1, 2)
    t.heatmap[1, 2, 13, 22] = 0.5  # view 1 -> cell (3, 5)
    ref_s = torch.randn(2, 4, 4, 6)
    loss = kd_losses(torch.rand_like(t.heatmap), torch.randn_like(t.coarse), ref_s, t,
                     NORM.replace(box_kd_distance="mse"), _decode)["loss_kd_local_refine"]
    d = ((_decode(ref_s) - _decode(t.patch_refine)) ** 2).sum(-1)  # (2, 24) per cell
    torch.testing.assert_close(loss, (1.0 * d[0, 1 * 6 + 2] + 0.5 * d[1, 3 * 6 + 5]) / 1.5)


def test_kl_option_still_works_through_kd_losses():
    t = _targets()
    hm_s = torch.rand_like(t.heatmap, requires_grad=True)
    losses = kd_losses(hm_s, torch.randn_like(t.coarse), torch.randn(1, 4, 4, 6), t, NORM.replace(hm_kd="kl"), _decode)
    torch.testing.assert_close(losses["loss_kd_global_hm"], heatmap_kd(hm_s, t.heatmap, DistillSettings(hm_kd="kl", hm_kd_temperature=1.0)))
    losses["loss_kd_global_hm"].backward()
    assert torch.isfinite(hm_s.grad).all()


def test_defaults_end_to_end_finite_and_weighted():
    t = _targets(valid=((True, True), (True, False)))
    args = (torch.rand_like(t.heatmap, requires_grad=True), torch.randn_like(t.coarse, requires_grad=True),
            torch.randn(3, 4, 4, 6, requires_grad=True))
    one = kd_losses(*args, t, NORM, _decode)
    scaled = kd_losses(*args, t, NORM.replace(kd_weight_global_hm=3.0, kd_weight_global_coarse=0.5), _decode)
    torch.testing.assert_close(scaled["loss_kd_global_hm"], 3.0 * one["loss_kd_global_hm"])
    torch.testing.assert_close(scaled["loss_kd_global_coarse"], 0.5 * one["loss_kd_global_coarse"])
    assert float(kd_losses(*args, t, DEFAULT, _decode)
                 ["loss_kd_global_hm"].detach()) == pytest.approx(float(one["loss_kd_global_hm"].detach()))  # defaults
    sum(one.values()).backward()
    assert all(torch.isfinite(a.grad).all() for a in args)


def test_peak_count_counts_a_plateau_once_so_cache_and_live_agree():
    p = torch.zeros(1, 1, 8, 8)
    p[0, 0, 2:4, 2:5] = 0.6                          # one flat-topped object
    p[0, 0, 6, 6] = 0.5
    assert float(teacher_peak_count(p, 0.3)) == 2.0
    live = torch.zeros(1, 1, 9, 9)
    live[0, 0, 3:6, 3:6] = torch.tensor([[.80, .85, .80], [.85, .851, .849], [.80, .85, .80]])
    cached = torch.from_numpy(HEATMAP.decode(HEATMAP.encode(live.numpy())))
    assert int((cached == cached.max()).sum()) > 1  # the quantised top is a plateau
    assert float(teacher_peak_count(live, 0.3)) == float(teacher_peak_count(cached, 0.3)) == 1.0


def test_supervised_gwd_loss_is_yolcs_formula_with_a_finite_gradient_at_zero_distance():
    from yolc_kd.models.losses import gwd_distance_loss

    pred, target = torch.randn(6, 4), torch.randn(6, 4)
    target[2] = pred[2]  # one box exactly on its target
    pred.requires_grad_(True)
    loss = gwd_distance_loss(pred, target)
    distance = torch.square(pred.detach() - target).sum(-1).sqrt()
    torch.testing.assert_close(loss.detach(), 1 - 1 / (1 + torch.log1p(distance)))  # YOLC's values
    loss.sum().backward()
    assert float(loss[2].detach()) == 0.0 and torch.isfinite(pred.grad).all() and (pred.grad[2] == 0).all()
    assert (pred.grad[[0, 1, 3, 4, 5]] != 0).any(dim=1).all()
