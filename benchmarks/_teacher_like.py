"""Teacher-like soft labels for the cache benchmark: real VisDrone box layouts (or synthetic clusters),
heatmaps with a teacher's blobs, confusions and false positives, and smooth raw box maps with jitter."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

# VisDrone's 2-category layout file (human / vehicle) -> the 10 VisDrone classes, roughly by frequency
SUBCLASSES = {"human": ([0, 1], [0.55, 0.45]),
              "vehicle": ([3, 9, 4, 2, 5, 6, 8, 7], [0.55, 0.15, 0.10, 0.05, 0.05, 0.04, 0.03, 0.03])}
CONFUSED = {0: 1, 1: 0, 2: 9, 9: 2, 3: 4, 4: 3, 5: 8, 8: 5, 6: 7, 7: 6}  # the class a teacher hesitates with


def read_layouts(path: Path, rng: np.random.Generator) -> Tuple[str, List[Dict[str, Any]]]:
    """[{width, height, boxes (n,4) xyxy, labels (n,) in 0..9}] from the VisDrone file, else synthetic clusters."""
    out = []
    if path.is_file():
        d = json.loads(path.read_text())
        names = {c["id"]: c["name"] for c in d["categories"]}
        by_img: Dict[Any, list] = {}
        for a in d["annotations"]:
            by_img.setdefault(a["image_id"], []).append(a)
        for im in d["images"]:
            anns = [a for a in by_img.get(im["id"], []) if a["bbox"][2] > 1 and a["bbox"][3] > 1]
            boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], np.float32).reshape(-1, 4)
            labels = []
            for a in anns:
                choices, p = SUBCLASSES.get(names.get(a["category_id"], "vehicle"), SUBCLASSES["vehicle"])
                labels.append(int(rng.choice(choices, p=np.array(p) / np.sum(p))))
            out.append(dict(width=int(im["width"]), height=int(im["height"]), boxes=boxes,
                            labels=np.array(labels, np.int64)))
        return f"visdrone:{path.name}", out
    for _ in range(50):  # fallback: clustered tiny objects on a 1360x765 frame
        w, h, boxes = 1360, 765, []
        for _ in range(int(rng.integers(3, 9))):
            c = rng.uniform((0, 0), (w, h))
            for _ in range(int(rng.integers(10, 40))):
                xy = c + rng.normal(0, 60, 2)
                s = np.exp(rng.uniform(np.log(6), np.log(48), 2))
                boxes.append([xy[0] - s[0] / 2, xy[1] - s[1] / 2, xy[0] + s[0] / 2, xy[1] + s[1] / 2])
        b = np.clip(np.array(boxes, np.float32), 0, [w - 1, h - 1, w - 1, h - 1])
        keep = (b[:, 2] - b[:, 0] > 1) & (b[:, 3] - b[:, 1] > 1)
        out.append(dict(width=w, height=h, boxes=b[keep], labels=rng.integers(0, 10, int(keep.sum()))))
    return "synthetic-clusters", out


def paste_peak(hm: np.ndarray, cx: float, cy: float, sigma: float, peak: float) -> None:
    """Max-paste peak * exp(-d^2 / 2 sigma^2), out to where it drops below 1/255 (a network's blob has no edge)."""
    h, w = hm.shape
    r = int(math.ceil(sigma * math.sqrt(2 * math.log(max(255 * peak, 1.0001))))) + 1
    x0, x1, y0, y1 = max(0, int(cx) - r), min(w, int(cx) + r + 1), max(0, int(cy) - r), min(h, int(cy) + r + 1)
    if x0 >= x1 or y0 >= y1:
        return
    xs = (np.arange(x0, x1, dtype=np.float32) - np.float32(cx)) ** 2
    ys = (np.arange(y0, y1, dtype=np.float32) - np.float32(cy)) ** 2
    k = np.float32(peak) * np.exp(-(ys[:, None] + xs[None, :]) / np.float32(2 * sigma * sigma))
    np.maximum(hm[y0:y1, x0:x1], k, out=hm[y0:y1, x0:x1])


def render_heatmap(boxes: np.ndarray, labels: np.ndarray, c: int, hw: Tuple[int, int],
                   rng: np.random.Generator) -> Tuple[np.ndarray, int]:
    """(C,H,W) teacher-like class probabilities: background noise < 1/255, a Gaussian per object (radius from
    the box as in the project's targets, sigma = diameter/6, peak 0.3..0.95), a weaker peak in a confusable class
    for half of them, and faint false positives (10 % of the object count)."""
    from yolc_kd.models.targets import gaussian_radius

    h, w = hw
    hm = rng.random((c, h, w), dtype=np.float32) * np.float32(0.95 / 255)
    for (x0, y0, x1, y1), lab in zip(boxes.tolist(), labels.tolist()):
        bw, bh = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
        cx, cy = (x0 + x1) / 2 + rng.normal(0, 0.5), (y0 + y1) / 2 + rng.normal(0, 0.5)
        sigma = max(0.8, (2 * max(0, int(gaussian_radius([bh, bw], min_overlap=0.3))) + 1) / 6)
        paste_peak(hm[lab], cx, cy, sigma, rng.uniform(0.3, 0.95))
        if rng.random() < 0.5:
            paste_peak(hm[CONFUSED.get(lab, lab) % c], cx, cy, sigma * 1.2, rng.uniform(0.02, 0.25))
    n_fp = max(1, len(boxes) // 10)
    for _ in range(n_fp):
        paste_peak(hm[int(rng.integers(c))], rng.uniform(0, w), rng.uniform(0, h), rng.uniform(1, 3),
                   rng.uniform(0.02, 0.2))
    return hm, len(boxes)


def smooth_maps(rng: np.random.Generator, n: int, hw: Tuple[int, int], noise: float) -> np.ndarray:
    """(n,4,h,w) raw xywh maps: offsets in [-1,1] and half sizes 1..8 varying smoothly over space (a field on a
    ~16-cell lattice, bicubic), plus `noise` relative high-frequency jitter as a real network's outputs have."""
    h, w = hw
    low = torch.from_numpy(rng.normal(size=(n, 4, h // 16 + 2, w // 16 + 2)).astype(np.float32))
    f = F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False).numpy()
    jitter = rng.normal(size=f.shape).astype(np.float32)
    out = np.empty_like(f)
    out[:, :2] = np.clip(0.6 * np.tanh(f[:, :2]) + noise * jitter[:, :2], -1, 1)
    size = np.exp(np.log(1.0) + (np.log(8.0) - np.log(1.0)) / (1 + np.exp(-1.5 * f[:, 2:])))
    out[:, 2:] = size * (1 + noise * jitter[:, 2:])
    return out


def coarse_with_objects(rng, boxes: np.ndarray, hw: Tuple[int, int], stride: int, noise: float) -> np.ndarray:
    """Smooth coarse maps with the objects' exact offsets and half sizes (grid cells) at their centre cells."""
    m = smooth_maps(rng, 1, hw, noise)[0]
    h, w = hw
    for x0, y0, x1, y1 in boxes.tolist():
        cx, cy = (x0 + x1) / 2 / stride, (y0 + y1) / 2 / stride
        i, j = int(cy), int(cx)
        if 0 <= i < h and 0 <= j < w:
            m[:, i, j] = (cx - j, cy - i, (x1 - x0) / stride / 2, (y1 - y0) / stride / 2)
    return m
