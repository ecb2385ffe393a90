"""Training views aligned with an image-level cache's rows: each view is a window of the image at one of the
cached scales, its offset from the row on the teacher's grid, so the view's pixels are the row's pixels and the
row's targets move into it cell for cell (data/view.py moves_cells) instead of being resampled.

Why: the teacher's output depends on where its input sits against its stride grid (a shift of 1-2 px changes its
heatmap as much as moving a cached row into an arbitrary view does; a shift by a multiple of 8 px changes nothing,
BENCHMARKS.md). A view drawn freely sits at an arbitrary sub-grid offset and scale from the cached row.

The draw is TrainAugment's (same key, same order: photometric, crop ratio and centre, flip); the geometry then
snaps: the scale to the cached scale nearest the crop's (nw / cw), the window's origin in the scaled image to a
multiple of `grid`, and the window is the network input's size. Photometric distortion, the crop's fill colour,
the box rule (centres inside the window) and the flip are the pipeline's."""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .augment import (AUGMENT_VERSION, AugmentConfig, AugmentedSample, TrainAugment, _img_norm_cfg, _normalise,
                      _to_uint8, fingerprint_uint8, make_rng)
from .augment_config import rescale_size
from .photometric import apply_photometric, draw_photometric
from .view import ViewTransform
from .view_steps import CropPaste, HFlip, Resize, fill_rgb, scaled_hw

DEFAULT_GRID = 8  # px of the scaled image: the teacher's output repeats under shifts by multiples of 8 (measured)


class AlignedViews(TrainAugment):
    """TrainAugment whose views are windows of the image at the cached scales, on the teacher's grid.

    Args:
        cfg: the augmentation settings.
        scales: the image-level cache's scales (Layout.scales).
        grid: the window origin's step in scaled-image pixels.
        mirrored_rows: the cache also holds the mirrored images (Layout.mirrored): a mirrored view's window is
            then on the grid of the mirrored row (its origin = the scaled width minus the input width, modulo
            grid), so that row moves into it cell for cell too.
    """

    def __init__(self, cfg: Optional[AugmentConfig], scales: Sequence[float], grid: int = DEFAULT_GRID,
                 mirrored_rows: bool = False):
        super().__init__(cfg)
        self.scales = tuple(float(s) for s in scales)
        self.grid = int(grid)
        self.mirrored_rows = bool(mirrored_rows)

    def _nearest(self, scale: float) -> float:
        return min(self.scales, key=lambda s: (abs(math.log(s) - math.log(scale)), s))

    def __call__(self, img: np.ndarray, boxes, labels, key) -> AugmentedSample:
        cfg = self.cfg
        img, boxes, labels = self.checked(img, boxes, labels)
        rng = make_rng(key)
        h, w = img.shape[:2]
        photo = draw_photometric(rng, cfg.brightness_delta, cfg.contrast_range, cfg.saturation_range,
                                 cfg.hue_delta) if cfg.photometric else None
        crop = self._draw_crop(rng, h, w, boxes) if cfg.center_crop else None
        flipped = bool(rng.random() < cfg.flip_ratio)
        ch, cw = crop["crop_hw"] if crop is not None else (h, w)
        nw, _ = rescale_size(cw, ch, cfg.img_scale, cfg.keep_ratio)
        scale = self._nearest(nw / cw)
        sh, sw = scaled_hw((h, w), scale)  # the cached row's size
        H, W = self.input_h, self.input_w
        cx, cy = crop["center_xy"] if crop is not None else (w / 2, h / 2)
        # window origin in the scaled image: on the row's grid (a mirrored row's grid runs from the right edge)
        phase = (sw - W) % self.grid if flipped and self.mirrored_rows else 0
        x0 = self.grid * math.floor((cx * sw / w - W / 2 - phase) / self.grid + 0.5) + phase
        y0 = self.grid * math.floor((cy * sh / h - H / 2) / self.grid + 0.5)
        src = (max(0, x0), max(0, y0), min(sw, x0 + W), min(sh, y0 + H))
        if src[2] <= src[0] or src[3] <= src[1]:  # the window misses the image: centre it instead
            x0 = ((sw - W) // 2 - phase) // self.grid * self.grid + phase
            y0 = (sh - H) // 2 // self.grid * self.grid
            src = (max(0, x0), max(0, y0), min(sw, x0 + W), min(sh, y0 + H))
        window = CropPaste((sh, sw), src, (src[0] - x0, src[1] - y0), (H, W), fill_rgb(cfg.crop_mean, cfg.crop_to_rgb),
                           keep_centres=True)
        steps = [Resize((h, w), (sh, sw)), window] + ([HFlip((H, W))] if flipped else [])
        view = ViewTransform(tuple(steps))
        scaled = steps[0].apply_image(img) if (sh, sw) != (h, w) else img
        scaled = np.clip(np.rint(scaled), 0, 255).astype(np.uint8) if scaled.dtype != np.uint8 else scaled
        region = window.cut(scaled)
        region = apply_photometric(region, photo) if photo is not None else region.astype(np.float32)
        work = window.paste(region)
        if flipped:
            work = steps[-1].apply_image(work)
        keep = view.box_keep(boxes)
        boxes, labels = view.apply_boxes(boxes[keep]), labels[keep]
        img_u8 = _to_uint8(work)
        norm = _normalise(img_u8, cfg.mean, cfg.std, cfg.to_rgb)
        tensor = torch.from_numpy(np.ascontiguousarray(norm.transpose(2, 0, 1)))
        params: dict[str, Any] = {"augment_version": AUGMENT_VERSION, "key": [int(k) for k in key], "ori_hw": [h, w],
                                  "photometric": photo, "crop": crop, "flipped": flipped, "input_hw": [H, W],
                                  "aligned": {"scale": scale, "scaled_hw": [sh, sw], "window_xy": [x0, y0],
                                              "grid": self.grid}}
        meta = {"ori_shape": (h, w, 3), "img_shape": (H, W, 3), "pad_shape": (H, W, 3), "batch_input_shape": (H, W),
                "scale_factor": np.array([sw / w, sh / h, sw / w, sh / h], dtype=np.float32),
                "keep_ratio": cfg.keep_ratio, "flip": flipped, "flip_direction": "horizontal" if flipped else None,
                "border": np.zeros(4, dtype=np.float32), "img_norm_cfg": _img_norm_cfg(cfg)}
        return AugmentedSample(img=tensor, img_uint8=img_u8,
                               boxes=np.ascontiguousarray(boxes, dtype=np.float32).reshape(-1, 4),
                               labels=np.ascontiguousarray(labels, dtype=np.int64), params=params,
                               fingerprint=fingerprint_uint8(img_u8, H, W), meta=meta, view=view)
