"""The rows of the image-level cache: every training image at each cached scale, in its own frame (no crop, flip
or colour change), as the teacher sees it; and the scales themselves, which cover the range of scales the
training augmentation gives its views (a view's targets are moved from the nearest cached scale)."""
from __future__ import annotations

import json
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from yolc_kd.cache.image_view import row_frame
from yolc_kd.cache.arrays import IMAGE_MAP_TILE, STATUS_OK, STATUS_SKIPPED
from yolc_kd.cache.schema import padded
from yolc_kd.data.view_steps import scaled_hw
from yolc_kd.data.augment import AugmentConfig, fingerprint_image, normalise, rescale_size
from yolc_kd.data.coco import CocoDetection
from yolc_kd.errors import UserError

MAX_FORWARDS = 3  # --scales auto: teacher forwards per image (rows of an image: scales, twice with mirrored rows)


def view_scale_range(cfg: AugmentConfig, image_hws: Sequence[Tuple[int, int]]) -> Tuple[float, float]:
    """(smallest, largest) scale from an image to a training view: from the crop ratios (RandomCenterCropPad:
    a crop of ratio r is resized to the input, scale ~ 1/r), or from the images' sizes without a crop."""
    if cfg.center_crop:
        scales = []
        for ratio in cfg.ratios:
            ch, cw = cfg.crop_hw(ratio)
            nw, _ = rescale_size(cw, ch, cfg.img_scale, cfg.keep_ratio)
            scales.append(nw / cw)
    else:
        scales = [rescale_size(w, h, cfg.img_scale, cfg.keep_ratio)[0] / w for h, w in image_hws]
    if not scales:
        raise UserError("no training image to take the view scales from")
    return min(scales), max(scales)


def auto_scales(lo: float, hi: float, n: int = MAX_FORWARDS) -> Tuple[float, ...]:
    """n scales spread geometrically over [lo, hi], each in the middle of its share: every view scale is within
    a factor (hi/lo)^(1/2n) of a cached one. One scale when lo == hi."""
    if hi <= lo * (1 + 1e-9):
        return (round(lo, 4),)
    return tuple(round(lo * (hi / lo) ** ((2 * k + 1) / (2 * n)), 4) for k in range(n))


def parse_scales(text: str, lo: float, hi: float, mirrored: bool = False) -> Tuple[float, ...]:
    """--scales: 'auto' (as many as MAX_FORWARDS rows per image allow: 3, or 1 with mirrored rows), a count, or
    comma-separated scales; sorted, each > 0."""
    text = str(text).strip().lower()
    if text == "auto":
        return auto_scales(lo, hi, max(1, MAX_FORWARDS // (2 if mirrored else 1)))
    try:
        if "," not in text and "." not in text:
            n = int(text)
            if not 1 <= n <= 8:
                raise UserError(f"--scales: a count must be 1..8, got {n}")
            return auto_scales(lo, hi, n)
        values = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise UserError(f"--scales must be auto, a count or scales such as 0.9,1.1, got {text!r}") from None
    if not values or values[0] <= 0 or values[-1] > 8:
        raise UserError(f"--scales must be between 0 and 8, got {text!r}")
    return tuple(values)


def canvas_hw(image_hws: Sequence[Tuple[int, int]], scales: Sequence[float]) -> Tuple[int, int]:
    """The row canvas: the largest scaled image, padded to whole map tiles (cache/arrays.py IMAGE_MAP_TILE, a
    multiple of the teacher's input multiple: zarr's shards hold whole chunks)."""
    h, w = largest_scaled(image_hws, scales)
    up = lambda n: -(-int(n) // IMAGE_MAP_TILE) * IMAGE_MAP_TILE  # noqa: E731
    return up(h), up(w)


def largest_scaled(image_hws: Sequence[Tuple[int, int]], scales: Sequence[float]) -> Tuple[int, int]:
    """(h, w) of the largest image at the largest scale (before the canvas padding)."""
    s = max(scales)
    sizes = [scaled_hw(hw, s) for hw in image_hws] or [(1, 1)]
    return max(h for h, _ in sizes), max(w for _, w in sizes)


def auto_regions(max_patches: int, largest_hw: Sequence[int], view_hw: Sequence[int], cap: int = 32) -> int:
    """Crop slots per row: twice a view's count per view-sized area of the largest scaled image (LSM finds more
    clusters in a larger image), at least 4 views' worth, at most cap."""
    area = (int(largest_hw[0]) * int(largest_hw[1])) / max(1, int(view_hw[0]) * int(view_hw[1]))
    return int(min(cap, max(4 * max_patches, math.ceil(2 * max_patches * area))))


class ImageRows(Dataset):
    """Item k -> the rows of image k: dict(records, imgs, content) with a record per row (index, image_id,
    variant, status, params and fingerprint or reason), the teacher's input (1,3,H,W) of every readable row (the
    image in the row's frame, cache/image_view.py row_frame, normalised as the training input, zero-padded
    bottom/right to multiples of 32) and the row image's (h, w) in it. Never raises for a bad image.

    Args:
        coco: the training images.
        cfg: the augmentation settings (mean, std, channel order of the network input).
        rows: (scale, mirrored) of each row of an image (Layout.image_rows).
        image_ids: the integer id of every image.
        images: the image indices to label (the shards' rows).
    """

    def __init__(self, coco: CocoDetection, cfg: AugmentConfig, rows: Sequence[Tuple[float, bool]],
                 image_ids: Sequence[int], images: Sequence[int]):
        self.coco, self.cfg = coco, cfg
        self.rows = tuple((float(s), bool(m)) for s, m in rows)
        self.image_ids, self.images = list(image_ids), list(images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, k: int) -> Dict[str, Any]:
        i = self.images[k]
        n = len(self.rows)
        records = [dict(index=i * n + v, image_id=self.image_ids[i], variant=v) for v in range(n)]
        try:
            img = self.coco.load_image(i)
        except (UserError, OSError, ValueError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            for rec in records:
                rec.update(status=STATUS_SKIPPED, reason=reason)
            return dict(records=records, imgs=[], content=[])
        fingerprint = fingerprint_image(img)
        imgs, content = [], []
        for rec, (s, mirrored) in zip(records, self.rows):
            hw = scaled_hw(img.shape[:2], s)
            frame = row_frame(img.shape[:2], s, mirrored)
            x = normalise(frame.apply_image(img) if hw != img.shape[:2] or mirrored else img, self.cfg)
            canvas = np.zeros((padded(hw[0]), padded(hw[1]), 3), np.float32)
            canvas[:hw[0], :hw[1]] = x
            imgs.append(torch.from_numpy(np.ascontiguousarray(canvas.transpose(2, 0, 1)))[None])
            content.append(hw)
            params = dict(kind="image", ori_hw=list(img.shape[:2]), scale=s, scaled_hw=list(hw))
            if mirrored:
                params["mirrored"] = True
            rec.update(status=STATUS_OK, fingerprint=fingerprint,
                       params=json.dumps(params, sort_keys=True, separators=(",", ":")))
        return dict(records=records, imgs=imgs, content=content)


def image_hws(coco: CocoDetection, images: Optional[Sequence[int]] = None) -> List[Tuple[int, int]]:
    """(h, w) of the images as the annotation file gives them (or their files, where it does not)."""
    idx = range(len(coco)) if images is None else images
    return [(int(coco.image_info(i)["height"]), int(coco.image_info(i)["width"])) for i in idx]
