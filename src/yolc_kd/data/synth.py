"""Synthetic aerial scenes: textured fields, roads, parking lots and clustered tiny objects (4..32 px).

Each class has its own shape and colour. Image i is drawn from np.random.default_rng([seed, i]), so
the same seed gives byte-identical PNGs and json, and image i does not depend on num_images.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from PIL import Image

from yolc_kd.data.images import PathLike, display_path
from yolc_kd.data.visdrone import VISDRONE_CLASSES, write_json
from yolc_kd.diskio import atomic_write
from yolc_kd.errors import UserError
from yolc_kd.progress import progress_bar

MIN_SIZE, MAX_SIZE = 4, 32
MAX_CLASSES = 10
Rng = np.random.Generator
ShapeFn = Callable[[np.ndarray, np.ndarray, float], np.ndarray]
Layout = tuple[int, int, np.ndarray]  # source width, height, (N, 4) xyxy boxes
Objects = list[tuple[int, list[int]]]  # (label, [x0, y0, x1, y1])


def _thick(nominal: float, px: float, r: float) -> float:
    return min(1.0, max(nominal, px / max(r, 1e-3)))


# shape(u, v, r): u, v normalised to [-1, 1] (v points down), r = smaller half-size in pixels
SHAPES: tuple[ShapeFn, ...] = (
    lambda u, v, r: (np.abs(u) <= 1) & (np.abs(v) <= 1),  # filled square
    lambda u, v, r: u * u + v * v <= 1,  # circle
    lambda u, v, r: (v <= 1) & (np.abs(u) <= (v + 1) / 2),  # triangle
    lambda u, v, r: ((np.abs(u) <= _thick(0.3, 0.8, r)) & (np.abs(v) <= 1))
    | ((np.abs(v) <= _thick(0.3, 0.8, r)) & (np.abs(u) <= 1)),  # cross
    lambda u, v, r: (u * u + v * v <= 1) & (u * u + v * v >= (1 - 2 * _thick(0.22, 0.8, r)) ** 2),  # ring
    lambda u, v, r: np.abs(u) + np.abs(v) <= 1,  # diamond
    lambda u, v, r: (np.abs(u) <= 1) & (np.abs(v) <= _thick(0.4, 2.0, r)),  # bar
    lambda u, v, r: ((u <= -1 + 2 * _thick(0.3, 0.8, r)) & (np.abs(u) <= 1) & (np.abs(v) <= 1))
    | ((v >= 1 - 2 * _thick(0.3, 0.8, r)) & (np.abs(u) <= 1) & (np.abs(v) <= 1)),  # L-shape
    lambda u, v, r: ((v <= -1 + 2 * _thick(0.3, 0.8, r)) & (np.abs(u) <= 1) & (np.abs(v) <= 1))
    | ((np.abs(u) <= _thick(0.3, 0.8, r)) & (np.abs(v) <= 1)),  # T-shape
    lambda u, v, r: np.hypot(u, v) <= 0.4 + 0.6 * np.abs(np.cos(2.5 * np.arctan2(v, u))) ** 2,  # star
)
COLOURS = np.array([
    (255, 40, 40), (255, 225, 0), (40, 90, 255), (255, 0, 255), (0, 230, 230),
    (250, 250, 250), (255, 140, 0), (150, 60, 255), (120, 255, 60), (255, 120, 180),
], dtype=np.float32)
SIZE_FACTOR = (0.6, 0.7, 0.75, 1.0, 1.1, 1.35, 0.9, 0.95, 1.6, 0.7)  # loosely VisDrone-like relative sizes
FIELD_COLOURS = np.array([
    (78, 112, 58), (96, 128, 66), (62, 94, 50), (120, 140, 78), (142, 124, 92),
    (160, 146, 104), (110, 96, 72), (88, 104, 70),
], dtype=np.float32)


def default_class_names(num_classes: int) -> tuple[str, ...]:
    """The first num_classes VisDrone names, so configs for fewer classes keep YOLC's naming."""
    return tuple(VISDRONE_CLASSES[:num_classes])


def _background(rng: Rng, w: int, h: int) -> tuple[np.ndarray, list[tuple[float, float, float, float]]]:
    """Fields (Voronoi parcels with crop-row stripes and smooth noise) plus 1-3 roads with lane marks."""
    seeds = (rng.uniform(0, 1, (int(rng.integers(4, 10)), 2)) * (w, h)).astype(np.float32)
    ys, xs = np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32)
    parcel = np.argmin((xs[None, None, :] - seeds[:, 0, None, None]) ** 2
                       + (ys[None, :, None] - seeds[:, 1, None, None]) ** 2, 0)
    n = len(seeds)
    colours = FIELD_COLOURS[rng.integers(0, len(FIELD_COLOURS), n)] + rng.normal(0, 6, (n, 3)).astype(np.float32)
    angle, period = rng.uniform(0, math.pi, n), rng.uniform(3, 9, n)
    amp = rng.uniform(0, 9, n) * (rng.uniform(0, 1, n) < 0.7)
    phase = xs[None, :] * np.cos(angle)[parcel] + ys[:, None] * np.sin(angle)[parcel]
    stripes = (amp[parcel] * np.sin(phase * (2 * math.pi) / period[parcel])).astype(np.float32)
    noise_low = rng.normal(0, 12, (h // 32 + 2, w // 32 + 2)).astype(np.float32)
    smooth = np.asarray(Image.fromarray(noise_low).resize((w, h), Image.BILINEAR))
    img = colours[parcel] + (stripes + smooth)[:, :, None]
    roads = []
    for _ in range(int(rng.integers(1, 4))):
        theta = rng.uniform(0, math.pi) if rng.uniform() < 0.5 else rng.choice([0.0, math.pi / 2]) + rng.normal(0, 0.1)
        px, py, half = rng.uniform(0.15, 0.85) * w, rng.uniform(0.15, 0.85) * h, rng.uniform(5, 10)
        across = (xs[None, :] - px) * -math.sin(theta) + (ys[:, None] - py) * math.cos(theta)
        along = (xs[None, :] - px) * math.cos(theta) + (ys[:, None] - py) * math.sin(theta)
        grey = rng.uniform(92, 132)
        img[np.abs(across) <= half] = (grey, grey, grey * 1.02)
        img[(np.abs(across) <= half) & (np.abs(across) >= half - 1.2)] = grey + 28
        img[(np.abs(across) <= 0.8) & (np.mod(along, 14.0) < 6.0)] = (214, 212, 190)
        roads.append((px, py, theta, half))
    return img, roads


def _paint_lot(img: np.ndarray, cx: float, cy: float, theta: float, half_l: float, half_d: float,
               stall: float, grey: float) -> None:
    h, w = img.shape[:2]
    r = int(math.ceil(math.hypot(half_l, half_d))) + 1
    x0, x1, y0, y1 = max(0, int(cx) - r), min(w, int(cx) + r + 1), max(0, int(cy) - r), min(h, int(cy) + r + 1)
    if x1 <= x0 or y1 <= y0:
        return
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy
    along = dx * math.cos(theta) + dy * math.sin(theta)
    across = -dx * math.sin(theta) + dy * math.cos(theta)
    inside = (np.abs(along) <= half_l) & (np.abs(across) <= half_d)
    patch = img[y0:y1, x0:x1]
    patch[inside] = grey
    lines = inside & (np.abs(np.mod(along + half_l, stall) - stall / 2) >= stall / 2 - 0.6) & (np.abs(across) > 2)
    patch[lines] = grey + 80


def _draw_object(img: np.ndarray, occ: np.ndarray, rng: Rng, cls: int, cx: float, cy: float,
                 rx: float, ry: float, theta: float, max_overlap: float) -> Optional[list[int]]:
    """Draw one object if it fits (box sides 4..32 px, inside the image, little overlap); return its xyxy box."""
    h, w = img.shape[:2]
    for _ in range(4):
        reach = int(math.ceil(max(rx, ry) * math.sqrt(2))) + 1
        ix, iy = int(math.floor(cx)), int(math.floor(cy))
        x0, y0 = ix - reach, iy - reach
        dx = np.arange(x0, ix + reach + 1, dtype=np.float32)[None, :] + 0.5 - cx
        dy = np.arange(y0, iy + reach + 1, dtype=np.float32)[:, None] + 0.5 - cy
        u0, v0 = dx / rx, dy / ry
        c, s = math.cos(theta), math.sin(theta)
        mask = SHAPES[cls % len(SHAPES)](u0 * c + v0 * s, -u0 * s + v0 * c, min(rx, ry))
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        if rows.size == 0:
            return None
        bw, bh = int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)
        if max(bw, bh) > MAX_SIZE:
            rx, ry = rx * (MAX_SIZE - 0.5) / max(bw, bh), ry * (MAX_SIZE - 0.5) / max(bw, bh)
            continue
        if min(bw, bh) < MIN_SIZE:
            grow = (MIN_SIZE + 0.5) / min(bw, bh)
            rx, ry = rx * grow, ry * grow
            continue
        break
    else:
        return None
    bx0, by0 = x0 + int(cols[0]), y0 + int(rows[0])
    bx1, by1 = bx0 + bw, by0 + bh
    if bx0 < 0 or by0 < 0 or bx1 > w or by1 > h:
        return None
    near = occ[max(0, by0 - 1):by1 + 1, max(0, bx0 - 1):bx1 + 1]
    if near.any() and (max_overlap <= 0 or occ[by0:by1, bx0:bx1].mean() > max_overlap):
        return None
    sub = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    colour = np.clip(COLOURS[cls % len(COLOURS)] * rng.uniform(0.78, 1.1) + rng.normal(0, 8, 3), 0, 255)
    img[by0:by1, bx0:bx1][sub] = colour
    occ[by0:by1, bx0:bx1] |= sub
    return [bx0, by0, bx1, by1]


def _random_objects(rng: Rng, img: np.ndarray, roads: list, num_classes: int) -> Objects:
    h, w = img.shape[:2]
    occ = np.zeros((h, w), dtype=bool)
    base = rng.uniform(7, 15)
    n_total = int(rng.integers(20, 80))
    n_clusters = int(rng.integers(1, 4))
    n_clustered = int(round(n_total * rng.uniform(0.7, 0.9)))
    counts = rng.multinomial(n_clustered, rng.dirichlet(np.full(n_clusters, 2.0)))
    samplers: list[tuple[int, Callable[[], tuple[float, float, float]]]] = []
    for count in counts:
        kind = rng.choice(["road", "lot", "free"], p=[0.4, 0.3, 0.3])
        spread = base * rng.uniform(0.9, 1.4) * math.sqrt(max(int(count), 1))
        if kind == "free" or not roads:
            cx, cy = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h
            sig, head = spread * 0.6, rng.uniform(0, 2 * math.pi)
            samplers.append((int(count), lambda cx=cx, cy=cy, sig=sig, head=head: (
                rng.normal(cx, sig), rng.normal(cy, sig), head + rng.normal(0, 0.6))))
            continue
        px, py, theta, half = roads[int(rng.integers(len(roads)))]
        t = rng.uniform(-0.3, 0.3) * max(w, h)
        cx, cy = px + t * math.cos(theta), py + t * math.sin(theta)
        nx, ny = -math.sin(theta), math.cos(theta)
        if kind == "lot":
            half_d = rng.uniform(1.2, 2.2) * base
            half_l = max(2 * base, spread * 0.9)
            side = rng.choice([-1.0, 1.0]) * (half + half_d + 2)
            cx, cy = cx + side * nx, cy + side * ny
            _paint_lot(img, cx, cy, theta, half_l, half_d, base * 1.5, rng.uniform(70, 100))
            along_sig, across_sig, head = half_l * 0.5, half_d * 0.5, theta + math.pi / 2
        else:
            along_sig, across_sig, head = spread * 1.2, half * 0.45, theta
        samplers.append((int(count), lambda cx=cx, cy=cy, a=along_sig, b=across_sig, th=theta, hd=head: (
            *_offset(rng, cx, cy, a, b, th), hd + rng.choice([0.0, math.pi]) + rng.normal(0, 0.08))))
    scattered = n_total - n_clustered
    samplers.append((scattered, lambda: (rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0, 2 * math.pi))))
    objects = []
    for count, sample in samplers:
        for _ in range(count):
            cls = int(rng.integers(num_classes))
            size = base * SIZE_FACTOR[cls % len(SIZE_FACTOR)] * rng.uniform(0.8, 1.25)
            size = float(np.clip(size, MIN_SIZE, MAX_SIZE))
            for _attempt in range(4):
                cx, cy, head = sample()
                box = _draw_object(img, occ, rng, cls, cx, cy, size / 2, size / 2, head, 0.0)
                if box is not None:
                    objects.append((cls, box))
                    break
    return objects


def _offset(rng: Rng, cx: float, cy: float, along_sig: float, across_sig: float, theta: float) -> tuple[float, float]:
    a, b = rng.normal(0, along_sig), rng.normal(0, across_sig)
    return cx + a * math.cos(theta) - b * math.sin(theta), cy + a * math.sin(theta) + b * math.cos(theta)


def _layout_objects(rng: Rng, img: np.ndarray, layout: Layout, num_classes: int) -> Objects:
    h, w = img.shape[:2]
    occ = np.zeros((h, w), dtype=bool)
    src_w, src_h, boxes = layout
    objects = []
    for x0, y0, x1, y1 in boxes.tolist():
        bw = min(max((x1 - x0) * w / src_w, MIN_SIZE), MAX_SIZE)
        bh = min(max((y1 - y0) * h / src_h, MIN_SIZE), MAX_SIZE)
        cx = min(max((x0 + x1) / 2 * w / src_w, bw / 2), w - bw / 2)
        cy = min(max((y0 + y1) / 2 * h / src_h, bh / 2), h - bh / 2)
        cls = int(rng.integers(num_classes))
        box = _draw_object(img, occ, rng, cls, cx, cy, bw / 2, bh / 2, int(rng.integers(4)) * math.pi / 2, 0.5)
        if box is not None:
            objects.append((cls, box))
    return objects


def render_image(rng: Rng, size: tuple[int, int], num_classes: int,
                 layout: Optional[Layout] = None) -> tuple[np.ndarray, Objects]:
    """One synthetic image (H, W, 3) uint8 and its objects as (label, [x0, y0, x1, y1]) with integer pixels."""
    w, h = size
    img, roads = _background(rng, w, h)
    if layout is None:
        objects = _random_objects(rng, img, roads, num_classes)
    else:
        objects = _layout_objects(rng, img, layout, num_classes)
    img += rng.integers(-3, 4, (h, w, 1)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8), objects


def _read_layouts(path: PathLike) -> list[Layout]:
    from yolc_kd.data.coco import CocoDetection  # local: coco imports images only, keeps import graph flat

    path = Path(path)
    ds = CocoDetection(path, path.parent)
    if len(ds) == 0:
        raise UserError(f"layout file {display_path(path)} has no images")
    return [(ds.image_info(i)["width"], ds.image_info(i)["height"], ds.annotations(i)[0]) for i in range(len(ds))]


def make_synthetic_dataset(out_dir: PathLike, num_images: int, seed: int, size: tuple[int, int] = (512, 320),
                           num_classes: int = 10, layout_from: Optional[PathLike] = None,
                           class_names: Optional[Sequence[str]] = None, progress: bool = False) -> Path:
    """Write out_dir/images/NNNNNN.png and out_dir/annotations.json; return out_dir.

    file_name entries are relative to out_dir ("images/000000.png"), so the image root is out_dir:
    CocoDetection(out_dir / "annotations.json", out_dir).
    """
    if num_images < 1:
        raise UserError(f"--num-images must be at least 1, got {num_images}")
    if seed < 0:
        raise UserError(f"--seed must be a non-negative integer, got {seed}")
    if not 1 <= num_classes <= MAX_CLASSES:
        raise UserError(f"--classes must be between 1 and {MAX_CLASSES}, got {num_classes}")
    w, h = size
    if w < 2 * MAX_SIZE or h < 2 * MAX_SIZE:
        raise UserError(f"--size must be at least {2 * MAX_SIZE}x{2 * MAX_SIZE}, got {w}x{h}")
    names = tuple(class_names) if class_names is not None else default_class_names(num_classes)
    if len(names) != num_classes:
        raise UserError(f"{len(names)} class names given for {num_classes} classes")
    layouts = _read_layouts(layout_from) if layout_from is not None else None
    out = Path(out_dir)
    try:
        (out / "images").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {display_path(out / 'images')}: {exc.strerror}") from None
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for i in progress_bar(range(num_images), desc="synth", unit="img", disable=not progress):
        rng = np.random.default_rng([seed, i])
        layout = layouts[i % len(layouts)] if layouts else None
        pixels, objects = render_image(rng, (w, h), num_classes, layout)
        file_name = f"images/{i:06d}.png"
        with atomic_write(out / file_name) as fh:
            Image.fromarray(pixels).save(fh, format="PNG", compress_level=1)
        images.append({"id": i + 1, "file_name": file_name, "width": w, "height": h})
        for cls, (x0, y0, x1, y1) in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": cls + 1,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
    categories = [{"id": k + 1, "name": name, "supercategory": "object"} for k, name in enumerate(names)]
    info = {"description": "yolc-kd synthetic aerial dataset", "seed": seed, "num_classes": num_classes,
            "layout_from": None if layout_from is None else Path(layout_from).name}
    write_json({"info": info, "images": images, "annotations": annotations, "categories": categories},
               out / "annotations.json")
    return out
