"""Configuration of YOLC's train augmentation / test transform, read from mmdet-style pipelines."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from yolc_kd.errors import UserError

#: Bump when anything changes the output for a given (image, key, config).
AUGMENT_VERSION = 1

_IGNORED_TYPES = ("LoadImageFromFile", "LoadAnnotations", "DefaultFormatBundle", "Collect")
_ORDER = ("PhotoMetricDistortion", "RandomCenterCropPad", "Resize", "RandomFlip", "Normalize", "Pad")

_YOLC_MEAN = (123.675, 116.28, 103.53)
_YOLC_STD = (58.395, 57.12, 57.375)


def rescale_size(w: int, h: int, scale, keep_ratio: bool = True) -> tuple[int, int]:
    """mmcv's output (w, h) of Resize: keep_ratio fits long/short edges of ``scale``."""
    if not keep_ratio:
        return int(scale[0]), int(scale[1])
    long_edge, short_edge = max(scale), min(scale)
    sf = min(long_edge / max(h, w), short_edge / min(h, w))
    return max(1, int(w * float(sf) + 0.5)), max(1, int(h * float(sf) + 0.5))


# --------------------------------------------------------------------------- config


def _floats(x, n: int, what: str) -> tuple:
    try:
        t = tuple(float(v) for v in x)
    except TypeError:
        raise UserError(f"{what} must be a sequence of {n} numbers, got {x!r}") from None
    if len(t) != n:
        raise UserError(f"{what} must have {n} values, got {x!r}")
    return t


def _ints(x, n: int, what: str) -> tuple:
    t = _floats(x, n, what)
    if any(v != int(v) or v <= 0 for v in t):
        raise UserError(f"{what} must be {n} positive integers, got {x!r}")
    return tuple(int(v) for v in t)


@dataclass
class AugmentConfig:
    """YOLC's augmentation settings (defaults = YOLC's train/test pipelines), in mmdet's names and orders.
    input_size is the fixed (W, H) of every train sample, input_hw the same size as (H, W).

    Args:
        photometric: apply PhotoMetricDistortion.
        brightness_delta: its brightness range (+-).
        contrast_range: its contrast factor range.
        saturation_range: its saturation factor range.
        hue_delta: its hue range (+-).
        center_crop: apply RandomCenterCropPad (train mode).
        crop_size: its crop size, in crop_size_order.
        crop_size_order: 'wh': crop_size is (w, h) like img_scale; 'hw': mmdet's literal (h, w).
        ratios: its crop size ratios.
        border: its border (mmdet's _get_border).
        crop_mean: its pad value (mean) per channel.
        crop_std: must be (1, 1, 1) (mmdet stores it and never applies it).
        crop_to_rgb: its to_rgb.
        img_scale: Resize's (w, h), as mmdet.
        keep_ratio: Resize keeps the aspect ratio.
        flip_ratio: probability of the horizontal RandomFlip.
        mean: Normalize's mean.
        std: Normalize's std.
        to_rgb: Normalize's to_rgb.
        test_pad_mode: RandomCenterCropPad (test mode) test_pad_mode.
        test_pad_add_pix: its test_pad_add_pix.
        test_pad_mean: its pad value per channel.
        test_pad_to_rgb: its to_rgb.
    """

    # PhotoMetricDistortion
    photometric: bool = True
    brightness_delta: float = 32
    contrast_range: tuple = (0.5, 1.5)
    saturation_range: tuple = (0.5, 1.5)
    hue_delta: float = 18
    # RandomCenterCropPad (train mode)
    center_crop: bool = True
    crop_size: tuple = (1024, 640)
    crop_size_order: str = "wh"  # 'wh': (w, h) like img_scale; 'hw': mmdet's literal (h, w)
    ratios: tuple = (0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3)
    border: int = 128
    crop_mean: tuple = (0.0, 0.0, 0.0)
    # mmdet's RandomCenterCropPad stores std but never applies it: only (1, 1, 1) is accepted, so no config can
    # ask for a scaling that does not happen (the field stays in to_dict: cache manifests compare it)
    crop_std: tuple = (1.0, 1.0, 1.0)
    crop_to_rgb: bool = True
    # Resize
    img_scale: tuple = (1024, 640)  # (w, h) as mmdet
    keep_ratio: bool = True
    # RandomFlip (horizontal)
    flip_ratio: float = 0.5
    # Normalize
    mean: tuple = _YOLC_MEAN
    std: tuple = _YOLC_STD
    to_rgb: bool = True
    # RandomCenterCropPad (test mode)
    test_pad_mode: tuple = ("logical_or", 31)
    test_pad_add_pix: int = 1
    test_pad_mean: tuple = (0.0, 0.0, 0.0)
    test_pad_to_rgb: bool = True

    def __post_init__(self):
        self.photometric = bool(self.photometric)
        self.brightness_delta = float(self.brightness_delta)
        self.contrast_range = _floats(self.contrast_range, 2, "contrast_range")
        self.saturation_range = _floats(self.saturation_range, 2, "saturation_range")
        self.hue_delta = float(self.hue_delta)
        self.center_crop = bool(self.center_crop)
        self.crop_size = _ints(self.crop_size, 2, "crop_size")
        if self.crop_size_order not in ("wh", "hw"):
            raise UserError(f"crop_size_order must be 'wh' or 'hw', got {self.crop_size_order!r}")
        try:
            self.ratios = tuple(float(r) for r in self.ratios)
        except TypeError:
            raise UserError(f"ratios must be a sequence of numbers, got {self.ratios!r}") from None
        if not self.ratios or any(r <= 0 for r in self.ratios):
            raise UserError(f"ratios must be a non-empty list of positive numbers, got {self.ratios!r}")
        if int(self.border) != self.border or self.border < 0:
            raise UserError(f"border must be a non-negative integer, got {self.border!r}")
        self.border = int(self.border)
        self.crop_mean = _floats(self.crop_mean, 3, "RandomCenterCropPad mean")
        self.crop_std = _floats(self.crop_std, 3, "RandomCenterCropPad std")
        if self.crop_std != (1.0, 1.0, 1.0):
            raise UserError(f"RandomCenterCropPad std {list(self.crop_std)} would do nothing (mmdet never applies it; "
                            f"Normalize's std scales the image): set std=[1, 1, 1]")
        self.crop_to_rgb = bool(self.crop_to_rgb)
        self.img_scale = _ints(self.img_scale, 2, "Resize img_scale")
        self.keep_ratio = bool(self.keep_ratio)
        self.flip_ratio = float(self.flip_ratio)
        if not 0.0 <= self.flip_ratio <= 1.0:
            raise UserError(f"flip_ratio must be in [0, 1], got {self.flip_ratio}")
        self.mean = _floats(self.mean, 3, "Normalize mean")
        self.std = _floats(self.std, 3, "Normalize std")
        if any(s == 0 for s in self.std):
            raise UserError(f"Normalize std must be non-zero, got {self.std}")
        self.to_rgb = bool(self.to_rgb)
        mode = tuple(self.test_pad_mode)
        if len(mode) != 2 or mode[0] not in ("logical_or", "size_divisor") or int(mode[1]) != mode[1] \
                or int(mode[1]) <= 0:
            raise UserError(
                "test_pad_mode must be ['logical_or', N] or ['size_divisor', N] with N > 0, "
                f"got {self.test_pad_mode!r}")
        self.test_pad_mode = (str(mode[0]), int(mode[1]))
        self.test_pad_add_pix = int(self.test_pad_add_pix)
        self.test_pad_mean = _floats(self.test_pad_mean, 3, "test RandomCenterCropPad mean")
        self.test_pad_to_rgb = bool(self.test_pad_to_rgb)

    # -- derived --------------------------------------------------------------

    def crop_hw(self, ratio: float) -> tuple[int, int]:
        """(h, w) of the train crop for one ratio (mmdet: int(size * ratio))."""
        a, b = self.crop_size
        if self.crop_size_order == "wh":
            return int(b * ratio), int(a * ratio)
        return int(a * ratio), int(b * ratio)

    @property
    def input_size(self) -> tuple[int, int]:
        """Fixed (W, H) every train sample is padded to (bottom/right)."""
        if not self.keep_ratio:
            return self.img_scale
        if not self.center_crop:
            # any image orientation is possible: mmcv fits long/short edges
            side = max(self.img_scale)
            return side, side
        ws, hs = [], []
        for r in self.ratios:
            h, w = self.crop_hw(r)
            nw, nh = rescale_size(w, h, self.img_scale, True)
            ws.append(nw)
            hs.append(nh)
        return max(ws), max(hs)

    @property
    def input_hw(self) -> tuple[int, int]:
        """Fixed (H, W) every train sample is padded to: input_size in the (h, w) order of tensors and Layout."""
        w, h = self.input_size
        return h, w

    # -- (de)serialisation ----------------------------------------------------

    def to_dict(self) -> dict:
        """JSON-able dict (for cache manifests); :meth:`from_dict` inverts it."""
        d: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        d["input_size"] = list(self.input_size)
        d["augment_version"] = AUGMENT_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AugmentConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        extra = set(d) - names - {"input_size", "augment_version"}
        if extra:
            raise UserError(f"unknown augmentation setting(s): {', '.join(sorted(extra))}")
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_pipeline(
        cls,
        pipeline: Optional[Sequence[dict]],
        test_pipeline: Optional[Sequence[dict]] = None,
        *,
        crop_size_order: Optional[str] = None,
    ) -> "AugmentConfig":
        """Read an mmdet/YOLC-style train pipeline (list of dicts with 'type').

        ``None`` gives YOLC's defaults.  LoadImageFromFile, LoadAnnotations,
        DefaultFormatBundle and Collect are ignored; any other type than
        PhotoMetricDistortion, RandomCenterCropPad, Resize, RandomFlip,
        Normalize (and a no-op Pad) raises :class:`UserError`.  A transform that
        is absent is disabled (no photometric / no crop / no flip / identity
        normalisation).  ``test_pipeline`` optionally sets the test padding.
        ``crop_size_order`` (the config's key; None: the field's default 'wh') says how
        RandomCenterCropPad.crop_size reads.
        """
        kw: dict[str, Any] = {} if crop_size_order is None else {"crop_size_order": crop_size_order}
        if pipeline is not None:
            kw.update(_parse_train_pipeline(pipeline))
        cfg = cls(**kw)
        if pipeline is not None:
            _check_pad(pipeline, cfg)
        if test_pipeline is not None:
            cfg = dataclasses.replace(cfg, **_parse_test_pipeline(test_pipeline, cfg))
        return cfg


def _kwargs(t: dict, allowed: dict, name: str) -> dict:
    unknown = set(t) - set(allowed) - {"type"}
    if unknown:
        raise UserError(f"{name}: unsupported argument(s) {', '.join(sorted(unknown))}")
    out = dict(allowed)
    out.update({k: v for k, v in t.items() if k != "type"})
    return out


_REQUIRED = object()


def _parse_train_pipeline(pipeline: Sequence[dict]) -> dict:
    if isinstance(pipeline, (str, bytes, dict)) or not isinstance(pipeline, Sequence):
        raise UserError("train pipeline must be a list of dicts with a 'type' key")
    kw: dict[str, Any] = {
        "photometric": False,
        "center_crop": False,
        "flip_ratio": 0.0,
        "mean": (0.0, 0.0, 0.0),
        "std": (1.0, 1.0, 1.0),
        "to_rgb": False,
    }
    seen: list[str] = []
    for t in pipeline:
        if not isinstance(t, dict) or "type" not in t:
            raise UserError(f"train pipeline entries must be dicts with a 'type' key, got {t!r}")
        typ = t["type"]
        if typ in _IGNORED_TYPES:
            continue
        if typ not in _ORDER:
            raise UserError(
                f"unsupported transform type {typ!r} in the train pipeline "
                f"(supported: {', '.join(_ORDER)}; ignored: {', '.join(_IGNORED_TYPES)})")
        if typ in seen:
            raise UserError(f"transform {typ!r} appears twice in the train pipeline")
        if seen and _ORDER.index(typ) < _ORDER.index(seen[-1]):
            raise UserError(
                f"transform {typ!r} after {seen[-1]!r}: only the order {' -> '.join(_ORDER)} is supported")
        seen.append(typ)
        if typ == "PhotoMetricDistortion":
            a = _kwargs(t, dict(brightness_delta=32, contrast_range=(0.5, 1.5),
                                saturation_range=(0.5, 1.5), hue_delta=18), typ)
            kw.update(photometric=True, **a)
        elif typ == "RandomCenterCropPad":
            a = _kwargs(t, dict(crop_size=None, ratios=(0.9, 1.0, 1.1), border=128, mean=(0, 0, 0),
                                std=(1, 1, 1), to_rgb=True, test_mode=False, test_pad_mode=None,
                                test_pad_add_pix=0, bbox_clip_border=True), typ)
            if a["test_mode"]:
                raise UserError("RandomCenterCropPad with test_mode=True is not allowed in the train pipeline")
            if a["crop_size"] is None:
                raise UserError("RandomCenterCropPad needs crop_size in the train pipeline")
            if a["ratios"] is None or a["border"] is None:
                raise UserError("RandomCenterCropPad needs ratios and border in the train pipeline")
            if not a["bbox_clip_border"]:
                raise UserError("RandomCenterCropPad(bbox_clip_border=False) is not supported")
            kw.update(center_crop=True, crop_size=a["crop_size"], ratios=a["ratios"], border=a["border"],
                      crop_mean=a["mean"], crop_std=a["std"], crop_to_rgb=a["to_rgb"])
        elif typ == "Resize":
            a = _kwargs(t, dict(img_scale=None, multiscale_mode="range", ratio_range=None, keep_ratio=True,
                                bbox_clip_border=True, backend="cv2", interpolation="bilinear",
                                override=False), typ)
            scale = a["img_scale"]
            if isinstance(scale, list) and len(scale) == 1 and isinstance(scale[0], (list, tuple)):
                scale = scale[0]
            if scale is None or not isinstance(scale, (list, tuple)) or len(scale) != 2 \
                    or isinstance(scale[0], (list, tuple)):
                raise UserError(f"Resize: only a single img_scale (w, h) is supported, got {a['img_scale']!r}")
            if a["ratio_range"] is not None:
                raise UserError("Resize: ratio_range is not supported")
            if a["interpolation"] != "bilinear":
                raise UserError(f"Resize: only bilinear interpolation is supported, got {a['interpolation']!r}")
            if a["backend"] not in ("cv2", "pillow"):
                raise UserError(f"Resize: unknown backend {a['backend']!r}")
            if not a["bbox_clip_border"]:
                raise UserError("Resize(bbox_clip_border=False) is not supported")
            kw.update(img_scale=scale, keep_ratio=a["keep_ratio"])
        elif typ == "RandomFlip":
            a = _kwargs(t, dict(flip_ratio=None, direction="horizontal"), typ)
            if a["direction"] != "horizontal":
                raise UserError(f"RandomFlip: only direction='horizontal' is supported, got {a['direction']!r}")
            fr = a["flip_ratio"]
            if fr is not None and not isinstance(fr, (int, float)):
                raise UserError(f"RandomFlip: flip_ratio must be a number, got {fr!r}")
            kw.update(flip_ratio=0.0 if fr is None else fr)
        elif typ == "Normalize":
            a = _kwargs(t, dict(mean=_REQUIRED, std=_REQUIRED, to_rgb=True), typ)
            if a["mean"] is _REQUIRED or a["std"] is _REQUIRED:
                raise UserError("Normalize needs mean and std")
            kw.update(mean=a["mean"], std=a["std"], to_rgb=a["to_rgb"])
        elif typ == "Pad":
            _kwargs(t, dict(size=None, size_divisor=None, pad_to_square=False, pad_val=0), typ)
    if "Resize" not in seen:
        raise UserError("the train pipeline needs a Resize with img_scale (it fixes the network input size)")
    return kw


def _check_pad(pipeline: Sequence[dict], cfg: AugmentConfig) -> None:
    """A Pad after Normalize is accepted only when it is a no-op for the fixed input size."""
    for t in pipeline:
        if isinstance(t, dict) and t.get("type") == "Pad":
            H, W = cfg.input_hw
            pv = t.get("pad_val", 0)
            if isinstance(pv, dict):
                pv = pv.get("img", 0)
            if (np.asarray(pv) != 0).any() or t.get("pad_to_square", False):
                raise UserError("Pad: only pad_val=0 without pad_to_square is supported")
            if t.get("size") is not None:
                if tuple(t["size"]) != (H, W):
                    raise UserError(f"Pad: size {tuple(t['size'])} differs from the input size (H, W) = {(H, W)}")
            elif t.get("size_divisor") is not None:
                d = int(t["size_divisor"])
                if H % d or W % d:
                    raise UserError(f"Pad: size_divisor {d} does not divide the input size (H, W) = {(H, W)}")


def _parse_test_pipeline(test_pipeline: Sequence[dict], cfg: AugmentConfig) -> dict:
    if isinstance(test_pipeline, (str, bytes, dict)) or not isinstance(test_pipeline, Sequence):
        raise UserError("test pipeline must be a list of dicts with a 'type' key")
    flat: list[dict] = []
    for t in test_pipeline:
        if not isinstance(t, dict) or "type" not in t:
            raise UserError(f"test pipeline entries must be dicts with a 'type' key, got {t!r}")
        if t["type"] == "MultiScaleFlipAug":
            if t.get("flip", False):
                raise UserError("MultiScaleFlipAug(flip=True) is not supported")
            if t.get("img_scale") is not None or float(t.get("scale_factor", 1.0)) != 1.0:
                raise UserError("test-time resizing is not supported (YOLC uses scale_factor=1.0)")
            flat.extend(t.get("transforms", []))
        else:
            flat.append(t)
    out: dict[str, Any] = {}
    for t in flat:
        typ = t.get("type") if isinstance(t, dict) else None
        if typ in _IGNORED_TYPES or typ in ("RandomFlip", "ImageToTensor"):
            continue
        if typ == "Resize":
            if t.get("img_scale") is not None:
                raise UserError("test-time resizing is not supported (YOLC uses scale_factor=1.0)")
        elif typ == "RandomCenterCropPad":
            if not t.get("test_mode", False):
                raise UserError("the test pipeline's RandomCenterCropPad needs test_mode=True")
            mode = t.get("test_pad_mode", ("logical_or", 127))
            out.update(test_pad_mode=tuple(mode), test_pad_add_pix=t.get("test_pad_add_pix", 0),
                       test_pad_mean=t.get("mean", (0, 0, 0)), test_pad_to_rgb=t.get("to_rgb", True))
        elif typ == "Normalize":
            same = (_floats(t.get("mean", ()), 3, "Normalize mean") == cfg.mean
                    and _floats(t.get("std", ()), 3, "Normalize std") == cfg.std
                    and bool(t.get("to_rgb", True)) == cfg.to_rgb)
            if not same:
                raise UserError("the test pipeline's Normalize must match the train pipeline's")
        else:
            raise UserError(f"unsupported transform type {typ!r} in the test pipeline")
    if "test_pad_mode" not in out:
        raise UserError("the test pipeline needs RandomCenterCropPad(test_mode=True) (YOLC's test padding)")
    return out


# --------------------------------------------------------------------------- helpers

