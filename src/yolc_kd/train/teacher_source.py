"""The live teacher as the trainer's target source (online KD, the reference mode): the frozen teacher runs on
every batch the student sees. Same KDTargets as the cache source, so the KD loss never knows which."""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from yolc_kd import crops
from yolc_kd.cache.arrays import dequantize_targets, quantize_targets
from yolc_kd.models import YOLC
from yolc_kd.models.detector import KDTargetsArg
from yolc_kd.config import DISTILL_DEFAULTS
from yolc_kd.kd import KDTargets
from yolc_kd.teacher import teacher_targets


class LiveTeacherSource:
    """Targets from a frozen teacher held by the trainer (never by the student model)."""
    num_variants: Optional[int] = None  # a fresh augmentation every epoch
    reads_samples = False               # nothing to read per sample in the DataLoader

    def __init__(self, teacher: YOLC, dcfg: Mapping):
        self.teacher, self.dcfg = teacher.eval(), dict(dcfg)
        self.as_cached = self.dcfg.get("online_targets", DISTILL_DEFAULTS["online_targets"]) == "cached"

    def to(self, device: torch.device) -> "LiveTeacherSource":
        self.teacher.to(device)
        return self

    def targets(self, batch: Mapping[str, Any]) -> KDTargetsArg:
        img, metas = batch["img"], batch["img_metas"]
        # under --amp the trainer calls this in autocast (the teacher runs in its dtype); its maps come float32
        if self.dcfg.get("use_teacher_crop", True):
            return self._final(teacher_targets(self.teacher, img, metas, self.dcfg))
        lsm_cfg = self.teacher.bbox_head.lsm_cfg
        # crops from the student's heatmap: the student hands it over inside its forward
        return lambda student_heat: self._final(teacher_targets(self.teacher, img, metas, self.dcfg,
                                                                crops.lsm_regions(student_heat, metas, lsm_cfg)))

    def _final(self, t: KDTargets) -> KDTargets:
        """float32 targets; with online_targets "cached", rounded as the cache stores them."""
        return dequantize_targets(quantize_targets(t)) if self.as_cached else t.float()
