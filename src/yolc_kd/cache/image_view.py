"""The image-level cache's targets moved into a training view: the teacher labelled each whole image once per
cached scale (precompute/image_level.py); a fresh view of the image gets its KD targets from the nearest scale
through the view's transform (data/view.py), as ReLabel cuts a random crop's label from a whole-image map.

Frames: `image` (the image as loaded, (h, w)), `row` (the image resized to a cached scale, mirrored in a mirrored
row: row_frame), `view` (the training input). `row_to_view` = row -> image -> view; every map, box and crop moves
by it (a mirrored view takes a mirrored row where the cache has them, and the two mirrors cancel):
- the heatmap (nearest pixel, on the training device: ImageViewTargets.heatmap_move), valid where the view
  shows the image. Nearest, not bilinear: a bilinear move at a sub-pixel shift flattens the teacher's one-pixel
  peaks into two-pixel plateaus below the peak threshold (60 % of the teacher's peaks kept within 2 px against
  83 % nearest, benchmarks/bench_image_targets.py), and students distilled from the flattened maps did worse
  than training without KD on two of four seeds (BENCHMARKS.md);
- the coarse box maps as decoded boxes (nearest cell, apply_box_map), valid likewise;
- the cached crops that lie in the view (at least min_patch_size on each side there, the largest first, up to the
  view's crop slots) as the view's KD crops: the student's patch is the crop's part in the view, resized so that
  its pixels are the teacher's patch pixels; the teacher's refine maps move by teacher patch -> scaled -> view ->
  student patch (a mirrored view mirrors them; nothing is dropped), valid where the student patch shows cells the
  teacher's patch had.
The teacher saw no photometric change: colour augmentation stays on the student's side."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Mapping, Sequence, Tuple

import numpy as np
import torch

from yolc_kd import crops
from yolc_kd.cache.codec import BOXES, HEATMAP
from yolc_kd.cache.schema import Layout
from yolc_kd.data.view_steps import scaled_hw
from yolc_kd.data.view import ViewTransform
from yolc_kd.data.view_steps import HFlip, Resize
from yolc_kd.kd import KDTargets
from yolc_kd.stride import BOX_STRIDE


def view_scale(view: ViewTransform) -> float:
    """The view's linear scale from the image (geometric mean of the two axes' factors)."""
    (ax, _), (ay, _) = view.affine()
    return math.sqrt(abs(float(ax)) * abs(float(ay)))


def nearest_scale(view: ViewTransform, scales: Sequence[float]) -> int:
    """Index of the cached scale nearest the view's (in log scale: a resampling factor up or down counts alike)."""
    s = math.log(view_scale(view))
    return min(range(len(scales)), key=lambda k: (abs(math.log(scales[k]) - s), k))


def row_frame(image_hw: Sequence[int], scale: float, mirrored: bool = False) -> ViewTransform:
    """The image -> a row's frame: the image resized by the row's scale (scaled_hw), then mirrored for a mirrored
    row. What the teacher saw (precompute/image_level.py ImageRows applies it to the image)."""
    image_hw, hw = tuple(int(v) for v in image_hw), scaled_hw(image_hw, scale)
    steps = ([Resize(image_hw, hw)] if hw != image_hw or not mirrored else []) + ([HFlip(hw)] if mirrored else [])
    return ViewTransform(tuple(steps))


def row_to_view(image_hw: Sequence[int], scale: float, mirrored: bool, view: ViewTransform) -> ViewTransform:
    """The row's frame -> the view: undo the row's scale (and mirror), then the view's own transform."""
    return row_frame(image_hw, scale, mirrored).inverse().then(view)


def view_mirrored(view: ViewTransform) -> bool:
    """Whether a view shows its image mirrored (its x axis reversed)."""
    (ax, _), _ = view.affine()
    return ax < 0


def source_window(move: ViewTransform, row_hw: Sequence[int],
                  stride: int = BOX_STRIDE) -> Tuple[int, int, int, int]:
    """(x0, y0, x1, y1): the part of the row's frame that the view's output shows, one pixel wider for bilinear
    sampling, its start on the box maps' grid (multiples of stride), clipped to the row's image."""
    (ax, bx), (ay, by) = move.affine()
    out_h, out_w = move.out_hw
    h, w = int(row_hw[0]), int(row_hw[1])
    xs = sorted(((0 - float(bx)) / float(ax), (out_w - float(bx)) / float(ax)))
    ys = sorted(((0 - float(by)) / float(ay), (out_h - float(by)) / float(ay)))
    x0 = max(0, math.floor(xs[0]) - 1) // stride * stride
    y0 = max(0, math.floor(ys[0]) - 1) // stride * stride
    x1, y1 = min(w, math.ceil(xs[1]) + 1), min(h, math.ceil(ys[1]) + 1)
    if x1 <= x0 or y1 <= y0:  # the view shows none of the row (cannot happen for a crop of the image)
        x0, y0 = 0, 0
        x1, y1 = min(w, stride), min(h, stride)
    return x0, y0, x1, y1


@dataclass
class ImageViewTargets:
    """One view's KD targets from an image-level row, as the DataLoader worker hands them over.

    Args:
        targets: KDTargets of batch 1 in the cache's stored dtypes, except the heatmap (an empty (1,C,0,0)
            placeholder: it is moved on the training device) and its mask; coarse, crops, refine and their masks
            already in the view.
        heatmap_window: (C, h, w) uint8, the part of the row's heatmap the view shows (source_window).
        heatmap_move: the window's frame -> the view.
    """
    targets: KDTargets
    heatmap_window: torch.Tensor
    heatmap_move: ViewTransform


def move_heatmaps(items: Sequence[Tuple[torch.Tensor, ViewTransform]], view_hw: Sequence[int],
                  device: torch.device, mode: str = "nearest") -> Tuple[torch.Tensor, torch.Tensor]:
    """(B,C,H,W) float32 probabilities and (B,1,H,W) bool masks: every (uint8 window, move) decoded
    (cache/codec.py HEATMAP) and resampled into its view (ViewTransform.apply_map, nearest by default), zero where
    the view does not show the image. On the device: the largest per-sample work of the image-level cache, a few
    ms there."""
    channels = int(items[0][0].shape[0]) if items else 0
    heat = torch.empty(len(items), channels, *view_hw, device=device)
    valid = torch.empty(len(items), 1, *view_hw, dtype=torch.bool, device=device)
    for i, (window, move) in enumerate(items):
        q = window.to(device, non_blocking=True)
        if mode == "nearest":  # picks stored values: gather the uint8 codes, then dequantise (half the time)
            h, v = move.apply_map(q, 1, out_size=tuple(view_hw), mode=mode)
            HEATMAP.decode(h, out=heat[i])  # in place: 4x the CPU speed of a decode into a new tensor
        else:
            h, v = move.apply_map(HEATMAP.decode(q), 1, out_size=tuple(view_hw), mode=mode)
            heat[i].copy_(h)
        _zero_outside(heat[i], v)
        valid[i, 0] = v
    return heat, valid


def _zero_outside(x: torch.Tensor, valid: torch.Tensor) -> None:
    """x (C,H,W) set to 0 where the (H,W) mask is False; a mask that is one rectangle (every view's is) by
    slices, 5x a masked fill on the CPU."""
    rows, cols = valid.any(dim=1).nonzero()[:, 0], valid.any(dim=0).nonzero()[:, 0]
    if len(rows) == 0:
        x.zero_()
        return
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    if (y1 - y0) * (x1 - x0) != int(valid.sum()):  # not one filled rectangle
        x.masked_fill_(~valid, 0.0)
        return
    x[:, :y0].zero_()
    x[:, y1:].zero_()
    x[:, y0:y1, :x0].zero_()
    x[:, y0:y1, x1:].zero_()


def crops_in_view(row: Mapping[str, np.ndarray], move: ViewTransform, min_size: int,
                  slots: int) -> List[Tuple[int, np.ndarray]]:
    """[(row slot, crop box [x, y, w, h] in the view)] of the cached crops that show at least min_size pixels
    on each side in the view, largest visible area first, at most `slots`."""
    cached = np.flatnonzero(np.asarray(row["patch_valid"], bool))
    if len(cached) == 0:
        return []
    boxes_view_xywh = np.asarray(move.apply_crop_boxes(np.asarray(row["patch_boxes"], np.float64)[cached]))
    found = [(float(box[2] * box[3]), int(k), box) for k, box in zip(cached, boxes_view_xywh)
             if box[2] >= min_size and box[3] >= min_size]
    found.sort(key=lambda t: (-t[0], t[1]))
    return [(k, box) for _, k, box in found[:slots]]


def move_row(row: Mapping[str, np.ndarray], refine: Mapping[int, np.ndarray], layout: Layout,
             image_hw: Sequence[int], view: ViewTransform, window: Tuple[int, int, int, int],
             chosen: List[Tuple[int, np.ndarray]], slots: int) -> ImageViewTargets:
    """The view's targets from one row: row holds patch_boxes / patch_scales / patch_valid and the heatmap and
    coarse windows (source_window), refine the stored refine maps of the chosen row slots (crops_in_view)."""
    variant = int(row["variant"])
    row_hw = scaled_hw(image_hw, layout.row_scale(variant))
    move = row_to_view(image_hw, layout.row_scale(variant), layout.row_mirrored(variant), view)
    x0, y0, x1, y1 = window
    to_view = ViewTransform.crop(row_hw, window).inverse().then(move)  # the window's frame -> the view
    view_hw = view.out_hw
    coarse_hw = (-(-view_hw[0] // BOX_STRIDE), -(-view_hw[1] // BOX_STRIDE))
    coarse, coarse_valid = to_view.apply_box_map(torch.from_numpy(np.asarray(row["coarse"], np.int16)), BOX_STRIDE,
                                                 out_size=coarse_hw, unit=BOXES.step)
    canvas = crops.patch_canvas(view_hw)
    rh, rw = layout.refine_hw
    boxes_view_xywh = torch.zeros(1, slots, 4)
    scales = torch.zeros(1, slots)
    valid = torch.zeros(1, slots, dtype=torch.bool)
    moved = torch.zeros(1, slots, 4, rh, rw, dtype=torch.int16)
    moved_valid = torch.zeros(1, slots, 1, rh, rw, dtype=torch.bool)
    if chosen:
        slot_idx = [k for k, _ in chosen]
        boxes_row_xywh = torch.as_tensor(np.asarray(row["patch_boxes"], np.float32)[slot_idx])[None]
        scales_row = torch.as_tensor(np.asarray(row["patch_scales"], np.float32)[slot_idx])[None]
        teacher_plan = crops.KDPatchPlan.from_targets(boxes_row_xywh, scales_row,
                                                      torch.ones(1, len(chosen), dtype=torch.bool), row_hw, canvas)
        (ax, _), _ = move.affine()
        for j, (k, box) in enumerate(chosen):
            boxes_view_xywh[0, j] = torch.as_tensor(box, dtype=torch.float32)
            # the student's patch pixels are the teacher's: teacher scale x (row pixels per view pixel)
            scales[0, j] = float(scales_row[0, j]) / abs(float(ax))
            valid[0, j] = True
        student_plan = crops.KDPatchPlan.from_targets(boxes_view_xywh, scales, valid, view_hw, canvas)
        for j, ((k, _), t_size, s_size) in enumerate(zip(chosen, teacher_plan.sizes(), student_plan.sizes())):
            teacher_patch = crops.patch_view(boxes_row_xywh[0, j].tolist(), t_size, row_hw, canvas)
            student_patch = crops.patch_view(boxes_view_xywh[0, j].tolist(), s_size, view_hw, canvas)
            patch_move = teacher_patch.inverse().then(move).then(student_patch)
            maps, ok = patch_move.apply_box_map(torch.from_numpy(np.asarray(refine[k], np.int16)), BOX_STRIDE,
                                                out_size=(rh, rw), unit=BOXES.step)
            moved[0, j] = torch.where(ok, maps, torch.zeros((), dtype=maps.dtype))
            moved_valid[0, j, 0] = ok
    heat = torch.from_numpy(np.ascontiguousarray(row["heatmap"], dtype=np.uint8))
    targets = KDTargets(heatmap=torch.zeros(1, heat.shape[0], 0, 0, dtype=torch.uint8),
                        coarse=torch.where(coarse_valid, coarse, torch.zeros((), dtype=coarse.dtype))[None],
                        patch_boxes=boxes_view_xywh, patch_scales=scales, patch_valid=valid, refine=moved,
                        coarse_valid=coarse_valid[None, None], refine_valid=moved_valid)
    return ImageViewTargets(targets, heat, to_view)
