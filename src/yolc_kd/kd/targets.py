"""KDTargets: the teacher's soft labels for a batch of views, from a live teacher (teacher.teacher_targets) or
from the cache reader; the KD loss never knows which."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, List, Optional, Sequence

import torch

from yolc_kd import crops


@dataclass
class KDTargets:
    """Teacher soft labels for a batch of views (fixed shapes, K = max_patches_per_img slots).

    The three masks say where a target exists; None means everywhere (a teacher that saw the view itself: the
    per-view cache, a live teacher). Targets moved into a view from the image-level cache have no teacher value
    in the view's padding nor outside the cached crop, and the losses skip those pixels and cells.

    Args:
        heatmap: (B,C,H,W) class probabilities at input resolution.
        coarse: (B,4,h,w) raw coarse xywh maps (stride BOX_STRIDE); decode_xywh_to_bbox gives boxes.
        patch_boxes: (B,K,4) crop [x,y,w,h] in view pixels.
        patch_scales: (B,K) resize factor from crop to patch.
        patch_valid: (B,K) bool.
        refine: (B,K,4,ph/4,pw/4) raw refine maps of the teacher on each patch (0 if invalid).
        heatmap_valid: (B,1,H,W) bool, or None.
        coarse_valid: (B,1,h,w) bool, or None.
        refine_valid: (B,K,1,ph/4,pw/4) bool, or None.
    """
    heatmap: torch.Tensor
    coarse: torch.Tensor
    patch_boxes: torch.Tensor
    patch_scales: torch.Tensor
    patch_valid: torch.Tensor
    refine: torch.Tensor
    heatmap_valid: Optional[torch.Tensor] = None
    coarse_valid: Optional[torch.Tensor] = None
    refine_valid: Optional[torch.Tensor] = None

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

    def patch_plan(self, view_hw: Sequence[int]) -> crops.KDPatchPlan:
        """Where the student's KD patches are cut from its (B,3,H,W) views of size view_hw: the crops these
        targets were made on (the teacher's LSM regions), on the same patch canvas."""
        return crops.KDPatchPlan.from_targets(self.patch_boxes, self.patch_scales, self.patch_valid, view_hw)

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
