"""ViewTransform (data/view.py), the one owner of a view's geometry: a box drawn into an image, a heatmap peak at
its centre and box-map cells encoding it land where apply_boxes puts the box, for every step kind (crop, pad,
scale, flip), their compositions (TrainAugment's views over many keys) and edge cases; inverses undo; the
pipeline's pixels are the transform's; params and JSON rebuild the same transform; bad input is one line."""
import json

import numpy as np
import pytest
import torch

from conftest import tiny_model_cfg
from yolc_kd.data.augment import AugmentConfig, TestTransform, TrainAugment
from yolc_kd.data.photometric import apply_photometric
from yolc_kd.data.view import CropPaste, HFlip, Resize, ViewTransform
from yolc_kd.data.view_meta import meta_view
from yolc_kd.errors import UserError
from yolc_kd.models import build_detector

COLOUR = np.array([250.0, 20.0, 130.0], np.float32)


@pytest.fixture(scope="module")
def decode():
    return build_detector(tiny_model_cfg()).bbox_head.decode_xywh_to_bbox


def _encode(box: np.ndarray, hw, stride: int = 4, radius: int = 3) -> torch.Tensor:
    """A (4, h/s, w/s) box map whose cells within `radius` of the box centre's cell all predict the box."""
    n_h, n_w = -(-hw[0] // stride), -(-hw[1] // stride)
    m = torch.zeros(4, n_h, n_w, dtype=torch.float64)
    cx, cy = (box[0] + box[2]) / 2 / stride, (box[1] + box[3]) / 2 / stride
    hw_, hh = (box[2] - box[0]) / 2 / stride, (box[3] - box[1]) / 2 / stride
    for y in range(max(0, int(cy) - radius), min(n_h, int(cy) + radius + 1)):
        for x in range(max(0, int(cx) - radius), min(n_w, int(cx) + radius + 1)):
            m[:, y, x] = torch.tensor([cx - x, cy - y, hw_, hh])
    return m


def _decoded_box_at(decode, m: torch.Tensor, px: float, py: float, stride: int = 4) -> np.ndarray:
    """The xyxy box (pixels) the box map predicts at the cell holding pixel (px, py), as YOLC decodes it."""
    n_w = m.shape[-1]
    cell = int(py // stride) * n_w + int(px // stride)
    cx, cy, hw, hh = decode(m[None].float())[0, cell].double().tolist()
    return np.array([cx - hw, cy - hh, cx + hw, cy + hh]) * stride


def _scene(hw, box):
    """A noisy grey image with the box filled in COLOUR, and a stride-1 heatmap with a gaussian at its centre."""
    rng = np.random.default_rng(0)
    img = rng.integers(60, 100, (*hw, 3)).astype(np.float32)
    x0, y0, x1, y1 = (int(v) for v in box)
    img[y0:y1, x0:x1] = COLOUR
    ys, xs = np.mgrid[0:hw[0], 0:hw[1]] + 0.5
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    heat = torch.from_numpy(np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * 3.0 ** 2)))[None].float()
    return img, heat


def _drawn_extent(img: np.ndarray) -> np.ndarray:
    """xyxy of the pixels at least half-way to COLOUR (what bilinear resampling leaves of the box's edges)."""
    near = np.abs(img - COLOUR).max(axis=2) < 0.5 * np.abs(np.float32(80) - COLOUR).max()
    ys, xs = np.nonzero(near)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)


def _check_all_land_together(view: ViewTransform, box, decode, edge_tol: float) -> None:
    box = np.asarray(box, np.float64)
    img, heat = _scene(view.in_hw, box)
    moved = view.apply_boxes(box[None].astype(np.float32))[0].astype(np.float64)
    # the drawn box
    out = view.apply_image(img)
    np.testing.assert_allclose(_drawn_extent(out), moved, atol=edge_tol)
    # the heatmap peak sits at the moved centre (pixel centres at +0.5)
    h, valid = view.apply_map(heat)
    assert h.shape[-2:] == view.out_hw and valid.shape == view.out_hw
    peak = np.unravel_index(int(torch.argmax(h[0])), view.out_hw)
    centre = (moved[:2] + moved[2:]) / 2
    np.testing.assert_allclose([peak[1] + 0.5, peak[0] + 0.5], centre, atol=max(edge_tol, 0.5))
    assert bool(valid[peak])
    # the box map: the cell under the moved centre decodes to the moved box
    m, mvalid = view.apply_box_map(_encode(box, view.in_hw), stride=4)
    np.testing.assert_allclose(_decoded_box_at(decode, m, *centre), moved, atol=1e-3)
    assert bool(mvalid[int(centre[1] // 4), int(centre[0] // 4)])
    # and everything comes back
    back = view.inverse()
    np.testing.assert_allclose(back.apply_boxes(moved[None])[0], box, atol=1e-4)
    np.testing.assert_allclose(back.apply_points(centre[None])[0], (box[:2] + box[2:]) / 2, atol=1e-4)
    m_back, _ = back.apply_box_map(m, stride=4)
    c = (box[:2] + box[2:]) / 2
    np.testing.assert_allclose(_decoded_box_at(decode, m_back, *c), box, atol=1e-3)


# ---------------------------------------------------------------- each step kind and hand-made compositions

CASES = {
    "flip": (ViewTransform.hflip((64, 96)), [10, 20, 30, 36], 0.0),
    "crop": (ViewTransform.crop((64, 96), (8, 4, 72, 60)), [20, 10, 40, 30], 0.0),
    "crop_not_on_cells": (ViewTransform.crop((64, 96), (7, 3, 70, 61)), [20, 10, 40, 30], 0.0),
    "pad_centre": (ViewTransform.pad((37, 53), (64, 64), (5, 13), fill=(0, 0, 0)), [3, 2, 20, 30], 0.0),
    "scale_up_odd": (ViewTransform.resize((37, 53), (64, 96)), [5, 6, 25, 30], 1.0),
    "scale_down": (ViewTransform.resize((96, 160), (58, 97)), [30, 20, 80, 60], 1.0),
    # a crop window partly outside the image: mmdet's crop/paste puts the image's part of it on a canvas
    "crop_outside_image": (ViewTransform((CropPaste((50, 70), (0, 10, 45, 50), (19, 0), (48, 64)),)),
                           [5, 15, 30, 40], 0.0),
    "crop_scale_flip_pad": (ViewTransform((CropPaste((90, 130), (10, 0, 130, 90), (0, 5), (100, 120)),
                                           Resize((100, 120), (53, 64)), HFlip((53, 64)),
                                           CropPaste((53, 64), (0, 0, 64, 53), (0, 0), (64, 96)))),
                            [40, 30, 90, 70], 1.0),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_box_image_heatmap_and_box_map_land_together(name, decode):
    view, box, tol = CASES[name]
    _check_all_land_together(view, box, decode, tol)


def test_views_from_train_augment_over_many_keys(decode):
    """Random views of odd-sized images (crop windows partly outside the image, ratios != 1, non-integer
    scales, flips): the boxes the pipeline keeps are where the view puts them, and for a box wholly inside the
    crop window the drawn box, the peak and the box map agree with it."""
    cfg = AugmentConfig(crop_size=(96, 64), img_scale=(96, 64), border=8, photometric=False)
    aug = TrainAugment(cfg)
    rng = np.random.default_rng(1)
    flips, checked = set(), 0
    for key in range(24):
        h, w = int(rng.integers(40, 130)), int(rng.integers(40, 130))
        x0, y0 = rng.uniform(0, w - 24), rng.uniform(0, h - 24)
        box = np.array([[x0, y0, x0 + rng.uniform(10, 24), y0 + rng.uniform(10, 24)]], np.float32).round()
        s = aug(np.zeros((h, w, 3), np.uint8), box, [0], (0, key, 0))
        assert s.view == ViewTransform.from_params(s.params, cfg)
        keep = s.view.box_keep(box)
        np.testing.assert_array_equal(s.boxes, s.view.apply_boxes(box[keep]))
        flips.add(s.params["flipped"])
        moved = s.view.apply_boxes(box)
        whole = np.allclose(s.view.inverse().apply_boxes(moved), box, atol=1e-3)  # not clipped by the crop
        if keep[0] and whole and np.all(moved[0, 2:] - moved[0, :2] >= 4):
            _check_all_land_together(s.view, box[0], decode, 1.0)
            checked += 1
    assert flips == {True, False} and checked >= 10, checked


def test_apply_image_is_the_pipelines_geometry():
    """apply_image(img) equals TrainAugment's view for the same params; with photometric distortion applied to
    the whole image first (it is pixel-wise), too."""
    rng = np.random.default_rng(5)
    img = rng.integers(0, 256, (301, 499, 3), dtype=np.uint8)
    boxes = np.array([[40, 50, 90, 80], [300, 200, 330, 260]], np.float32)
    for cfg in (AugmentConfig(photometric=False), AugmentConfig(), AugmentConfig(center_crop=False),
                AugmentConfig(crop_mean=(10.0, 20.0, 30.0), crop_to_rgb=False)):
        aug = TrainAugment(cfg)
        for v in range(4):
            s = aug(img, boxes, [0, 1], (2, 9, v))
            src = img if s.params["photometric"] is None else apply_photometric(img, s.params["photometric"])
            out = s.view.apply_image(src)  # uint8 in, uint8 out; the photometric float32 image stays float32
            u8 = out if out.dtype == np.uint8 else np.clip(np.rint(out), 0, 255).astype(np.uint8)
            nh, nw = s.img_uint8.shape[:2]
            assert out.shape == (*s.params["input_hw"], 3) and (out.dtype == np.uint8) == (src.dtype == np.uint8)
            np.testing.assert_array_equal(u8[:nh, :nw], s.img_uint8)
            pad = s.view.steps[-1]  # the network input's bottom/right padding, 0 in normalised space
            padded = pad.apply_image(s.img[:, :nh, :nw].permute(1, 2, 0).numpy(), fill=(0, 0, 0))
            assert torch.equal(s.img, torch.from_numpy(padded.transpose(2, 0, 1).copy()))
            valid = s.view.valid_mask().numpy()
            assert valid[:nh, :nw].any() and not valid[nh:].any() and not valid[:, nw:].any()


def test_test_transform_view_maps_back_like_the_border():
    img = np.zeros((301, 499, 3), np.uint8)
    t, meta = TestTransform()(img)
    view, border = meta["view"], meta["border"]
    assert view.in_hw == (301, 499) and view.out_hw == tuple(t.shape[-2:])
    boxes = np.array([[12.5, 20.0, 40.25, 60.0], [0.0, 0.0, 499.0, 301.0]], np.float32)
    in_tensor = boxes + border[[2, 0, 2, 0]]
    np.testing.assert_array_equal(view.apply_boxes(boxes), in_tensor)
    np.testing.assert_array_equal(view.inverse().apply_boxes(in_tensor), boxes)
    np.testing.assert_array_equal(view.inverse().apply_points(np.array([[border[2], border[0]]])), [[0, 0]])
    heat = torch.rand(2, *t.shape[-2:])
    back, valid = view.inverse().apply_map(heat)  # whole pixels: the crop by the border, exact
    y0, x0 = int(border[0]), int(border[2])
    assert torch.equal(back, heat[:, y0:y0 + 301, x0:x0 + 499]) and bool(valid.all())


def test_meta_view_without_a_view_is_the_border_pad():
    """Inference reads a meta's view (models/detector.py, infer/predict.py); an mmdet-style meta without one
    gives the pad its border describes, the same geometry as TestTransform's view."""
    t, meta = TestTransform()(np.zeros((301, 499, 3), np.uint8))
    plain = {k: v for k, v in meta.items() if k != "view"}
    assert meta_view(meta) is meta["view"]
    v = meta_view(plain, t.shape[-2:])
    assert v.affine() == meta["view"].affine() and v.content_rect() == meta["view"].content_rect()
    top, bottom, left, right = (int(b) for b in meta["border"])
    assert v.valid_window(out_size=(400, 600)) == (top, bottom, left, right)  # a batch padded further
    dets = torch.tensor([[20.5, 30.25, 41.0, 60.0]])
    back = v.inverse().apply_points(dets.reshape(-1, 2)).reshape(-1, 4)
    assert torch.equal(back, dets - torch.tensor([left, top, left, top], dtype=torch.float32))
    no_shape = {k: v for k, v in plain.items() if k != "img_shape"}
    assert meta_view(no_shape, t.shape[-2:]).in_hw == (t.shape[-2] - top, t.shape[-1] - left)


def test_detections_and_regions_leave_the_tensor_through_the_inverse_view():
    """meta_to_image is the one way from the tensor to the image: an mmdet-style meta's border and scale_factor
    (mmdet's meaning: boxes minus the border, divided by the scale factor), a predict-style view with a resize, and
    apply_xyxy's inverse round trip through a flip; inverted network boxes stay inverted (YOLC keeps them)."""
    from yolc_kd.data.view_meta import meta_rescale, meta_to_image

    meta = dict(img_shape=(40, 60, 3), pad_shape=(48, 76, 3), border=np.array([4, 4, 8, 8], np.float32),
                scale_factor=np.full(4, 0.5, np.float32))
    dets = torch.tensor([[20.5, 30.25, 41.0, 44.0, 0.9], [50.0, 10.0, 12.0, 8.0, 0.1]])  # the second inverted
    offset = torch.tensor([8.0, 4.0, 8.0, 4.0])
    content = meta_to_image(meta, (48, 76), rescale=False).apply_xyxy(dets)
    torch.testing.assert_close(content[:, :4], dets[:, :4] - offset, rtol=0, atol=0)
    torch.testing.assert_close(meta_to_image(meta, (48, 76)).apply_xyxy(dets)[:, :4], (dets[:, :4] - offset) / 0.5)
    torch.testing.assert_close(meta_rescale(meta, (48, 76)).apply_xyxy(content), meta_to_image(meta, (48, 76))
                               .apply_xyxy(dets))
    assert torch.equal(content[:, 4], dets[:, 4])
    assert meta_rescale(dict(meta, scale_factor=np.ones(4, np.float32)), (48, 76)) is None
    view = ViewTransform.resize((80, 120), (40, 60)).then(HFlip((40, 60))).then(
        CropPaste((40, 60), (0, 0, 60, 40), (8, 4), (48, 76)))
    shown = view.apply_xyxy(dets[:1])
    assert shown[0, 0] < shown[0, 2]  # the flip swapped x0 and x1 back into order
    torch.testing.assert_close(view.inverse().apply_xyxy(shown), dets[:1])
    _, test_meta = TestTransform()(np.zeros((30, 50, 3), np.uint8))
    downscaled = dict(test_meta, view=ViewTransform.resize((60, 100), (30, 50)).then(test_meta["view"]))
    hw = test_meta["view"].out_hw
    reg = meta_rescale(downscaled, hw).apply_crop_boxes(np.array([[4.0, 6.0, 10.0, 8.0]]))
    np.testing.assert_allclose(reg, [[8.0, 12.0, 20.0, 16.0]])
    assert meta_to_image(downscaled, hw, rescale=False).in_hw == hw and meta_to_image(downscaled, hw).out_hw == (60, 100)


# ---------------------------------------------------------------- maps: exactness, inverses, validity


def test_flip_and_whole_cell_crops_move_maps_exactly():
    x = torch.randint(0, 255, (3, 32, 48), dtype=torch.uint8)
    flip = ViewTransform.hflip((32, 48))
    out, valid = flip.apply_map(x)
    assert out.dtype == torch.uint8 and torch.equal(out, x.flip(-1)) and bool(valid.all())
    assert torch.equal(flip.inverse().apply_map(out)[0], x)
    crop = ViewTransform.crop((128, 192), (8, 4, 136, 100))  # 4-pixel aligned
    assert crop.moves_cells(4) and not ViewTransform.crop((128, 192), (6, 4, 134, 100)).moves_cells(4)
    m = torch.randn(4, 32, 48)
    moved, _ = crop.apply_map(m, stride=4)
    assert torch.equal(moved, m[:, 1:25, 2:34])
    back, back_valid = crop.inverse().apply_map(moved, stride=4)
    assert torch.equal(back[:, back_valid], m[:, back_valid]) and int(back_valid.sum()) == 24 * 32
    assert float(back[:, ~back_valid].abs().sum()) == 0.0
    assert not ViewTransform.hflip((32, 50)).moves_cells(4) and ViewTransform.hflip((32, 50)).moves_cells(1)


def test_int16_box_maps_move_in_fixed_point_exactly():
    q = torch.randint(-3000, 3000, (4, 8, 12), dtype=torch.int16)
    flip = ViewTransform.hflip((32, 48))
    moved, _ = flip.apply_box_map(q, 4, unit=2.0 ** -6)
    f, _ = flip.apply_box_map(q.double() * 2.0 ** -6, 4)
    assert moved.dtype == torch.int16 and torch.equal(moved.double() * 2.0 ** -6, f)
    assert torch.equal(flip.apply_box_map(moved, 4, unit=2.0 ** -6)[0], q)


def test_padding_is_invalid_and_bilinear_keeps_constants():
    view = ViewTransform.pad((30, 40), (64, 64), (10, 6)).then(Resize((64, 64), (48, 48)))
    ones = torch.ones(2, 30, 40)
    out, valid = view.apply_map(ones)
    assert out.shape == (2, 48, 48)
    torch.testing.assert_close(out[:, valid], torch.ones(2, int(valid.sum())))
    x0, y0, x1, y1 = (float(v) for v in view.content_rect())
    assert (x0, y0, x1, y1) == (7.5, 4.5, 37.5, 27.0)
    cols = valid.any(0).nonzero().flatten()
    assert int(cols[0]) == 7 and int(cols[-1]) == 36  # pixel centres 7.5 .. 36.5 inside [7.5, 37.5)
    q, _ = view.apply_map(torch.full((1, 30, 40), 200, dtype=torch.uint8))
    assert q.dtype == torch.uint8 and bool((q[0][valid] == 200).all())
    with pytest.raises(ValueError, match="bilinear"):
        view.apply_map(ones, mode="cubic")


def test_stride_change_and_crop_boxes():
    view = ViewTransform.resize((64, 96), (128, 192))
    heat = torch.zeros(1, 16, 24)
    heat[0, 5, 7] = 1
    out, _ = view.apply_map(heat, stride=4, out_stride=4, mode="nearest")
    assert out.shape == (1, 32, 48) and out[0, 10:12, 14:16].eq(1).all() and int(out.sum()) == 4
    xywh = torch.tensor([[8.0, 4.0, 16.0, 16.0]])
    assert view.apply_crop_boxes(xywh).tolist() == [[16.0, 8.0, 32.0, 32.0]]
    flip = ViewTransform.hflip((64, 96))
    assert flip.apply_crop_boxes(xywh).tolist() == [[72.0, 4.0, 16.0, 16.0]]
    assert flip.apply_crop_boxes(np.array([[90.0, 0, 20, 10]])).tolist() == [[0.0, 0.0, 6.0, 10.0]]  # clipped


# ---------------------------------------------------------------- params, JSON, bad input


def test_from_params_json_round_trip_and_cache_record():
    img = np.random.default_rng(0).integers(0, 256, (120, 200, 3), dtype=np.uint8)
    aug = TrainAugment()
    for v in range(6):
        s = aug(img, np.array([[10, 10, 50, 40]], np.float32), [0], (0, 1, v))
        stored = json.dumps(s.params, sort_keys=True, separators=(",", ":"))  # as precompute stores aug_params
        view = ViewTransform.from_params(json.loads(stored))
        assert view == s.view
        assert ViewTransform.from_dict(json.loads(json.dumps(view.to_dict()))) == view
        assert view.out_hw == (640, 1024) and view.in_hw == (120, 200)
        twice = view.inverse().inverse()  # the same geometry; the crop's annotation rule belongs to the forward view
        assert twice.affine() == view.affine() and twice.content_rect() == view.content_rect()
        assert [st.to_dict() for st in twice.steps if st.kind != "crop_paste"] == \
            [st.to_dict() for st in view.steps if st.kind != "crop_paste"]


@pytest.mark.parametrize("bad, msg", [
    ({"skipped": "unreadable image"}, "skipped: unreadable image"),
    ({"ori_hw": [10, 10]}, "not the params of an augmented view"),
    ({"ori_hw": [10, 10], "resize": {"size_wh": [10, 10]}, "crop": None}, "incomplete or malformed"),
    ({"ori_hw": [10, 10], "resize": {"size_wh": [10, 10]}, "input_hw": [8, 8]}, "does not fit"),
    ({"augment_version": 99, "ori_hw": [10, 10], "resize": {}}, "augment version 99"),
])
def test_bad_params_are_one_line(bad, msg):
    with pytest.raises(UserError, match=msg) as err:
        ViewTransform.from_params(bad)
    assert "\n" not in str(err.value)


def test_bad_steps_and_json_are_one_line():
    with pytest.raises(UserError, match="do not chain"):
        ViewTransform((Resize((10, 10), (20, 20)), HFlip((10, 10))))
    with pytest.raises(UserError, match="not inside the input"):
        CropPaste((10, 10), (0, 0, 11, 10), (0, 0), (10, 11))
    with pytest.raises(UserError, match="at least one step"):
        ViewTransform(())
    with pytest.raises(UserError, match="non-empty"):
        Resize((0, 10), (5, 5))
    with pytest.raises(UserError, match="not a view step"):
        ViewTransform.from_dict({"steps": [{"type": "rotate"}]})
    with pytest.raises(UserError, match="bad resize view step"):
        ViewTransform.from_dict({"steps": [{"type": "resize", "in_hw": [1, 1]}]})
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        ViewTransform.hflip((4, 4)).apply_boxes(np.zeros((2, 3)))


def test_take_gathers_and_zeroes_out_of_range_indices_on_every_path():
    from yolc_kd.data.view import _take

    x = torch.arange(2 * 5 * 6, dtype=torch.uint8).reshape(2, 5, 6)
    for dim in (1, 2, -1):
        n = x.shape[dim]
        for idx in ([-2, -1, 0, 1, 2], [n - 2, n - 1, n, n + 1], [3, 0, 4, 1, -1, 2], [0, 0, 1, 1, 2, 2],
                    [n, n + 1], [2, 1, 0, -1]):
            idx_t = torch.tensor(idx)
            got, ok = _take(x, dim, idx_t)
            want = torch.stack([x.select(dim, i) if 0 <= i < n else torch.zeros_like(x.select(dim, 0))
                                for i in idx], dim=dim % x.dim())
            assert torch.equal(got, want) and torch.equal(ok, (idx_t >= 0) & (idx_t < n)), (dim, idx)
