"""Precise BN as a hook: the head's BatchNorm statistics recomputed after the last step (train/precise_bn.py)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from yolc_kd.train.hooks.base import HookBase
from yolc_kd.train.precise_bn import recompute_bn_stats

if TYPE_CHECKING:
    from yolc_kd.train.loop import Trainer


class PreciseBNHook(HookBase):
    """After a run that reached its last iteration (rank 0): averages the statistics of `num_batches` batches
    of the last trained epoch's views into the weights a checkpoint hands to inference, rewrites that
    iteration's checkpoint and logs `{"iter": N, "precise_bn_batches": used}`.

    Args:
        num_batches: precise_bn.num_batches.
    """

    def __init__(self, num_batches: int):
        self.num_batches = int(num_batches)

    def after_train(self, trainer: "Trainer") -> None:
        it = trainer.iter
        if trainer.rank != 0 or it != trainer.total_iters or trainer.start_iter >= trainer.total_iters:
            return
        # the last trained epoch's views: a cache of K = epochs holds them, and offline and online read the same
        trainer.sampler.set_epoch((it - 1) // trainer.iters_per_epoch)
        used = recompute_bn_stats(trainer.eval_model, trainer.loader, self.num_batches, trainer.to_device)
        trainer.checkpointer.save(it)
        trainer.log(dict(iter=it, precise_bn_batches=used))
