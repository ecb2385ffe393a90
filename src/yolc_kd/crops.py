"""Crop machinery shared by training and inference: LSM clusters, region selection, crop, patch meta,
remap to the full image and fusion of full-image with patch detections."""
from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms

from yolc_kd.crop_settings import CropSettings, LSMSettings
from yolc_kd.data.view import CropPaste, Resize, ViewTransform
from yolc_kd.data.view_steps import scaled_hw
from yolc_kd.data.view_meta import meta_content
from yolc_kd.diskio import atomic_write


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


def find_clusters(heatmap: np.ndarray, grid: Tuple[int, int] = LSMSettings.grid,
                  topk_cells: int = LSMSettings.topk_cells,
                  threshold: float = LSMSettings.threshold) -> Tuple[np.ndarray, np.ndarray]:
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
    # densest first; cells tied in density go by grid index (x-major), the same on every numpy and CPU
    # (YOLC's argsort leaves the choice among ties at the cut to numpy's sort implementation)
    flat = density.flatten()
    chosen = np.lexsort((np.arange(flat.size), -flat))[:topk_cells]
    mask = np.zeros((gx, gy), dtype=bool)
    mask[chosen // gy, chosen % gy] = True
    comps = np.array(_grid_components(mask), dtype=np.int64).reshape(-1, 4)
    comps[:, 0::2] = np.clip(comps[:, 0::2] * ws, 0, w)
    comps[:, 1::2] = np.clip(comps[:, 1::2] * hs, 0, h)
    comps[:, 2:] -= comps[:, :2]
    return binary, comps


def lsm_regions(heatmap: torch.Tensor, img_metas: Sequence[Mapping], lsm: Optional[LSMSettings] = None,
                with_binary: bool = False):
    """LSM for every image of a batch: (B,C,H,W) heatmap -> per image (K,4) int64 regions [x, y, w, h] in
    the image content frame (the meta's border subtracted). with_binary also returns the binary maps."""
    lsm = lsm if lsm is not None else LSMSettings()
    locmap = heatmap.detach().max(dim=1, keepdim=True)[0].float().cpu().numpy()
    out, binaries = [], []
    for i, meta in enumerate(img_metas):
        binary, regions_xywh = find_clusters(locmap[i:i + 1], grid=lsm.grid, topk_cells=lsm.topk_cells,
                                             threshold=float(lsm.threshold))
        x0, y0, _, _ = meta_content(meta, locmap.shape[2:])
        regions_xywh[:, 0] -= x0  # tensor -> image content frame, in place
        regions_xywh[:, 1] -= y0
        out.append(regions_xywh)
        binaries.append(binary)
    return (out, binaries) if with_binary else out


def image_lsm_regions(heatmap: torch.Tensor, content_hw: Sequence[int], view_hw: Sequence[int],
                      lsm: Optional[LSMSettings] = None) -> np.ndarray:
    """LSM over a whole image larger than a view: (1,C,H,W) heatmap whose image fills [:h, :w] (content_hw) ->
    (K,4) int64 regions [x, y, w, h] in image pixels. The grid keeps a view's cell size (view_hw / LSM's grid)
    and the share of cells kept (topk_cells of the view's grid), so every part of the image is judged as a view
    there would be."""
    lsm = lsm if lsm is not None else LSMSettings()
    h, w = int(content_hw[0]), int(content_hw[1])
    gx, gy = lsm.grid
    cell_w, cell_h = max(1, int(view_hw[1]) // gx), max(1, int(view_hw[0]) // gy)
    nx, ny = max(1, round(w / cell_w)), max(1, round(h / cell_h))
    topk = max(1, round(lsm.topk_cells * nx * ny / (gx * gy)))
    locmap = heatmap.detach()[:1, :, :h, :w].max(dim=1, keepdim=True)[0].float().cpu().numpy()
    _, regions_image_xywh = find_clusters(locmap, grid=(nx, ny), topk_cells=topk, threshold=float(lsm.threshold))
    return regions_image_xywh


def save_cluster_png(binary: np.ndarray, regions_map_xywh: np.ndarray, path: Path) -> Path:
    """The LSM binary map with its regions ((K,4) [x, y, w, h] in the map's pixels) outlined, for inspection."""
    from PIL import Image, ImageDraw

    img = Image.fromarray(binary).convert("RGB")
    draw = ImageDraw.Draw(img)
    for x, y, w, h in regions_map_xywh.tolist():
        draw.rectangle([x, y, x + w - 1, y + h - 1], outline=(255, 0, 0), width=2)
    with atomic_write(path) as fh:  # a failed write (a full disk) is one line and leaves no file
        img.save(fh, format="PNG")
    return path


def select_regions(regions_xywh: np.ndarray, img_hw: Sequence[int], max_patches: int = 4, min_size: int = 64,
                   enlarge: float = 1.2) -> np.ndarray:
    """Keep the max_patches largest regions with both sides >= min_size, enlarge around the centre, clamp.
    regions_xywh: (K,4) [x, y, w, h] in the pixels of an image of size img_hw = (h, w); returns (K',4) int64
    [x, y, w, h] inside it."""
    xywh = np.asarray(regions_xywh, dtype=np.float64).reshape(-1, 4)
    h, w = float(img_hw[0]), float(img_hw[1])
    x1, y1 = np.clip(xywh[:, 0], 0, w), np.clip(xywh[:, 1], 0, h)  # the part inside the image counts
    x2, y2 = np.clip(xywh[:, 0] + xywh[:, 2], 0, w), np.clip(xywh[:, 1] + xywh[:, 3], 0, h)
    inside = np.stack([x1, y1, x2 - x1, y2 - y1], axis=1)
    inside = inside[(inside[:, 2] >= min_size) & (inside[:, 3] >= min_size)]
    order = np.argsort(-(inside[:, 2] * inside[:, 3]), kind="stable")
    kept = inside[order[:max_patches]]
    cx, cy = kept[:, 0] + kept[:, 2] / 2, kept[:, 1] + kept[:, 3] / 2
    nw, nh = kept[:, 2] * enlarge, kept[:, 3] * enlarge
    x1, y1 = np.clip(cx - nw / 2, 0, w), np.clip(cy - nh / 2, 0, h)
    x2, y2 = np.clip(cx + nw / 2, 0, w), np.clip(cy + nh / 2, 0, h)
    out = np.stack([x1, y1, x2 - x1, y2 - y1], axis=1)
    return np.round(out).astype(np.int64)


def crop_bounds(box_view_xywh: Sequence[float], view_hw: Sequence[int]) -> Tuple[int, int, int, int]:
    """[x, y, w, h] in a view's pixels rounded to pixels and clamped to the view of size (h, w): (x1, y1, x2, y2)."""
    h, w = int(view_hw[0]), int(view_hw[1])
    x, y, cw, ch = [int(round(float(v))) for v in box_view_xywh]
    x1, y1 = min(max(x, 0), w), min(max(y, 0), h)
    return x1, y1, min(max(x + cw, x1), w), min(max(y + ch, y1), h)


def crop_img_tensor(img_i: torch.Tensor, box_tensor_xywh: Sequence[float]) -> torch.Tensor:
    """(C,H,W) -> (C,h,w) view of [x, y, w, h] in the tensor's pixels, clamped to the tensor."""
    x1, y1, x2, y2 = crop_bounds(box_tensor_xywh, img_i.shape[1:])
    return img_i[:, y1:y2, x1:x2]


def build_patch_meta(meta: Mapping, patch_shape: Sequence[int], box_tensor_xywh: Sequence[float],
                     scale: Union[float, Tuple[float, float]] = 1.0) -> dict:
    """Meta of a patch cut at box_tensor_xywh = [x, y, w, h] (tensor frame) and resized by `scale` (or (sx, sy)):
    shapes become the patch's, crop_offset=(x, y), scale_factor=[sx, sy, sx, sy], border zero."""
    m = copy.copy(dict(meta))
    ph, pw = int(patch_shape[0]), int(patch_shape[1])
    m["img_shape"] = (ph, pw, 3)
    m["pad_shape"] = (ph, pw, 3)
    m["batch_input_shape"] = (ph, pw)
    m["crop_offset"] = (float(box_tensor_xywh[0]), float(box_tensor_xywh[1]))
    sx, sy = (scale, scale) if np.isscalar(scale) else scale
    m["scale_factor"] = np.array([sx, sy, sx, sy], dtype=np.float32)
    m["border"] = np.zeros(4, dtype=np.float32)
    m.pop("view", None)  # the image's view is not the patch's: its fields above describe the patch
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


def pack_patches(sizes: Sequence[Tuple[int, int]], divisor: int = 32) -> Tuple[Tuple[int, int], List[Tuple[int, int]]]:
    """A layout of (h, w) patches on ONE canvas: (canvas (H, W), [(y, x)] per patch), H, W, y and x multiples of
    divisor, no two patches overlapping. Shelf packing: tallest first, each shelf as high as its first patch,
    the canvas width that gives the smallest area. Patches of different shapes waste far less than a batch
    padded to the largest H and W (pad_batch); a single patch gets exactly pad_batch's shape."""
    up = lambda v: -(-int(v) // divisor) * divisor  # noqa: E731
    padded = [(up(h), up(w)) for h, w in sizes]
    if not padded:
        return (0, 0), []
    order = sorted(range(len(padded)), key=lambda i: (-padded[i][0], -padded[i][1], i))
    best = None
    for width in range(max(w for _, w in padded), sum(w for _, w in padded) + 1, divisor):
        shelves: List[List[int]] = []  # [y, height, used width]
        offsets = [(0, 0)] * len(padded)
        for i in order:
            h, w = padded[i]
            shelf = next((sh for sh in shelves if sh[2] + w <= width), None)  # first fit; h <= the shelf's
            if shelf is None:
                shelf = [sum(sh[1] for sh in shelves), h, 0]
                shelves.append(shelf)
            offsets[i] = (shelf[0], shelf[2])
            shelf[2] += w
        canvas = (sum(sh[1] for sh in shelves), max(sh[2] for sh in shelves))
        if best is None or canvas[0] * canvas[1] < best[0][0] * best[0][1]:
            best = (canvas, offsets)
    return best


def fuse_detections(full: Tuple[torch.Tensor, torch.Tensor], patch: Tuple[torch.Tensor, torch.Tensor],
                    regions_xywh: np.ndarray, mode: str = "nms", iou_threshold: float = 0.6,
                    max_per_img: int = 300) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fuse full-image and remapped patch detections, both in the image content frame, as the crop regions
    regions_xywh ((K,4) [x, y, w, h]).

    nms: union, then class-wise NMS. replace (YOLC): full-image boxes lying entirely inside a region are
    dropped and the patch boxes take their place, then class-wise NMS. none: full-image boxes only.
    """
    (fd, fl), (pd, pl) = full, patch
    if mode == "none" or pd.numel() == 0:
        dets, labels = fd, fl
    else:
        if mode == "replace" and len(regions_xywh):
            r = torch.as_tensor(np.asarray(regions_xywh, dtype=np.float32), device=fd.device)
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


def crop_config(test_cfg: Optional[Mapping]) -> CropSettings:
    """A model's crop settings: its test_cfg.crop over CropSettings' defaults, checked (test_cfg.lsm too)."""
    return CropSettings.from_test_cfg(test_cfg)


# test_cfg.max_pixels: the most input pixels (batch x height x width) of one network forward in the full-image pass;
# a larger input runs in overlapping tiles (models/tiling.py). 0: no limit (YOLC: the whole input at once). 4 MP keeps
# the w48 teacher's tile near 6.5 GB, so a 48 MP image fits in 16 GB (BENCHMARKS.md, "Large images").
# test_cfg.tile_overlap: the context (pixels, a multiple of 32) a tile sees beyond the part it keeps; HRNet-w18/w48
# outputs stop changing (float32) 320 px from a cut edge, the tiny configs' 160 px (BENCHMARKS.md)
DEFAULT_TILE_CFG = dict(max_pixels=4_194_304, tile_overlap=384)


def tile_config(test_cfg: Optional[Mapping]) -> dict:
    """A model's tiling settings: test_cfg.max_pixels and test_cfg.tile_overlap over DEFAULT_TILE_CFG, checked."""
    from yolc_kd.errors import ModelConfigError

    test_cfg = test_cfg or {}
    out = {k: test_cfg.get(k, v) for k, v in DEFAULT_TILE_CFG.items()}
    for key, value in out.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ModelConfigError(f"test_cfg.{key} must be an integer >= 0, got {value!r}")
    if out["tile_overlap"] % 32:
        raise ModelConfigError(f"test_cfg.tile_overlap must be a multiple of 32 (tiles start on the network's "
                               f"coarsest grid), got {out['tile_overlap']}")
    return out


def patch_canvas(input_hw: Sequence[int]) -> Tuple[int, int]:
    """Fixed patch size for KD (one dense block per sample in the cache): half the input, multiple of 32."""
    return (max(32, int(input_hw[0]) // 2 // 32 * 32), max(32, int(input_hw[1]) // 2 // 32 * 32))


@dataclass
class PatchPlan(ABC):
    """Patches of a batch of views in fixed slots, the geometry both plans share: where each patch is cut from its
    view, how it is resized, and the patch metas that map its detections back. KDPatchPlan and
    InferencePatchPlan say how the cut patches are laid out for the network.

    Args:
        boxes: (B, K, 4) crop regions [x, y, w, h] in the view tensor's frame.
        scales: (B, K) crop -> patch scale.
        valid: (B, K) which slots hold a patch.
        canvas: (h, w) the largest patch (KD: every patch is padded to it).
        view_hw: (h, w) of the views the boxes are in.
        regions: per image, the selected LSM regions in its content frame.
    """
    boxes: torch.Tensor
    scales: torch.Tensor
    valid: torch.Tensor
    canvas: Tuple[int, int]
    view_hw: Tuple[int, int]
    regions: List[np.ndarray] = field(default_factory=list)
    _host: Optional[Tuple[List[Tuple[int, int]], np.ndarray, np.ndarray]] = field(default=None, init=False,
                                                                                   repr=False, compare=False)

    def host(self) -> Tuple[List[Tuple[int, int]], np.ndarray, np.ndarray]:
        """(valid slots (i, k) in cut order, boxes (B,K,4), scales (B,K)) on the host as float64 (exact for the
        float32 / float64 tensors): ONE transfer for the whole plan, whose tensors may live on a GPU."""
        if self._host is None:
            b, k = self.valid.shape[:2]
            packed = torch.cat([self.boxes.reshape(b, k, 4).double(), self.scales.reshape(b, k, 1).double(),
                                self.valid.reshape(b, k, 1).double()], dim=2).cpu().numpy()
            slots = [(int(i), int(j)) for i, j in zip(*np.nonzero(packed[:, :, 5]))]  # row-major = cut order
            self._host = (slots, packed[:, :, :4], packed[:, :, 4])
        return self._host

    @property
    def owners(self) -> List[int]:
        """Image index of every valid patch, in cut order (image by image, slot by slot)."""
        return [i for i, _ in self.host()[0]]

    def _fit(self, size: Tuple[int, int]) -> Tuple[int, int]:
        """A resized patch's (h, w) as the plan keeps it."""
        return size

    def sizes(self) -> List[Tuple[int, int]]:
        """(h, w) of every valid patch after resizing, in cut order."""
        out = []
        slots, boxes, scales = self.host()
        for i, k in slots:
            x1, y1, x2, y2 = crop_bounds(boxes[i, k], self.view_hw)
            out.append(self._fit(scaled_hw((y2 - y1, x2 - x1), float(scales[i, k]))))
        return out

    def _resized(self, img: torch.Tensor) -> List[torch.Tensor]:
        """Every valid patch cut from its view and resized by its scale, (C,h,w) each, in cut order."""
        out = []
        slots, boxes, _ = self.host()
        for (i, k), size in zip(slots, self.sizes()):
            patch = crop_img_tensor(img[i], boxes[i, k])
            if size != tuple(patch.shape[1:]):
                patch = F.interpolate(patch[None], size=size, mode="bilinear", align_corners=False)[0]
            out.append(patch)
        return out

    @abstractmethod
    def cut(self, img: torch.Tensor) -> torch.Tensor:
        """(Np,C,ph,pw): every valid patch cut from its view, resized by its scale and zero-padded bottom/right
        (the plan says to what size). All patches, one batch."""

    def metas(self, img_metas: Sequence[Mapping], batch_hw: Sequence[int]) -> List[dict]:
        """Patch metas in cut order: crop offset, the exact per-axis scale (patch size / crop size) and the
        batch's padded shape, for decoding on the patch and remapping to the view."""
        out = []
        slots, boxes, _ = self.host()
        for (i, k), (ph, pw) in zip(slots, self.sizes()):
            x1, y1, x2, y2 = crop_bounds(boxes[i, k], self.view_hw)
            m = build_patch_meta(img_metas[i], (ph, pw), (float(x1), float(y1), x2 - x1, y2 - y1),
                                 (pw / (x2 - x1), ph / (y2 - y1)))
            m["batch_input_shape"] = tuple(int(v) for v in batch_hw)
            m["pad_shape"] = (*m["batch_input_shape"], 3)
            out.append(m)
        return out


class KDPatchPlan(PatchPlan):
    """The KD patches: regions over the whole view, each scaled down if needed to fit the fixed canvas and padded
    to it, so every sample's refine maps are one dense (K, 4, canvas / 4) block (the cache stores them so). Its
    scales are float32, as the cache stores them, and the student cuts its patches from those."""

    @classmethod
    def from_targets(cls, boxes_view_xywh: torch.Tensor, scales: torch.Tensor, valid: torch.Tensor,
                     view_hw: Sequence[int], canvas: Optional[Sequence[int]] = None) -> "KDPatchPlan":
        """The plan behind stored KD targets (patch_boxes: (B,K,4) [x, y, w, h] in the view's pixels,
        patch_scales, patch_valid) of views of size view_hw; canvas: the refine maps' canvas (default
        patch_canvas(view_hw))."""
        canvas = patch_canvas(view_hw) if canvas is None else canvas
        return cls(boxes_view_xywh, scales, valid, (int(canvas[0]), int(canvas[1])), (int(view_hw[0]), int(view_hw[1])))

    def _fit(self, size: Tuple[int, int]) -> Tuple[int, int]:
        return min(self.canvas[0], size[0]), min(self.canvas[1], size[1])

    def cut(self, img: torch.Tensor) -> torch.Tensor:
        out = self._resized(img)
        if not out:
            return img.new_zeros((0, img.shape[1], self.canvas[0], self.canvas[1]))
        return torch.stack([F.pad(p, (0, self.canvas[1] - p.shape[2], 0, self.canvas[0] - p.shape[1])) for p in out])


class InferencePatchPlan(PatchPlan):
    """The inference patches: regions inside each image's content (its padding excluded), never shrunk; each
    patch meta keeps the exact per-axis scale after rounding, so remapping inverts the crop exactly. The patches
    go through the network packed on one canvas (pack) or as a batch padded to the largest (cut)."""

    def cut(self, img: torch.Tensor) -> torch.Tensor:
        out = self._resized(img)
        if not out:
            return img.new_zeros((0, img.shape[1], self.canvas[0], self.canvas[1]))
        return pad_batch(out)

    def pack(self, img: torch.Tensor) -> Tuple[torch.Tensor, List[Tuple[int, int, int, int, int]]]:
        """Every valid patch cut and resized as cut() does, laid out on one zero canvas by pack_patches:
        ((1,C,H,W), windows (0, y, x, h, w) in cut order). One forward, little padding."""
        patches = self._resized(img)
        sizes = [tuple(p.shape[1:]) for p in patches]
        (ch, cw), offsets = pack_patches(sizes)
        canvas = img.new_zeros((1, img.shape[1], ch, cw))
        for p, (y, x) in zip(patches, offsets):
            canvas[0, :, y:y + p.shape[1], x:x + p.shape[2]] = p
        return canvas, [(0, y, x, h, w) for (y, x), (h, w) in zip(offsets, sizes)]


def plan_kd_patches(regions_view_xywh: Sequence[np.ndarray], view_hw: Sequence[int], max_patches: int, min_size: int,
                    enlarge: float, upscale: float, canvas: Optional[Sequence[int]] = None) -> KDPatchPlan:
    """LSM regions of each view ([x, y, w, h] in the view's frame) -> the KD plan: the max_patches largest regions
    of at least min_size, enlarged, clamped to the view, each upscaled by `upscale` or less to fit the canvas
    (default patch_canvas(view_hw))."""
    view_hw = (int(view_hw[0]), int(view_hw[1]))
    canvas = patch_canvas(view_hw) if canvas is None else (int(canvas[0]), int(canvas[1]))
    b = len(regions_view_xywh)
    boxes, scales = torch.zeros(b, max_patches, 4), torch.zeros(b, max_patches, dtype=torch.float32)
    valid = torch.zeros(b, max_patches, dtype=torch.bool)
    regions = []
    for i, c in enumerate(regions_view_xywh):
        regs = select_regions(c, view_hw, max_patches, min_size, enlarge)
        for k, (x, y, w, h) in enumerate(regs.tolist()):
            if w >= 1 and h >= 1:
                boxes[i, k] = torch.tensor([x, y, w, h], dtype=torch.float32)
                scales[i, k] = min(float(upscale), canvas[0] / h, canvas[1] / w)
                valid[i, k] = True
        regions.append(regs)
    return KDPatchPlan(boxes, scales, valid, canvas, view_hw, regions)


def plan_inference_patches(regions_content_xywh: Sequence[np.ndarray], img_metas: Sequence[Mapping],
                           view_hw: Sequence[int], max_patches: int, min_size: int, enlarge: float, upscale: float,
                           canvas: Sequence[int], budget: Optional[float] = None) -> InferencePatchPlan:
    """LSM regions of each image ([x, y, w, h] in its content frame) -> the inference plan: the max_patches
    largest regions of at least min_size, enlarged, clamped to the image content, each upscaled by `upscale` as
    far as the canvas allows (never below 1).

    budget: the patches of an image together cover at most budget x its content area after upscaling. Largest
    region first; one that does not fit at its scale is upscaled less (never below 1) to fill what is left, or
    left out when even that does not fit. The fused cost is then about 1 + budget (YOLC has no such bound)."""
    view_hw = (int(view_hw[0]), int(view_hw[1]))
    canvas = (int(canvas[0]), int(canvas[1]))
    b = len(regions_content_xywh)
    boxes, scales = torch.zeros(b, max_patches, 4), torch.zeros(b, max_patches, dtype=torch.float64)
    valid = torch.zeros(b, max_patches, dtype=torch.bool)
    regions = []
    for i, (c, meta) in enumerate(zip(regions_content_xywh, img_metas)):
        ox, oy, h_img, w_img = meta_content(meta, view_hw)  # the image content inside the tensor
        regs = select_regions(c, (h_img, w_img), max_patches, min_size, enlarge)
        left = None if budget is None else float(budget) * h_img * w_img  # patch pixels still allowed
        kept = []
        for k, (x, y, w, h) in enumerate(regs.tolist()):
            if w < 1 or h < 1:
                continue
            scale = min(float(upscale), max(1.0, min(canvas[0] / h, canvas[1] / w)))
            if left is not None:
                scale = min(scale, (max(left, 0.0) / (w * h)) ** 0.5)
                if scale < 1.0:
                    continue
                rh, rw = scaled_hw((h, w), scale)
                left -= rh * rw
            boxes[i, k] = torch.tensor([x + ox, y + oy, w, h], dtype=torch.float32)
            scales[i, k] = scale
            valid[i, k] = True
            kept.append(k)
        regions.append(regs[kept] if budget is not None else regs)
    return InferencePatchPlan(boxes, scales, valid, canvas, view_hw, regions)


def patch_view(box_view_xywh: Sequence[float], size_hw: Sequence[int], view_hw: Sequence[int],
               canvas_hw: Sequence[int]) -> ViewTransform:
    """View frame -> the KD patch canvas of one crop box [x, y, w, h]: the crop as crops.PatchPlan cuts it
    (rounded, clamped), resized to size_hw (the plan's size), zero-padded bottom/right to the canvas."""
    x1, y1, x2, y2 = crop_bounds(box_view_xywh, view_hw)
    h, w = (int(v) for v in view_hw)
    cut = CropPaste((h, w), (x1, y1, x2, y2), (0, 0), (y2 - y1, x2 - x1))
    size = (int(size_hw[0]), int(size_hw[1]))
    return ViewTransform((cut, Resize(cut.out_hw, size))).then(
        CropPaste(size, (0, 0, size[1], size[0]), (0, 0), tuple(canvas_hw)))
