"""KD beside the model: the student returns its outputs (full view and KD patches), KDLoss compares them with
KDTargets. student_losses is one training forward of a student, with or without KD targets."""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional

import torch
import torch.nn as nn

from yolc_kd.kd.losses import kd_losses
from yolc_kd.kd.targets import KDTargets
from yolc_kd.models.detector import StudentOutputs
from yolc_kd.models.yolc_head import decode_xywh_to_bbox
from yolc_kd.settings import DistillSettings


class KDLoss(nn.Module):
    """The distillation terms (loss_kd_global_hm, loss_kd_global_coarse, loss_kd_local_refine) of a student's
    outputs against the teacher's KDTargets for the same views.

    Args:
        settings: the run's distill_cfg (formulas, their options and the three weights).
    """

    def __init__(self, settings: DistillSettings):
        super().__init__()
        self.settings = settings

    def forward(self, outputs: StudentOutputs, targets: KDTargets) -> Dict[str, torch.Tensor]:
        if outputs.patch_refine is None:
            raise ValueError("the student ran no KD patches: pass targets.patch_plan(...) to its forward")
        return kd_losses(outputs.heatmap, outputs.coarse, outputs.patch_refine, targets, self.settings,
                         decode_xywh_to_bbox)


def student_losses(model: nn.Module, img: torch.Tensor, img_metas: List[Mapping], gt_bboxes: List[torch.Tensor],
                   gt_labels: List[torch.Tensor], targets: Optional[KDTargets] = None,
                   kd_loss: Optional[KDLoss] = None) -> Dict[str, torch.Tensor]:
    """YOLC's supervised losses of a student (a YOLC or its DistributedDataParallel wrapper), and with targets
    the KD terms of kd_loss: the student cuts its KD patches where the targets' crops are and runs them in one
    batched forward after the full view."""
    if targets is not None and kd_loss is None:
        raise ValueError("KD targets without a KDLoss to compare them")
    patches = None if targets is None else targets.patch_plan(img.shape[2:])
    losses, outputs = model(img, img_metas, gt_bboxes=gt_bboxes, gt_labels=gt_labels, patches=patches)
    if targets is not None:
        losses.update(kd_loss(outputs, targets))
    return losses
