"""YOLC's train augmentation and test transform, reproducible from a key.

Behaviour follows mmdet 2.26 (``PhotoMetricDistortion``, ``RandomCenterCropPad``
in train and test mode, ``Resize(keep_ratio=True)``, ``RandomFlip``,
``Normalize`` and mmcv's collate padding) with these deliberate differences:

* Images are RGB uint8 (mmdet loads BGR); colour operations act on the same
  colours, and mmdet's BGR channel-swap permutation is translated.
* Every random value comes from ``np.random.Generator(PCG64(SeedSequence(key)))``
  with ``key = (dataset_seed, image_id, variant)``, drawn in mmdet's order, so a
  (image, key) pair always gives a bit-identical sample.
* The float result is rounded and clipped to uint8 *before* normalisation (mmdet
  feeds the unclipped floats); the normalised tensor is a pure function of
  :attr:`AugmentedSample.img_uint8`, which the fingerprint hashes.
* mmdet retries crop centres 50 times per ratio and then draws a new ratio,
  forever; we stop after ``_MAX_RATIO_DRAWS`` ratios and keep the last candidate
  (``params['crop']['fallback']``), which only happens when no box centre can lie
  strictly inside the image.
* ``crop_size`` order: mmdet reads ``RandomCenterCropPad.crop_size`` as (h, w),
  which makes YOLC's ``crop_size=(1024, 640)`` a *portrait* crop (and a portrait
  1024x640 network input).  By default (``crop_size_order='wh'``) we read it as
  (w, h) like ``img_scale``, giving landscape crops that exactly fill the
  (W=1024, H=640) input.  ``crop_size_order='hw'`` reproduces mmdet literally
  (``input_size`` then becomes (640, 1024)).
* Resizing is a deterministic float32 numpy bilinear with cv2 ``INTER_LINEAR``
  geometry (half-pixel centres, edge clamping, horizontal pass then vertical).
* Train samples are padded bottom/right with 0 (in normalised space) to the
  fixed :attr:`AugmentConfig.input_size`, as mmcv's collate pads a batch.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from yolc_kd.errors import UserError

from .augment_config import AUGMENT_VERSION, AugmentConfig, rescale_size
from .photometric import apply_photometric, draw_photometric
from .view import CropPaste, ViewTransform
from .view_steps import fill_rgb, resize_bilinear

__all__ = [
    "AUGMENT_VERSION",
    "AugmentConfig",
    "AugmentedSample",
    "TrainAugment",
    "TestTransform",
    "ViewTransform",
    "collate_test",
    "fingerprint_image",
    "normalise",
    "make_rng",
    "resize_bilinear",
    "rescale_size",
]


_CROP_TRIES_PER_RATIO = 50  # mmdet's inner loop
_MAX_RATIO_DRAWS = 20  # mmdet: unbounded


def make_rng(key) -> np.random.Generator:
    """The generator every random choice of one sample is drawn from."""
    k = tuple(key)
    if len(k) != 3 or any(int(x) != x or int(x) < 0 for x in k):
        raise ValueError(f"key must be (dataset_seed, image_id, variant) of non-negative ints, got {key!r}")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(x) for x in k])))


def _get_border(border: int, size: int) -> int:
    """mmdet RandomCenterCropPad._get_border, in exact integer arithmetic."""
    if border <= 0:
        return 0
    k_ceil = -(-2 * border // size)  # ceil(2 * border / size)
    exponent = (k_ceil - 1).bit_length()  # ceil(log2(k_ceil))
    if (2 * border) % size == 0:  # k == int(k)
        exponent += 1
    return border // (2 ** exponent)


def _paste_geometry(img_h: int, img_w: int, center_y: int, center_x: int, target_h: int, target_w: int):
    """mmdet _crop_image_and_paste geometry: source patch, destination box, border."""
    x0 = max(0, center_x - target_w // 2)
    x1 = min(center_x + target_w // 2, img_w)
    y0 = max(0, center_y - target_h // 2)
    y1 = min(center_y + target_h // 2, img_h)
    left, right = center_x - x0, x1 - center_x
    top, bottom = center_y - y0, y1 - center_y
    cy, cx = target_h // 2, target_w // 2
    dst = (cx - left, cy - top, cx + right, cy + bottom)  # x0, y0, x1, y1 in the target
    border = np.array([cy - top, cy + bottom, cx - left, cx + right], dtype=np.float32)
    return (x0, y0, x1, y1), dst, border


def _normalise(img: np.ndarray, mean, std, to_rgb: bool) -> np.ndarray:
    """mmcv.imnormalize on our RGB image: returns float32 (h, w, 3) in the network's channel order."""
    x = np.asarray(img, dtype=np.float32)
    if not to_rgb:  # the network expects BGR (mmdet's loading order)
        x = x[..., ::-1]
    mean32 = np.asarray(mean, dtype=np.float32)
    stdinv32 = (1.0 / np.asarray(std, dtype=np.float64)).astype(np.float32)
    return np.ascontiguousarray((x - mean32) * stdinv32, dtype=np.float32)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _img_norm_cfg(cfg: AugmentConfig) -> dict:
    return dict(mean=np.asarray(cfg.mean, dtype=np.float32), std=np.asarray(cfg.std, dtype=np.float32),
                to_rgb=cfg.to_rgb)


# --------------------------------------------------------------------------- train


@dataclass
class AugmentedSample:
    """One augmented training view of an image.

    Args:
        img: (3, H, W) float32, normalised, zero-padded bottom/right.
        img_uint8: (h, w, 3) uint8 RGB, before padding.
        boxes: (M, 4) float32 xyxy in the padded-input frame.
        labels: (M,) int64.
        params: JSON-able record of every drawn value.
        fingerprint: blake2b-16 hex of the padded uint8 image and its shapes.
        meta: mmdet-style img_metas.
        view: the geometry: original image frame -> padded input frame.
    """
    img: torch.Tensor
    img_uint8: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    params: dict = field(default_factory=dict)
    fingerprint: str = ""
    meta: dict = field(default_factory=dict)
    view: Optional[ViewTransform] = None


def fingerprint_uint8(img_uint8: np.ndarray, pad_h: int, pad_w: int) -> str:
    """Hash of the uint8 image zero-padded bottom/right to (pad_h, pad_w), plus both shapes."""
    h, w = img_uint8.shape[:2]
    padded = np.zeros((pad_h, pad_w, 3), dtype=np.uint8)
    padded[:h, :w] = img_uint8
    hsh = hashlib.blake2b(digest_size=16)
    hsh.update(f"yolc_kd.augment.v{AUGMENT_VERSION}:{h}x{w}x3:{pad_h}x{pad_w}x3:".encode())
    hsh.update(padded.tobytes())
    return hsh.hexdigest()


def fingerprint_image(img_uint8: np.ndarray) -> str:
    """Hash of a whole (h, w, 3) uint8 image as loaded, and its shape: what an image-level cache row was made
    from (the training view is drawn afresh, so the image itself is what must not change)."""
    hsh = hashlib.blake2b(digest_size=16)
    hsh.update(f"yolc_kd.image.v1:{img_uint8.shape[0]}x{img_uint8.shape[1]}x{img_uint8.shape[2]}:".encode())
    hsh.update(np.ascontiguousarray(img_uint8).tobytes())
    return hsh.hexdigest()


def normalise(img_uint8: np.ndarray, cfg: AugmentConfig) -> np.ndarray:
    """A uint8 RGB image as the network input is normalised (float32 (h, w, 3), cfg's mean, std and order)."""
    return _normalise(img_uint8, cfg.mean, cfg.std, cfg.to_rgb)


class TrainAugment:
    """YOLC's train pipeline; ``aug(img, boxes, labels, key)`` -> :class:`AugmentedSample`, whose ``view`` is the
    sample's geometry (ViewTransform.from_params of its params), the one that moved its pixels and boxes.

    Args:
        cfg: the augmentation settings; default YOLC's train pipeline.
    """

    def __init__(self, cfg: Optional[AugmentConfig] = None):
        self.cfg = cfg if cfg is not None else AugmentConfig()
        self.input_w, self.input_h = self.cfg.input_size

    def _draw_crop(self, rng: np.random.Generator, h: int, w: int, boxes: np.ndarray) -> dict:
        cfg = self.cfg
        h_border = _get_border(cfg.border, h)
        w_border = _get_border(cfg.border, w)
        tries = 0
        for _ in range(_MAX_RATIO_DRAWS):
            ratio = cfg.ratios[int(rng.integers(len(cfg.ratios)))]
            new_h, new_w = cfg.crop_hw(ratio)
            for _ in range(_CROP_TRIES_PER_RATIO):
                tries += 1
                center_x = int(rng.integers(w_border, w - w_border))
                center_y = int(rng.integers(h_border, h - h_border))
                patch, dst, _ = _paste_geometry(h, w, center_y, center_x, new_h, new_w)
                window = CropPaste((h, w), patch, dst[:2], (new_h, new_w), keep_centres=True)
                if len(boxes) > 0 and not window.centres_inside(boxes).any():
                    continue
                return dict(ratio=ratio, crop_hw=[new_h, new_w], center_xy=[center_x, center_y],
                            patch_xyxy=list(patch), paste_xyxy=list(dst), tries=tries, fallback=False)
        return dict(ratio=ratio, crop_hw=[new_h, new_w], center_xy=[center_x, center_y],
                    patch_xyxy=list(patch), paste_xyxy=list(dst), tries=tries, fallback=True)

    @staticmethod
    def checked(img, boxes, labels) -> tuple:
        """(uint8 (H, W, 3) image, float32 (M, 4) boxes, int64 (M,) labels), or a ValueError saying what is wrong."""
        img = np.asarray(img)
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 or img.shape[0] < 1 or img.shape[1] < 1:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {img.dtype} {img.shape}")
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(labels) != len(boxes):
            raise ValueError(f"{len(boxes)} boxes but {len(labels)} labels")
        return img, boxes, labels

    def __call__(self, img: np.ndarray, boxes, labels, key) -> AugmentedSample:
        cfg = self.cfg
        img, boxes, labels = self.checked(img, boxes, labels)
        rng = make_rng(key)
        h, w = img.shape[:2]
        params: dict[str, Any] = {"augment_version": AUGMENT_VERSION, "key": [int(k) for k in key],
                                  "ori_hw": [h, w]}

        # 1. draw in mmdet's order: photometric, crop, (resize: none), flip
        photo = None
        if cfg.photometric:
            photo = draw_photometric(rng, cfg.brightness_delta, cfg.contrast_range,
                                     cfg.saturation_range, cfg.hue_delta)
        params["photometric"] = photo
        crop = self._draw_crop(rng, h, w, boxes) if cfg.center_crop else None
        params["crop"] = crop
        flipped = bool(rng.random() < cfg.flip_ratio)
        ch, cw = crop["crop_hw"] if crop is not None else (h, w)
        nw, nh = rescale_size(cw, ch, cfg.img_scale, cfg.keep_ratio)
        w_scale, h_scale = nw / cw, nh / ch
        params["resize"] = {"size_wh": [nw, nh], "scale_factor": [float(w_scale), float(h_scale)]}
        params["flipped"] = flipped
        H, W = self.input_h, self.input_w
        if nh > H or nw > W:  # cannot happen for a consistent config; guard anyway
            raise UserError(f"resized image {nw}x{nh} exceeds the input size {W}x{H}")
        params["input_hw"] = [H, W]

        # 2. the view's geometry, from the params alone (what the cache stores): [crop/paste,] resize, [flip,]
        # pad; its steps move the pixels and the boxes below
        view = ViewTransform.from_params(params, cfg)
        *geometry, pad = view.steps

        # 3. photometric (pixel-wise, so applying it to the crop window only is identical), then the geometry
        if crop is not None:
            first, geometry = geometry[0], geometry[1:]
            region = first.cut(img)
            region = apply_photometric(region, photo) if photo is not None else region.astype(np.float32)
            work = first.paste(region)
        else:
            work = apply_photometric(img, photo) if photo is not None else img.astype(np.float32)
        for step in geometry:
            work = step.apply_image(work)
        keep = view.box_keep(boxes)
        boxes, labels = view.apply_boxes(boxes[keep]), labels[keep]

        # 4. uint8, normalise, pad to the fixed input size (0 in normalised space)
        img_u8 = _to_uint8(work)
        norm = pad.apply_image(_normalise(img_u8, cfg.mean, cfg.std, cfg.to_rgb), fill=(0.0, 0.0, 0.0))
        tensor = torch.from_numpy(np.ascontiguousarray(norm.transpose(2, 0, 1)))
        scale_factor = np.array([w_scale, h_scale, w_scale, h_scale], dtype=np.float32)
        meta = {
            "ori_shape": (h, w, 3),
            "img_shape": (nh, nw, 3),
            "pad_shape": (H, W, 3),
            "batch_input_shape": (H, W),
            "scale_factor": scale_factor,
            "keep_ratio": cfg.keep_ratio,
            "flip": flipped,
            "flip_direction": "horizontal" if flipped else None,
            "border": np.zeros(4, dtype=np.float32),
            "img_norm_cfg": _img_norm_cfg(cfg),
        }
        return AugmentedSample(
            img=tensor,
            img_uint8=img_u8,
            boxes=np.ascontiguousarray(boxes, dtype=np.float32).reshape(-1, 4),
            labels=np.ascontiguousarray(labels, dtype=np.int64),
            params=params,
            fingerprint=fingerprint_uint8(img_u8, H, W),
            meta=meta,
            view=view,
        )


# --------------------------------------------------------------------------- test


class TestTransform:
    """YOLC's test pipeline: no resize, centre pad (RandomCenterCropPad test mode), Normalize;
    ``tt(img)`` -> (tensor, meta) with the pad as ``meta['view']``.

    Args:
        cfg: the augmentation settings (test_pad_*, mean/std); default YOLC's.
    """

    __test__ = False  # not a pytest class

    def __init__(self, cfg: Optional[AugmentConfig] = None):
        self.cfg = cfg if cfg is not None else AugmentConfig()

    def target_hw(self, h: int, w: int) -> tuple[int, int]:
        mode, val = self.cfg.test_pad_mode
        if mode == "logical_or":
            return (h | val) + self.cfg.test_pad_add_pix, (w | val) + self.cfg.test_pad_add_pix
        return -(-h // val) * val, -(-w // val) * val

    def __call__(self, img: np.ndarray):
        cfg = self.cfg
        img = np.asarray(img)
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 or img.shape[0] < 1 or img.shape[1] < 1:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {img.dtype} {img.shape}")
        h, w = img.shape[:2]
        th, tw = self.target_hw(h, w)
        src, (dx0, dy0, _, _), border = _paste_geometry(h, w, h // 2, w // 2, th, tw)
        view = ViewTransform((CropPaste((h, w), src, (dx0, dy0), (th, tw),
                                        fill_rgb(cfg.test_pad_mean, cfg.test_pad_to_rgb)),))
        # the pad step itself (a float32 canvas holding the uint8 pixels), not apply_image's uint8 rounding:
        # the pad colour need not be an integer
        norm = _normalise(view.steps[0].apply_image(img), cfg.mean, cfg.std, cfg.to_rgb)
        tensor = torch.from_numpy(np.ascontiguousarray(norm.transpose(2, 0, 1)))
        meta = {
            "ori_shape": (h, w, 3),
            "img_shape": (h, w, 3),
            "pad_shape": (th, tw, 3),
            "batch_input_shape": (th, tw),
            "scale_factor": np.ones(4, dtype=np.float32),
            "keep_ratio": True,
            "flip": False,
            "flip_direction": None,
            "border": border,
            "img_norm_cfg": _img_norm_cfg(cfg),
            "view": view,  # image -> tensor frame; view.inverse() maps tensor coordinates back to the image
        }
        return tensor, meta


def collate_test(items):
    """Stack (tensor, meta) pairs, zero-padding bottom/right to the largest (H, W) (mmcv collate).

    Returns ``(batch (B, 3, Hmax, Wmax), metas)``; metas are copies with
    ``batch_input_shape = (Hmax, Wmax)``.
    """
    items = list(items)
    if not items:
        raise ValueError("collate_test needs at least one item")
    hmax = max(int(t.shape[-2]) for t, _ in items)
    wmax = max(int(t.shape[-1]) for t, _ in items)
    batch = torch.zeros((len(items), int(items[0][0].shape[0]), hmax, wmax), dtype=items[0][0].dtype)
    metas = []
    for i, (t, m) in enumerate(items):
        batch[i, :, : t.shape[-2], : t.shape[-1]] = t
        m = dict(m)
        m["batch_input_shape"] = (hmax, wmax)
        metas.append(m)
    return batch, metas
