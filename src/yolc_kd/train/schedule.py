"""YOLC's optimisation recipe: optimizer from the config, linear warmup, step decay, grad clipping."""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch

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


def lr_at(it: int, base_lr: float, lr_cfg: Mapping, steps_in_iters: Sequence[int]) -> float:
    """mmdet's step policy with linear warmup, at iteration `it` (0-based)."""
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
