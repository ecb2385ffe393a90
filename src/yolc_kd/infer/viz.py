"""Detection overlays and loss-curve plots drawn with PIL only (no matplotlib).

``draw_detections`` layers, bottom to top: image, heatmap (max over classes, resized,
alpha proportional to heat so cold regions stay untouched), crop regions (dashed white
rectangles on a dark outline with their index), final boxes coloured by class with a
``name score`` tag.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from yolc_kd.data.images import display_path
from yolc_kd.diskio import atomic_write
from yolc_kd.errors import UserError

PathLike = Union[str, "os.PathLike[str]"]
Color = Tuple[int, int, int]

# distinct colours (no white: crop regions are white); class k uses PALETTE[k % len(PALETTE)]
PALETTE: Tuple[Color, ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40),
)
CROP_COLOR: Color = (255, 255, 255)
# jet-like colour map control points (value, rgb)
_CMAP_X = np.array([0.0, 0.125, 0.375, 0.625, 0.875, 1.0])
_CMAP_RGB = np.array([[0, 0, 128], [0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0], [128, 0, 0]], float)


def class_color(label: int) -> Color:
    return PALETTE[int(label) % len(PALETTE)]


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1
    except TypeError:
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: Any) -> Tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return int(right - left), int(bottom - top)


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to uint8 RGB (jet-like)."""
    v = np.clip(values, 0.0, 1.0)
    rgb = np.stack([np.interp(v, _CMAP_X, _CMAP_RGB[:, c]) for c in range(3)], axis=-1)
    return rgb.round().astype(np.uint8)


def _overlay_heatmap(img: np.ndarray, heatmap: Any, max_alpha: float = 0.6) -> np.ndarray:
    hm = _np(heatmap).astype(np.float32)
    if hm.ndim == 3:
        hm = hm.max(axis=0)
    if hm.ndim != 2 or hm.size == 0:
        raise ValueError(f"heatmap must be (C,H,W) or (H,W), got shape {hm.shape}")
    hm = np.clip(np.nan_to_num(hm, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    h, w = img.shape[:2]
    if hm.shape != (h, w):
        hm = np.asarray(Image.fromarray(hm.astype(np.float32)).resize((w, h), Image.BILINEAR), np.float32)
        hm = np.clip(hm, 0.0, 1.0)
    alpha = (max_alpha * hm)[..., None]
    out = img.astype(np.float32) * (1.0 - alpha) + colormap(hm).astype(np.float32) * alpha
    return out.round().clip(0, 255).astype(np.uint8)


def _dashed_line(draw: ImageDraw.ImageDraw, p0: Tuple[float, float], p1: Tuple[float, float],
                 color: Color, width: int, dash: int) -> None:
    (x0, y0), (x1, y1) = p0, p1
    length = math.hypot(x1 - x0, y1 - y0)
    if length == 0:
        return
    step = 2 * dash
    for s in np.arange(0.0, length, step):
        e = min(s + dash, length)
        draw.line([(x0 + (x1 - x0) * s / length, y0 + (y1 - y0) * s / length),
                   (x0 + (x1 - x0) * e / length, y0 + (y1 - y0) * e / length)], fill=color, width=width)


def _tag(draw: ImageDraw.ImageDraw, xy: Tuple[float, float], text: str, font: Any, bg: Color,
         img_size: Tuple[int, int], above: bool = True) -> None:
    """Text on a filled background, just above (or inside) the point, kept inside the image."""
    tw, th = _text_size(draw, text, font)
    pad = 2
    W, H = img_size
    x = min(max(0, int(xy[0])), max(0, W - tw - 2 * pad))
    y = int(xy[1]) - th - 2 * pad if above else int(xy[1])
    y = min(max(0, y), max(0, H - th - 2 * pad))
    draw.rectangle([x, y, x + tw + 2 * pad, y + th + 2 * pad], fill=bg)
    fg = (0, 0, 0) if sum(bg) > 382 else (255, 255, 255)
    left, top, _, _ = draw.textbbox((0, 0), text, font=font)
    draw.text((x + pad - left, y + pad - top), text, fill=fg, font=font)


def draw_detections(img: np.ndarray, boxes: Any, labels: Any, scores: Any,
                    class_names: Optional[Sequence[str]] = None, crop_regions: Any = None,
                    heatmap: Any = None, score_thr: float = 0.3) -> Image.Image:
    """Render detections on an (H,W,3) uint8 image; boxes are xyxy, crop_regions [x,y,w,h], both in its pixels."""
    arr = _np(img)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"img must be (H,W,3), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    H, W = arr.shape[:2]
    if heatmap is not None:
        arr = _overlay_heatmap(arr, heatmap)
    pil = Image.fromarray(np.ascontiguousarray(arr))
    draw = ImageDraw.Draw(pil)
    side = min(H, W)
    font = _font(int(np.clip(side / 45, 10, 22)))
    box_w = max(1, int(round(max(H, W) / 500)))
    crop_w = max(2, 2 * box_w)

    if crop_regions is not None:
        crops = _np(crop_regions).reshape(-1, 4).astype(float)
        for i, (x, y, w, h) in enumerate(crops):
            if w < 1 or h < 1:
                continue  # an empty region has nothing to outline
            x0, y0, x1, y1 = x, y, x + w - 1, y + h - 1
            corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
            draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0), width=crop_w + 2)
            for a, b in zip(corners, corners[1:] + corners[:1]):
                _dashed_line(draw, a, b, CROP_COLOR, crop_w, dash=max(6, 4 * crop_w))
            _tag(draw, (x0 + crop_w, y0 + crop_w), f"crop {i}", font, (40, 40, 40), (W, H), above=False)

    b = _np(boxes).reshape(-1, 4).astype(float)
    lab = _np(labels).reshape(-1).astype(int)
    sc = _np(scores).reshape(-1).astype(float)
    if not (len(b) == len(lab) == len(sc)):
        raise ValueError(f"boxes/labels/scores lengths differ: {len(b)}/{len(lab)}/{len(sc)}")
    for i in np.argsort(sc, kind="stable"):  # highest score drawn last (on top)
        if sc[i] < score_thr:
            continue
        color = class_color(lab[i])
        x0, y0, x1, y1 = b[i]
        if x1 < x0 or y1 < y0:
            continue
        draw.rectangle([x0, y0, x1, y1], outline=color, width=box_w)
        name = class_names[lab[i]] if class_names is not None and 0 <= lab[i] < len(class_names) \
            else f"cls{lab[i]}"
        _tag(draw, (x0, y0), f"{name} {sc[i]:.2f}", font, color, (W, H), above=True)
    return pil


def save_detections(path: PathLike, img: np.ndarray, boxes: Any, labels: Any, scores: Any,
                    class_names: Optional[Sequence[str]] = None, crop_regions: Any = None,
                    heatmap: Any = None, score_thr: float = 0.3) -> Path:
    """``draw_detections`` then save (format from the extension); returns the path."""
    out = Path(path)
    fmt = Image.registered_extensions().get(out.suffix.lower())
    if fmt is None:
        raise UserError(f"cannot save image {display_path(out)}: unknown file extension {out.suffix!r}")
    pil = draw_detections(img, boxes, labels, scores, class_names, crop_regions, heatmap, score_thr)
    try:
        with atomic_write(out) as fh:
            pil.save(fh, format=fmt)
    except (ValueError, KeyError) as exc:  # PIL's refusals (no writer for the format, options it rejects)
        raise UserError(f"cannot save image {display_path(out)}: {exc}") from None
    return out


# ----------------------------------------------------------------------------- loss curves

def _read_jsonl(path: Path) -> List[Dict[str, Any]]:
    if not path.is_file():
        raise UserError(f"metrics file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read metrics file {path}: {exc}") from None
    records: List[Dict[str, Any]] = []
    nonblank = [(n, s) for n, s in enumerate(lines, 1) if s.strip()]
    for j, (n, s) in enumerate(nonblank):
        try:
            rec = json.loads(s)
        except json.JSONDecodeError:
            if j == len(nonblank) - 1:
                break  # last line may still be being written by a running training
            raise UserError(f"invalid JSON on line {n} of {path}") from None
        if isinstance(rec, dict):
            records.append(rec)
    return records


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _nice_ticks(lo: float, hi: float, n: int = 6) -> List[float]:
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(1, n - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], start
    while t <= hi + 1e-9 * step:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _fmt_tick(v: float) -> str:
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.0e}"
    return f"{v:g}"


def plot_loss_curves(jsonl_paths: Dict[str, PathLike], out_png: PathLike,
                     keys: Optional[Sequence[str]] = None, size: Tuple[int, int] = (1000, 560),
                     log_y: Optional[bool] = None, title: str = "training loss") -> Path:
    """Plot ``iter`` vs loss keys from JSON-lines files (label -> path) to a PNG.

    keys=None plots every numeric key whose name contains "loss". log_y=None picks a log
    axis when all values are positive and span more than 50x.
    """
    series: List[Tuple[str, np.ndarray, np.ndarray]] = []
    for run_name, p in jsonl_paths.items():
        recs = [r for r in _read_jsonl(Path(p)) if _num(r.get("iter"))]
        names = list(keys) if keys is not None else sorted(
            {k for r in recs for k, v in r.items() if "loss" in k and _num(v)})
        for k in names:
            pts = [(float(r["iter"]), float(r[k])) for r in recs if _num(r.get(k))]
            if not pts:
                continue
            pts.sort(key=lambda t: t[0])
            label = k if len(jsonl_paths) == 1 else (run_name if len(names) == 1 else f"{run_name}: {k}")
            series.append((label, np.array([t[0] for t in pts]), np.array([t[1] for t in pts])))
    if not series:
        wanted = ", ".join(keys) if keys else "*loss*"
        raise UserError(f"no '{wanted}' values with an 'iter' found in {', '.join(map(str, jsonl_paths.values()))}")

    xs = np.concatenate([s[1] for s in series])
    ys = np.concatenate([s[2] for s in series])
    if log_y is None:
        log_y = bool(ys.min() > 0 and ys.max() / ys.min() > 50)
    elif log_y and ys.min() <= 0:
        log_y = False
    fy = np.log10 if log_y else (lambda v: v)

    W, H = size
    img = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = _font(13)
    legend_w = min(260, max(120, max(_text_size(draw, s[0], font)[0] for s in series) + 40))
    L, R, T, B = 70, W - legend_w - 20, 36, H - 50  # plot area
    x_lo, x_hi = float(xs.min()), float(xs.max())
    if x_hi <= x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    y_lo, y_hi = float(fy(ys.min())), float(fy(ys.max()))
    pad = (y_hi - y_lo) * 0.05 or (abs(y_hi) * 0.1 or 1.0)
    y_lo, y_hi = y_lo - pad, y_hi + pad
    if not log_y and ys.min() >= 0:
        y_lo = max(y_lo, 0.0)

    def px(x: float) -> float:
        return L + (x - x_lo) / (x_hi - x_lo) * (R - L)

    def py(y: float) -> float:
        return B - (y - y_lo) / (y_hi - y_lo) * (B - T)

    # grid + ticks
    grid, axis = (225, 225, 225), (60, 60, 60)
    for t in _nice_ticks(x_lo, x_hi):
        if x_lo <= t <= x_hi:
            draw.line([(px(t), T), (px(t), B)], fill=grid)
            draw.line([(px(t), B), (px(t), B + 5)], fill=axis)
            s = _fmt_tick(t)
            draw.text((px(t) - _text_size(draw, s, font)[0] / 2, B + 8), s, fill=axis, font=font)
    if log_y:
        yt = [float(e) for e in range(math.floor(y_lo), math.ceil(y_hi) + 1)]
        if len([t for t in yt if y_lo <= t <= y_hi]) < 3:
            yt = sorted({math.log10(m * 10 ** e) for e in range(math.floor(y_lo), math.ceil(y_hi) + 1)
                         for m in (1, 2, 5)})
        y_labels = [(t, _fmt_tick(10 ** t)) for t in yt]
    else:
        y_labels = [(t, _fmt_tick(t)) for t in _nice_ticks(y_lo, y_hi)]
    for t, s in y_labels:
        if y_lo <= t <= y_hi:
            draw.line([(L, py(t)), (R, py(t))], fill=grid)
            draw.line([(L - 5, py(t)), (L, py(t))], fill=axis)
            tw, th = _text_size(draw, s, font)
            draw.text((L - 8 - tw, py(t) - th / 2 - 2), s, fill=axis, font=font)
    draw.rectangle([L, T, R, B], outline=axis, width=1)

    # curves (subsampled to a few points per pixel column)
    for i, (_, x, y) in enumerate(series):
        stride = max(1, len(x) // (4 * (R - L)))
        pts = [(px(a), py(float(fy(b)))) for a, b in zip(x[::stride], y[::stride])]
        color = PALETTE[i % len(PALETTE)]
        if len(pts) == 1:
            cx, cy = pts[0]
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=color)
        else:
            draw.line(pts, fill=color, width=2, joint="curve")

    # labels, title, legend
    draw.text(((L + R) / 2 - _text_size(draw, "iter", font)[0] / 2, B + 28), "iter", fill=axis, font=font)
    ylab = "loss (log)" if log_y else "loss"
    draw.text((8, T - 24), ylab, fill=axis, font=font)
    draw.text(((L + R) / 2 - _text_size(draw, title, font)[0] / 2, 10), title, fill=(0, 0, 0), font=font)
    lx, ly = R + 16, T
    for i, (label, _, _) in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        y = ly + i * 22
        if y > B:
            draw.text((lx, y), f"... +{len(series) - i} more", fill=axis, font=font)
            break
        draw.line([(lx, y + 8), (lx + 24, y + 8)], fill=color, width=4)
        draw.text((lx + 32, y), label, fill=(0, 0, 0), font=font)

    out = Path(out_png)
    with atomic_write(out) as fh:
        img.save(fh, format="PNG")
    return out
