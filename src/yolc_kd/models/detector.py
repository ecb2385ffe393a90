"""The YOLC detector: HRNet -> HRFPN -> YOLCHead, with YOLC's crop-refine-fuse inference."""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from yolc_kd import crops
from yolc_kd.kd import KDTargets, kd_losses
from yolc_kd.models.hrfpn import HRFPN
from yolc_kd.models.hrnet import HRNet
from yolc_kd.models.yolc_head import Dets, YOLCHead, gaussian_blur3x3

# patch_limit: upscale a patch only while it fits the input ("input") or a quarter of it ("quarter": bounded cost)
DEFAULT_CROP_CFG = dict(max_patches=4, min_patch_size=64, enlarge=1.2, upscale=1.5, fusion="nms", patch_limit="input")


class YOLC(nn.Module):
    def __init__(self, backbone: Mapping, neck: Optional[Mapping], bbox_head: Mapping,
                 train_cfg: Optional[Mapping] = None, test_cfg: Optional[Mapping] = None,
                 pretrained: Optional[str] = None, init_cfg=None, distill_cfg: Optional[Mapping] = None,
                 teacher: Optional[nn.Module] = None):
        super().__init__()
        self.backbone = _build(backbone, {"HRNet": HRNet}, "backbone")
        self.neck = _build(neck, {"HRFPN": HRFPN}, "neck") if neck else None
        head_cfg = dict(bbox_head)
        head_cfg.update(train_cfg=train_cfg, test_cfg=test_cfg)  # as mmdet's SingleStageDetector
        self.bbox_head = _build(head_cfg, {"YOLCHead": YOLCHead}, "bbox_head")
        self.crop_cfg = {**DEFAULT_CROP_CFG, **dict((test_cfg or {}).get("crop", {}))}
        self.distill_cfg = dict(distill_cfg) if distill_cfg else None
        # the teacher is held outside the module tree: student checkpoints and optimizers never see it
        self._teacher = [teacher] if teacher is not None else []

    @property
    def teacher(self) -> Optional["YOLC"]:
        return self._teacher[0] if self._teacher else None

    def _apply(self, fn, *args, **kwargs):
        if self._teacher:
            self._teacher[0]._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True) -> "YOLC":
        super().train(mode)
        if self._teacher:
            self._teacher[0].eval()  # the teacher stays in eval mode
        return self

    def forward(self, img: torch.Tensor, img_metas: List[Mapping], return_loss: bool = True, **kwargs):
        """mmdet convention (needed by DistributedDataParallel): losses in training, detections otherwise."""
        if return_loss:
            return self.forward_train(img, img_metas, **kwargs)
        return self.simple_test(img, img_metas, **kwargs)

    @property
    def test_cfg(self) -> dict:
        return self.bbox_head.test_cfg

    def extract_feat(self, img: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        x = self.backbone(img)
        return self.neck(x) if self.neck is not None else tuple(x)

    def forward_dummy(self, img: torch.Tensor):
        return self.bbox_head(self.extract_feat(img))

    def forward_train(self, img: torch.Tensor, img_metas: List[Mapping], gt_bboxes: List[torch.Tensor],
                      gt_labels: List[torch.Tensor], kd_targets: Optional[KDTargets] = None,
                      **unused) -> Dict[str, torch.Tensor]:
        """YOLC's supervised losses, plus the KD losses when targets are given (offline, from the cache)
        or a teacher is attached (online)."""
        heat, coarse, refine = self.bbox_head(self.extract_feat(img))
        losses = self.bbox_head.loss(heat, coarse, refine, gt_bboxes, gt_labels, img_metas)
        dcfg = self.distill_cfg
        if kd_targets is None and self.teacher is not None and dcfg and dcfg.get("enable", True):
            coords = None if dcfg.get("use_teacher_crop", True) else self.bbox_head.LSM([heat[0].detach()], img_metas)
            kd_targets = self.teacher.kd_targets(img, img_metas, dcfg, coords)
        if kd_targets is not None:
            canvas = crops.patch_canvas(img.shape[2:])
            patches = crops.patch_batch(img, kd_targets.patch_boxes, kd_targets.patch_scales,
                                        kd_targets.patch_valid, canvas)
            if patches.shape[0]:
                patch_refine = self.patch_refine(patches)  # all patches, one forward
            else:
                patch_refine = img.new_zeros((0, 4, canvas[0] // 4, canvas[1] // 4))
            losses.update(kd_losses(heat[0], coarse[0], patch_refine, kd_targets, dcfg or {},
                                    self.bbox_head.decode_xywh_to_bbox))
        return losses

    @torch.no_grad()
    def kd_targets(self, img: torch.Tensor, img_metas: List[Mapping], dcfg: Mapping,
                   coords: Optional[List[np.ndarray]] = None) -> KDTargets:
        """This model as teacher: heatmap and coarse maps on the views, LSM crops (or the given ones),
        refine maps on every patch (one batched forward)."""
        heat, coarse, _ = self.bbox_head(self.extract_feat(img))
        if coords is None:
            coords = self.bbox_head.LSM(heat, img_metas)
        canvas = crops.patch_canvas(img.shape[2:])
        boxes, scales, valid = crops.plan_patches(
            coords, img.shape[2:], int(dcfg["max_patches_per_img"]), int(dcfg["min_patch_size"]),
            float(self.crop_cfg["enlarge"]), float(self.crop_cfg["upscale"]), canvas)
        patches = crops.patch_batch(img, boxes, scales, valid, canvas)
        refine = img.new_zeros((img.shape[0], valid.shape[1], 4, canvas[0] // 4, canvas[1] // 4))
        if patches.shape[0]:
            refine[valid.to(img.device)] = self.patch_refine(patches)
        return KDTargets(heatmap=heat[0], coarse=coarse[0], patch_boxes=boxes.to(img.device),
                         patch_scales=scales.to(img.device), patch_valid=valid.to(img.device), refine=refine)

    def patch_refine(self, patches: torch.Tensor) -> torch.Tensor:
        """Refine maps of a batch of patches; the heatmap branch is skipped (local KD needs only refine)."""
        feats = self.extract_feat(patches)
        assert len(feats) == 1, "YOLC uses one feature level"
        return self.bbox_head.forward_boxes(feats[0])[1]

    # ------------------------------------------------------------------ crop helpers (design names)
    def _crop_img_tensor(self, img_i: torch.Tensor, coord: Sequence[float]) -> torch.Tensor:
        return crops.crop_img_tensor(img_i, coord)

    def _build_patch_meta(self, meta: Mapping, patch_shape: Sequence[int], coord: Sequence[float],
                          scale: float = 1.0) -> dict:
        return crops.build_patch_meta(meta, patch_shape, coord, scale)

    def _remap_bboxes_to_full(self, bboxes: torch.Tensor, meta_patch: Mapping) -> torch.Tensor:
        return crops.remap_bboxes_to_full(bboxes, meta_patch)

    def make_patches(self, img: torch.Tensor, img_metas: List[Mapping], regions: List[np.ndarray],
                     upscale: float) -> Tuple[Optional[torch.Tensor], List[dict], List[int]]:
        """Cut every region (content frame, [x,y,w,h]) of every image, upscale, pad to one batch.
        Returns the batch, the patch metas and the image index of each patch."""
        patches, metas, owners = [], [], []
        limit = self.crop_cfg.get("patch_limit", "input")
        if limit not in ("input", "quarter"):
            raise ValueError(f"test_cfg.crop.patch_limit must be 'input' or 'quarter', got {limit!r}")
        canvas = crops.patch_canvas(img.shape[2:]) if limit == "quarter" else tuple(img.shape[2:])
        for i, (meta, regs) in enumerate(zip(img_metas, regions)):
            border = np.asarray(meta.get("border", np.zeros(4)), dtype=np.float64)
            for reg in np.asarray(regs).reshape(-1, 4):
                coord = [reg[0] + border[2], reg[1] + border[0], reg[2], reg[3]]  # content -> tensor frame
                patch = self._crop_img_tensor(img[i], coord)
                coord = [max(0.0, coord[0]), max(0.0, coord[1]), coord[2], coord[3]]  # the clamped crop origin
                crop_h, crop_w = patch.shape[1:]
                if crop_h < 1 or crop_w < 1:
                    continue
                s = min(upscale, max(1.0, min(canvas[0] / patch.shape[1], canvas[1] / patch.shape[2])))
                if s != 1.0:
                    size = (max(1, round(patch.shape[1] * s)), max(1, round(patch.shape[2] * s)))
                    patch = F.interpolate(patch[None], size=size, mode="bilinear", align_corners=False)[0]
                # the exact scale per axis keeps remap the inverse of crop after rounding the size
                scale = (patch.shape[2] / crop_w, patch.shape[1] / crop_h)
                patches.append(patch)
                metas.append(self._build_patch_meta(meta, patch.shape[1:], coord, scale))
                owners.append(i)
        if not patches:
            return None, [], []
        batch = crops.pad_batch(patches)
        for m in metas:
            m["batch_input_shape"] = tuple(batch.shape[2:])
            m["pad_shape"] = (*batch.shape[2:], 3)
        return batch, metas, owners

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def simple_test(self, img: torch.Tensor, img_metas: List[Mapping], rescale: bool = True,
                    fusion: Optional[str] = None, max_patches: Optional[int] = None,
                    return_extras: bool = False):
        """Full-image detection -> LSM on this model's heatmap -> one batched forward over all patches ->
        remap -> fusion -> class-wise NMS. Returns per image (dets (N,5) [x1,y1,x2,y2,score], labels (N,))."""
        cfg = self.crop_cfg
        fusion = fusion or cfg["fusion"]
        max_patches = cfg["max_patches"] if max_patches is None else max_patches
        heat, coarse, refine = self.bbox_head(self.extract_feat(img))
        blurred = gaussian_blur3x3(heat[0])  # once: for decoding and (YOLC quirk kept) for LSM
        full = self.bbox_head.bboxes_from_blurred(blurred, refine[0], img_metas, rescale=False)
        regions: List[np.ndarray] = [np.zeros((0, 4), np.int64) for _ in img_metas]
        results: List[Dets] = list(full)
        if fusion != "none" and max_patches > 0:
            # YOLC's get_bboxes blurs the heatmap list in place, so its LSM reads the blurred map; no clusters in padding
            masked = blurred * _content_mask(heat[0], img_metas)
            for i, (meta, coord) in enumerate(zip(img_metas, self.bbox_head.LSM([masked], img_metas))):
                h, w = meta.get("img_shape", img.shape[2:])[:2]
                regions[i] = crops.select_regions(coord, (h, w), max_patches, cfg["min_patch_size"], cfg["enlarge"])
            results = self._fuse_patches(img, img_metas, full, regions, fusion)
        out = []
        for (dets, labels), meta in zip(results, img_metas):
            dets = dets.clone()
            h, w = meta.get("img_shape", img.shape[2:])[:2]
            dets[:, 0:4:2] = dets[:, 0:4:2].clamp(0, w)  # yolc-kd clips to the image (YOLC does not)
            dets[:, 1:4:2] = dets[:, 1:4:2].clamp(0, h)
            if rescale:
                dets[:, :4] /= dets.new_tensor(np.asarray(meta.get("scale_factor", 1.0), np.float32) * np.ones(4, np.float32))
            out.append((dets, labels))
        if return_extras:
            return out, dict(heatmap=heat[0], regions=regions)
        return out

    def _fuse_patches(self, img, img_metas, full: List[Dets], regions: List[np.ndarray], fusion: str) -> List[Dets]:
        batch, metas, owners = self.make_patches(img, img_metas, regions, float(self.crop_cfg["upscale"]))
        per_img: List[List[Dets]] = [[] for _ in img_metas]
        if batch is not None:
            ph, pc, pr = self.bbox_head(self.extract_feat(batch))
            # rescale=False: _remap_bboxes_to_full undoes the patch scale (once)
            for (dets, labels), m, i in zip(self.bbox_head.get_bboxes(ph, pc, pr, metas, rescale=False), metas, owners):
                dets = self._remap_bboxes_to_full(dets, m)
                border = np.asarray(img_metas[i].get("border", np.zeros(4)), np.float32)
                dets[:, :4] -= dets.new_tensor(border[[2, 0, 2, 0]])  # tensor -> content frame
                per_img[i].append((dets, labels))
        iou = float(self.test_cfg.get("nms_cfg", {}).get("iou_threshold", 0.6))
        out = []
        for i, (fd, fl) in enumerate(full):
            pd = torch.cat([d for d, _ in per_img[i]]) if per_img[i] else fd.new_zeros((0, 5))
            pl = torch.cat([l for _, l in per_img[i]]) if per_img[i] else fl.new_zeros((0,))
            out.append(crops.fuse_detections((fd, fl), (pd, pl), regions[i], fusion, iou,
                                             int(self.test_cfg["max_per_img"])))
        return out


def _content_mask(heat: torch.Tensor, img_metas: List[Mapping]) -> torch.Tensor:
    """(B,1,H,W) 1 inside each image's content (its border and the batch padding excluded), else 0."""
    mask = heat.new_zeros((heat.shape[0], 1, *heat.shape[2:]))
    for i, meta in enumerate(img_metas):
        top, _, left, _ = [int(v) for v in np.asarray(meta.get("border", np.zeros(4)))]
        h, w = meta.get("img_shape", heat.shape[2:])[:2]
        mask[i, :, top:top + int(h), left:left + int(w)] = 1
    return mask


def _build(cfg: Mapping, registry: Mapping, what: str) -> nn.Module:
    cfg = dict(cfg)
    kind = cfg.pop("type", None)
    if kind not in registry:
        raise ValueError(f"{what}: unsupported type {kind!r} (supported: {', '.join(registry)})")
    try:
        return registry[kind](**cfg)
    except TypeError as exc:  # an unknown or missing key in the config dict
        raise ValueError(f"{what} ({kind}): {exc}") from None
