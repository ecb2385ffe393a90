"""Vectorised YOLC targets equal a per-object reference (YOLC's loop: max-paste, last object wins a cell)."""
import torch

from yolc_kd.models.targets import gaussian_2d, gaussian_radius, yolc_targets


def _per_object(gt_bboxes, gt_labels, feat_h, feat_w, num_classes):
    heat = torch.zeros(len(gt_bboxes), num_classes, feat_h * 4, feat_w * 4)
    xywh = torch.zeros(len(gt_bboxes), feat_h, feat_w, 4)
    for b, (boxes, labels) in enumerate(zip(gt_bboxes, gt_labels)):
        for (x1, y1, x2, y2), lab in zip(boxes, labels):
            r = max(0, int(gaussian_radius([y2 - y1, x2 - x1], 0.3)))
            k = gaussian_2d(r, (2 * r + 1) / 6)
            cx, cy = int((x1 + x2) / 2), int((y1 + y2) / 2)
            for dy in range(-r, r + 1):
                for dx in range(-r, r + 1):
                    y, x = cy + dy, cx + dx
                    if 0 <= y < feat_h * 4 and 0 <= x < feat_w * 4:
                        heat[b, lab, y, x] = max(heat[b, lab, y, x], k[dy + r, dx + r])
            xywh[b, int((y1 + y2) / 8), int((x1 + x2) / 8)] = torch.stack(
                [(x1 + x2) / 8, (y1 + y2) / 8, (x2 - x1) / 8, (y2 - y1) / 8])
    return heat, xywh


def test_vectorised_targets_equal_per_object_loop():
    gen = torch.Generator().manual_seed(3)
    gt_b, gt_l = [], []
    for n in (7, 0, 12):
        xy = (torch.rand(n, 2, generator=gen) * torch.tensor([80.0, 56.0])).round()
        wh = 1 + (torch.rand(n, 2, generator=gen) * 24).round()
        gt_b.append(torch.cat([xy, xy + wh], 1))
        gt_l.append(torch.randint(0, 3, (n,), generator=gen))
    gt_b[2][5] = gt_b[2][4] + 0.5  # two objects in one stride-4 cell: the later one is the target
    targets, avg_factor = yolc_targets(gt_b, gt_l, (3, 4, 16, 24), (64, 96, 3), 3)
    heat, xywh = _per_object(gt_b, gt_l, 16, 24, 3)
    assert torch.equal(targets["center_heatmap_target"], heat)
    assert torch.equal(targets["xywh_target"], xywh)
    assert int(avg_factor) == int(heat.eq(1).sum())
    assert targets["xywh_target_weight"].sum() == (xywh.abs().sum(-1) > 0).sum()
