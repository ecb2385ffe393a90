"""YOLC's optimisation recipe: optimizer from the config, linear warmup, step decay (or mmcv's cosine
annealing), grad clipping."""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Optional, Sequence, Tuple

import torch

from yolc_kd.data.loading import dataset_repeats
from yolc_kd.errors import UserError

OPTIMIZERS = {"SGD": torch.optim.SGD, "Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: Mapping) -> torch.optim.Optimizer:
    cfg = dict(cfg)
    kind = cfg.pop("type", "SGD")
    if kind not in OPTIMIZERS:
        raise UserError(f"optimizer type {kind!r} is not supported (one of {', '.join(OPTIMIZERS)})")
    cfg.pop("paramwise_cfg", None)
    try:
        return OPTIMIZERS[kind]([p for p in params if p.requires_grad], **cfg)
    except TypeError as exc:
        raise UserError(f"optimizer {kind}: {exc}") from None


LR_POLICIES = ("step", "CosineAnnealing")  # mmcv's names (mmcv also takes "Step")


def check_lr_config(lr_cfg: Mapping) -> str:
    """The policy of an lr_config, checked: one of LR_POLICIES, cosine with exactly one of min_lr/min_lr_ratio."""
    policy = str(lr_cfg.get("policy", "step"))
    policy = "step" if policy == "Step" else policy
    if policy not in LR_POLICIES:
        raise UserError(f"lr_config.policy {policy!r} is not supported (one of {', '.join(LR_POLICIES)})")
    if policy == "CosineAnnealing" and (("min_lr" in lr_cfg) == ("min_lr_ratio" in lr_cfg)):
        raise UserError("lr_config with policy='CosineAnnealing' needs exactly one of min_lr and min_lr_ratio")
    return policy


def lr_at(it: int, base_lr: float, lr_cfg: Mapping, steps_in_iters: Sequence[int], total_iters: int) -> float:
    """mmcv's step or cosine-annealing policy with linear warmup, at iteration `it` (0-based). Cosine anneals
    over the run's total iterations (so `--max-iters` shortens the whole schedule, not just its end)."""
    if check_lr_config(lr_cfg) == "CosineAnnealing":
        target = float(lr_cfg["min_lr"]) if "min_lr" in lr_cfg else base_lr * float(lr_cfg["min_lr_ratio"])
        progress = min(it, total_iters) / max(1, total_iters)
        lr = target + 0.5 * (base_lr - target) * (1 + math.cos(math.pi * progress))
    else:
        gamma = float(lr_cfg.get("gamma", 0.1))
        lr = base_lr * gamma ** sum(it >= s for s in steps_in_iters)
    warmup_iters = int(lr_cfg.get("warmup_iters", 0) or 0)
    if lr_cfg.get("warmup") == "linear" and it < warmup_iters:
        ratio = float(lr_cfg.get("warmup_ratio", 0.001))
        lr *= 1 - (1 - it / warmup_iters) * (1 - ratio)
    return lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def schedule_iters(cfg: Mapping, iters_per_epoch: int, max_iters: Optional[int]) -> Tuple[int, list]:
    """(total iterations, lr step iterations) of the config's runner; max_iters overrides the total."""
    runner = cfg.get("runner") or {}
    lr_cfg = cfg.get("lr_config") or {}
    steps = list(lr_cfg.get("step") or [])
    if runner.get("type") == "IterBasedRunner":
        total = int(runner.get("max_iters", 1000))
        steps_iters = [int(s) for s in steps]
    else:
        total = int(runner.get("max_epochs", 48)) * iters_per_epoch
        steps_iters = [int(s) * iters_per_epoch for s in steps]
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
    total, _ = schedule_iters(cfg, per_epoch, max_iters)
    return math.ceil(total / per_epoch) * repeats
