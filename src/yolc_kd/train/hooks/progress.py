"""The training progress bar (yolc_kd.progress: a live bar on a terminal, plain lines in a log)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from yolc_kd.progress import progress_bar
from yolc_kd.train.hooks.base import HookBase

if TYPE_CHECKING:
    from yolc_kd.train.loop import Trainer


class ProgressHook(HookBase):
    """One bar over the run's iterations on rank 0 (starting at the resumed iteration), the last step's losses
    as its postfix.

    Args:
        enabled: False for --no-progress.
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar: Optional[Any] = None

    def before_train(self, trainer: "Trainer") -> None:
        self.bar = progress_bar(total=trainer.total_iters, initial=trainer.iter, desc="train", unit="it",
                                disable=not self.enabled or trainer.rank != 0)

    def after_step(self, trainer: "Trainer") -> None:
        self.bar.update(1)
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in trainer.last.items() if k != "lr"}, refresh=False)

    def after_train(self, trainer: "Trainer") -> None:
        self.bar.close()
