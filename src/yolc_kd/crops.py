"""Crop machinery shared by training and inference: LSM clusters, region selection, crop, patch meta,
remap to the full image and fusion of full-image with patch detections."""
from __future__ import annotations

import copy
from collections import deque
from pathlib import Path
from typing import List, Mapping, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms


def _grid_components(mask: np.ndarray) -> List[Tuple[int, int, int, int]]:
    """8-connected components of a boolean (gx, gy) grid as [x0, y0, x1, y1) cell ranges, in scan order.
    Written here because the grid is 16x10 cells and scipy is not a dependency."""
    gx, gy = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    comps = []
    for i in range(gx):
        for j in range(gy):
            if seen[i, j] or not mask[i, j]:
                continue
            seen[i, j] = True
            queue, x0, y0, x1, y1 = deque([(i, j)]), i, j, i, j
            while queue:
                a, b = queue.popleft()
                x0, y0, x1, y1 = min(x0, a), min(y0, b), max(x1, a), max(y1, b)
                for da in (-1, 0, 1):
                    for db in (-1, 0, 1):
                        na, nb = a + da, b + db
                        if 0 <= na < gx and 0 <= nb < gy and mask[na, nb] and not seen[na, nb]:
                            seen[na, nb] = True
                            queue.append((na, nb))
            comps.append((x0, y0, x1 + 1, y1 + 1))
    return comps


def find_clusters(heatmap: np.ndarray, grid: Tuple[int, int] = (16, 10), topk_cells: int = 15,
                  threshold: float = 10.0 / 11.0) -> Tuple[np.ndarray, np.ndarray]:
    """YOLC's findclusters on a (1,1,H,W) max-over-classes heatmap.

    Returns the binary map (uint8 0/255) and (K,4) int64 regions [x, y, w, h] in heatmap pixels.
    """
    inv = 1 - heatmap  # numpy arithmetic keeps the input dtype, as YOLC (float16 maps stay float16)
    peak = np.max(inv)
    scaled = 255 * inv / peak if peak > 0 else np.zeros_like(inv)
    gray = scaled[0][0].astype(np.uint8)
    binary = np.where(gray > np.floor(threshold * 255.0), 0, 255).astype(np.uint8)  # cv2 THRESH_BINARY_INV
    h, w = binary.shape
    gx, gy = grid
    ws, hs = w // gx, h // gy
    ones = (binary == 255).astype(np.int64)[:gy * hs, :gx * ws]
    density = ones.reshape(gy, hs, gx, ws).sum(axis=(1, 3)).T.astype(np.float64)  # (gx, gy) as YOLC
    chosen = density.flatten().argsort()[-topk_cells:][::-1]
    mask = np.zeros((gx, gy), dtype=bool)
    mask[chosen // gy, chosen % gy] = True
    comps = np.array(_grid_components(mask), dtype=np.int64).reshape(-1, 4)
    comps[:, 0::2] = np.clip(comps[:, 0::2] * ws, 0, w)
    comps[:, 1::2] = np.clip(comps[:, 1::2] * hs, 0, h)
    comps[:, 2:] -= comps[:, :2]
    return binary, comps


def save_cluster_png(binary: np.ndarray, coords: np.ndarray, path: Path) -> Path:
    """The LSM binary map with its regions outlined, for inspection."""
    from PIL import Image, ImageDraw

    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(binary).convert("RGB")
    draw = ImageDraw.Draw(img)
    for x, y, w, h in coords.tolist():
        draw.rectangle([x, y, x + w - 1, y + h - 1], outline=(255, 0, 0), width=2)
    img.save(path)
    return path


def select_regions(coords: np.ndarray, img_hw: Sequence[int], max_patches: int = 4, min_size: int = 64,
                   enlarge: float = 1.2) -> np.ndarray:
    """Keep the max_patches largest regions with both sides >= min_size, enlarge around the centre, clamp.
    Returns (K,4) float [x, y, w, h] inside an image of size img_hw = (h, w)."""
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 4)
    h, w = float(img_hw[0]), float(img_hw[1])
    x1, y1 = np.clip(coords[:, 0], 0, w), np.clip(coords[:, 1], 0, h)  # the part inside the image counts
    x2, y2 = np.clip(coords[:, 0] + coords[:, 2], 0, w), np.clip(coords[:, 1] + coords[:, 3], 0, h)
    coords = np.stack([x1, y1, x2 - x1, y2 - y1], axis=1)
    coords = coords[(coords[:, 2] >= min_size) & (coords[:, 3] >= min_size)]
    order = np.argsort(-(coords[:, 2] * coords[:, 3]), kind="stable")
    coords = coords[order[:max_patches]]
    cx, cy = coords[:, 0] + coords[:, 2] / 2, coords[:, 1] + coords[:, 3] / 2
    nw, nh = coords[:, 2] * enlarge, coords[:, 3] * enlarge
    x1, y1 = np.clip(cx - nw / 2, 0, w), np.clip(cy - nh / 2, 0, h)
    x2, y2 = np.clip(cx + nw / 2, 0, w), np.clip(cy + nh / 2, 0, h)
    out = np.stack([x1, y1, x2 - x1, y2 - y1], axis=1)
    return np.round(out).astype(np.int64)


def crop_img_tensor(img_i: torch.Tensor, coord: Sequence[float]) -> torch.Tensor:
    """(C,H,W) -> (C,h,w) view of [x, y, w, h], clamped to the image."""
    _, h, w = img_i.shape
    x, y, cw, ch = [int(round(float(v))) for v in coord]
    x1, y1 = min(max(x, 0), w), min(max(y, 0), h)
    x2, y2 = min(max(x + cw, x1), w), min(max(y + ch, y1), h)
    return img_i[:, y1:y2, x1:x2]


def build_patch_meta(meta: Mapping, patch_shape: Sequence[int], coord: Sequence[float],
                     scale: Union[float, Tuple[float, float]] = 1.0) -> dict:
    """Meta of a patch cut at coord=[x, y, w, h] (tensor frame) and resized by `scale` (or (sx, sy)):
    shapes become the patch's, crop_offset=(x, y), scale_factor=[sx, sy, sx, sy], border zero."""
    m = copy.copy(dict(meta))
    ph, pw = int(patch_shape[0]), int(patch_shape[1])
    m["img_shape"] = (ph, pw, 3)
    m["pad_shape"] = (ph, pw, 3)
    m["batch_input_shape"] = (ph, pw)
    m["crop_offset"] = (float(coord[0]), float(coord[1]))
    sx, sy = (scale, scale) if np.isscalar(scale) else scale
    m["scale_factor"] = np.array([sx, sy, sx, sy], dtype=np.float32)
    m["border"] = np.zeros(4, dtype=np.float32)
    return m


def remap_bboxes_to_full(bboxes: torch.Tensor, meta_patch: Mapping) -> torch.Tensor:
    """Patch-frame [x1,y1,x2,y2,...] -> full tensor frame: undo the patch scale, add the crop offset."""
    out = bboxes.clone()
    scale = torch.as_tensor(np.asarray(meta_patch["scale_factor"], dtype=np.float32), device=out.device)
    ox, oy = meta_patch["crop_offset"]
    out[:, :4] = out[:, :4] / scale
    out[:, :4] += out.new_tensor([ox, oy, ox, oy])
    return out


def pad_batch(patches: List[torch.Tensor], divisor: int = 32) -> torch.Tensor:
    """Stack (C,h,w) tensors into one zero-padded (N,C,H,W) batch (bottom/right), H and W multiples of divisor."""
    hmax = max(p.shape[1] for p in patches)
    wmax = max(p.shape[2] for p in patches)
    hmax, wmax = -(-hmax // divisor) * divisor, -(-wmax // divisor) * divisor
    return torch.stack([F.pad(p, (0, wmax - p.shape[2], 0, hmax - p.shape[1])) for p in patches])


def fuse_detections(full: Tuple[torch.Tensor, torch.Tensor], patch: Tuple[torch.Tensor, torch.Tensor],
                    regions: np.ndarray, mode: str = "nms", iou_threshold: float = 0.6,
                    max_per_img: int = 300) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fuse full-image and remapped patch detections (same frame).

    nms: union, then class-wise NMS. replace (YOLC): full-image boxes lying entirely inside a region are
    dropped and the patch boxes take their place, then class-wise NMS. none: full-image boxes only.
    """
    (fd, fl), (pd, pl) = full, patch
    if mode == "none" or pd.numel() == 0:
        dets, labels = fd, fl
    else:
        if mode == "replace" and len(regions):
            r = torch.as_tensor(np.asarray(regions, dtype=np.float32), device=fd.device)
            x1, y1, x2, y2 = r[:, 0], r[:, 1], r[:, 0] + r[:, 2], r[:, 1] + r[:, 3]
            inside = ((fd[:, None, 0] >= x1) & (fd[:, None, 1] >= y1) &
                      (fd[:, None, 2] <= x2) & (fd[:, None, 3] <= y2)).any(dim=1)
            fd, fl = fd[~inside], fl[~inside]
        elif mode not in ("nms", "replace"):
            raise ValueError(f"unknown fusion mode {mode!r} (nms, replace, none)")
        dets, labels = torch.cat([fd, pd]), torch.cat([fl, pl])
    if labels.numel() == 0:
        return dets, labels
    keep = batched_nms(dets[:, :4].float(), dets[:, 4].float(), labels, iou_threshold)[:max_per_img]
    return dets[keep], labels[keep]


def patch_canvas(input_hw: Sequence[int]) -> Tuple[int, int]:
    """Fixed patch size for KD (one dense block per sample in the cache): half the input, multiple of 32."""
    return (max(32, int(input_hw[0]) // 2 // 32 * 32), max(32, int(input_hw[1]) // 2 // 32 * 32))


def plan_patches(coords: List[np.ndarray], img_hw: Sequence[int], max_patches: int, min_size: int,
                 enlarge: float, upscale: float, canvas: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LSM regions of each image -> fixed-slot patch plan: boxes (B,K,4) [x,y,w,h], scales (B,K), valid (B,K).
    Each region is upscaled by `upscale`, or less when it would not fit the canvas."""
    b = len(coords)
    boxes = torch.zeros(b, max_patches, 4)
    scales = torch.zeros(b, max_patches)
    valid = torch.zeros(b, max_patches, dtype=torch.bool)
    for i, c in enumerate(coords):
        regs = select_regions(c, img_hw, max_patches, min_size, enlarge)
        for k, (x, y, w, h) in enumerate(regs.tolist()):
            if w < 1 or h < 1:
                continue
            boxes[i, k] = torch.tensor([x, y, w, h], dtype=torch.float32)
            scales[i, k] = min(float(upscale), canvas[0] / h, canvas[1] / w)
            valid[i, k] = True
    return boxes, scales, valid


def patch_batch(img: torch.Tensor, boxes: torch.Tensor, scales: torch.Tensor, valid: torch.Tensor,
                canvas: Sequence[int]) -> torch.Tensor:
    """Cut every valid planned patch from its view, resize by its scale, pad into the canvas: (Np,C,ph,pw).
    Patches are ordered image by image, slot by slot (the order of valid.nonzero())."""
    out = []
    for i, k in valid.nonzero().tolist():
        patch = crop_img_tensor(img[i], boxes[i, k].tolist())
        s = float(scales[i, k])
        size = (min(canvas[0], max(1, round(patch.shape[1] * s))), min(canvas[1], max(1, round(patch.shape[2] * s))))
        if size != tuple(patch.shape[1:]):
            patch = F.interpolate(patch[None], size=size, mode="bilinear", align_corners=False)[0]
        out.append(F.pad(patch, (0, canvas[1] - patch.shape[2], 0, canvas[0] - patch.shape[1])))
    if not out:
        return img.new_zeros((0, img.shape[1], canvas[0], canvas[1]))
    return torch.stack(out)
