"""Recompute BatchNorm running statistics from training batches (the "precise BN" of Detectron).

YOLC's head BN uses momentum 0.01: after a short run its running variance still holds much of its
initial value 1, and eval-mode heatmaps come out flat. Averaging the statistics of N batches fixes that."""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable

import torch
import torch.nn as nn


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, batches: Iterable[Dict[str, Any]], num_batches: int,
                       to_device: Callable[[Dict[str, Any]], Dict[str, Any]]) -> int:
    """Cumulative average of batch statistics over num_batches for every BN layer that trains
    (backbone BN frozen by norm_eval stays as it is). Returns the number of batches used."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    was_training = model.training
    model.train()  # backbone BN with norm_eval stays in eval mode (HRNet.train)
    active = [m for m in bns if m.training]
    saved = [m.momentum for m in active]
    for m in active:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    used = 0
    for batch in batches:
        if used >= num_batches:
            break
        if not batch.get("size"):
            continue
        b = to_device(batch)
        model.bbox_head(model.extract_feat(b["img"]))
        used += 1
    for m, mom in zip(active, saved):
        m.momentum = mom
    model.train(was_training)
    return used
