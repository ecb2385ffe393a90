"""Cheap re-augmentation of a cached view at training time: the horizontal mirror of the view, its boxes and
the teacher's targets, so a cache of K views gives the student 2K distinct ones (distill_cfg.cache_flip).

One transform moves everything: the flip of the view frame (data/view.py ViewTransform.hflip) applied to the
image, the boxes, the heatmap, the coarse box maps (as decoded boxes, re-encoded in their new cells) and the crop
boxes; each patch's refine maps move by the same flip seen from the patch (patch -> view -> mirrored view ->
mirrored patch). The teacher's mirrored output stands in for its output on the mirrored view, as for any
flip-trained CNN. Maps move exactly cell for cell: the view width must be a multiple of the stride 4, and a
patch is dropped from the mirrored sample unless the mirrored patch (as crops.PatchPlan cuts it from the mirrored
view) is exactly the old patch mirrored and its refine cells land on whole cells (a resized patch width that is
not a multiple of 4 does not; nor does a crop box off the pixel grid whose rounded mirror is a pixel off)."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Dict

import torch

from yolc_kd import crops
from yolc_kd.cache.codec import BOXES
from yolc_kd.data.view import ViewTransform
from yolc_kd.kd import KDTargets
from yolc_kd.stride import BOX_STRIDE


def flip_targets(t: KDTargets, view_hw: tuple) -> KDTargets:
    """KD targets of one view (batch 1, stored or float dtypes) for the horizontally mirrored view."""
    flip = ViewTransform.hflip(view_hw)
    if not flip.moves_cells(BOX_STRIDE):
        raise ValueError(f"mirroring needs a view width divisible by {BOX_STRIDE}, got {int(view_hw[1])}")
    heatmap, _ = flip.apply_map(t.heatmap)
    coarse, _ = flip.apply_box_map(t.coarse, BOX_STRIDE, unit=BOXES.unit(t.coarse))
    boxes_mirrored_xywh, valid, refine = t.patch_boxes.clone(), t.patch_valid.clone(), t.refine.clone()
    plan = t.patch_plan(view_hw)
    canvas = (BOX_STRIDE * t.refine.shape[-2], BOX_STRIDE * t.refine.shape[-1])
    for (b, k), size in zip(t.patch_valid.nonzero().tolist(), plan.sizes()):
        new_box = flip.apply_crop_boxes(t.patch_boxes[b, k][None])[0]
        old_patch = crops.patch_view(t.patch_boxes[b, k].tolist(), size, view_hw, canvas)
        new_patch = crops.patch_view(new_box.tolist(), size, view_hw, canvas)
        moved = old_patch.inverse().then(flip).then(new_patch)
        whole = moved.content_rect() == (0, 0, size[1], size[0])  # the new patch is all old patch pixels
        if not (whole and moved.moves_cells(BOX_STRIDE)):
            valid[b, k] = False
            refine[b, k] = 0
            continue
        maps, _ = moved.apply_box_map(t.refine[b, k], BOX_STRIDE, unit=BOXES.unit(t.refine))
        # the canvas below the patch is zero padding in both views, so those rows move with the patch's
        # columns; the columns right of the patch (padding too) keep the teacher's values
        _, columns = moved.valid_axes(BOX_STRIDE, t.refine.shape[-2:])
        refine[b, k] = torch.where(columns.to(maps.device), maps, t.refine[b, k])
        boxes_mirrored_xywh[b, k] = new_box
    return replace(t, heatmap=heatmap, coarse=coarse, patch_boxes=boxes_mirrored_xywh, patch_valid=valid,
                   refine=refine)


def flip_sample(sample: Dict[str, Any]) -> Dict[str, Any]:
    """A training sample (TrainSamples item) mirrored: view, ground-truth boxes, meta flag, KD targets."""
    flip = ViewTransform.hflip(tuple(sample["img"].shape[-2:]))
    img, _ = flip.apply_map(sample["img"])
    boxes = flip.apply_boxes(sample["boxes"])
    flipped = not bool(sample["meta"].get("flip", False))
    meta = dict(sample["meta"], flip=flipped, flip_direction="horizontal" if flipped else None, reaugmented="flip")
    out = dict(sample, img=img, boxes=boxes, meta=meta)
    if "kd_targets" in sample:
        out["kd_targets"] = flip_targets(sample["kd_targets"], tuple(img.shape[-2:]))
    return out
