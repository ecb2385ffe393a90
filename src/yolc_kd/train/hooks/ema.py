"""The weight average's update after every step (the average itself: train/ema.py)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from yolc_kd.train.ema import WeightAverage
from yolc_kd.train.hooks.base import HookBase

if TYPE_CHECKING:
    from yolc_kd.train.loop import Trainer


class EMAHook(HookBase):
    """Blends the trained weights into the average after each optimizer step (custom_hooks' EMA hook).

    Args:
        average: the trainer's WeightAverage; checkpoints save it and --resume restores it.
    """

    def __init__(self, average: WeightAverage):
        self.average = average

    def after_step(self, trainer: "Trainer") -> None:
        self.average.update(trainer.model, trainer.iter - 1)  # the 0-based index of the step just taken
