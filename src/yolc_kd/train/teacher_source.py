"""The live teacher as the trainer's target source (online KD, the reference mode): the frozen teacher runs on
every batch the student sees. Same KDTargets as the cache source, so the KD loss never knows which."""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from yolc_kd.cache.arrays import dequantize_targets, quantize_targets
from yolc_kd.kd import KDTargets
from yolc_kd.models import YOLC
from yolc_kd.settings import DistillSettings
from yolc_kd.teacher import teacher_targets


class LiveTeacherSource:
    """Targets from a frozen teacher held by the trainer (never by the student model), made before the student's
    forward.

    Args:
        teacher: the frozen teacher (teacher.build_teacher).
        settings: the run's distill settings (KD crop slots and sizes, online_targets).
    """
    num_variants: Optional[int] = None  # a fresh augmentation every epoch
    reads_samples = False               # nothing to read per sample in the DataLoader

    def __init__(self, teacher: YOLC, settings: DistillSettings):
        self.teacher, self.settings = teacher.eval(), settings
        self.as_cached = settings.online_targets == "cached"

    def to(self, device: torch.device) -> "LiveTeacherSource":
        self.teacher.to(device)
        return self

    def targets(self, batch: Mapping[str, Any]) -> KDTargets:
        # under --amp the trainer calls this in autocast (the teacher runs in its dtype); its maps come float32
        return self._final(teacher_targets(self.teacher, batch["img"], batch["img_metas"], self.settings))

    def _final(self, t: KDTargets) -> KDTargets:
        """float32 targets; with online_targets "cached", rounded as the cache stores them."""
        return dequantize_targets(quantize_targets(t)) if self.as_cached else t.float()
