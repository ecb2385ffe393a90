"""YOLC's losses (mmdet semantics): GaussianFocal, GWD and L1, with weight and avg_factor reduction. They compute
in float32, also under autocast (float16's 1 - pred + 1e-12 is 0 at pred = 1, and log(0) -inf)."""
from __future__ import annotations

from typing import Callable, Mapping, Optional, Union

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from yolc_kd.errors import ModelConfigError


def recomputed_in_backward(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> torch.Tensor:
    """fn(*tensors), its intermediates not kept for backward but computed again when backward reaches them
    (torch.utils.checkpoint, non-reentrant): the same ops on the same inputs inside the same backward graph, so
    values and gradients are bit-identical. For the full-resolution heatmap losses (YOLC's focal loss, the KD
    heatmap terms), whose elementwise chains otherwise keep about eight (B,C,H,W) tensors each alive from the
    forward to the backward. fn must be deterministic and draw no random numbers; without gradients it simply
    runs."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return checkpoint(fn, *tensors, use_reentrant=False, preserve_rng_state=False)
    return fn(*tensors)


AvgFactor = Optional[Union[float, torch.Tensor]]


def reduce_weighted(loss: torch.Tensor, weight: Optional[torch.Tensor], avg_factor: AvgFactor) -> torch.Tensor:
    """Element-wise weight, then sum / (avg_factor + eps) (mmdet's 'mean' with avg_factor)."""
    if weight is not None:
        loss = loss * weight
    if avg_factor is None:
        return loss.mean()
    return loss.sum() / (avg_factor + torch.finfo(torch.float32).eps)


def gaussian_focal_loss(pred: torch.Tensor, target: torch.Tensor, alpha: float = 2.0, gamma: float = 4.0) -> torch.Tensor:
    """Focal loss against a gaussian heatmap; pred are probabilities (no sigmoid here)."""
    eps = 1e-12
    pos = target.eq(1)
    neg_weights = (1 - target).pow(gamma)
    pos_loss = -(pred + eps).log() * (1 - pred).pow(alpha) * pos
    neg_loss = -(1 - pred + eps).log() * pred.pow(alpha) * neg_weights
    return pos_loss + neg_loss


def gwd_distance_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """YOLC's 'GWD': 1 - 1/(1 + log1p(||pred - target||_2)) per box, on [cx, cy, w/2, h/2]. Where pred ==
    target the loss is 0 with a zero gradient (a plain sqrt's gradient there is NaN); elsewhere YOLC's values."""
    if target.numel() == 0:
        return pred.sum() * 0
    sq = torch.square(pred - target).sum(dim=-1)
    nonzero = sq > 0
    distance = torch.where(nonzero, torch.where(nonzero, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))
    return 1 - 1 / (1.0 + torch.log1p(distance))


class GaussianFocalLoss(nn.Module):
    """mmdet's GaussianFocalLoss (CenterNet's focal loss on gaussian heatmap targets), computed in float32.

    Args:
        alpha: the focusing power on the prediction.
        gamma: the power of (1 - target) that down-weights negatives near a peak.
        loss_weight: factor on the loss.
    """

    def __init__(self, alpha: float = 2.0, gamma: float = 4.0, loss_weight: float = 1.0):
        super().__init__()
        self.alpha, self.gamma, self.loss_weight = alpha, gamma, loss_weight

    def forward(self, pred, target, weight=None, avg_factor: AvgFactor = None) -> torch.Tensor:
        with torch.autocast(pred.device.type, enabled=False):
            loss = gaussian_focal_loss(pred.float(), target.float(), self.alpha, self.gamma)
            return self.loss_weight * reduce_weighted(loss, weight, avg_factor)


class GWDLoss(nn.Module):
    """YOLC's GWD box loss (gwd_distance_loss on decoded boxes), computed in float32.

    Args:
        loss_weight: factor on the loss.
    """

    def __init__(self, loss_weight: float = 1.0):
        super().__init__()
        self.loss_weight = loss_weight

    def forward(self, pred, target, weight=None, avg_factor: AvgFactor = None) -> torch.Tensor:
        with torch.autocast(pred.device.type, enabled=False):
            return self.loss_weight * reduce_weighted(gwd_distance_loss(pred.float(), target.float()), weight,
                                                      avg_factor)


class L1Loss(nn.Module):
    """mmdet's L1Loss (|pred - target|, weighted), computed in float32.

    Args:
        loss_weight: factor on the loss.
    """

    def __init__(self, loss_weight: float = 1.0):
        super().__init__()
        self.loss_weight = loss_weight

    def forward(self, pred, target, weight=None, avg_factor: AvgFactor = None) -> torch.Tensor:
        with torch.autocast(pred.device.type, enabled=False):
            pred, target = pred.float(), target.float()
            loss = pred.sum() * 0 if target.numel() == 0 else torch.abs(pred - target)
            return self.loss_weight * reduce_weighted(loss, weight, avg_factor)


LOSSES = {"GaussianFocalLoss": GaussianFocalLoss, "GWDLoss": GWDLoss, "L1Loss": L1Loss}


def build_loss(cfg: Mapping) -> nn.Module:
    cfg = dict(cfg)
    kind = cfg.pop("type", None)
    if kind not in LOSSES:
        raise ModelConfigError(f"unknown loss type {kind!r}; known: {sorted(LOSSES)}")
    if cfg.pop("reduction", "mean") != "mean":  # YOLC reduces every loss by its avg_factor ('mean')
        raise ModelConfigError(f"loss {kind}: only reduction='mean' is supported")
    try:
        return LOSSES[kind](**cfg)
    except TypeError as exc:
        raise ModelConfigError(f"loss {kind}: {exc}") from None
