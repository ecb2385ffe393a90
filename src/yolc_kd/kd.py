"""Knowledge-distillation targets and losses. The targets object comes from a live teacher
(YOLC.kd_targets) or from the cache reader; the loss never knows which."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Dict, List, Mapping

import torch
import torch.nn.functional as F


@dataclass
class KDTargets:
    """Teacher soft labels for a batch of views (fixed shapes, K = max_patches_per_img slots)."""
    heatmap: torch.Tensor       # (B,C,H,W) class probabilities at input resolution
    coarse: torch.Tensor        # (B,4,h,w) raw coarse xywh maps (stride 4); decode_xywh_to_bbox gives boxes
    patch_boxes: torch.Tensor   # (B,K,4) crop [x,y,w,h] in view pixels
    patch_scales: torch.Tensor  # (B,K) resize factor from crop to patch
    patch_valid: torch.Tensor   # (B,K) bool
    refine: torch.Tensor        # (B,K,4,ph/4,pw/4) raw refine maps of the teacher on each patch (0 if invalid)

    def to(self, device) -> "KDTargets":
        return KDTargets(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def detach(self) -> "KDTargets":
        return KDTargets(**{f.name: getattr(self, f.name).detach() for f in fields(self)})

    @staticmethod
    def stack(items: List["KDTargets"]) -> "KDTargets":
        """Concatenate per-sample (batch of 1) targets along the batch axis."""
        return KDTargets(**{f.name: torch.cat([getattr(t, f.name) for t in items]) for f in fields(KDTargets)})

    def select(self, i: int) -> "KDTargets":
        return KDTargets(**{f.name: getattr(self, f.name)[i:i + 1] for f in fields(self)})

    @property
    def patch_refine(self) -> torch.Tensor:
        """(Np,4,ph/4,pw/4) refine maps of the valid patches in patch_batch order."""
        return self.refine[self.patch_valid]


def _check_shape(name: str, student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"KD shape mismatch for {name}: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}")


def heatmap_kd(p_s: torch.Tensor, p_t: torch.Tensor, mode: str = "mse", temperature: float = 1.0) -> torch.Tensor:
    """MSE on probabilities, or KL of per-pixel class softmax of the logits recovered from the probabilities."""
    if mode == "mse":
        return F.mse_loss(p_s, p_t, reduction="mean")
    eps = 1e-6
    logit_s = torch.logit(p_s.clamp(eps, 1 - eps))
    logit_t = torch.logit(p_t.clamp(eps, 1 - eps))
    log_q_s = F.log_softmax(logit_s / temperature, dim=1)
    log_q_t = F.log_softmax(logit_t / temperature, dim=1)
    kl = (log_q_t.exp() * (log_q_t - log_q_s)).sum(dim=1)  # (B,H,W)
    return kl.mean() * temperature ** 2


def kd_losses(heatmap_s: torch.Tensor, coarse_s: torch.Tensor, patch_refine_s: torch.Tensor, targets: KDTargets,
              dcfg: Mapping, decode: Callable[[torch.Tensor], torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The three KD terms, weighted by distill_cfg; every teacher tensor is detached."""
    t = targets.detach()
    for name in ("heatmap", "coarse", "refine"):
        if not getattr(t, name).is_floating_point():
            raise TypeError(f"KD target {name} is {getattr(t, name).dtype}: dequantise stored targets first")
    _check_shape("heatmap", heatmap_s, t.heatmap)
    _check_shape("coarse", coarse_s, t.coarse)
    hm = heatmap_kd(heatmap_s.float(), t.heatmap.float(), dcfg.get("hm_kd", "mse"),
                    float(dcfg.get("hm_kd_temperature", 1.0)))
    coarse = F.mse_loss(decode(coarse_s.float()), decode(t.coarse.float()), reduction="mean")
    ref_t = t.patch_refine.float()
    _check_shape("refine", patch_refine_s, ref_t)
    if ref_t.shape[0] == 0:
        local = heatmap_s.sum() * 0  # no patch in this batch: zero that still joins the graph
    else:
        per_patch = (decode(patch_refine_s.float()) - decode(ref_t)).pow(2).mean(dim=(1, 2))
        local = per_patch.mean()  # mean inside each patch, then over the patches of the batch
    return dict(loss_kd_global_hm=float(dcfg["kd_weight_global_hm"]) * hm,
                loss_kd_global_coarse=float(dcfg["kd_weight_global_coarse"]) * coarse,
                loss_kd_local_refine=float(dcfg["kd_weight_local_refine"]) * local)
