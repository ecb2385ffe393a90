"""The trainer's extension points (detectron2's HookBase): a hook is one concern of a training run, called by the
Trainer at fixed points with the trainer itself."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict

if TYPE_CHECKING:  # the trainer imports the hooks; the hooks only read and call what it exposes
    from yolc_kd.train.loop import Trainer


class HookBase:
    """Base of every training hook; each method does nothing unless a hook overrides it.

    The trainer calls its hooks in list order at each point. `trainer.iter` counts the iterations finished:
    before_step sees the 0-based index of the step about to run, after_step the count with that step included.
    before_train runs after --resume has restored the trainer's state. after_eval runs on rank 0 only, right
    after an evaluation, with its result."""

    def before_train(self, trainer: "Trainer") -> None:
        """Once, before the first step of this run."""

    def before_step(self, trainer: "Trainer") -> None:
        """Before every optimizer step."""

    def after_step(self, trainer: "Trainer") -> None:
        """After every optimizer step."""

    def after_eval(self, trainer: "Trainer", result: Dict[str, Any]) -> None:
        """After each evaluation (rank 0), with the metrics it returned."""

    def after_train(self, trainer: "Trainer") -> None:
        """Once, after the last step (not after an error)."""
