"""The KD loss formulas: heatmap KD (soft_focal, mse, kl), box KD (weighted by the teacher's confidence, or mse)
on decoded boxes, and kd_losses, the three weighted terms of distill_cfg. Every option comes from the run's
settings.DistillSettings; no formula restates a default."""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from yolc_kd import crops
from yolc_kd.kd.targets import KDTargets
from yolc_kd.models.losses import gwd_distance_loss, recomputed_in_backward
from yolc_kd.settings import BOX_KD_DISTANCES, BOX_KD_MODES, DistillSettings, HM_KD_MODES
from yolc_kd.stride import BOX_STRIDE


def _check_shape(name: str, student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"KD shape mismatch for {name}: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}")


PROB_EPS = 1e-12                   # GaussianFocalLoss's eps on the probabilities inside the logs
GWD_WEIGHT, L1_WEIGHT = 2.0, 0.5   # YOLCHead's loss_xywh (GWDLoss) and L1 loss weights
L1_COORD_WEIGHTS = (1.0, 1.0, 0.2, 0.2)  # YOLC down-weights the size terms of L1 (targets.yolc_targets)


def teacher_peak_count(p_t: torch.Tensor, threshold: float) -> torch.Tensor:
    """Number of 3x3 local maxima (as YOLC's decode) of p_t at or above threshold over the whole batch, clamped
    at 1 and detached: the teacher's object count, YOLC's avg_factor analogue. A plateau (a quantised cache
    heatmap's flat top) counts once: a peak is also strictly above its up-left, up, up-right and left neighbours."""
    p = p_t.detach()
    peak = (p == F.max_pool2d(p, 3, stride=1, padding=1)) & (p >= threshold)
    h, w = p.shape[-2:]
    padded = F.pad(p, (1, 1, 1, 0), value=-1.0)  # pixel (y, x) sits at (y + 1, x + 1)
    for dy, dx in ((0, 0), (0, 1), (0, 2), (1, 0)):
        peak &= p > padded[..., dy:dy + h, dx:dx + w]
    return peak.sum().clamp(min=1).to(p.dtype)


def _soft_focal_sum(p_s: torch.Tensor, p_t: torch.Tensor, beta: float,
                    mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    p_s = p_s.float()  # a lower-precision heatmap is cast here, so its float32 copy is not kept either
    log_p = p_s.clamp(min=PROB_EPS).log()
    log_1mp = (1 - p_s).clamp(min=PROB_EPS).log()
    bce = -(p_t * log_p + (1 - p_t) * log_1mp)
    modulator = (p_s - p_t).abs().pow(beta) if beta else torch.ones_like(bce)
    if mask is not None:
        modulator = modulator * mask
    return (bce * modulator).sum()


def soft_focal_heatmap_kd(p_s: torch.Tensor, p_t: torch.Tensor, beta: float, peak_threshold: float,
                          mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Quality-focal soft BCE: sum of BCE(p_s; p_t) * |p_s - p_t|^beta over all elements (those where the
    (B,1,H,W) mask is True) / teacher peaks at or above peak_threshold (distill_cfg.hm_kd_beta, hm_kd_peak_thr)."""
    p_t = p_t.float()
    total = recomputed_in_backward(lambda s, t: _soft_focal_sum(s, t, beta, mask), p_s, p_t)
    return total / teacher_peak_count(p_t if mask is None else p_t * mask, peak_threshold)


def masked_mean(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """x.mean(), or the mean over the elements where mask (broadcast to x) is True (0 when there are none)."""
    if mask is None:
        return x.mean()
    m = mask.to(x.dtype).expand_as(x)
    return (x * m).sum() / m.sum().clamp(min=1.0)


def heatmap_kd(p_s: torch.Tensor, p_t: torch.Tensor, settings: DistillSettings,
               mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The heatmap term of settings.hm_kd: mse (seed): MSE on probabilities; kl: KL of per-pixel class softmax of
    the logits recovered from the probabilities, at hm_kd_temperature; soft_focal: soft_focal_heatmap_kd with
    hm_kd_beta and hm_kd_peak_thr. mask (B,1,H,W): only those pixels count."""
    mode = settings.hm_kd
    if mode == "mse":
        if mask is None:
            return F.mse_loss(p_s.float(), p_t.float(), reduction="mean")
        return masked_mean((p_s.float() - p_t.float()).pow(2), mask)
    if mode == "soft_focal":
        return soft_focal_heatmap_kd(p_s, p_t, float(settings.hm_kd_beta), float(settings.hm_kd_peak_thr), mask)
    if mode != "kl":
        raise ValueError(f"unknown hm_kd mode {mode!r} ({', '.join(HM_KD_MODES)})")
    temperature = float(settings.hm_kd_temperature)
    return recomputed_in_backward(lambda s, t: _kl_heatmap_kd(s, t, temperature, mask), p_s, p_t)


def _kl_heatmap_kd(p_s: torch.Tensor, p_t: torch.Tensor, temperature: float,
                   mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    eps = 1e-6
    logit_s = torch.logit(p_s.float().clamp(eps, 1 - eps))
    logit_t = torch.logit(p_t.float().clamp(eps, 1 - eps))
    log_q_s = F.log_softmax(logit_s / temperature, dim=1)
    log_q_t = F.log_softmax(logit_t / temperature, dim=1)
    kl = (log_q_t.exp() * (log_q_t - log_q_s)).sum(dim=1)  # (B,H,W)
    return masked_mean(kl, None if mask is None else mask[:, 0]) * temperature ** 2


def cell_weights(heatmap: torch.Tensor, grid_hw: Tuple[int, int]) -> torch.Tensor:
    """(B,C,H,W) teacher probabilities -> (B, h*w) confidence per stride-4 regression cell: max over classes,
    then 4x4 max-pool (pixel (y, x) decodes from cell (y//4, x//4), as YOLCHead.decode_heatmap)."""
    b, _, hh, ww = heatmap.shape
    if (hh, ww) != (BOX_STRIDE * grid_hw[0], BOX_STRIDE * grid_hw[1]):
        raise ValueError(f"KD heatmap {hh}x{ww} is not {BOX_STRIDE}x the regression grid {grid_hw[0]}x{grid_hw[1]}")
    conf = heatmap.detach().amax(dim=1, keepdim=True)
    return F.max_pool2d(conf, BOX_STRIDE, stride=BOX_STRIDE).reshape(b, -1)


def patch_cell_weights(targets: KDTargets, grid_hw: Tuple[int, int]) -> torch.Tensor:
    """(Np, ph/4*pw/4) teacher confidence per refine cell of every valid patch: the max-over-classes heatmap
    cut, resized and padded exactly as the image patches (crops.KDPatchPlan.cut), then 4x4 max-pooled."""
    conf = targets.heatmap.detach().float().amax(dim=1, keepdim=True)
    canvas = (BOX_STRIDE * int(grid_hw[0]), BOX_STRIDE * int(grid_hw[1]))  # the canvas the refine maps were computed on
    plan = crops.KDPatchPlan.from_targets(targets.patch_boxes, targets.patch_scales, targets.patch_valid,
                                          conf.shape[2:], canvas)
    patches = plan.cut(conf)
    return F.max_pool2d(patches, BOX_STRIDE, stride=BOX_STRIDE).reshape(patches.shape[0], -1)


def _cell_mask(valid: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """(N,1,h,w) bool cell mask -> (N, h*w) float (the decoded boxes' cell order), or None."""
    return None if valid is None else valid.flatten(1).float()


def box_distance(box_s: torch.Tensor, box_t: torch.Tensor, distance: str) -> torch.Tensor:
    """Per-cell distance of decoded boxes (...,4) -> (...): squared error summed over the 4 coords (mse), or
    YOLC's own box loss per box, 2 * GWD + 0.5 * L1 with size terms at 0.2 (gwd_l1)."""
    if distance == "mse":
        return (box_s - box_t).pow(2).sum(dim=-1)
    if distance == "gwd_l1":
        l1 = ((box_s - box_t).abs() * box_s.new_tensor(L1_COORD_WEIGHTS)).sum(dim=-1)
        return GWD_WEIGHT * gwd_distance_loss(box_s, box_t) + L1_WEIGHT * l1
    raise ValueError(f"unknown box_kd_distance {distance!r} ({', '.join(BOX_KD_DISTANCES)})")


def weighted_box_kd(box_s: torch.Tensor, box_t: torch.Tensor, weight: torch.Tensor, distance: str) -> torch.Tensor:
    """sum(w * d) / max(sum(w), 1) over all cells: a confidence-weighted mean of the per-cell distance;
    an empty scene (w ~ 0) gives ~0 instead of a mean over background cells."""
    weight = weight.detach()
    return (box_distance(box_s, box_t, distance) * weight).sum() / weight.sum().clamp(min=1.0)


def kd_losses(heatmap_s: torch.Tensor, coarse_s: torch.Tensor, patch_refine_s: torch.Tensor, targets: KDTargets,
              settings: DistillSettings, decode: Callable[[torch.Tensor], torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The three KD terms of the student's full-view heatmap and coarse maps and its KD patches' refine maps,
    weighted as settings say; every teacher tensor is detached. hm_kd / box_kd pick the formulas ('mse' for both
    is the seed's). decode: raw box maps -> boxes (models.yolc_head.decode_xywh_to_bbox). They compute in
    float32, also under autocast (float16's logs of saturated probabilities give infinite gradients)."""
    with torch.autocast(heatmap_s.device.type, enabled=False):
        return _kd_terms(heatmap_s, coarse_s, patch_refine_s, targets, settings, decode)


def _kd_terms(heatmap_s: torch.Tensor, coarse_s: torch.Tensor, patch_refine_s: torch.Tensor, targets: KDTargets,
              settings: DistillSettings, decode: Callable[[torch.Tensor], torch.Tensor]) -> Dict[str, torch.Tensor]:
    t = targets.detach()
    for name in ("heatmap", "coarse", "refine"):
        if not getattr(t, name).is_floating_point():
            raise TypeError(f"KD target {name} is {getattr(t, name).dtype}: dequantise stored targets first")
    _check_shape("heatmap", heatmap_s, t.heatmap)
    _check_shape("coarse", coarse_s, t.coarse)
    # heatmap_kd casts to float32 itself (inside the recomputed part: no float32 copy of a lower-precision heatmap
    # is kept)
    hm = heatmap_kd(heatmap_s, t.heatmap, settings, mask=t.heatmap_valid)
    box_mode, distance = settings.box_kd, settings.box_kd_distance
    if box_mode not in BOX_KD_MODES:
        raise ValueError(f"unknown box_kd mode {box_mode!r} ({', '.join(BOX_KD_MODES)})")
    box_s, box_t = decode(coarse_s.float()), decode(t.coarse.float())
    coarse_mask = _cell_mask(t.coarse_valid)  # (B, h*w) or None
    if box_mode == "mse":
        if coarse_mask is None:
            coarse = F.mse_loss(box_s, box_t, reduction="mean")
        else:
            coarse = masked_mean((box_s - box_t).pow(2), coarse_mask[..., None])
    else:
        weight = cell_weights(t.heatmap.float(), coarse_s.shape[2:])
        coarse = weighted_box_kd(box_s, box_t, weight if coarse_mask is None else weight * coarse_mask, distance)
    ref_t = t.patch_refine.float()
    _check_shape("refine", patch_refine_s, ref_t)
    refine_mask = _cell_mask(t.patch_refine_valid)  # (Np, cells) or None
    if ref_t.shape[0] == 0:
        local = heatmap_s.sum() * 0  # no patch in this batch: zero that still joins the graph
    elif box_mode == "mse":
        sq = (decode(patch_refine_s.float()) - decode(ref_t)).pow(2)
        if refine_mask is None:
            per_patch = sq.mean(dim=(1, 2))
        else:
            m = refine_mask[..., None].expand_as(sq)
            per_patch = (sq * m).sum(dim=(1, 2)) / m.sum(dim=(1, 2)).clamp(min=1.0)
        local = per_patch.mean()  # mean inside each patch, then over the patches of the batch
    else:  # one confidence-weighted mean over the cells of all patches of the batch
        weight = patch_cell_weights(t, ref_t.shape[2:])
        local = weighted_box_kd(decode(patch_refine_s.float()), decode(ref_t),
                                weight if refine_mask is None else weight * refine_mask, distance)
    return dict(loss_kd_global_hm=float(settings.kd_weight_global_hm) * hm,
                loss_kd_global_coarse=float(settings.kd_weight_global_coarse) * coarse,
                loss_kd_local_refine=float(settings.kd_weight_local_refine) * local)
