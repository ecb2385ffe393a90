import colorsys
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from yolc_kd.data.augment import (
    AugmentConfig,
    TestTransform,
    TrainAugment,
    collate_test,
    rescale_size,
    resize_bilinear,
    _get_border,
)
from yolc_kd.data.photometric import (
    apply_photometric,
    bgr_perm_to_rgb,
    draw_photometric,
    hsv_to_rgb,
    rgb_to_hsv,
)
from yolc_kd.errors import UserError

MEAN = np.array([123.675, 116.28, 103.53], np.float32)
STD = np.array([58.395, 57.12, 57.375], np.float32)

YOLC_TRAIN = [
    dict(type="LoadImageFromFile", to_float32=True, color_type="color"),
    dict(type="LoadAnnotations", with_bbox=True),
    dict(type="PhotoMetricDistortion", brightness_delta=32, contrast_range=(0.5, 1.5),
         saturation_range=(0.5, 1.5), hue_delta=18),
    dict(type="RandomCenterCropPad", crop_size=(1024, 640),
         ratios=(0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3), mean=[0, 0, 0], std=[1, 1, 1],
         to_rgb=True, test_pad_mode=None),
    dict(type="Resize", img_scale=(1024, 640), keep_ratio=True),
    dict(type="RandomFlip", flip_ratio=0.5),
    dict(type="Normalize", mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True),
    dict(type="DefaultFormatBundle"),
    dict(type="Collect", keys=["img", "gt_bboxes", "gt_labels"]),
]
YOLC_TEST = [
    dict(type="LoadImageFromFile", to_float32=True),
    dict(type="MultiScaleFlipAug", scale_factor=1.0, flip=False, transforms=[
        dict(type="Resize", keep_ratio=True),
        dict(type="RandomCenterCropPad", ratios=None, border=None, mean=[0, 0, 0], std=[1, 1, 1],
             to_rgb=True, test_mode=True, test_pad_mode=["logical_or", 31], test_pad_add_pix=1),
        dict(type="RandomFlip"),
        dict(type="Normalize", mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True),
        dict(type="DefaultFormatBundle"),
        dict(type="Collect", keys=["img"]),
    ]),
]

_SRC = str(Path(__file__).resolve().parents[1] / "src")


def _scene(h=480, w=720, seed=123):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    boxes = np.array([[40, 50, 90, 80], [300, 200, 330, 260], [600, 400, 700, 470], [5, 5, 12, 9]], np.float32)
    labels = np.array([0, 3, 7, 1], np.int64)
    return img, boxes, labels


# ---------------------------------------------------------------- determinism


def test_same_key_is_bit_identical():
    img, boxes, labels = _scene()
    a = TrainAugment()(img, boxes, labels, (7, 42, 3))
    b = TrainAugment(AugmentConfig())(img.copy(), boxes.copy(), labels.copy(), (7, 42, 3))
    assert torch.equal(a.img, b.img)
    assert np.array_equal(a.img_uint8, b.img_uint8)
    assert np.array_equal(a.boxes, b.boxes) and np.array_equal(a.labels, b.labels)
    assert a.params == b.params
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 32
    json.dumps(a.params)  # JSON-able
    assert a.img.dtype == torch.float32 and a.img.shape == (3, 640, 1024)
    assert a.boxes.dtype == np.float32 and a.labels.dtype == np.int64


def test_same_key_in_a_subprocess():
    code = (
        "import json, numpy as np\n"
        "from yolc_kd.data.augment import TrainAugment\n"
        "rng = np.random.default_rng(123)\n"
        "img = rng.integers(0, 256, (480, 720, 3), dtype=np.uint8)\n"
        "boxes = np.array([[40, 50, 90, 80], [300, 200, 330, 260], [600, 400, 700, 470], [5, 5, 12, 9]], np.float32)\n"
        "labels = np.array([0, 3, 7, 1], np.int64)\n"
        "aug = TrainAugment()\n"
        "out = [[aug(img, boxes, labels, (7, 42, v)).fingerprint, aug(img, boxes, labels, (7, 42, v)).params]"
        " for v in range(3)]\n"
        "print(json.dumps(out))\n"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345", OMP_NUM_THREADS="3")
    env["PYTHONPATH"] = _SRC + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    theirs = json.loads(res.stdout)
    img, boxes, labels = _scene()
    aug = TrainAugment()
    for v, (fp, params) in enumerate(theirs):
        s = aug(img, boxes, labels, (7, 42, v))
        assert s.fingerprint == fp
        assert json.loads(json.dumps(s.params)) == params


def test_different_variants_differ():
    img, boxes, labels = _scene()
    aug = TrainAugment()
    samples = [aug(img, boxes, labels, (0, 5, v)) for v in range(8)]
    assert len({s.fingerprint for s in samples}) == 8
    assert len({json.dumps(s.params["crop"]) for s in samples}) > 1
    other = aug(img, boxes, labels, (1, 5, 0))  # dataset seed matters too
    assert other.fingerprint != samples[0].fingerprint


def test_normalised_tensor_is_function_of_uint8():
    img, boxes, labels = _scene()
    s = TrainAugment()(img, boxes, labels, (3, 3, 3))
    h, w = s.img_uint8.shape[:2]
    assert s.meta["img_shape"] == (h, w, 3)
    expect = (s.img_uint8.astype(np.float32) - MEAN) * (1.0 / STD.astype(np.float64)).astype(np.float32)
    assert torch.allclose(s.img[:, :h, :w], torch.from_numpy(expect.transpose(2, 0, 1).copy()), atol=1e-6)
    assert float(s.img[:, h:, :].abs().sum()) == 0.0 and float(s.img[:, :, w:].abs().sum()) == 0.0


# ---------------------------------------------------------------- geometry


def _bright_bbox(u8):
    ys, xs = np.nonzero(u8.max(axis=2) > 127)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


@pytest.mark.parametrize("hw", [(600, 900), (300, 420), (1500, 2000)])
def test_boxes_follow_crop_resize_flip(hw):
    h, w = hw
    box = np.array([[0.30 * w, 0.40 * h, 0.30 * w + 60, 0.40 * h + 45]], np.float32).round()
    img = np.zeros((h, w, 3), np.uint8)
    x0, y0, x1, y1 = box[0].astype(int)
    img[y0:y1, x0:x1] = 255
    aug = TrainAugment(AugmentConfig(photometric=False))
    flips = set()
    for v in range(12):
        s = aug(img, box, np.array([4]), (1, 2, v))
        flips.add(s.meta["flip"])
        assert not s.params["crop"]["fallback"]
        assert len(s.boxes) == 1 and s.labels.tolist() == [4]
        ih, iw = s.meta["img_shape"][:2]
        bx0, by0, bx1, by1 = s.boxes[0]
        assert 0 <= bx0 < bx1 <= iw and 0 <= by0 < by1 <= ih
        gx0, gy0, gx1, gy1 = _bright_bbox(s.img_uint8)
        for got, want in zip((gx0, gy0, gx1, gy1), (bx0, by0, bx1, by1)):
            assert abs(got - want) <= 1.5, (v, s.params, s.boxes, (gx0, gy0, gx1, gy1))
        # nothing bright outside the box
        mask = s.img_uint8.max(axis=2) > 127
        mask[int(by0):int(np.ceil(by1)), int(bx0):int(np.ceil(bx1))] = False
        assert not mask.any()
    assert flips == {True, False}


def test_crop_pad_keeps_centre_filter_and_clip():
    # two boxes far apart: any crop must contain at least one centre; dropped boxes have centre outside
    img = np.full((1200, 1800, 3), 80, np.uint8)
    boxes = np.array([[10, 10, 40, 30], [1700, 1100, 1790, 1190]], np.float32)
    aug = TrainAugment(AugmentConfig(photometric=False, flip_ratio=0.0))
    for v in range(10):
        s = aug(img, boxes, np.array([1, 2]), (0, 0, v))
        crop = s.params["crop"]
        px0, py0, px1, py1 = crop["patch_xyxy"]
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        inside = (centres[:, 0] > px0) & (centres[:, 0] < px1) & (centres[:, 1] > py0) & (centres[:, 1] < py1)
        assert inside.any()
        assert s.labels.tolist() == [l for l, k in zip([1, 2], inside) if k]
        # forward map of the kept boxes: shift to crop, clip, then scale
        nh, nw = crop["crop_hw"]
        cx, cy = crop["center_xy"]
        exp = boxes[inside].copy()
        exp[:, 0::2] = np.clip(exp[:, 0::2] + nw // 2 - cx, 0, nw)
        exp[:, 1::2] = np.clip(exp[:, 1::2] + nh // 2 - cy, 0, nh)
        exp *= np.array(s.meta["scale_factor"], np.float32)
        np.testing.assert_allclose(s.boxes, exp, atol=1e-3)
        assert s.meta["border"].tolist() == [0, 0, 0, 0]
        assert s.meta["pad_shape"] == (640, 1024, 3) and s.meta["batch_input_shape"] == (640, 1024)


def test_resize_params_match_mmcv_rescale():
    # crop sizes for every ratio fit the (W=1024, H=640) input
    cfg = AugmentConfig()
    for r in cfg.ratios:
        h, w = cfg.crop_hw(r)
        nw, nh = rescale_size(w, h, (1024, 640))
        assert nw <= 1024 and nh <= 640 and max(1024 - nw, 640 - nh) <= 1
    assert rescale_size(1126, 704, (1024, 640)) == (1024, 640)
    assert rescale_size(640, 1024, (1024, 640)) == (640, 1024)  # mmcv fits long/short edges
    assert cfg.input_size == (1024, 640)
    assert cfg.input_hw == (640, 1024)  # the same size in (H, W), the order of tensors and cache layouts
    assert AugmentConfig(crop_size_order="hw").input_size == (640, 1024)
    assert AugmentConfig(crop_size_order="hw").input_hw == (1024, 640)


def test_mmdet_literal_crop_order():
    img, boxes, labels = _scene()
    s = TrainAugment(AugmentConfig(crop_size_order="hw"))(img, boxes, labels, (0, 1, 2))
    assert s.img.shape == (3, 1024, 640)
    assert s.params["crop"]["crop_hw"][0] > s.params["crop"]["crop_hw"][1]


def test_get_border_matches_mmdet_formula():
    def mmdet(border, size):
        k = 2 * border / size
        i = pow(2, np.ceil(np.log2(np.ceil(k))) + (k == int(k)))
        return int(border // i)

    for size in list(range(1, 700)) + [1000, 1360, 2000]:
        assert _get_border(128, size) == mmdet(128, size), size
        b = _get_border(128, size)
        assert 2 * b < size


def test_resize_bilinear_geometry():
    x = np.arange(4, dtype=np.float32).reshape(1, 4, 1).repeat(2, axis=0)
    up = resize_bilinear(x, 8, 2)[0, :, 0]
    # cv2 INTER_LINEAR: half-pixel centres, clamped edges
    np.testing.assert_allclose(up, [0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3])
    down = resize_bilinear(x, 2, 2)[0, :, 0]
    np.testing.assert_allclose(down, [0.5, 2.5])
    same = resize_bilinear(x, 4, 2)
    assert np.array_equal(same, x)


# ---------------------------------------------------------------- edge cases


def test_empty_boxes():
    img, _, _ = _scene()
    s = TrainAugment()(img, np.zeros((0, 4), np.float32), np.zeros((0,), np.int64), (0, 0, 0))
    assert s.boxes.shape == (0, 4) and s.labels.shape == (0,)
    assert s.params["crop"]["tries"] == 1
    s2 = TrainAugment()(img, [], [], (0, 0, 0))
    assert s2.fingerprint == s.fingerprint


@pytest.mark.parametrize("hw", [(1, 1), (2, 3), (5, 7), (31, 17), (100, 150)])
def test_tiny_images(hw):
    h, w = hw
    img = np.full((h, w, 3), 200, np.uint8)
    boxes = np.array([[0, 0, w, h]], np.float32)
    for v in range(3):
        s = TrainAugment()(img, boxes, np.array([2]), (9, 9, v))
        assert s.img.shape == (3, 640, 1024)
        assert len(s.boxes) == 1
        ih, iw = s.meta["img_shape"][:2]
        assert (s.boxes[:, 0::2] <= iw).all() and (s.boxes[:, 1::2] <= ih).all() and (s.boxes >= 0).all()
        # the (tiny) image sits inside a black crop canvas
        assert s.img_uint8.max() > 0 and (s.img_uint8 == 0).mean() > 0.5


def test_unreachable_box_falls_back():
    img = np.zeros((50, 60, 3), np.uint8)
    boxes = np.array([[-30, -30, -10, -10]], np.float32)  # centre outside the image
    s = TrainAugment()(img, boxes, np.array([0]), (0, 0, 0))
    assert s.params["crop"]["fallback"] is True
    assert s.boxes.shape == (0, 4)


def test_bad_inputs():
    aug = TrainAugment()
    with pytest.raises(ValueError):
        aug(np.zeros((4, 4), np.uint8), [], [], (0, 0, 0))
    with pytest.raises(ValueError):
        aug(np.zeros((4, 4, 3), np.float32), [], [], (0, 0, 0))
    with pytest.raises(ValueError):
        aug(np.zeros((4, 4, 3), np.uint8), [], [], (0, -1, 0))
    with pytest.raises(ValueError):
        aug(np.zeros((4, 4, 3), np.uint8), [[0, 0, 1, 1]], [], (0, 0, 0))


# ---------------------------------------------------------------- photometric


def test_hsv_matches_colorsys_and_round_trips():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2000, 3)).astype(np.float32)
    x[:10] = [[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255],
              [255, 255, 0], [0, 255, 255], [255, 0, 255], [7, 7, 7], [128, 64, 64]]
    hsv = rgb_to_hsv(x)
    ref = np.array([colorsys.rgb_to_hsv(*(p / 255.0)) for p in x])
    dh = np.abs(hsv[:, 0] / 360.0 - ref[:, 0])
    assert np.minimum(dh, 1 - dh).max() < 1e-5
    assert np.abs(hsv[:, 1] - ref[:, 1]).max() < 1e-5
    assert np.abs(hsv[:, 2] / 255.0 - ref[:, 2]).max() < 1e-6
    assert (hsv[:, 0] >= 0).all() and (hsv[:, 0] < 360).all()
    np.testing.assert_allclose(hsv_to_rgb(hsv), x, atol=1e-3)


def test_hue_shift_moves_colours():
    red = np.array([[[255, 0, 0]]], np.float32)
    p = dict(brightness_delta=None, contrast_first=False, contrast_alpha=None, saturation=None,
             hue_delta=120.0 - 1e-4, channel_perm_rgb=None)
    out = apply_photometric(red, p)
    assert np.argmax(out[0, 0]) == 1  # red -> green, as on the same colours in mmdet's BGR image
    p["hue_delta"] = -120.0 + 1e-4
    assert np.argmax(apply_photometric(red, p)[0, 0]) == 2  # red -> blue (wrap below 0)


def test_channel_perm_translation_matches_mmdet_bgr():
    rgb = np.random.default_rng(1).random((4, 5, 3)).astype(np.float32)
    for perm in itertools.permutations(range(3)):
        mmdet_bgr = rgb[..., ::-1][..., list(perm)]
        ours = rgb[..., bgr_perm_to_rgb(perm)]
        assert np.array_equal(ours, mmdet_bgr[..., ::-1])


def test_photometric_draws_follow_mmdet_probabilities():
    n = 2000
    draws = [draw_photometric(np.random.default_rng(i), 32, (0.5, 1.5), (0.5, 1.5), 18) for i in range(n)]
    frac = lambda f: sum(f(d) for d in draws) / n  # noqa: E731
    assert abs(frac(lambda d: d["brightness_delta"] is not None) - 0.5) < 0.05
    assert abs(frac(lambda d: d["contrast_first"]) - 0.5) < 0.05
    assert abs(frac(lambda d: d["contrast_alpha"] is not None) - 0.5) < 0.05
    assert abs(frac(lambda d: d["channel_perm_bgr"] is not None) - 0.5) < 0.05
    assert all(-32 <= d["brightness_delta"] <= 32 for d in draws if d["brightness_delta"] is not None)
    assert all(0.5 <= d["saturation"] <= 1.5 for d in draws if d["saturation"] is not None)
    assert all(-18 <= d["hue_delta"] <= 18 for d in draws if d["hue_delta"] is not None)


def test_photometric_output_in_uint8_range():
    img, boxes, labels = _scene(seed=5)
    img[:20] = 255
    img[20:40] = 0
    aug = TrainAugment()
    lo = torch.from_numpy((0 - MEAN) / STD).view(3, 1, 1) - 1e-4
    hi = torch.from_numpy((255 - MEAN) / STD).view(3, 1, 1) + 1e-4
    for v in range(10):
        s = aug(img, boxes, labels, (2, 2, v))
        assert s.img_uint8.dtype == np.uint8
        h, w = s.img_uint8.shape[:2]
        region = s.img[:, :h, :w]
        assert torch.isfinite(region).all()
        assert (region >= lo).all() and (region <= hi).all()
    s = TrainAugment(AugmentConfig(photometric=False, center_crop=False, flip_ratio=0.0))(
        img[:320, :512], boxes, labels, (0, 0, 0))
    assert s.params["photometric"] is None
    assert s.img_uint8.shape == (640, 1024, 3)


# ---------------------------------------------------------------- test transform


def test_test_transform_300x500():
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)
    t, meta = TestTransform()(img)
    assert t.shape == (3, 320, 512) and t.dtype == torch.float32
    assert meta["border"].dtype == np.float32
    assert meta["border"].tolist() == [10, 310, 6, 506]
    assert meta["img_shape"] == (300, 500, 3) and meta["ori_shape"] == (300, 500, 3)
    assert meta["pad_shape"] == (320, 512, 3) and meta["batch_input_shape"] == (320, 512)
    assert meta["scale_factor"].dtype == np.float32 and meta["scale_factor"].tolist() == [1, 1, 1, 1]
    assert meta["flip"] is False
    inner = (img.astype(np.float32) - MEAN) * (1.0 / STD.astype(np.float64)).astype(np.float32)
    assert torch.allclose(t[:, 10:310, 6:506], torch.from_numpy(inner.transpose(2, 0, 1).copy()), atol=1e-6)
    pad_val = torch.from_numpy(-MEAN / STD)
    for c in range(3):  # pad (value 0 before Normalize) all around
        assert torch.allclose(t[c, :10], pad_val[c]) and torch.allclose(t[c, 310:], pad_val[c])
        assert torch.allclose(t[c, :, :6], pad_val[c]) and torch.allclose(t[c, :, 506:], pad_val[c])


def test_test_transform_odd_sizes():
    t, meta = TestTransform()(np.zeros((301, 499, 3), np.uint8))
    assert t.shape == (3, 320, 512)
    # centre (150, 249) -> target centre (160, 256)
    assert meta["border"].tolist() == [10, 311, 7, 506]
    t, meta = TestTransform()(np.zeros((320, 512, 3), np.uint8))  # 320|31 = 351 -> 352
    assert t.shape == (3, 352, 544) and meta["border"].tolist() == [16, 336, 16, 528]


def test_collate_test():
    tt = TestTransform()
    a = tt(np.full((300, 500, 3), 10, np.uint8))
    b = tt(np.full((100, 700, 3), 20, np.uint8))
    assert tuple(b[0].shape) == (3, 128, 704)
    batch, metas = collate_test([a, b])
    assert batch.shape == (2, 3, 320, 704)
    assert all(m["batch_input_shape"] == (320, 704) for m in metas)
    assert a[1]["batch_input_shape"] == (320, 512)  # inputs not mutated
    assert torch.equal(batch[0, :, :320, :512], a[0]) and float(batch[0, :, :, 512:].abs().sum()) == 0
    assert torch.equal(batch[1, :, :128, :704], b[0]) and float(batch[1, :, 128:].abs().sum()) == 0
    assert metas[1]["border"].tolist() == b[1]["border"].tolist()


# ---------------------------------------------------------------- config


def test_from_pipeline_yolc_round_trip():
    cfg = AugmentConfig.from_pipeline(YOLC_TRAIN)
    assert cfg == AugmentConfig()
    assert AugmentConfig.from_pipeline(None) == cfg
    assert cfg.input_size == (1024, 640)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["input_size"] == [1024, 640]
    assert AugmentConfig.from_dict(d) == cfg
    full = AugmentConfig.from_pipeline(YOLC_TRAIN, YOLC_TEST)
    assert full == cfg and full.test_pad_mode == ("logical_or", 31) and full.test_pad_add_pix == 1


def test_from_pipeline_reads_values_and_disables_missing():
    pipe = [
        dict(type="LoadImageFromFile"),
        dict(type="RandomCenterCropPad", crop_size=[512, 512], ratios=[1.0], mean=[0, 0, 0],
             std=[1, 1, 1], to_rgb=True, test_pad_mode=None),
        dict(type="Resize", img_scale=[(512, 512)], keep_ratio=True),
        dict(type="Normalize", mean=[1, 2, 3], std=[4, 5, 6], to_rgb=False),
        dict(type="Pad", size_divisor=32),
    ]
    cfg = AugmentConfig.from_pipeline(pipe)
    assert cfg.photometric is False and cfg.flip_ratio == 0.0
    assert cfg.crop_size == (512, 512) and cfg.ratios == (1.0,) and cfg.input_size == (512, 512)
    assert cfg.mean == (1.0, 2.0, 3.0) and cfg.to_rgb is False
    img = np.zeros((100, 100, 3), np.uint8)
    img[..., 0] = 200  # red; with to_rgb=False the network sees BGR
    s = TrainAugment(cfg)(img, [], [], (0, 0, 0))
    assert s.img.shape == (3, 512, 512)
    cx, cy = 256, 256
    assert float(s.img[2, cy, cx]) == pytest.approx((200 - 3) / 6, abs=1e-4)
    assert float(s.img[0, cy, cx]) == pytest.approx((0 - 1) / 4, abs=1e-4)


def test_from_pipeline_rejects():
    with pytest.raises(UserError, match="Mosaic"):
        AugmentConfig.from_pipeline(YOLC_TRAIN[:3] + [dict(type="Mosaic", img_scale=(640, 640))])
    with pytest.raises(UserError, match="order"):
        AugmentConfig.from_pipeline([dict(type="Resize", img_scale=(1024, 640)),
                                     dict(type="PhotoMetricDistortion")])
    with pytest.raises(UserError, match="ratio_range"):
        AugmentConfig.from_pipeline([dict(type="Resize", img_scale=(1024, 640), ratio_range=(0.5, 2.0))])
    with pytest.raises(UserError, match="bogus"):
        AugmentConfig.from_pipeline([dict(type="Resize", img_scale=(1024, 640), bogus=1)])
    with pytest.raises(UserError, match="Resize"):
        AugmentConfig.from_pipeline([dict(type="RandomFlip", flip_ratio=0.5)])
    with pytest.raises(UserError, match="vertical"):
        AugmentConfig.from_pipeline([dict(type="Resize", img_scale=(1024, 640)),
                                     dict(type="RandomFlip", flip_ratio=0.5, direction="vertical")])
    with pytest.raises(UserError, match="size_divisor"):
        AugmentConfig.from_pipeline([dict(type="Resize", img_scale=(1000, 600)), dict(type="Pad", size_divisor=32)])
    with pytest.raises(UserError):
        AugmentConfig.from_pipeline([dict(img_scale=(1024, 640))])
    with pytest.raises(UserError, match="RandomCrop"):
        AugmentConfig.from_pipeline(YOLC_TRAIN, [dict(type="MultiScaleFlipAug", scale_factor=1.0,
                                                      transforms=[dict(type="RandomCrop")])])
    with pytest.raises(UserError):
        AugmentConfig.from_dict({"nope": 1})
