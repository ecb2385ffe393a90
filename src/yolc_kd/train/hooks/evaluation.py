"""Evaluation during training: the trainer's eval function on the weights a checkpoint hands to inference."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict

import torch.nn as nn
from tqdm import tqdm

from yolc_kd.train.hooks.base import HookBase

if TYPE_CHECKING:
    from yolc_kd.train.loop import Trainer

EvalFn = Callable[[nn.Module, int], Dict[str, Any]]


class EvalHook(HookBase):
    """Evaluates on rank 0 every `interval` epochs and after the last iteration (the EMA average when the
    config has one, in eval mode), writes the result to metrics.jsonl and one `eval @ iter N:` line, hands it to
    every hook's after_eval, and holds the other ranks until rank 0 is done.

    Args:
        interval: evaluation.interval, in epochs.
        eval_fn: (model, iteration) -> metrics (recipe.make_eval_fn: COCO AP of fused inference on --val-ann).
    """

    def __init__(self, interval: int, eval_fn: EvalFn):
        self.interval, self.eval_fn = int(interval), eval_fn

    def due(self, trainer: "Trainer") -> bool:
        it, per_epoch = trainer.iter, trainer.iters_per_epoch
        return (it % per_epoch == 0 and (it // per_epoch) % self.interval == 0) or it == trainer.total_iters

    def after_step(self, trainer: "Trainer") -> None:
        if not self.due(trainer):
            return
        if trainer.rank == 0:
            self.evaluate(trainer)
        trainer.dist.wait_for_rank0()

    def evaluate(self, trainer: "Trainer") -> Dict[str, Any]:
        it, model = trainer.iter, trainer.eval_model
        model.eval()
        try:
            result = self.eval_fn(model, it)
        finally:
            model.train()
        trainer.log(dict(iter=it, eval=result))
        tqdm.write(f"eval @ iter {it}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()
                                                   if isinstance(v, float)))
        trainer.call_hooks("after_eval", result)
        return result
