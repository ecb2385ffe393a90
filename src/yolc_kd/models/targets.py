"""YOLC's training targets: full-resolution gaussian heatmaps and stride-4 box targets."""
from __future__ import annotations

from math import sqrt
from typing import Dict, List, Sequence, Tuple

import torch

from yolc_kd.stride import BOX_STRIDE


def _sqrt(x):
    # math.sqrt as mmdet calls it on 0-dim tensors: a float64 root, rounded back to the operand's dtype
    return x.double().sqrt().to(x.dtype) if torch.is_tensor(x) else sqrt(x)


def gaussian_radius(det_size: Sequence, min_overlap: float):
    """CornerNet's radius: the smallest of the three corner-placement cases keeping IoU >= min_overlap.
    Floats or tensors (element-wise, same rounding as mmdet's per-box call)."""
    height, width = det_size
    b1 = height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 - _sqrt(b1 ** 2 - 4 * c1)) / 2
    b2 = 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 - _sqrt(b2 ** 2 - 16 * c2)) / 8
    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + _sqrt(b3 ** 2 - 4 * a3 * c3)) / (2 * a3)
    if torch.is_tensor(r1):
        return torch.minimum(torch.minimum(r1, r2), r3)
    return min(r1, r2, r3)


def gaussian_2d(radius: int, sigma: float, dtype=torch.float32, device="cpu") -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device).view(1, -1)
    y = torch.arange(-radius, radius + 1, dtype=dtype, device=device).view(-1, 1)
    h = (-(x * x + y * y) / (2 * sigma * sigma)).exp()
    return h.masked_fill_(h < torch.finfo(h.dtype).eps * h.max(), 0)  # a mask, no host read on a GPU


def draw_gaussians(heat: torch.Tensor, index: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor,
                   radius: torch.Tensor) -> None:
    """Max-paste gaussians (sigma = diameter / 6) into heat (N,H,W) at integer centres, in place; one
    scatter per distinct radius instead of one paste per object (max is order-free, so the result is the same).
    One host sync in all (the distinct radii and their counts): objects are grouped by radius with a sort, and
    offsets outside the map write -inf, which amax ignores, instead of being masked out."""
    n_maps, height, width = heat.shape
    flat = heat.view(-1)
    order = torch.argsort(radius, stable=True)
    values, counts = torch.unique(radius, return_counts=True)  # sorted, as the argsort groups them
    start = 0
    for r, count in zip(*torch.stack([values, counts]).tolist()):
        group = order[start:start + count]
        start += count
        kernel = gaussian_2d(r, (2 * r + 1) / 6, heat.dtype, heat.device).reshape(-1)
        d = torch.arange(-r, r + 1, device=heat.device)
        dy, dx = d.repeat_interleave(2 * r + 1), d.repeat(2 * r + 1)
        ys, xs = cy[group, None] + dy, cx[group, None] + dx
        inside = (ys >= 0) & (ys < height) & (xs >= 0) & (xs < width)
        pos = torch.where(inside, (index[group, None] * height + ys) * width + xs, 0)
        val = torch.where(inside, kernel.expand(pos.shape), float("-inf"))
        flat.scatter_reduce_(0, pos.reshape(-1), val.reshape(-1), reduce="amax")


def yolc_targets(gt_bboxes: List[torch.Tensor], gt_labels: List[torch.Tensor], feat_shape: Sequence[int],
                 img_shape: Sequence[int], num_classes: int) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """Heatmap targets at 4x the regression grid; one box target per object at its stride-4 centre cell."""
    img_h, img_w = img_shape[:2]
    bs, _, feat_h, feat_w = feat_shape
    width_ratio = float(feat_w / img_w)
    height_ratio = float(feat_h / img_h)
    ref = gt_bboxes[-1]
    heat = ref.new_zeros([bs, num_classes, feat_h * BOX_STRIDE, feat_w * BOX_STRIDE])
    xywh = ref.new_zeros([bs * feat_h * feat_w, 4])
    weight = ref.new_zeros([bs * feat_h * feat_w])
    l1_weight = ref.new_zeros([bs * feat_h * feat_w, 4])
    boxes = torch.cat([b.reshape(-1, 4) for b in gt_bboxes]).to(ref.dtype)
    if boxes.shape[0]:
        image = torch.cat([torch.full((len(b),), i, device=ref.device) for i, b in enumerate(gt_bboxes)])
        labels = torch.cat([lab.reshape(-1) for lab in gt_labels]).to(ref.device).long()
        x1, y1, x2, y2 = boxes.unbind(1)
        ctx, cty = (x1 + x2) * width_ratio / 2, (y1 + y2) * height_ratio / 2
        box_w, box_h = x2 - x1, y2 - y1
        radius = gaussian_radius([box_h, box_w], min_overlap=0.3).trunc().clamp(min=0).long()
        # the heatmap peak sits at the integer centre in input pixels (the head is full resolution)
        draw_gaussians(heat.view(-1, feat_h * BOX_STRIDE, feat_w * BOX_STRIDE), image * num_classes + labels,
                       ((x1 + x2) / 2).trunc().long(), ((y1 + y2) / 2).trunc().long(), radius)
        ctx_int, cty_int = ctx.trunc().long(), cty.trunc().long()
        keep = (cty_int < feat_h) & (ctx_int < feat_w) & (cty_int >= 0) & (ctx_int >= 0)
        n_cells = bs * feat_h * feat_w
        cell = torch.where(keep, (image * feat_h + cty_int) * feat_w + ctx_int, n_cells)  # outside: a spare slot
        # several objects in one cell: the last one wins, as in YOLC's per-object loop (the highest object index)
        winner = torch.full((n_cells + 1,), -1, dtype=torch.long, device=ref.device)
        winner.scatter_reduce_(0, cell, torch.arange(len(cell), device=ref.device), reduce="amax")
        winner = winner[:n_cells]
        has = (winner >= 0)[:, None]
        rows = torch.stack([ctx, cty, box_w * width_ratio / 2, box_h * height_ratio / 2], 1)
        xywh = torch.where(has, rows[winner.clamp(min=0)], xywh)
        weight = has[:, 0].to(weight.dtype)
        l1_weight = torch.where(has, ref.new_tensor([1.0, 1.0, 0.2, 0.2]), l1_weight)  # YOLC down-weights sizes
    avg_factor = torch.clamp(heat.eq(1).sum(), min=1)
    return dict(center_heatmap_target=heat, xywh_target=xywh.view(bs, feat_h, feat_w, 4),
                xywh_target_weight=weight.view(bs, feat_h, feat_w),
                xywh_l1target_weight=l1_weight.view(bs, feat_h, feat_w, 4)), avg_factor
