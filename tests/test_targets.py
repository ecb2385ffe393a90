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
            gy, gx = int((y1 + y2) / 8), int((x1 + x2) / 8)
            if 0 <= gy < feat_h and 0 <= gx < feat_w:  # a centre outside the grid gets no box target
                xywh[b, gy, gx] = torch.stack([(x1 + x2) / 8, (y1 + y2) / 8, (x2 - x1) / 8, (y2 - y1) / 8])
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


def test_objects_at_and_beyond_the_border_and_the_weights():
    """Gaussians cut by the map's edge, centres outside the regression grid (no box target), crowded cells: the
    heatmap, the box targets and both weights as the per-object loop gives them."""
    gen = torch.Generator().manual_seed(5)
    xy = (torch.rand(60, 2, generator=gen) * torch.tensor([110.0, 80.0]) - 8).round()
    wh = 1 + (torch.rand(60, 2, generator=gen) * 30).round()
    boxes = torch.cat([xy, xy + wh], 1)
    boxes[0] = torch.tensor([90.0, 60.0, 120.0, 90.0])  # centre beyond the 96x64 image: heatmap only
    labels = torch.randint(0, 3, (60,), generator=gen)
    targets, _ = yolc_targets([boxes, boxes[:0]], [labels, labels[:0]], (2, 4, 16, 24), (64, 96, 3), 3)
    heat, xywh = _per_object([boxes], [labels], 16, 24, 3)
    assert torch.equal(targets["center_heatmap_target"][:1], heat)
    assert torch.equal(targets["xywh_target"][:1], xywh)
    has = torch.zeros(2, 16, 24, dtype=torch.bool)
    for x1, y1, x2, y2 in boxes.tolist():
        cx, cy = int((x1 + x2) / 8), int((y1 + y2) / 8)
        if 0 <= cx < 24 and 0 <= cy < 16:
            has[0, cy, cx] = True
    assert torch.equal(targets["xywh_target_weight"], has.float())
    l1 = torch.where(has[..., None], torch.tensor([1.0, 1.0, 0.2, 0.2]), torch.zeros(4))
    assert torch.equal(targets["xywh_l1target_weight"], l1)


class _HostReads(torch.overrides.TorchFunctionMode):
    """Counts the tensor calls that read values back to the host (each a wait on a GPU)."""
    names = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy", "nonzero", "unique"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        masked = name in ("__getitem__", "__setitem__") and len(args) > 1 and torch.is_tensor(args[1]) \
            and args[1].dtype == torch.bool
        self.count += name in self.names or masked
        return func(*args, **(kwargs or {}))


def test_target_building_reads_the_device_a_fixed_number_of_times():
    """The host reads do not grow with the objects: one for the distinct radii, whatever the object count."""
    counts = []
    for n in (4, 400):
        boxes = torch.tensor([[10.0, 10.0, 18.0, 18.0], [40.0, 20.0, 70.0, 44.0]]).repeat(n // 2, 1)
        boxes += torch.arange(n, dtype=torch.float32)[:, None] % 7
        with _HostReads() as reads:
            yolc_targets([boxes], [torch.zeros(n, dtype=torch.long)], (1, 4, 16, 24), (64, 96, 3), 3)
        counts.append(reads.count)
    assert counts[0] == counts[1] <= 2, counts
