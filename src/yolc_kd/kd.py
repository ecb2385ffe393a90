"""Knowledge-distillation targets and losses. The targets object comes from a live teacher
(YOLC.kd_targets) or from the cache reader; the loss never knows which."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from yolc_kd import crops
from yolc_kd.config import DISTILL_DEFAULTS


@dataclass
class KDTargets:
    """Teacher soft labels for a batch of views (fixed shapes, K = max_patches_per_img slots).

    The three masks say where a target exists; None means everywhere (a teacher that saw the view itself: the
    per-view cache, a live teacher). Targets moved into a view from the image-level cache have no teacher value
    in the view's padding nor outside the cached crop, and the losses skip those pixels and cells."""
    heatmap: torch.Tensor       # (B,C,H,W) class probabilities at input resolution
    coarse: torch.Tensor        # (B,4,h,w) raw coarse xywh maps (stride 4); decode_xywh_to_bbox gives boxes
    patch_boxes: torch.Tensor   # (B,K,4) crop [x,y,w,h] in view pixels
    patch_scales: torch.Tensor  # (B,K) resize factor from crop to patch
    patch_valid: torch.Tensor   # (B,K) bool
    refine: torch.Tensor        # (B,K,4,ph/4,pw/4) raw refine maps of the teacher on each patch (0 if invalid)
    heatmap_valid: Optional[torch.Tensor] = None  # (B,1,H,W) bool
    coarse_valid: Optional[torch.Tensor] = None   # (B,1,h,w) bool
    refine_valid: Optional[torch.Tensor] = None   # (B,K,1,ph/4,pw/4) bool

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "KDTargets":
        """fn applied to every tensor field (the masks that are None stay None)."""
        return KDTargets(**{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                            for f in fields(self)})

    def to(self, device, non_blocking: bool = False) -> "KDTargets":
        return self._map(lambda x: x.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "KDTargets":
        """In page-locked memory (the DataLoader calls it with pin_memory=True), for asynchronous copies."""
        return self._map(lambda x: x.pin_memory())

    def detach(self) -> "KDTargets":
        return self._map(lambda x: x.detach())

    def float(self) -> "KDTargets":
        """Floating-point fields as float32 (a teacher run under --amp gives fp16), the masks as they are."""
        return self._map(lambda x: x.float() if x.is_floating_point() else x)

    @staticmethod
    def stack(items: List["KDTargets"]) -> "KDTargets":
        """Concatenate per-sample (batch of 1) targets along the batch axis; a mask that some items lack is
        all True for them."""
        out = {}
        for f in fields(KDTargets):
            values = [getattr(t, f.name) for t in items]
            if all(v is None for v in values):
                out[f.name] = None
                continue
            if any(v is None for v in values):
                like = next(v for v in values if v is not None)
                values = [torch.ones_like(like) if v is None else v for v in values]
            out[f.name] = torch.cat(values)
        return KDTargets(**out)

    def select(self, i: int) -> "KDTargets":
        return self._map(lambda x: x[i:i + 1])

    @property
    def patch_refine(self) -> torch.Tensor:
        """(Np,4,ph/4,pw/4) refine maps of the valid patches in cut order (image by image, slot by slot)."""
        return self.refine[self.patch_valid]

    @property
    def patch_refine_valid(self) -> Optional[torch.Tensor]:
        """(Np,1,ph/4,pw/4) refine mask of the valid patches in cut order, or None (all cells)."""
        return None if self.refine_valid is None else self.refine_valid[self.patch_valid]


def _check_shape(name: str, student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"KD shape mismatch for {name}: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}")


HM_KD_MODES = ("soft_focal", "mse", "kl")
BOX_KD_MODES = ("weighted", "mse")
BOX_KD_DISTANCES = ("mse", "gwd_l1")
PROB_EPS = 1e-12                   # GaussianFocalLoss's eps on the probabilities inside the logs
GWD_WEIGHT, L1_WEIGHT = 2.0, 0.5   # YOLCHead's loss_xywh (GWDLoss) and L1 loss weights
L1_COORD_WEIGHTS = (1.0, 1.0, 0.2, 0.2)  # YOLC down-weights the size terms of L1 (targets.yolc_targets)


def teacher_peak_count(p_t: torch.Tensor, threshold: float = 0.3) -> torch.Tensor:
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


def recomputed_in_backward(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> torch.Tensor:
    """fn(*tensors), its intermediates not kept for backward but computed again when backward reaches them
    (torch.utils.checkpoint, non-reentrant): the same ops on the same inputs inside the same backward graph, so
    values and gradients are bit-identical. For the full-resolution heatmap losses, whose elementwise chains
    otherwise keep about eight (B,C,H,W) tensors each alive from the forward to the backward. fn must be
    deterministic and draw no random numbers; without gradients it simply runs."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return checkpoint(fn, *tensors, use_reentrant=False, preserve_rng_state=False)
    return fn(*tensors)


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


def soft_focal_heatmap_kd(p_s: torch.Tensor, p_t: torch.Tensor, beta: float = 2.0,
                          peak_threshold: float = 0.3, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Quality-focal soft BCE: sum of BCE(p_s; p_t) * |p_s - p_t|^beta over all elements (those where the
    (B,1,H,W) mask is True) / teacher peaks."""
    p_t = p_t.float()
    total = recomputed_in_backward(lambda s, t: _soft_focal_sum(s, t, beta, mask), p_s, p_t)
    return total / teacher_peak_count(p_t if mask is None else p_t * mask, peak_threshold)


def masked_mean(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """x.mean(), or the mean over the elements where mask (broadcast to x) is True (0 when there are none)."""
    if mask is None:
        return x.mean()
    m = mask.to(x.dtype).expand_as(x)
    return (x * m).sum() / m.sum().clamp(min=1.0)


def heatmap_kd(p_s: torch.Tensor, p_t: torch.Tensor, mode: str = "mse", temperature: float = 1.0, *,
               beta: float = 2.0, peak_threshold: float = 0.3, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """mse (seed): MSE on probabilities; kl: KL of per-pixel class softmax of the logits recovered from the
    probabilities; soft_focal: soft_focal_heatmap_kd. mask (B,1,H,W): only those pixels count."""
    if mode == "mse":
        if mask is None:
            return F.mse_loss(p_s.float(), p_t.float(), reduction="mean")
        return masked_mean((p_s.float() - p_t.float()).pow(2), mask)
    if mode == "soft_focal":
        return soft_focal_heatmap_kd(p_s, p_t, beta, peak_threshold, mask)
    if mode != "kl":
        raise ValueError(f"unknown hm_kd mode {mode!r} ({', '.join(HM_KD_MODES)})")
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
    if (hh, ww) != (4 * grid_hw[0], 4 * grid_hw[1]):
        raise ValueError(f"KD heatmap {hh}x{ww} is not 4x the regression grid {grid_hw[0]}x{grid_hw[1]}")
    conf = heatmap.detach().amax(dim=1, keepdim=True)
    return F.max_pool2d(conf, 4, stride=4).reshape(b, -1)


def patch_cell_weights(targets: KDTargets, grid_hw: Tuple[int, int]) -> torch.Tensor:
    """(Np, ph/4*pw/4) teacher confidence per refine cell of every valid patch: the max-over-classes heatmap
    cut, resized and padded exactly as the image patches (crops.KDPatchPlan.cut), then 4x4 max-pooled."""
    conf = targets.heatmap.detach().float().amax(dim=1, keepdim=True)
    canvas = (4 * int(grid_hw[0]), 4 * int(grid_hw[1]))  # the canvas the refine maps were computed on
    plan = crops.KDPatchPlan.from_targets(targets.patch_boxes, targets.patch_scales, targets.patch_valid,
                                          conf.shape[2:], canvas)
    patches = plan.cut(conf)
    return F.max_pool2d(patches, 4, stride=4).reshape(patches.shape[0], -1)


def _cell_mask(valid: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """(N,1,h,w) bool cell mask -> (N, h*w) float (the decoded boxes' cell order), or None."""
    return None if valid is None else valid.flatten(1).float()


def box_distance(box_s: torch.Tensor, box_t: torch.Tensor, distance: str = "mse") -> torch.Tensor:
    """Per-cell distance of decoded boxes (...,4) -> (...): squared error summed over the 4 coords (mse), or
    YOLC's own box loss per box, 2 * GWD + 0.5 * L1 with size terms at 0.2 (gwd_l1)."""
    if distance == "mse":
        return (box_s - box_t).pow(2).sum(dim=-1)
    if distance == "gwd_l1":
        from yolc_kd.models.losses import gwd_distance_loss  # not at the top: models imports kd when it loads

        l1 = ((box_s - box_t).abs() * box_s.new_tensor(L1_COORD_WEIGHTS)).sum(dim=-1)
        return GWD_WEIGHT * gwd_distance_loss(box_s, box_t) + L1_WEIGHT * l1
    raise ValueError(f"unknown box_kd_distance {distance!r} ({', '.join(BOX_KD_DISTANCES)})")


def weighted_box_kd(box_s: torch.Tensor, box_t: torch.Tensor, weight: torch.Tensor,
                    distance: str = "mse") -> torch.Tensor:
    """sum(w * d) / max(sum(w), 1) over all cells: a confidence-weighted mean of the per-cell distance;
    an empty scene (w ~ 0) gives ~0 instead of a mean over background cells."""
    weight = weight.detach()
    return (box_distance(box_s, box_t, distance) * weight).sum() / weight.sum().clamp(min=1.0)


def kd_losses(heatmap_s: torch.Tensor, coarse_s: torch.Tensor, patch_refine_s: torch.Tensor, targets: KDTargets,
              dcfg: Mapping, decode: Callable[[torch.Tensor], torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The three KD terms, weighted by distill_cfg; every teacher tensor is detached. hm_kd / box_kd pick the
    formulas ('mse' for both is the seed's); missing keys fall back to DISTILL_DEFAULTS. They compute in float32,
    also under autocast (float16's logs of saturated probabilities give infinite gradients)."""
    with torch.autocast(heatmap_s.device.type, enabled=False):
        return _kd_terms(heatmap_s, coarse_s, patch_refine_s, targets, dcfg, decode)


def _kd_terms(heatmap_s: torch.Tensor, coarse_s: torch.Tensor, patch_refine_s: torch.Tensor, targets: KDTargets,
              dcfg: Mapping, decode: Callable[[torch.Tensor], torch.Tensor]) -> Dict[str, torch.Tensor]:
    t = targets.detach()
    opt = {**DISTILL_DEFAULTS, **dict(dcfg)}
    for name in ("heatmap", "coarse", "refine"):
        if not getattr(t, name).is_floating_point():
            raise TypeError(f"KD target {name} is {getattr(t, name).dtype}: dequantise stored targets first")
    _check_shape("heatmap", heatmap_s, t.heatmap)
    _check_shape("coarse", coarse_s, t.coarse)
    # heatmap_kd casts to float32 itself (inside the recomputed part: no float32 copy of a lower-precision heatmap
    # is kept)
    hm = heatmap_kd(heatmap_s, t.heatmap, opt["hm_kd"], float(opt["hm_kd_temperature"]),
                    beta=float(opt["hm_kd_beta"]), peak_threshold=float(opt["hm_kd_peak_thr"]), mask=t.heatmap_valid)
    box_mode, distance = opt["box_kd"], opt["box_kd_distance"]
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
    return dict(loss_kd_global_hm=float(opt["kd_weight_global_hm"]) * hm,
                loss_kd_global_coarse=float(opt["kd_weight_global_coarse"]) * coarse,
                loss_kd_local_refine=float(opt["kd_weight_local_refine"]) * local)
