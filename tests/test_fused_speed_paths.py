"""Fused inference's fast paths give the plain path's detections: packed patches decoded in windows, the
heatmap-only LSM pass, crops lent by another model; and the patch budget bounds the patch pixels."""
import numpy as np
import pytest
import torch

from conftest import plain_metas, tiny_model_cfg
from yolc_kd import crops
from yolc_kd.errors import ModelConfigError
from yolc_kd.models import build_detector
from yolc_kd.models.yolc_head import gaussian_blur3x3, local_maximum


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(**crop):
    cfg = tiny_model_cfg(num_classes=3)
    cfg["test_cfg"]["crop"] = dict(dict(min_patch_size=8, max_patches=3, patch_limit="input"), **crop)
    torch.manual_seed(0)
    model = build_detector(cfg).eval()
    with torch.no_grad():  # YOLC's init gives flat maps; these give distinct peaks everywhere (padding too) and boxes
        for p in model.bbox_head.parameters():
            if p.dim() == 4:
                p.normal_(0, 0.3)
    return model


def _rows(dets, labels):
    return sorted((int(l), *[round(float(v), 3) for v in d]) for d, l in zip(dets, labels))


def _plan(img, metas, regions, upscale=1.5, budget=None):
    return crops.plan_inference_patches(regions, metas, img.shape[2:], max(len(r) for r in regions), 1, 1.0, upscale,
                                        tuple(img.shape[2:]), budget=budget)


# ----------------------------------------------------------------------------- decoding

def test_local_maximum_is_heat_times_its_peak_mask():
    heat = torch.rand(2, 3, 40, 52)
    heat[0, 0, 5:8, 5:8] = 0.7  # a plateau: every pixel of it is a peak
    hmax = torch.nn.functional.max_pool2d(heat, 3, stride=1, padding=1)
    assert torch.equal(local_maximum(heat, 3), heat * (hmax == heat).float())
    peaks = local_maximum(heat, 3)
    assert torch.equal(local_maximum(peaks, 3), peaks)  # peaks of peaks: the same map
    assert local_maximum(heat, 1) is heat


def test_window_decode_is_the_whole_map_decode_restricted_to_the_window():
    model = _model()
    head = model.bbox_head
    torch.manual_seed(1)
    heat = gaussian_blur3x3(torch.rand(1, 3, 96, 128) ** 4)
    xywh = torch.randn(1, 4, 24, 32) * 3
    # the whole map as one window: get_bboxes' decode
    (d, l), = head.bboxes_from_windows(heat, xywh, [(0, 0, 0, 96, 128)])
    ref_d, ref_l = head.decode_heatmap(heat, xywh, (96, 128), k=head.test_cfg["topk"], kernel=3)
    assert torch.equal(d, ref_d[0]) and torch.equal(l, ref_l[0])
    # windows of sizes that are no multiple of 4: the peaks of the whole map inside each window, boxes in its frame
    peaks = local_maximum(heat, 3)
    for y, x, h, w in [(0, 0, 50, 61), (32, 64, 61, 45), (64, 96, 32, 32)]:
        (d, l), = head.bboxes_from_windows(heat, xywh, [(0, y, x, h, w)])
        masked = torch.zeros_like(peaks)
        masked[..., y:y + h, x:x + w] = peaks[..., y:y + h, x:x + w]
        ref_d, ref_l = head.decode_heatmap(masked, xywh, (96, 128), k=head.test_cfg["topk"], kernel=1)
        keep = ref_d[0, :, 4] > 0
        ref_d, ref_l = ref_d[0][keep], ref_l[0][keep]
        ref_d[:, :4] -= torch.tensor([x, y, x, y], dtype=torch.float32)  # the whole map's frame -> the window's
        got = d[:, 4] > 0
        assert _rows(d[got], l[got]) == _rows(ref_d, ref_l)
        assert len(d) == min(head.test_cfg["topk"], 3 * h * w)


# ----------------------------------------------------------------------------- packing

def test_pack_patches_layout():
    assert crops.pack_patches([(201, 280)]) == ((224, 288), [(0, 0)])  # one patch: pad_batch's shape
    sizes = [(201, 280), (152, 93), (64, 40), (250, 70)]
    (ch, cw), offsets = crops.pack_patches(sizes)
    up = lambda v: -(-v // 32) * 32  # noqa: E731
    boxes = [(y, x, y + up(h), x + up(w)) for (y, x), (h, w) in zip(offsets, sizes)]
    for i, (y0, x0, y1, x1) in enumerate(boxes):
        assert y0 % 32 == 0 and x0 % 32 == 0 and y1 <= ch and x1 <= cw
        for y0b, x0b, y1b, x1b in boxes[i + 1:]:
            assert y1 <= y0b or y1b <= y0 or x1 <= x0b or x1b <= x0, "patches overlap"
    assert ch * cw < len(sizes) * max(up(h) for h, _ in sizes) * max(up(w) for _, w in sizes)  # < pad_batch
    assert crops.pack_patches([]) == ((0, 0), [])


def test_plan_pack_puts_each_cut_patch_in_its_window():
    img = torch.randn(2, 3, 128, 160)
    metas = plain_metas(2, 128, 160)
    plan = _plan(img, metas, [np.array([[10, 20, 61, 45], [90, 5, 30, 70]]), np.array([[0, 0, 40, 33]])])
    batch = plan.cut(img)
    canvas, windows = plan.pack(img)
    assert canvas.shape[0] == 1 and len(windows) == 3
    covered = torch.zeros(canvas.shape[2:], dtype=torch.bool)
    for j, ((b, y, x, h, w), size) in enumerate(zip(windows, plan.sizes())):
        assert b == 0 and (h, w) == size
        assert torch.equal(canvas[0, :, y:y + h, x:x + w], batch[j, :, :h, :w])
        covered[y:y + h, x:x + w] = True
    assert (canvas[0, :, ~covered] == 0).all()
    assert canvas.shape[2] * canvas.shape[3] < batch.shape[0] * batch.shape[2] * batch.shape[3]


def test_one_patch_fused_detections_are_the_plain_path_without_padding_peaks(monkeypatch):
    """One patch: the canvas is pad_batch's batch, so the packed path must give the plain path's detections
    (cut -> one padded batch -> get_bboxes -> remap -> fusion) minus those from peaks in the padding."""
    model = _model()
    region = np.array([[13, 9, 61, 45]])  # upscaled to 92x68: padded to 96x96
    monkeypatch.setattr(model.bbox_head, "LSM", lambda heat, metas, **kw: [region.copy() for _ in metas])
    img = torch.randn(1, 3, 128, 160)
    metas = plain_metas(1, 128, 160)
    with torch.no_grad():
        heat, coarse, refine = model.bbox_head(model.extract_feat(img))
        full = model.bbox_head.get_bboxes(heat, coarse, refine, metas, rescale=False)
        plan = model.inference_patch_plan(img, metas, [region], 1)
        (ph, pw), = plan.sizes()
        batch = plan.cut(img)
        canvas, _ = plan.pack(img)
        assert torch.equal(canvas, batch)
        pm = plan.metas(metas, batch.shape[2:])
        outs = model.bbox_head(model.extract_feat(batch))
        blurred = gaussian_blur3x3(outs[0][0])
        peaks = local_maximum(blurred, 3)
        inside = torch.zeros_like(peaks, dtype=torch.bool)
        inside[..., :ph, :pw] = True
        # the plain decode, once as it is and once with the padding's peaks removed
        k, cap = model.bbox_head.test_cfg["topk"], model.bbox_head.test_cfg["max_per_img"]
        plain_d, plain_l = model.bbox_head.decode_heatmap(peaks, outs[2][0], batch.shape[2:], k=k, kernel=1)
        masked_d, masked_l = model.bbox_head.decode_heatmap(peaks * inside, outs[2][0], batch.shape[2:], k=k, kernel=1)
        keep = masked_d[0, :, 4] > 0
        assert _rows(plain_d[0], plain_l[0]) != _rows(masked_d[0][keep], masked_l[0][keep])  # padding has peaks
        pd = crops.remap_bboxes_to_full(masked_d[0][keep], pm[0])
        ref = crops.fuse_detections(full[0], (pd, masked_l[0][keep]), plan.regions[0], "nms", 0.6, cap)
        got = model._fuse_patches(img, metas, full, plan, "nms")[0]
    assert _rows(*got) == _rows(*ref)


def test_simple_test_packs_all_patches_of_a_batch_into_one_forward(monkeypatch):
    model = _model()
    regions = [np.array([[10, 20, 61, 45], [90, 5, 30, 70]]), np.array([[0, 0, 40, 33]])]
    monkeypatch.setattr(model.bbox_head, "LSM", lambda heat, metas, **kw: [r.copy() for r in regions])
    shapes = []
    orig = model.extract_feat
    monkeypatch.setattr(model, "extract_feat", lambda x: shapes.append(tuple(x.shape)) or orig(x))
    img = torch.randn(2, 3, 128, 160)
    out = model.simple_test(img, plain_metas(2, 128, 160), rescale=False)
    assert len(shapes) == 2 and shapes[1][0] == 1  # the full batch, then one canvas with the three patches
    assert all(torch.isfinite(d).all() and len(d) for d, _ in out)


# ----------------------------------------------------------------------------- patch budget

def test_patch_budget_bounds_the_patch_pixels():
    img = torch.randn(1, 3, 128, 192)
    metas = plain_metas(1, 128, 192)
    regions = [np.array([[0, 0, 80, 60], [100, 60, 50, 40], [10, 90, 30, 30]])]  # largest first
    free = _plan(img, metas, regions)
    assert [round(float(s), 6) for s in free.scales[0]] == [1.5, 1.5, 1.5]
    for budget in (0.2, 0.35, 0.6, 5.0):
        plan = _plan(img, metas, regions, budget=budget)
        sizes = plan.sizes()
        area = sum(h * w for h, w in sizes)
        assert area <= budget * 128 * 192 + 128 + 192  # give or take the rounding to whole pixels
        scales = plan.scales[plan.valid]
        assert (scales >= 1.0).all() and (scales <= 1.5).all()
        assert len(plan.regions[0]) == int(plan.valid.sum())  # fusion sees the regions that got a patch
        # remap still inverts the crop exactly (per-axis scale after rounding)
        for m, (i, k) in zip(plan.metas(metas, (128, 192)), plan.valid.nonzero().tolist()):
            x, y, w, h = plan.boxes[i, k].tolist()
            back = crops.remap_bboxes_to_full(torch.tensor([[0.0, 0.0, m["img_shape"][1], m["img_shape"][0], 1.0]]), m)
            torch.testing.assert_close(back[0, :4], torch.tensor([x, y, x + w, y + h]), atol=1e-4, rtol=0)
    # 0.2 x 128 x 192 = 4915 px: the 80x60 region fits only at 1.0 < s < 1.5, the others no longer fit
    plan = _plan(img, metas, [regions[0][:2]], budget=0.2)
    assert plan.valid[0].tolist() == [True, False] and 1.0 < float(plan.scales[0, 0]) < 1.5
    # a budget too small even for upscale 1 skips that region but a smaller one may still fit
    plan = _plan(img, metas, regions, budget=0.05)
    assert plan.valid[0].tolist() == [False, False, True]
    np.testing.assert_array_equal(plan.regions[0], regions[0][2:])
    assert torch.equal(_plan(img, metas, regions, budget=None).scales, free.scales)
    with pytest.raises(TypeError, match="budget"):  # a budget is for inference plans only
        crops.plan_kd_patches(regions, img.shape[2:], 3, 1, 1.0, 1.5, (64, 96), budget=0.3)


@pytest.mark.parametrize("bad", [0, -1, "0.3", True])
def test_bad_patch_budget_is_a_config_error(bad):
    with pytest.raises(ModelConfigError, match="patch_budget"):  # refused when the model is built
        _model(patch_budget=bad)


# ----------------------------------------------------------------------------- crops from another model

def test_lsm_coords_heatmap_only_pass_gives_simple_tests_crops():
    """lsm_coords skips the box branch; the regions, and the detections with them, are simple_test's own."""
    model = _model()
    img = torch.randn(2, 3, 128, 160)
    metas = plain_metas(2, 128, 160)
    metas[1]["border"] = np.array([8, 120, 16, 144], np.float32)
    coords = model.lsm_coords(img, metas)
    with torch.no_grad():
        heat = model.bbox_head(model.extract_feat(img))[0]
        expect = model._lsm_of_max(gaussian_blur3x3(heat[0]).amax(dim=1, keepdim=True), metas)  # LSM of the blurred map
    for a, b in zip(coords, expect):
        np.testing.assert_array_equal(a, b)
    own, extras = model.simple_test(img, metas, return_extras=True)
    lent = model.simple_test(img, metas, crop_coords=coords)
    assert sum(len(r) for r in extras["regions"]) >= 1
    for (d1, l1), (d2, l2) in zip(own, lent):
        assert torch.equal(d1, d2) and torch.equal(l1, l2)
