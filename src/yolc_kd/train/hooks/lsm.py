"""distill_cfg.lsm_visualize as a hook: pictures of the crops local KD used in the first training batches."""
from __future__ import annotations

from typing import TYPE_CHECKING

from yolc_kd.train.hooks.base import HookBase
from yolc_kd.train.lsm_viz import LSMVisualizer

if TYPE_CHECKING:
    from yolc_kd.train.loop import Trainer


class LSMHook(HookBase):
    """Draws each step's KD targets (the teacher's LSM map and crop boxes) until the visualizer has drawn its
    batches.

    Args:
        visualizer: writes the PNGs (train/lsm_viz.py).
    """

    def __init__(self, visualizer: LSMVisualizer):
        self.visualizer = visualizer

    def after_step(self, trainer: "Trainer") -> None:
        self.visualizer(trainer.iter - 1, trainer.batch, trainer.kd_targets)
