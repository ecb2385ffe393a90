"""KDTargets through the cache's quantisation, in torch on the targets' device: quantize_targets gives the
stored dtypes bit for bit as the cache writer's numpy functions (cache/schema.py) do, dequantize_targets the
float32 targets the cache source serves. A live teacher's targets go through both (distill_cfg.online_targets
"cached"), so online KD trains on exactly what offline KD reads. Written here because the writer's functions
are numpy: a GPU teacher's maps would go to the host and back every batch."""
from __future__ import annotations

from dataclasses import replace

import torch

from yolc_kd.cache.schema import BOX_Q_MAX, BOX_STEP, HEATMAP_LEVELS, HEATMAP_ZERO_BELOW
from yolc_kd.kd import KDTargets


def _quantize_heatmap(p: torch.Tensor) -> torch.Tensor:
    p = torch.nan_to_num(p.float(), nan=0.0)  # float32 first, as the writer does
    q = torch.floor(p.double() * HEATMAP_LEVELS + 0.5).clamp(0, HEATMAP_LEVELS).to(torch.uint8)
    return q.masked_fill(p < HEATMAP_ZERO_BELOW, 0)


def _quantize_boxes(x: torch.Tensor) -> torch.Tensor:
    big = BOX_Q_MAX * BOX_STEP
    x = torch.nan_to_num(x.float(), nan=0.0, posinf=big, neginf=-big)
    return torch.round(x.double() / BOX_STEP).clamp(-BOX_Q_MAX, BOX_Q_MAX).to(torch.int16)  # half to even = rint


def quantize_targets(t: KDTargets) -> KDTargets:
    """Float targets -> the cache's stored dtypes (uint8 heatmap, int16 box maps, float32 patch geometry)."""
    return KDTargets(heatmap=_quantize_heatmap(t.heatmap), coarse=_quantize_boxes(t.coarse),
                     patch_boxes=t.patch_boxes.float(), patch_scales=t.patch_scales.float(),
                     patch_valid=t.patch_valid.bool(), refine=_quantize_boxes(t.refine))


def dequantize_targets(t: KDTargets) -> KDTargets:
    """Targets as stored (uint8 heatmap, int16 box maps) -> float32 with the schema's formulas (data_schema.md),
    best after batching and moving to the device. Float targets (a live teacher's) pass through unchanged."""
    if t.heatmap.dtype == torch.uint8:
        t = replace(t, heatmap=t.heatmap.float() / float(HEATMAP_LEVELS))
    if t.coarse.dtype == torch.int16:
        t = replace(t, coarse=t.coarse.float() * BOX_STEP, refine=t.refine.float() * BOX_STEP)
    return t
