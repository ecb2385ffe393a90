"""Cheap re-augmentation of a cached view at training time: the horizontal mirror of the view, its boxes and
the teacher's targets, so a cache of K views gives the student 2K distinct ones (distill_cfg.cache_flip).

Exact geometry (the teacher's mirrored output stands in for its output on the mirrored view, as for any
flip-trained CNN): the heatmap mirrors pixel for pixel; a box map cell x holds its box centre as an offset
dx from the cell, and mirroring a view of width W (a multiple of the stride 4) sends cell x to W/4-1-x with
offset 1-dx (decode: centre = (x + dx) * 4). A crop patch mirrors inside its resized width pw when pw is a
multiple of 4; other patches are dropped from the mirrored sample (their cells would not line up)."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Dict

import torch

from yolc_kd import crops
from yolc_kd.cache.schema import BOX_Q_MAX, BOX_STEP
from yolc_kd.kd import KDTargets

STRIDE = 4


def _mirror_offset(x: torch.Tensor) -> torch.Tensor:
    """dx -> 1 - dx on the x-offset channel (dim -3) of box maps, float or int16 fixed point."""
    out = x.clone()
    if x.dtype == torch.int16:  # q -> 1/step - q, exact in the fixed point
        one = int(round(1.0 / BOX_STEP))
        out[..., 0, :, :] = (one - x[..., 0, :, :].to(torch.int32)).clamp(-BOX_Q_MAX, BOX_Q_MAX).to(torch.int16)
    else:
        out[..., 0, :, :] = 1 - x[..., 0, :, :]
    return out


def flip_targets(t: KDTargets, view_hw: tuple) -> KDTargets:
    """KD targets of one view (batch 1, stored or float dtypes) for the horizontally mirrored view."""
    _, width = int(view_hw[0]), int(view_hw[1])
    if width % STRIDE:
        raise ValueError(f"mirroring needs a view width divisible by {STRIDE}, got {width}")
    coarse = _mirror_offset(t.coarse.flip(-1))
    boxes, valid, refine = t.patch_boxes.clone(), t.patch_valid.clone(), t.refine.clone()
    plan = crops.kd_patch_plan(t.patch_boxes, t.patch_scales, t.patch_valid, view_hw)
    for (b, k), (_, pw) in zip(t.patch_valid.nonzero().tolist(), plan.sizes()):
        if pw % STRIDE:
            valid[b, k] = False
            refine[b, k] = 0
            continue
        cells = pw // STRIDE
        refine[b, k, :, :, :cells] = _mirror_offset(t.refine[b, k, :, :, :cells].flip(-1))
        x, _, w, _ = t.patch_boxes[b, k].tolist()
        boxes[b, k, 0] = width - x - w
    return replace(t, heatmap=t.heatmap.flip(-1), coarse=coarse, patch_boxes=boxes, patch_valid=valid, refine=refine)


def flip_sample(sample: Dict[str, Any]) -> Dict[str, Any]:
    """A training sample (TrainSamples item) mirrored: view, ground-truth boxes, meta flag, KD targets."""
    img = sample["img"].flip(-1)
    width = img.shape[-1]
    boxes = sample["boxes"].clone()
    boxes[:, 0], boxes[:, 2] = width - sample["boxes"][:, 2], width - sample["boxes"][:, 0]
    flipped = not bool(sample["meta"].get("flip", False))
    meta = dict(sample["meta"], flip=flipped, flip_direction="horizontal" if flipped else None, reaugmented="flip")
    out = dict(sample, img=img, boxes=boxes, meta=meta)
    if "kd_targets" in sample:
        out["kd_targets"] = flip_targets(sample["kd_targets"], tuple(img.shape[-2:]))
    return out
