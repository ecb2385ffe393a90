"""Exponential moving average of the weights, as mmdet 2.x's EMA hooks (`custom_hooks` in a config).

    custom_hooks = [dict(type='ExpMomentumEMAHook', momentum=0.0002, total_iter=2000)]

After every step ema = (1 - m) * ema + m * weights, with m = momentum_fun(iteration) (0-based):
ExpMomentumEMAHook: (1 - momentum) * exp(-(1 + it) / total_iter) + momentum (starts near 1: the average follows
the weights early and settles to `momentum`); LinearMomentumEMAHook: min(momentum, (1 + it) / (warm_up + it)).
The average lives in a torch.optim.swa_utils.AveragedModel (a copy of the model); BN running statistics are
averaged too unless skip_buffers. Checkpoints then hold the average as `state_dict` (what infer / precompute
load) and the trained weights as `train_state_dict` (what --resume continues from).
"""
from __future__ import annotations

import math
from typing import Any, Callable, List, Mapping, Optional

import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel

from yolc_kd.errors import UserError

EMA_HOOKS = ("ExpMomentumEMAHook", "LinearMomentumEMAHook")
_KEYS = dict(ExpMomentumEMAHook={"momentum", "interval", "skip_buffers", "total_iter", "resume_from", "priority"},
             LinearMomentumEMAHook={"momentum", "interval", "skip_buffers", "warm_up", "resume_from", "priority"})


def momentum_fun(hook: Mapping[str, Any]) -> Callable[[int], float]:
    """The hook's momentum as a function of the 0-based iteration (mmdet 2.x's formulas)."""
    momentum = float(hook.get("momentum", 0.0002))
    if hook["type"] == "ExpMomentumEMAHook":
        total = float(hook.get("total_iter", 2000))
        return lambda it: (1 - momentum) * math.exp(-(1 + it) / total) + momentum
    interval, warm_up = int(hook.get("interval", 1)), float(hook.get("warm_up", 100))
    return lambda it: min(momentum ** interval, (1 + it) / (warm_up + it))


def ema_hook(cfg: Mapping) -> Optional[dict]:
    """The config's EMA hook (checked), or None. Other custom_hooks types are accepted and mean nothing here."""
    hooks = cfg.get("custom_hooks") or []
    if not isinstance(hooks, (list, tuple)) or not all(isinstance(h, Mapping) and "type" in h for h in hooks):
        raise UserError("custom_hooks must be a list of dicts with a 'type'")
    found = [dict(h) for h in hooks if h["type"] in EMA_HOOKS]
    if len(found) > 1:
        raise UserError(f"custom_hooks: {len(found)} EMA hooks; at most one ({' or '.join(EMA_HOOKS)})")
    if not found:
        return None
    hook = found[0]
    unknown = sorted(set(hook) - {"type"} - _KEYS[hook["type"]])
    if unknown:
        raise UserError(f"custom_hooks {hook['type']}: unknown key(s) {', '.join(unknown)} "
                        f"(known: {', '.join(sorted(_KEYS[hook['type']]))})")
    if hook.get("resume_from"):
        raise UserError(f"custom_hooks {hook['type']}: resume_from is not supported; use `yolc-kd train --resume`, "
                        f"which restores the average from the work dir's checkpoint")
    momentum = hook.get("momentum", 0.0002)
    if not isinstance(momentum, (int, float)) or not 0 < momentum < 1:
        raise UserError(f"custom_hooks {hook['type']}: momentum must be in (0, 1), got {momentum!r}")
    for key in ("interval", "total_iter", "warm_up"):
        if key in hook and (not isinstance(hook[key], (int, float)) or hook[key] <= 0):
            raise UserError(f"custom_hooks {hook['type']}: {key} must be a positive number, got {hook[key]!r}")
    return hook


class WeightAverage:
    """The running average of a model's weights. `update(model, it)` after each optimizer step.

    Args:
        model: the model whose weights are averaged (copied at the start).
        hook: the EMA hook's config (interval, momentum and its schedule: train/ema.py momentum_fun).
    """

    def __init__(self, model: nn.Module, hook: Mapping[str, Any]):
        self.hook = dict(hook)
        self.interval = int(hook.get("interval", 1))
        fun = momentum_fun(hook)

        @torch.no_grad()
        def blend(ema: List[torch.Tensor], cur: List[torch.Tensor], n_averaged: torch.Tensor) -> None:
            m = fun(int(n_averaged) - 1)  # n_averaged counts the initial copy: iteration it = n_averaged - 1
            if ema[0].is_floating_point():
                torch._foreach_lerp_(ema, cur, m)  # the lerp torch's own get_ema_multi_avg_fn uses
            else:
                for e, c in zip(ema, cur):  # integer buffers (BN's num_batches_tracked) follow the model
                    e.copy_(c)

        self.averaged = AveragedModel(model, multi_avg_fn=blend, use_buffers=not hook.get("skip_buffers", False))
        self.averaged.update_parameters(model)  # the initial copy (mmdet copies the weights before the first step)

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    def update(self, model: nn.Module, it: int) -> None:
        """After the step of 0-based iteration `it` (every `interval` iterations, as mmdet)."""
        if it % self.interval == 0:
            self.averaged.update_parameters(model)
        else:
            self.averaged.n_averaged += 1  # the momentum follows the iteration, updated or not

    def restore(self, weights: Mapping[str, torch.Tensor], start_iter: int) -> None:
        """Resume: the average saved at iteration start_iter (its updates counted from it)."""
        self.module.load_state_dict(weights, strict=True)
        self.averaged.n_averaged.fill_(start_iter + 1)
