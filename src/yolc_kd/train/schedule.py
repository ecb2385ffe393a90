"""YOLC's optimisation recipe as the trainer runs it: the optimizer, the lr at each iteration (linear warmup, step
decay or mmcv's cosine annealing) and the run's length, from the config's ScheduleSettings."""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Optional, Sequence, Tuple

import torch

from yolc_kd.data.loading import dataset_repeats
from yolc_kd.schedule_settings import OPTIMIZERS, ScheduleSettings

def build_optimizer(params: Iterable[torch.nn.Parameter], schedule: ScheduleSettings) -> torch.optim.Optimizer:
    """The schedule's torch optimizer over the parameters that train (its arguments checked by ScheduleSettings)."""
    return OPTIMIZERS[schedule.optimizer]([p for p in params if p.requires_grad], lr=schedule.lr,
                                          **schedule.optimizer_args)


def lr_at(it: int, schedule: ScheduleSettings, steps_in_iters: Sequence[int], total_iters: int) -> float:
    """mmcv's step or cosine-annealing policy with linear warmup, at iteration `it` (0-based). Cosine anneals
    over the run's total iterations (so `--max-iters` shortens the whole schedule, not just its end)."""
    base_lr = float(schedule.lr)
    if schedule.lr_policy == "CosineAnnealing":
        target = float(schedule.min_lr) if schedule.min_lr is not None else base_lr * float(schedule.min_lr_ratio)
        progress = min(it, total_iters) / max(1, total_iters)
        lr = target + 0.5 * (base_lr - target) * (1 + math.cos(math.pi * progress))
    else:
        lr = base_lr * float(schedule.gamma) ** sum(it >= s for s in steps_in_iters)
    warmup_iters = schedule.warmup_iters
    if schedule.warmup == "linear" and it < warmup_iters:
        lr *= 1 - (1 - it / warmup_iters) * (1 - float(schedule.warmup_ratio))
    return lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def schedule_iters(schedule: ScheduleSettings, iters_per_epoch: int, max_iters: Optional[int]) -> Tuple[int, list]:
    """(total iterations, lr step iterations) of the schedule's runner; max_iters overrides the total."""
    if schedule.by_epoch:
        total = schedule.max_epochs * iters_per_epoch
        steps_iters = [int(s) * iters_per_epoch for s in schedule.step]
    else:
        total = schedule.max_iters
        steps_iters = [int(s) for s in schedule.step]
    return (int(max_iters) if max_iters else total), steps_iters


def views_needed(cfg: Mapping, num_images: int, batch_size: int, max_iters: Optional[int] = None, world: int = 1,
                 *, flip: bool) -> int:
    """Cached views per image (K) for a schedule in which the student never sees the same view twice:
    one per pass over the data (epochs x the RepeatDataset's times), halved when training mirrors the cached
    views (distill_cfg.cache_flip=True)."""
    passes = schedule_passes(cfg, num_images, batch_size, max_iters, world)
    return max(1, math.ceil(passes / 2) if flip else passes)


def schedule_passes(cfg: Mapping, num_images: int, batch_size: int, max_iters: Optional[int] = None,
                    world: int = 1) -> int:
    """Passes over every image that the config's schedule (or max_iters) starts: started epochs x the
    RepeatDataset's times (a partly trained epoch still visits items of each of its passes)."""
    repeats = dataset_repeats(cfg)
    per_epoch = max(1, math.ceil(math.ceil(num_images * repeats / world) / batch_size))
    total, _ = schedule_iters(cfg["schedule"], per_epoch, max_iters)
    return math.ceil(total / per_epoch) * repeats
