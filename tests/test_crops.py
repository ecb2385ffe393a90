"""Crop machinery: crop/remap inverse, LSM clusters, region selection, fusion, and the batched patch pass."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import plain_metas, tiny_model_cfg
from yolc_kd import crops
from yolc_kd.data.augment import TestTransform, collate_test
from yolc_kd.models import build_detector


def _model(num_classes: int = 3, **crop) -> torch.nn.Module:
    cfg = tiny_model_cfg(num_classes=num_classes)
    cfg["test_cfg"]["crop"] = dict(crop, patch_limit=crop.get("patch_limit", "quarter"))
    torch.manual_seed(0)
    return build_detector(cfg).eval()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return _model()


# ----------------------------------------------------------------------------- crop <-> remap

def _make_patches(img, meta, coord, up):
    """One region through the inference patch plan as it is (no enlarging), canvas a quarter of the input."""
    plan = crops.plan_inference_patches([np.array([coord])], [meta], img.shape[2:], 1, 1, 1.0, up,
                                        crops.patch_canvas(img.shape[2:]))
    batch = plan.cut(img)
    return batch, plan.metas([meta], batch.shape[2:]), plan.owners


def test_remap_is_the_inverse_of_crop(model):
    rng = np.random.default_rng(0)
    H, W = 160, 224
    img = torch.randn(3, H, W)
    meta = plain_metas(1, H, W)[0]
    worst = 0.0
    for _ in range(200):
        up = float(rng.choice([1.0, 1.5, 2.0]))
        x, y = int(rng.integers(0, W - 1)), int(rng.integers(0, H - 1))
        w, h = int(rng.integers(1, W - x + 1)), int(rng.integers(1, H - y + 1))
        coord = [x, y, w, h]
        # the patch and the scale exactly as the inference patch plan builds them
        batch, metas, owners = _make_patches(img[None], meta, coord, up)
        patch = crops.crop_img_tensor(img, coord)
        assert tuple(patch.shape[1:]) == (h, w)
        ch, cw = crops.patch_canvas((H, W))  # upscaling stops where the patch would exceed the canvas
        up = min(up, max(1.0, min(ch / h, cw / w)))
        if up != 1.0:
            size = (max(1, round(h * up)), max(1, round(w * up)))
            patch = F.interpolate(patch[None], size=size, mode="bilinear", align_corners=False)[0]
        ph, pw = patch.shape[1:]
        assert owners == [0] and tuple(metas[0]["img_shape"][:2]) == (ph, pw)
        torch.testing.assert_close(batch[0, :, :ph, :pw], patch)
        scale = float(metas[0]["scale_factor"][0])
        assert scale == pytest.approx(pw / w)
        patch_meta = crops.build_patch_meta(meta, patch.shape[1:], coord, scale)
        assert patch_meta["crop_offset"] == (x, y)

        # a random box inside the region, moved into the patch frame and back
        bx = np.sort(rng.uniform(x, x + w, 2))
        by = np.sort(rng.uniform(y, y + h, 2))
        box = np.array([bx[0], by[0], bx[1], by[1]])
        in_patch = (box - np.array([x, y, x, y])) * scale
        dets = torch.tensor([[*in_patch, 0.5]], dtype=torch.float32)
        back = crops.remap_bboxes_to_full(dets, patch_meta)
        err = float(np.abs(back[0, :4].double().numpy() - box).max())
        worst = max(worst, err)
        assert back[0, 4] == dets[0, 4]
    assert worst < 1e-4, worst


def test_patch_scale_is_exact_per_axis(model):
    img = torch.randn(3, 128, 128)
    meta = plain_metas(1, 128, 128)[0]
    batch, metas, _ = _make_patches(img[None], meta, [0, 0, 64, 65], 1.5)
    ph, pw = metas[0]["img_shape"][:2]
    box = torch.tensor([[0.0, 0.0, float(pw), float(ph), 1.0]])  # the whole patch
    back = crops.remap_bboxes_to_full(box, metas[0])
    torch.testing.assert_close(back[0, :4], torch.tensor([0.0, 0.0, 64.0, 65.0]), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- LSM / findclusters

def _blob(heat: torch.Tensor, b: int, c: int, cells_x: range, cells_y: range, cell: int = 16) -> None:
    heat[b, c, cells_y.start * cell:cells_y.stop * cell, cells_x.start * cell:cells_x.stop * cell] = 0.9


def test_lsm_per_image_regions_and_border(model):
    # 256x160 heatmap: the 16x10 LSM grid has 16x16-pixel cells; every image gets exactly 15 hot cells
    heat = torch.zeros(2, 3, 160, 256)
    _blob(heat, 0, 0, range(2, 7), range(1, 4))  # 5x3 cells
    _blob(heat, 1, 2, range(3, 5), range(6, 9))  # 2x3 cells
    _blob(heat, 1, 1, range(10, 13), range(5, 8))  # 3x3 cells
    metas = plain_metas(2, 160, 256)
    metas[1]["border"] = np.array([16, 144, 32, 224], np.float32)  # top, bottom, left, right
    out = model.bbox_head.LSM([heat], metas)
    assert len(out) == 2
    np.testing.assert_array_equal(out[0], [[32, 16, 80, 48]])
    # image 1: both blobs, in the tensor frame minus the border (left 32, top 16)
    got = sorted(map(tuple, out[1].tolist()))
    assert got == [(16, 80, 32, 48), (128, 64, 48, 48)]
    assert not np.array_equal(out[0], out[1])
    assert out[0].dtype.kind == "i" and out[1].shape == (2, 4)


def test_lsm_visualize_writes_only_to_viz_dir(model, tmp_path, monkeypatch):
    cwd, viz = tmp_path / "cwd", tmp_path / "viz"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    heat = np.zeros((1, 1, 160, 256), np.float32)
    heat[0, 0, 16:64, 32:112] = 0.9
    # one PNG per image, named after the stem of the meta's filename (img<i> without one)
    metas = plain_metas(2, 160, 256)
    metas[0]["filename"] = "dir/img_7.jpg"
    regions = model.bbox_head.LSM([torch.from_numpy(heat).repeat(2, 1, 1, 1)], metas, visualize=True,
                                  viz_dir=str(viz))
    np.testing.assert_array_equal(regions[0], [[32, 16, 80, 48]])
    assert sorted(p.name for p in viz.iterdir()) == ["lsm_img1.png", "lsm_img_7.png"]
    assert list(cwd.iterdir()) == []
    with pytest.raises(ValueError, match="viz_dir"):
        model.bbox_head.LSM([torch.from_numpy(heat)], plain_metas(1, 160, 256), visualize=True)
    assert list(cwd.iterdir()) == []


# ----------------------------------------------------------------------------- select_regions

def test_select_regions_largest_min_size_enlarge_clamp():
    coords = np.array([[0, 0, 100, 50],  # too low
                       [10, 10, 30, 200],  # too narrow
                       [50, 50, 200, 100],  # largest
                       [0, 0, 10, 10],  # too small
                       [5, 5, 70, 70]])  # second largest
    out = crops.select_regions(coords, (130, 260), max_patches=4, min_size=64, enlarge=1.2)
    # (50,50,200,100) is first clamped to the image (50,50,200,80): centre (150,90), 240x96 -> x 30..270,
    # y 42..138, clamped to 260 x 130; (5,5,70,70): centre (40,40), 84x84 -> -2..82, clamped at 0
    np.testing.assert_array_equal(out, [[30, 42, 230, 88], [0, 0, 82, 82]])
    assert out.dtype == np.int64
    np.testing.assert_array_equal(crops.select_regions(coords, (130, 260), max_patches=1), [[30, 42, 230, 88]])
    np.testing.assert_array_equal(crops.select_regions(coords, (500, 500), 4, 64, enlarge=1.0),
                                  [[50, 50, 200, 100], [5, 5, 70, 70]])
    assert crops.select_regions(np.zeros((0, 4)), (100, 100)).shape == (0, 4)
    assert crops.select_regions(coords, (130, 260), max_patches=0).shape == (0, 4)


# ----------------------------------------------------------------------------- fusion

def _dets(rows):
    t = torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)
    return t[:, :5], t[:, 5].long()


FULL = _dets([[0, 0, 10, 10, 0.9, 0],  # A: overlaps patch box P1 (IoU 0.81)
              [50, 50, 60, 60, 0.8, 0],  # B: inside the region
              [100, 100, 110, 110, 0.7, 1]])  # C: elsewhere
PATCH = _dets([[1, 1, 10, 10, 0.95, 0],  # P1
               [52, 52, 60, 60, 0.5, 1]])  # P2: over B but another class
REGIONS = np.array([[40, 40, 30, 30]])


def _rows(dets, labels):
    return [tuple(round(v, 2) for v in d.tolist()) + (int(l),) for d, l in zip(dets, labels)]


def test_fuse_nms_union_then_classwise_nms():
    d, l = crops.fuse_detections(FULL, PATCH, REGIONS, "nms", 0.6)
    assert _rows(d, l) == [(1, 1, 10, 10, 0.95, 0), (50, 50, 60, 60, 0.8, 0),
                           (100, 100, 110, 110, 0.7, 1), (52, 52, 60, 60, 0.5, 1)]
    d, l = crops.fuse_detections(FULL, PATCH, REGIONS, "nms", 0.9)  # A survives a looser threshold
    assert len(d) == 5
    d, _ = crops.fuse_detections(FULL, PATCH, REGIONS, "nms", 0.6, max_per_img=2)
    assert d[:, 4].tolist() == pytest.approx([0.95, 0.8])


def test_fuse_replace_drops_full_boxes_inside_regions():
    d, l = crops.fuse_detections(FULL, PATCH, REGIONS, "replace", 0.6)
    assert _rows(d, l) == [(1, 1, 10, 10, 0.95, 0), (100, 100, 110, 110, 0.7, 1), (52, 52, 60, 60, 0.5, 1)]
    # without regions replace is a plain union
    d, _ = crops.fuse_detections(FULL, PATCH, np.zeros((0, 4)), "replace", 0.6)
    assert len(d) == 4


def test_fuse_none_and_empty_patches_keep_full_boxes():
    d, l = crops.fuse_detections(FULL, PATCH, REGIONS, "none", 0.6)
    assert _rows(d, l) == _rows(*FULL)
    empty = (torch.zeros((0, 5)), torch.zeros((0,), dtype=torch.long))
    for mode in ("nms", "replace"):
        d, l = crops.fuse_detections(FULL, empty, REGIONS, mode, 0.6)
        assert _rows(d, l) == _rows(*FULL)
    d, l = crops.fuse_detections(empty, empty, REGIONS, "nms")
    assert d.shape == (0, 5) and l.shape == (0,)
    with pytest.raises(ValueError, match="fusion"):
        crops.fuse_detections(FULL, PATCH, REGIONS, "mean")


# ----------------------------------------------------------------------------- simple_test

def _batch(sizes=((150, 200), (180, 120)), seed: int = 0):
    rng = np.random.default_rng(seed)
    tt = TestTransform()
    imgs = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    return collate_test([tt(im) for im in imgs])


def _count_extract_feat(model, monkeypatch):
    calls = []
    orig = model.extract_feat

    def counted(img):
        calls.append(tuple(img.shape))
        return orig(img)

    monkeypatch.setattr(model, "extract_feat", counted)
    return calls


def test_simple_test_batch_runs_one_patch_forward(monkeypatch):
    model = _model(min_patch_size=8)
    calls = _count_extract_feat(model, monkeypatch)
    img, metas = _batch()
    out, extras = model.simple_test(img, metas, rescale=True, return_extras=True)
    assert len(calls) == 2, calls  # full batch + ONE forward over all patches of the batch
    assert calls[0] == tuple(img.shape)
    assert len(out) == 2 and len(extras["regions"]) == 2
    assert extras["heatmap"].shape == (2, 3, *img.shape[2:])
    assert sum(len(r) for r in extras["regions"]) >= 1
    for (dets, labels), meta, regs in zip(out, metas, extras["regions"]):
        h, w = meta["img_shape"][:2]
        assert dets.shape[1] == 5 and dets.shape[0] == labels.shape[0] > 0
        assert ((labels >= 0) & (labels < 3)).all()
        assert torch.isfinite(dets).all()
        regs = np.asarray(regs).reshape(-1, 4)
        assert (regs[:, :2] >= 0).all() and (regs[:, 0] + regs[:, 2] <= w).all() and (regs[:, 1] + regs[:, 3] <= h).all()
    # no patches -> a single forward
    calls.clear()
    model.simple_test(img, metas, fusion="none")
    model.simple_test(img, metas, max_patches=0)
    assert len(calls) == 2


def test_simple_test_boxes_inside_original_image():
    model = _model(min_patch_size=8)
    img, metas = _batch()
    for (dets, _), meta in zip(model.simple_test(img, metas, rescale=True), metas):
        h, w = meta["ori_shape"][:2]
        assert (dets[:, :2] >= 0).all() and (dets[:, 2] <= w).all() and (dets[:, 3] <= h).all()


@pytest.mark.parametrize("upscale", [1.0, 1.5, 2.0])
def test_patch_detections_land_in_the_full_frame(monkeypatch, upscale):
    """A patch box covering [0, 0, 30, 30] of the patch input must come back as the region's corner box."""
    model = _model(min_patch_size=8, enlarge=1.0, upscale=upscale, fusion="nms")
    region = np.array([[10, 20, 64, 64]])
    monkeypatch.setattr(model.bbox_head, "LSM", lambda heat, metas, **kw: [region.copy() for _ in metas])
    calls = []

    def fake_decode(heat, xywh, img_shape, k=100, kernel=3):
        b = heat.shape[0]
        calls.append(b)
        if len(calls) == 1:  # full image: a far-away box of class 1
            return torch.tensor([[[100.0, 100.0, 110.0, 110.0, 0.5]]]).repeat(b, 1, 1), torch.ones(b, 1).long()
        return torch.tensor([[[0.0, 0.0, 30.0, 30.0, 0.9]]]).repeat(b, 1, 1), torch.zeros(b, 1).long()

    monkeypatch.setattr(model.bbox_head, "decode_heatmap", fake_decode)
    (dets, labels), = model.simple_test(torch.randn(1, 3, 256, 256), plain_metas(1, 256, 256), rescale=True)
    assert calls == [1, 1]
    patch_box = dets[labels == 0][0, :4]
    s = round(64 * upscale) / 64  # a 64 px region upscaled by 2 still fits the 128 px canvas of a 256 px input
    torch.testing.assert_close(patch_box, torch.tensor([10.0, 20.0, 10 + 30 / s, 20 + 30 / s]), atol=1e-4, rtol=0)


def test_lsm_ties_at_the_cut_go_by_grid_index():
    """20 isolated cells of equal density compete for the 15 places: the fixed rule keeps the 15 with the lowest
    x-major grid index (ix * 10 + iy), whatever numpy's sort would do; without ties the choice is the top 15."""
    cell = 8
    heat = np.zeros((1, 1, 10 * cell, 16 * cell), np.float32)
    candidates = [(ix, iy) for ix in range(0, 16, 2) for iy in range(0, 10, 2)]  # never adjacent
    rng = np.random.default_rng(0)
    tied = [candidates[i] for i in rng.permutation(len(candidates))[:20]]
    for ix, iy in tied:
        heat[0, 0, iy * cell:iy * cell + 2, ix * cell:ix * cell + 3] = 0.9  # 6 hot pixels in each
    _, coords = crops.find_clusters(heat)
    expect = sorted(tied, key=lambda c: c[0] * 10 + c[1])[:15]
    assert sorted(map(tuple, coords.tolist())) == sorted((ix * cell, iy * cell, cell, cell) for ix, iy in expect)
    # a strictly denser cell always wins its place, and the tie-break is the same on every call
    ix, iy = max(tied, key=lambda c: c[0] * 10 + c[1])
    heat[0, 0, iy * cell + 4:iy * cell + 6, ix * cell:ix * cell + 3] = 0.9
    _, again = crops.find_clusters(heat)
    assert (ix * cell, iy * cell, cell, cell) in set(map(tuple, again.tolist())) and len(again) == 15
    np.testing.assert_array_equal(crops.find_clusters(heat)[1], again)
