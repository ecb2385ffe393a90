"""YOLC's training targets: full-resolution gaussian heatmaps and stride-4 box targets."""
from __future__ import annotations

from math import sqrt
from typing import Dict, List, Sequence, Tuple

import torch


def gaussian_radius(det_size: Sequence[float], min_overlap: float) -> float:
    """CornerNet's radius: the smallest of the three corner-placement cases keeping IoU >= min_overlap."""
    height, width = det_size
    b1 = height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 - sqrt(b1 ** 2 - 4 * c1)) / 2
    b2 = 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 - sqrt(b2 ** 2 - 16 * c2)) / 8
    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + sqrt(b3 ** 2 - 4 * a3 * c3)) / (2 * a3)
    return min(r1, r2, r3)


def gaussian_2d(radius: int, sigma: float, dtype=torch.float32, device="cpu") -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device).view(1, -1)
    y = torch.arange(-radius, radius + 1, dtype=dtype, device=device).view(-1, 1)
    h = (-(x * x + y * y) / (2 * sigma * sigma)).exp()
    h[h < torch.finfo(h.dtype).eps * h.max()] = 0
    return h


def draw_gaussian(heatmap: torch.Tensor, center: Tuple[int, int], radius: int) -> None:
    """Max-paste a gaussian of the given radius (sigma = diameter / 6) at an integer centre, in place."""
    diameter = 2 * radius + 1
    kernel = gaussian_2d(radius, diameter / 6, heatmap.dtype, heatmap.device)
    x, y = center
    height, width = heatmap.shape[:2]
    left, right = min(x, radius), min(width - x, radius + 1)
    top, bottom = min(y, radius), min(height - y, radius + 1)
    if right <= -left or bottom <= -top:
        return
    region = heatmap[y - top:y + bottom, x - left:x + right]
    patch = kernel[radius - top:radius + bottom, radius - left:radius + right]
    region.copy_(torch.maximum(region, patch))


def yolc_targets(gt_bboxes: List[torch.Tensor], gt_labels: List[torch.Tensor], feat_shape: Sequence[int],
                 img_shape: Sequence[int], num_classes: int) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """Heatmap targets at 4x the regression grid; one box target per object at its stride-4 centre cell."""
    img_h, img_w = img_shape[:2]
    bs, _, feat_h, feat_w = feat_shape
    width_ratio = float(feat_w / img_w)
    height_ratio = float(feat_h / img_h)
    ref = gt_bboxes[-1]
    heat = ref.new_zeros([bs, num_classes, feat_h * 4, feat_w * 4])
    xywh = ref.new_zeros([bs, feat_h, feat_w, 4])
    weight = ref.new_zeros([bs, feat_h, feat_w])
    l1_weight = ref.new_zeros([bs, feat_h, feat_w, 4])
    for b in range(bs):
        boxes, labels = gt_bboxes[b], gt_labels[b]
        for j in range(boxes.shape[0]):
            x1, y1, x2, y2 = boxes[j]
            ctx, cty = (x1 + x2) * width_ratio / 2, (y1 + y2) * height_ratio / 2
            ctx_int, cty_int = int(ctx), int(cty)
            box_w, box_h = x2 - x1, y2 - y1
            radius = max(0, int(gaussian_radius([box_h, box_w], min_overlap=0.3)))
            # the heatmap peak sits at the integer centre in input pixels (the head is full resolution)
            draw_gaussian(heat[b, labels[j]], (int((x1 + x2) / 2), int((y1 + y2) / 2)), radius)
            if cty_int >= feat_h or ctx_int >= feat_w:
                continue
            xywh[b, cty_int, ctx_int] = torch.stack([ctx, cty, box_w * width_ratio / 2, box_h * height_ratio / 2])
            weight[b, cty_int, ctx_int] = 1
            l1_weight[b, cty_int, ctx_int, 0:2] = 1.0
            l1_weight[b, cty_int, ctx_int, 2:4] = 0.2  # YOLC down-weights the size terms of L1
    avg_factor = torch.clamp(heat.eq(1).sum(), min=1)
    return dict(center_heatmap_target=heat, xywh_target=xywh, xywh_target_weight=weight,
                xywh_l1target_weight=l1_weight), avg_factor
