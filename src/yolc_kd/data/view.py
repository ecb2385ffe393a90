"""ViewTransform: the single owner of a view's geometry. A view (a training view of TrainAugment, YOLC's test-time
centre pad, a mirrored cached view, a patch cut from a view) is a chain of primitive steps (data/view_steps.py:
crop/paste window, resize with a scale per axis, horizontal flip), and one object applies it to everything that
lives in the view's frame: the image, xyxy boxes, points, crop boxes [x, y, w, h], dense maps at any stride (the
class heatmap at stride 1) and YOLC's box maps at stride 4, the latter as decoded boxes. `inverse()` maps back.

Modelled on detectron2's Transform / TransformList (apply_image, apply_coords, apply_box, inverse).

Maps. A map at stride s over a frame has cell i covering [s*i, s*(i+1)) on each axis. A destination cell takes
the source value at its centre: exactly a source cell when the transform moves cells onto cells at these strides
(moves_cells: a flip, a crop by whole cells), else bilinear (apply_map) or the nearest cell (apply_box_map).
Cells whose centre lies outside the view's content (padding) are False in the returned validity mask; their
values are the source's where the source map covers them, else 0."""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from functools import cached_property
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from yolc_kd.errors import UserError
from yolc_kd.stride import BOX_STRIDE

from .augment_config import AUGMENT_VERSION, AugmentConfig
from .view_steps import HW, Affine, CropPaste, HFlip, Rect, Resize, Step, clip_xyxy, fill_rgb, step_from_dict

__all__ = ["ViewTransform", "CropPaste", "Resize", "HFlip", "VIEW_VERSION"]

VIEW_VERSION = 1
Boxes = Union[np.ndarray, torch.Tensor]


def _as_numpy(x: Boxes, what: str, width: int) -> Tuple[np.ndarray, Any]:
    """(float array (N, width), a function giving the result back in x's type, dtype and device)."""
    if isinstance(x, torch.Tensor):
        arr = x.detach().cpu().numpy()
        back = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device=x.device, dtype=x.dtype)  # noqa: E731
    else:
        arr = np.asarray(x)
        back = lambda a: a  # noqa: E731
    if arr.dtype.kind != "f":
        arr = arr.astype(np.float32)
    if arr.ndim != 2 or arr.shape[1] != width:
        raise ValueError(f"{what} must be (N, {width}), got {tuple(arr.shape)}")
    return arr, back


def _exact_int(f: Fraction) -> bool:
    return f.denominator == 1


def _source_positions(a: Fraction, b: Fraction, s_in: int, s_out: int) -> Tuple[Fraction, Fraction]:
    """(alpha, beta): destination cell i at stride s_out has its centre at source cell coordinate u = alpha i + beta
    (cell centres at integers) for the axis map x_out = a x_in + b."""
    alpha = Fraction(s_out) / (a * s_in)
    beta = (Fraction(s_out, 2) - b) / (a * s_in) - Fraction(1, 2)
    return alpha, beta


def _nearest_cells(alpha: Fraction, beta: Fraction, n_out: int) -> torch.Tensor:
    """floor(u + 1/2) for every destination cell, in exact integer arithmetic (no float tie errors)."""
    c = beta + Fraction(1, 2)
    d = alpha.denominator * c.denominator // math.gcd(alpha.denominator, c.denominator)
    an, cn = alpha.numerator * (d // alpha.denominator), c.numerator * (d // c.denominator)
    if max(abs(an) * n_out + abs(cn), d) < 2 ** 62:  # int64 holds every product: vectorised
        return torch.div(torch.arange(n_out, dtype=torch.long) * an + cn, d, rounding_mode="floor")
    return torch.tensor([(an * i + cn) // d for i in range(n_out)], dtype=torch.long)


def _span(lo: Fraction, hi: Fraction, stride: int, n: int) -> Tuple[int, int]:
    """[first, stop): the cells (of n) of a map at `stride` whose centre lies in [lo, hi)."""
    first = min(max(math.ceil(lo / stride - Fraction(1, 2)), 0), n)
    return first, min(max(math.ceil(hi / stride - Fraction(1, 2)), first), n)


def _inside(lo: Fraction, hi: Fraction, stride: int, n: int) -> torch.Tensor:
    """Cells of a map at `stride` whose centre lies in [lo, hi), as a mask."""
    first, stop = _span(lo, hi, stride, n)
    i = torch.arange(n)
    return (i >= first) & (i < stop)


def _take(x: torch.Tensor, dim: int, idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """x indexed by idx along dim, out-of-range indices giving 0; and the in-range mask. A run of consecutive
    indices (a crop, a pad, a flip: the exact moves) is a slice, flipped for a mirror, not a gather."""
    n_in, n = x.shape[dim], len(idx)
    ok = (idx >= 0) & (idx < n_in)
    steps = idx[1:] - idx[:-1]
    step = 1 if n < 2 else int(steps[0]) if bool((steps == steps[0]).all()) else 0
    if step in (1, -1) and bool(ok.any()):
        first, last = (int(v) for v in ok.nonzero()[[0, -1], 0])
        lo, hi = sorted((int(idx[first]), int(idx[last])))
        part = x.narrow(dim, lo, hi + 1 - lo)
        part = part.flip(dim) if step == -1 else part
        if first == 0 and last == n - 1:
            return part, ok  # may be a view of x: _gather copies a result that still is
        shape = list(x.shape)
        shape[dim] = n
        out = x.new_zeros(shape)
        out.narrow(dim, first, last + 1 - first).copy_(part)
        return out, ok
    safe = idx.clamp(0, max(n_in - 1, 0))
    if x.device.type == "cpu" and not x.requires_grad and x.dtype != torch.bfloat16:  # numpy's take: 6x torch's
        # index_select on the last dim (bfloat16 has no numpy dtype)
        out = torch.from_numpy(np.take(x.numpy(), safe.numpy(), axis=dim))
    else:
        out = x.index_select(dim, safe.to(x.device))
    if bool(ok.all()):
        return out, ok
    inside = ok.nonzero()[:, 0]
    if len(inside) and int(inside[-1] - inside[0]) + 1 == len(inside):  # one run in range: zero what is around it
        first, stop = int(inside[0]), int(inside[-1]) + 1
        out.narrow(dim, 0, first).zero_()
        out.narrow(dim, stop, n - stop).zero_()
    else:
        out[(slice(None),) * (dim % x.dim()) + (~ok.to(x.device),)] = 0  # out-of-range indices give 0
    return out, ok


def _gather(x: torch.Tensor, iy: torch.Tensor, ix: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x[..., iy, :][..., ix] with out-of-range indices giving 0; and the in-range rows and columns."""
    out, oky = _take(x, x.dim() - 2, iy)
    out, okx = _take(out, x.dim() - 1, ix)
    if out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        out = out.clone()  # never an alias of the input
    return out, oky, okx


def _outer_and(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """rows[:, None] & columns[None, :] for masks that are each one run of True (every mask here is: a rectangle
    seen along an axis), set as one slice (a broadcast boolean AND is ~10x slower on the CPU)."""
    out = torch.zeros(len(rows), len(columns), dtype=torch.bool)
    if bool(rows.any()) and bool(columns.any()):
        r, c = rows.nonzero()[:, 0], columns.nonzero()[:, 0]
        if int(r[-1] - r[0]) + 1 != len(r) or int(c[-1] - c[0]) + 1 != len(c):
            return rows[:, None] & columns[None, :]
        out[int(r[0]):int(r[-1]) + 1, int(c[0]):int(c[-1]) + 1] = True
    return out


def _round_into(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float values back into a map dtype: integers round to nearest and clip to the dtype's symmetric range.
    values is a scratch buffer of the caller's: rounded and clipped in place (10x faster on the CPU than new
    tensors for every step)."""
    if dtype.is_floating_point:
        return values.to(dtype)
    top = torch.iinfo(dtype).max
    low = -top if torch.iinfo(dtype).min < 0 else 0
    return values.round_().clamp_(low, top).to(dtype)


@dataclass(frozen=True)
class ViewTransform:
    """A chain of view steps applied in order; the frame of each step's output is the next step's input.

    Args:
        steps: CropPaste / Resize / HFlip steps (view_steps.py), at least one, consecutive frames matching.
    """
    steps: Tuple[Step, ...]

    def __post_init__(self) -> None:
        steps = tuple(self.steps)
        object.__setattr__(self, "steps", steps)
        if not steps:
            raise UserError("a view transform needs at least one step")
        for prev, nxt in zip(steps, steps[1:]):
            if prev.out_hw != nxt.in_hw:
                raise UserError(f"view steps do not chain: {prev.kind} gives {prev.out_hw}, {nxt.kind} takes "
                                f"{nxt.in_hw}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def hflip(cls, hw: Sequence[int]) -> "ViewTransform":
        """The horizontal mirror of a frame of size hw = (h, w)."""
        return cls((HFlip(tuple(hw)),))

    @classmethod
    def crop(cls, in_hw: Sequence[int], xyxy: Sequence[int]) -> "ViewTransform":
        """The window xyxy of a frame in_hw as a frame of its own."""
        x0, y0, x1, y1 = (int(v) for v in xyxy)
        return cls((CropPaste(tuple(in_hw), (x0, y0, x1, y1), (0, 0), (y1 - y0, x1 - x0)),))

    @classmethod
    def resize(cls, in_hw: Sequence[int], out_hw: Sequence[int]) -> "ViewTransform":
        return cls((Resize(tuple(in_hw), tuple(out_hw)),))

    @classmethod
    def pad(cls, in_hw: Sequence[int], out_hw: Sequence[int], left_top: Sequence[int] = (0, 0),
            fill: Sequence[float] = (0.0, 0.0, 0.0)) -> "ViewTransform":
        """The whole frame in_hw placed at left_top = (x, y) on a canvas of out_hw."""
        h, w = (int(v) for v in in_hw)
        return cls((CropPaste((h, w), (0, 0, w, h), tuple(left_top), tuple(out_hw), tuple(fill)),))

    @classmethod
    def from_params(cls, params: Mapping[str, Any], cfg: Optional[AugmentConfig] = None) -> "ViewTransform":
        """The view TrainAugment recorded in `params` (AugmentedSample.params; the cache's aug_params JSON):
        [crop/paste (RandomCenterCropPad), ] resize, [flip, ] pad bottom/right to the network input. cfg gives the
        fill colours only (the crop's pad colour, the network's mean for the input padding): the geometry is all
        in params."""
        cfg = cfg if cfg is not None else AugmentConfig()
        if not isinstance(params, Mapping) or "resize" not in params or "ori_hw" not in params:
            what = params.get("skipped") if isinstance(params, Mapping) else None
            raise UserError(f"not the params of an augmented view{f' (skipped: {what})' if what else ''}: "
                            f"{str(dict(params) if isinstance(params, Mapping) else params)[:120]}")
        version = params.get("augment_version", AUGMENT_VERSION)
        if version != AUGMENT_VERSION:
            raise UserError(f"view params of augment version {version}, this package reads {AUGMENT_VERSION}")
        try:
            h, w = (int(v) for v in params["ori_hw"])
            steps: List[Step] = []
            frame = (h, w)
            crop = params.get("crop")
            if crop is not None:
                x0, y0, _, _ = (int(v) for v in crop["paste_xyxy"])
                steps.append(CropPaste(frame, tuple(crop["patch_xyxy"]), (x0, y0), tuple(crop["crop_hw"]),
                                       fill_rgb(cfg.crop_mean, cfg.crop_to_rgb), keep_centres=True))
                frame = steps[-1].out_hw
            nw, nh = (int(v) for v in params["resize"]["size_wh"])
            steps.append(Resize(frame, (nh, nw)))
            if params.get("flipped"):
                steps.append(HFlip((nh, nw)))
            steps.append(CropPaste((nh, nw), (0, 0, nw, nh), (0, 0), tuple(params["input_hw"]),
                                   fill_rgb(cfg.mean, cfg.to_rgb)))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"view params are incomplete or malformed ({type(exc).__name__}: {exc})") from None
        return cls(tuple(steps))

    # ------------------------------------------------------------------ structure
    @property
    def in_hw(self) -> HW:
        return self.steps[0].in_hw

    @property
    def out_hw(self) -> HW:
        return self.steps[-1].out_hw

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, index: slice) -> "ViewTransform":
        """A sub-chain (a slice of the steps) as a transform of its own."""
        if not isinstance(index, slice):
            raise TypeError("index a ViewTransform with a slice; .steps[i] is a single step")
        return ViewTransform(self.steps[index])

    def then(self, other: Union["ViewTransform", Step]) -> "ViewTransform":
        """This view followed by `other` (whose input frame is this view's output frame)."""
        more = other.steps if isinstance(other, ViewTransform) else (other,)
        return ViewTransform(self.steps + tuple(more))

    def inverse(self) -> "ViewTransform":
        """The view's output frame back to its input frame: exact inverses step by step in reverse order (crop
        <-> paste, scale <-> 1/scale, flip <-> flip). Content a crop dropped does not come back (fill / invalid)."""
        return ViewTransform(tuple(s.inverse() for s in reversed(self.steps)))

    @cached_property
    def _affine(self) -> Affine:
        (ax, bx), (ay, by) = (Fraction(1), Fraction(0)), (Fraction(1), Fraction(0))
        for step in self.steps:
            (sx, tx), (sy, ty) = step.affine()
            ax, bx, ay, by = sx * ax, sx * bx + tx, sy * ay, sy * by + ty
        return (ax, bx), (ay, by)

    @cached_property
    def _content_rect(self) -> Rect:
        rect: Rect = (Fraction(0), Fraction(0), Fraction(self.in_hw[1]), Fraction(self.in_hw[0]))
        for step in self.steps:
            rect = step.content(rect)
        return rect

    def affine(self) -> Affine:
        """((ax, bx), (ay, by)), exact: x_out = ax * x_in + bx, y_out = ay * y_in + by."""
        return self._affine

    def content_rect(self) -> Rect:
        """(x0, y0, x1, y1), exact, in the output frame: where the input's pixels are (the rest is padding)."""
        return self._content_rect

    def moves_cells(self, stride: int = 1, out_stride: Optional[int] = None) -> bool:
        """True when every destination cell of a map at out_stride is exactly one source cell at stride (a flip
        of a width divisible by the stride, a crop / pad by whole cells): maps then move without resampling."""
        out_stride = stride if out_stride is None else out_stride
        for a, b in self.affine():
            alpha, beta = _source_positions(a, b, stride, out_stride)
            if not (_exact_int(alpha) and _exact_int(beta)):
                return False
        return True

    # ------------------------------------------------------------------ images, boxes, points
    def apply_image(self, img: np.ndarray, fill: Optional[Sequence[float]] = None) -> np.ndarray:
        """An (h, w, c) image through every step with the pipeline's pixel code (cv2-geometry bilinear resize,
        paste on a fill colour), computed in float32: a uint8 image comes back rounded and clipped to uint8 as
        TrainAugment rounds its view, any other as float32. fill: the last step's canvas colour instead of its
        own (e.g. 0 for an already normalised image)."""
        img = np.asarray(img)
        if img.ndim != 3 or tuple(img.shape[:2]) != self.in_hw:
            raise ValueError(f"expected an image of {self.in_hw[0]}x{self.in_hw[1]}xC, got {img.shape}")
        out = img
        for i, step in enumerate(self.steps):
            last = i == len(self.steps) - 1
            out = step.apply_image(out, fill) if (last and fill is not None and step.kind == "crop_paste") \
                else step.apply_image(out)
        if img.dtype == np.uint8 and out.dtype != np.uint8:
            return np.clip(np.rint(out), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(out, dtype=img.dtype if img.dtype == np.uint8 else np.float32)

    def apply_boxes(self, boxes: Boxes) -> Boxes:
        """(N, 4) xyxy boxes (numpy or torch; float32 boxes compute in float32 as the pipeline does), each step's
        result clipped to its frame as the pipeline clips. No box is dropped: see box_keep."""
        arr, back = _as_numpy(boxes, "boxes", 4)
        for step in self.steps:
            arr = step.apply_boxes(arr)
        return back(arr)

    def box_keep(self, boxes: Boxes) -> np.ndarray:
        """(N,) bool: the boxes the training pipeline keeps: at a crop step with keep_centres, the centre strictly
        inside the window and a non-empty box after it; every other box is kept."""
        arr, _ = _as_numpy(boxes, "boxes", 4)
        keep = np.ones(len(arr), dtype=bool)
        for step in self.steps:
            if getattr(step, "keep_centres", False):
                keep &= step.centres_inside(arr)
            arr = step.apply_boxes(arr)
            if getattr(step, "keep_centres", False):
                keep &= (arr[:, 2] > arr[:, 0]) & (arr[:, 3] > arr[:, 1])
        return keep

    def apply_points(self, points: Boxes) -> Boxes:
        """(N, 2) [x, y] points, not clipped; a float torch tensor stays on its device (no host round trip)."""
        if isinstance(points, torch.Tensor) and points.is_floating_point():
            if points.dim() != 2 or points.shape[1] != 2:
                raise ValueError(f"points must be (N, 2), got {tuple(points.shape)}")
            out = points
        else:
            out, back = _as_numpy(points, "points", 2)
        for step in self.steps:
            out = step.apply_points(out)
        return out if isinstance(points, torch.Tensor) and points.is_floating_point() else back(out)

    def apply_xyxy(self, dets: torch.Tensor) -> torch.Tensor:
        """(N, >= 4) float detections whose first 4 columns are xyxy boxes, mapped on their device without clipping
        or reordering (the network's boxes may leave the frame or be inverted; YOLC keeps them so); a flip swaps
        x0 and x1. The other columns (score, ...) are kept. A new tensor."""
        if dets.dim() != 2 or dets.shape[1] < 4:
            raise ValueError(f"detections must be (N, >= 4), got {tuple(dets.shape)}")
        out = dets.clone()
        out[:, :4] = self.apply_points(dets[:, :4].reshape(-1, 2)).reshape(-1, 4)
        (ax, _), (ay, _) = self.affine()
        if ax < 0:
            out[:, [0, 2]] = out[:, [2, 0]]
        if ay < 0:
            out[:, [1, 3]] = out[:, [3, 1]]
        return out

    def apply_crop_boxes(self, xywh: Boxes) -> Boxes:
        """(N, 4) crop regions [x, y, w, h] (LSM / crops.py) as the region covering the same pixels in the output,
        clipped to each frame. Computed in float64 and returned in the input's dtype."""
        arr, back = _as_numpy(xywh, "crop boxes", 4)
        dtype = arr.dtype
        b = arr.astype(np.float64)
        b = np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)
        b = clip_xyxy(b, self.in_hw)
        for step in self.steps:  # a region has no pixels outside a frame: clipped to every one (a flip too)
            b = clip_xyxy(step.apply_boxes(b), step.out_hw)
        return back(np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1).astype(dtype))

    # ------------------------------------------------------------------ dense maps
    def _map_size(self, n_out: Optional[Sequence[int]], out_stride: int) -> HW:
        if n_out is not None:
            return int(n_out[0]), int(n_out[1])
        return -(-self.out_hw[0] // out_stride), -(-self.out_hw[1] // out_stride)

    def valid_axes(self, out_stride: int = 1,
                   out_size: Optional[Sequence[int]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(rows (h,), columns (w,)) bool over a map at out_stride of the output frame: the rows / columns of
        cells whose centre lies inside the input's content (content_rect)."""
        n_h, n_w = self._map_size(out_size, out_stride)
        x0, y0, x1, y1 = self.content_rect()
        return _inside(y0, y1, out_stride, n_h), _inside(x0, x1, out_stride, n_w)

    def valid_window(self, out_stride: int = 1, out_size: Optional[Sequence[int]] = None) -> Tuple[int, int, int, int]:
        """(y0, y1, x0, x1): valid_mask as index ranges, rows [y0, y1) and columns [x0, x1) (for slicing)."""
        n_h, n_w = self._map_size(out_size, out_stride)
        x0, y0, x1, y1 = self.content_rect()
        return (*_span(y0, y1, out_stride, n_h), *_span(x0, x1, out_stride, n_w))

    def valid_mask(self, out_stride: int = 1, out_size: Optional[Sequence[int]] = None) -> torch.Tensor:
        """(h, w) bool over a map at out_stride of the output frame: the cells whose centre shows the input."""
        return _outer_and(*self.valid_axes(out_stride, out_size))

    def _valid(self, out_stride: int, n_out: HW, oky: torch.Tensor, okx: torch.Tensor, device) -> torch.Tensor:
        rows, columns = self.valid_axes(out_stride, n_out)
        return _outer_and(rows & oky, columns & okx).to(device)

    def _cells(self, stride: int, out_stride: int, n_out: HW):
        """Per axis (y, x): (alpha, beta, nearest source cell of every destination cell, exact)."""
        (ax, bx), (ay, by) = self.affine()
        out = []
        for (a, b), n in (((ay, by), n_out[0]), ((ax, bx), n_out[1])):
            alpha, beta = _source_positions(a, b, stride, out_stride)
            out.append((alpha, beta, _nearest_cells(alpha, beta, n)))
        return out

    def apply_map(self, x: torch.Tensor, stride: int = 1, out_stride: Optional[int] = None,
                  out_size: Optional[Sequence[int]] = None,
                  mode: str = "bilinear") -> Tuple[torch.Tensor, torch.Tensor]:
        """A dense map (..., h, w) at `stride` over the input frame -> ((..., H, W) at out_stride over the output
        frame, valid (H, W) bool). out_size defaults to ceil(output frame / out_stride). Cells that move onto cells
        (moves_cells) are copied exactly, any dtype; otherwise mode 'bilinear' (grid_sample, edges clamped) or
        'nearest' samples the source at each destination centre; integer maps round back to their dtype."""
        if mode not in ("bilinear", "nearest"):
            raise ValueError(f"map mode must be 'bilinear' or 'nearest', got {mode!r}")
        out_stride = stride if out_stride is None else out_stride
        n_out = self._map_size(out_size, out_stride)
        (alpha_y, beta_y, iy), (alpha_x, beta_x, ix) = self._cells(stride, out_stride, n_out)
        exact = all(_exact_int(f) for f in (alpha_x, beta_x, alpha_y, beta_y))
        if exact or mode == "nearest":
            out, oky, okx = _gather(x, iy, ix)
            return out, self._valid(out_stride, n_out, oky, okx, x.device)
        valid = self.valid_mask(out_stride, n_out).to(x.device)
        h, w = x.shape[-2:]
        dtype = x.dtype if x.dtype.is_floating_point else torch.float32
        # grid_sample's normalised coordinates (align_corners=False): -1 and 1 are the outer edges of the map
        gy = (2 * (float(alpha_y) * np.arange(n_out[0]) + float(beta_y)) + 1) / h - 1
        gx = (2 * (float(alpha_x) * np.arange(n_out[1]) + float(beta_x)) + 1) / w - 1
        grid = torch.stack(torch.meshgrid(torch.as_tensor(gx, dtype=dtype, device=x.device),
                                          torch.as_tensor(gy, dtype=dtype, device=x.device), indexing="xy"), dim=-1)
        lead = x.shape[:-2]
        flat = x.reshape(1, -1, h, w).to(dtype)
        out = F.grid_sample(flat, grid[None], mode="bilinear", padding_mode="border", align_corners=False)
        return _round_into(out.reshape(*lead, *n_out), x.dtype), valid

    def apply_box_map(self, x: torch.Tensor, stride: int = BOX_STRIDE, out_stride: Optional[int] = None,
                      out_size: Optional[Sequence[int]] = None, unit: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
        """YOLC's box maps (..., 4, h, w) at `stride` (cell (x, y) holds dx, dy, w/2, h/2 in cells times `unit`:
        box centre ((x + dx) s, (y + dy) s), half sizes (w/2 s, h/2 s) in pixels, as decode_xywh_to_bbox reads
        it; unit is 2^-6 for the cache's int16 fixed point) -> (maps at out_stride over the output frame, valid).

        Each destination cell takes the source cell at its centre (nearest, exact where cells move onto cells:
        a box map cell holds one box, a blend of two cells' boxes would be neither), decodes it to a box in the
        source frame, moves the box by the transform and encodes it relative to the destination cell. Float64
        inside; integer maps round to nearest and clip to the dtype's symmetric range."""
        if x.shape[-3] != 4:
            raise ValueError(f"box maps have 4 channels (dx, dy, w/2, h/2) at dim -3, got {tuple(x.shape)}")
        out_stride = stride if out_stride is None else out_stride
        n_out = self._map_size(out_size, out_stride)
        (_, _, iy), (_, _, ix) = self._cells(stride, out_stride, n_out)
        src, oky, okx = _gather(x, iy, ix)
        (ax, bx), (ay, by) = self.affine()
        dev = x.device
        # per axis, in units: moved = k * stored + offset(destination cell), with k the axis' scale in cells and
        # offset the source cell's position moved into the destination cell's frame (one multiply-add per value)
        moved = src.to(torch.float64)
        for ch, a, b, cells, n in ((0, ax, bx, ix, n_out[1]), (1, ay, by, iy, n_out[0])):
            k = float(a) * stride / out_stride
            offset = ((float(a) * stride * cells.to(dev, torch.float64) + float(b)) / out_stride
                      - torch.arange(n, device=dev, dtype=torch.float64)) / unit
            moved[..., ch, :, :].mul_(k).add_(offset[None, :] if ch == 0 else offset[:, None])
            moved[..., ch + 2, :, :].mul_(abs(k))
        out = _round_into(moved, x.dtype)
        out[..., ~oky.to(dev), :] = 0  # no source cell: 0, as apply_map
        out[..., ~okx.to(dev)] = 0
        return out, self._valid(out_stride, n_out, oky, okx, dev)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> Dict[str, Any]:
        return dict(view_version=VIEW_VERSION, steps=[s.to_dict() for s in self.steps])

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ViewTransform":
        if not isinstance(d, Mapping) or not isinstance(d.get("steps"), list):
            raise UserError(f"not a view transform (a dict with 'steps'): {str(d)[:120]}")
        if d.get("view_version", VIEW_VERSION) != VIEW_VERSION:
            raise UserError(f"view transform version {d.get('view_version')}, this package reads {VIEW_VERSION}")
        return cls(tuple(step_from_dict(s) for s in d["steps"]))
