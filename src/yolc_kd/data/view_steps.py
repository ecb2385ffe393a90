"""The primitive steps of a view transform (data/view.py): crop/paste window, resize with a scale per axis,
horizontal flip. Each step knows its input and output frame (h, w), its coordinate map, how it moves an image
and boxes exactly as YOLC's pipeline does (data/augment.py runs these very methods), and its exact inverse.

Coordinates are continuous with pixel edges at integers (pixel (x, y) covers [x, x+1) x [y, y+1), its centre at
x + 0.5), as mmdet's boxes and cv2's INTER_LINEAR geometry use them. Every step maps each axis by an affine
x_out = a * x_in + b; a and b are kept as exact fractions, so compositions stay exact (a crop then its inverse
is the identity, not 1 - 1e-16)."""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from yolc_kd.errors import UserError

HW = Tuple[int, int]
Rect = Tuple[Fraction, Fraction, Fraction, Fraction]  # x0, y0, x1, y1
Affine = Tuple[Tuple[Fraction, Fraction], Tuple[Fraction, Fraction]]  # ((ax, bx), (ay, by))


def fill_rgb(mean: Sequence[float], to_rgb: bool) -> Tuple[float, float, float]:
    """A pad colour for our RGB arrays from an mmdet mean (mmdet pads BGR images with mean[::-1] if to_rgb)."""
    m = np.asarray(mean, dtype=np.float32)
    m = m if to_rgb else m[::-1]
    return tuple(float(v) for v in m)


def _linear_taps(src: int, dst: int):
    """cv2 INTER_LINEAR source indices and weights along one axis."""
    d = np.arange(dst, dtype=np.float64)
    f = ((d + 0.5) * (src / dst) - 0.5).astype(np.float32)
    i0f = np.floor(f)
    frac = (f - i0f).astype(np.float32)
    i0 = i0f.astype(np.int64)
    low = i0 < 0
    high = i0 >= src - 1
    i0 = np.where(low, 0, np.where(high, src - 1, i0))
    frac = np.where(low | high, np.float32(0.0), frac)
    i1 = np.minimum(i0 + 1, src - 1)
    return i0, i1, (np.float32(1.0) - frac).astype(np.float32), frac.astype(np.float32)


def resize_bilinear(img: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
    """Deterministic float32 bilinear resize of (h, w, c) with cv2 INTER_LINEAR geometry."""
    # numpy rather than cv2 (not a dependency): the same taps on every machine, so views replay bit for bit
    img = np.asarray(img, dtype=np.float32)
    h, w = img.shape[:2]
    if (h, w) == (out_h, out_w):
        return img.copy()
    if w != out_w:
        i0, i1, a0, a1 = _linear_taps(w, out_w)
        img = img[:, i0] * a0[None, :, None] + img[:, i1] * a1[None, :, None]
    if h != out_h:
        j0, j1, b0, b1 = _linear_taps(h, out_h)
        img = img[j0] * b0[:, None, None] + img[j1] * b1[:, None, None]
    return np.ascontiguousarray(img, dtype=np.float32)


def _hw(value: Any, what: str) -> HW:
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError):
        raise UserError(f"view step {what} must be (h, w) integers, got {value!r}") from None
    if h < 0 or w < 0:
        raise UserError(f"view step {what} must not be negative, got {value!r}")
    return h, w


def _ints(value: Any, n: int, what: str) -> Tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise UserError(f"view step {what} must be {n} integers, got {value!r}") from None
    if len(out) != n:
        raise UserError(f"view step {what} must be {n} integers, got {value!r}")
    return out


def _const(like: Any, values: Sequence[float]) -> Any:
    """values as an array of like's kind (numpy, or torch on like's device) and dtype, for exact elementwise ops."""
    if isinstance(like, np.ndarray):
        return np.asarray(values, dtype=like.dtype)
    return like.new_tensor(values)


def scaled_hw(hw: Sequence[int], scale: float) -> HW:
    """(h, w) of a frame resized by scale (at least one pixel, Python's round): an image-level cache row, an aligned
    view's scaled image and a resized patch all round so."""
    return max(1, round(int(hw[0]) * scale)), max(1, round(int(hw[1]) * scale))


def clip_xyxy(boxes: np.ndarray, hw: HW) -> np.ndarray:
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, hw[1])
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, hw[0])
    return boxes


@dataclass(frozen=True)
class CropPaste:
    """The window src_xyxy of the input, placed with its top-left corner at dst_xy on a canvas of out_hw filled
    with `fill` (mmdet's RandomCenterCropPad crop and test-mode pad; a pure crop, a pure pad, or both).

    Args:
        in_hw: input frame (h, w).
        src_xyxy: the window kept, integer (x0, y0, x1, y1) inside the input.
        dst_xy: where the window's top-left corner lands in the output.
        out_hw: output frame (h, w); the window must fit inside it.
        fill: colour of the canvas outside the window (per channel, the image's own value space).
        keep_centres: the pipeline's annotation rule for this step: a box is kept only when its centre lies
            strictly inside the window (RandomCenterCropPad's train crop); box_keep applies it.
    """
    in_hw: HW
    src_xyxy: Tuple[int, int, int, int]
    dst_xy: Tuple[int, int]
    out_hw: HW
    fill: Tuple[float, ...] = (0.0, 0.0, 0.0)
    keep_centres: bool = False
    kind = "crop_paste"

    def __post_init__(self) -> None:
        object.__setattr__(self, "in_hw", _hw(self.in_hw, "in_hw"))
        object.__setattr__(self, "out_hw", _hw(self.out_hw, "out_hw"))
        object.__setattr__(self, "src_xyxy", _ints(self.src_xyxy, 4, "src_xyxy"))
        object.__setattr__(self, "dst_xy", _ints(self.dst_xy, 2, "dst_xy"))
        object.__setattr__(self, "fill", tuple(float(v) for v in self.fill))
        x0, y0, x1, y1 = self.src_xyxy
        dx, dy = self.dst_xy
        if not (0 <= x0 <= x1 <= self.in_hw[1] and 0 <= y0 <= y1 <= self.in_hw[0]):
            raise UserError(f"crop window {self.src_xyxy} is not inside the input {self.in_hw[1]}x{self.in_hw[0]}")
        if not (0 <= dx and 0 <= dy and dx + x1 - x0 <= self.out_hw[1] and dy + y1 - y0 <= self.out_hw[0]):
            raise UserError(f"crop window {self.src_xyxy} placed at {self.dst_xy} does not fit the output "
                            f"{self.out_hw[1]}x{self.out_hw[0]}")

    @property
    def offset(self) -> Tuple[int, int]:
        """(ox, oy): output = input + offset on each axis."""
        return self.dst_xy[0] - self.src_xyxy[0], self.dst_xy[1] - self.src_xyxy[1]

    @property
    def dst_xyxy(self) -> Tuple[int, int, int, int]:
        x0, y0, x1, y1 = self.src_xyxy
        return self.dst_xy[0], self.dst_xy[1], self.dst_xy[0] + x1 - x0, self.dst_xy[1] + y1 - y0

    def affine(self) -> Affine:
        ox, oy = self.offset
        return (Fraction(1), Fraction(ox)), (Fraction(1), Fraction(oy))

    def content(self, rect: Rect) -> Rect:
        """The part of the input rectangle `rect` that survives, in the output frame."""
        x0, y0, x1, y1 = self.src_xyxy
        ox, oy = self.offset
        r = (max(rect[0], x0), max(rect[1], y0), min(rect[2], x1), min(rect[3], y1))
        return r[0] + ox, r[1] + oy, max(r[2], r[0]) + ox, max(r[3], r[1]) + oy

    def cut(self, img: np.ndarray) -> np.ndarray:
        """The window of an (h, w, ...) image (a view, no copy)."""
        x0, y0, x1, y1 = self.src_xyxy
        return img[y0:y1, x0:x1]

    def paste(self, window: np.ndarray, fill: Optional[Sequence[float]] = None) -> np.ndarray:
        """A float32 output canvas filled with `fill` (default: the step's) holding the cut window."""
        dx0, dy0, dx1, dy1 = self.dst_xyxy
        canvas = np.empty((*self.out_hw, *window.shape[2:]), dtype=np.float32)
        canvas[...] = np.asarray(self.fill if fill is None else fill, dtype=np.float32)
        canvas[dy0:dy1, dx0:dx1] = window
        return canvas

    def apply_image(self, img: np.ndarray, fill: Optional[Sequence[float]] = None) -> np.ndarray:
        return self.paste(self.cut(img), fill)

    def apply_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """xyxy boxes shifted into the output and clipped to it (RandomCenterCropPad's arithmetic)."""
        ox, oy = self.offset
        b = boxes.copy()
        b[:, 0::2] += ox
        b[:, 1::2] += oy
        return clip_xyxy(b, self.out_hw)

    def apply_points(self, points: Any) -> Any:
        ox, oy = self.offset
        return points + _const(points, [ox, oy])

    def centres_inside(self, boxes: np.ndarray) -> np.ndarray:
        """mmdet's crop rule: the box centre strictly inside the window (float32 centres, as mmdet)."""
        x0, y0, x1, y1 = self.src_xyxy
        centre = (boxes[:, :2] + boxes[:, 2:]) / np.float32(2)
        return (centre[:, 0] > x0) & (centre[:, 1] > y0) & (centre[:, 0] < x1) & (centre[:, 1] < y1)

    def inverse(self) -> "CropPaste":
        """The output window put back where it came from, on a canvas of the input's size (exact on the window;
        what lay outside it is gone and comes back as fill)."""
        return CropPaste(self.out_hw, self.dst_xyxy, self.src_xyxy[:2], self.in_hw, self.fill)

    def to_dict(self) -> Dict[str, Any]:
        return dict(type=self.kind, in_hw=list(self.in_hw), src_xyxy=list(self.src_xyxy), dst_xy=list(self.dst_xy),
                    out_hw=list(self.out_hw), fill=list(self.fill), keep_centres=self.keep_centres)


@dataclass(frozen=True)
class Resize:
    """Resize in_hw -> out_hw with its own scale per axis (out / in), cv2 INTER_LINEAR geometry for images.

    Args:
        in_hw: input frame (h, w), both sides at least 1.
        out_hw: output frame (h, w), both sides at least 1.
    """
    in_hw: HW
    out_hw: HW
    kind = "resize"

    def __post_init__(self) -> None:
        object.__setattr__(self, "in_hw", _hw(self.in_hw, "in_hw"))
        object.__setattr__(self, "out_hw", _hw(self.out_hw, "out_hw"))
        if min(self.in_hw + self.out_hw) < 1:
            raise UserError(f"resize needs non-empty frames, got {self.in_hw} -> {self.out_hw}")

    @property
    def scale(self) -> Tuple[Fraction, Fraction]:
        """(sx, sy), exact."""
        return Fraction(self.out_hw[1], self.in_hw[1]), Fraction(self.out_hw[0], self.in_hw[0])

    def affine(self) -> Affine:
        sx, sy = self.scale
        return (sx, Fraction(0)), (sy, Fraction(0))

    def content(self, rect: Rect) -> Rect:
        sx, sy = self.scale
        return rect[0] * sx, rect[1] * sy, rect[2] * sx, rect[3] * sy

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        return resize_bilinear(img, self.out_hw[1], self.out_hw[0])

    def _factors(self, dtype) -> np.ndarray:
        # the pipeline's float scale_factor (out / in as a Python float), in the boxes' dtype
        sx, sy = self.out_hw[1] / self.in_hw[1], self.out_hw[0] / self.in_hw[0]
        return np.array([sx, sy, sx, sy], dtype=dtype)

    def apply_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """xyxy boxes times the scale factor, clipped to the output (mmdet's Resize arithmetic)."""
        return clip_xyxy(boxes * self._factors(boxes.dtype), self.out_hw)

    def apply_points(self, points: Any) -> Any:
        sx, sy = self.out_hw[1] / self.in_hw[1], self.out_hw[0] / self.in_hw[0]
        return points * _const(points, [sx, sy])

    def inverse(self) -> "Resize":
        return Resize(self.out_hw, self.in_hw)

    def to_dict(self) -> Dict[str, Any]:
        return dict(type=self.kind, in_hw=list(self.in_hw), out_hw=list(self.out_hw))


@dataclass(frozen=True)
class HFlip:
    """Horizontal mirror of a frame of size hw: x -> w - x. Its own inverse.

    Args:
        hw: the frame (h, w), input and output alike.
    """
    hw: HW
    kind = "hflip"

    def __post_init__(self) -> None:
        object.__setattr__(self, "hw", _hw(self.hw, "hw"))

    @property
    def in_hw(self) -> HW:
        return self.hw

    @property
    def out_hw(self) -> HW:
        return self.hw

    def affine(self) -> Affine:
        return (Fraction(-1), Fraction(self.hw[1])), (Fraction(1), Fraction(0))

    def content(self, rect: Rect) -> Rect:
        w = self.hw[1]
        return w - rect[2], rect[1], w - rect[0], rect[3]

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        return img[:, ::-1]

    def apply_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """x0' = w - x1, x1' = w - x0 (RandomFlip's arithmetic; no clipping needed)."""
        w = self.hw[1]
        b = boxes.copy()
        b[:, 0] = w - boxes[:, 2]
        b[:, 2] = w - boxes[:, 0]
        return b

    def apply_points(self, points: Any) -> Any:
        return points * _const(points, [-1, 1]) + _const(points, [self.hw[1], 0])

    def inverse(self) -> "HFlip":
        return self

    def to_dict(self) -> Dict[str, Any]:
        return dict(type=self.kind, hw=list(self.hw))


Step = Union[CropPaste, Resize, HFlip]
STEP_TYPES = {cls.kind: cls for cls in (CropPaste, Resize, HFlip)}


def step_from_dict(d: Mapping[str, Any]) -> Step:
    """A step from its to_dict() form; anything else is one line (UserError)."""
    if not isinstance(d, Mapping) or d.get("type") not in STEP_TYPES:
        raise UserError(f"not a view step (type one of {', '.join(STEP_TYPES)}): {d!r}")
    cls = STEP_TYPES[d["type"]]
    args = {k: v for k, v in d.items() if k != "type"}
    try:
        return cls(**args)
    except TypeError as exc:
        raise UserError(f"bad {d['type']} view step {dict(d)!r}: {exc}") from None
