"""The run's log lines: the plan before the first step, a metrics.jsonl record every log interval."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from tqdm import tqdm

from yolc_kd.train.hooks.base import HookBase
from yolc_kd.train.metrics_log import set_aside

if TYPE_CHECKING:
    from yolc_kd.train.loop import Trainer


class LoggerHook(HookBase):
    """Before training (rank 0): a fresh run sets an earlier run's metrics.jsonl aside (one note line), then
    the `train: ...` plan line and, when the cache's views repeat, a note. Every `interval` iterations and
    after the last: `{"iter", "epoch", "sec" (since the previous record), "lr", "loss", each loss term}`.

    Args:
        interval: log_config.interval (--log-interval).
    """

    def __init__(self, interval: int):
        self.interval = int(interval)
        self.tic = 0.0

    def before_train(self, trainer: "Trainer") -> None:
        if trainer.rank == 0:
            metrics = trainer.metrics.path
            if not trainer.opts.resume and metrics.exists():  # a fresh run: an earlier log is kept, not extended
                kept = set_aside(metrics)
                tqdm.write(f"note: {trainer.work_dir} held an earlier run's metrics.jsonl; it is now {kept.name}")
            tqdm.write(f"train: {trainer.plan_line()}")
            self._note_repeated_views(trainer)
        self.tic = time.perf_counter()

    @staticmethod
    def _note_repeated_views(trainer: "Trainer") -> None:
        """One note line when the cache holds fewer distinct views than the schedule's passes (views repeat)."""
        k = trainer.source.num_variants if trainer.source is not None else None
        if not k:
            return
        flip = trainer.sampler.flip
        distinct = 2 * k if flip else k
        if trainer.passes > distinct:
            held = f"{k} view(s) per image" + (f" ({distinct} with their mirrors)" if flip else "")
            tqdm.write(f"note: the cache holds {held} and this run makes {trainer.passes} passes over the data, so "
                       f"views repeat from pass {distinct}; `yolc-kd precompute --variants auto --train-iters "
                       f"{trainer.total_iters}` caches enough")

    def after_step(self, trainer: "Trainer") -> None:
        it = trainer.iter
        if it % self.interval == 0 or it == trainer.total_iters:
            now = time.perf_counter()
            trainer.log(dict(iter=it, epoch=trainer.epoch, sec=round(now - self.tic, 3), **trainer.last))
            self.tic = now
