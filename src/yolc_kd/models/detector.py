"""The YOLC detector: HRNet -> HRFPN -> YOLCHead, with YOLC's crop-refine-fuse inference."""
from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from yolc_kd import crops
from yolc_kd.errors import ModelConfigError
from yolc_kd.kd import KDTargets, kd_losses
from yolc_kd.models.hrfpn import HRFPN
from yolc_kd.models.hrnet import HRNet
from yolc_kd.models.yolc_head import Dets, YOLCHead, gaussian_blur3x3

# KD targets for a batch, or a function that makes them from the model's own (detached) heatmap
KDTargetsArg = Union[KDTargets, Callable[[torch.Tensor], KDTargets], None]


class YOLC(nn.Module):
    def __init__(self, backbone: Mapping, neck: Optional[Mapping], bbox_head: Mapping,
                 train_cfg: Optional[Mapping] = None, test_cfg: Optional[Mapping] = None,
                 pretrained: Optional[str] = None, init_cfg=None):
        super().__init__()
        self.backbone = _build(backbone, {"HRNet": HRNet}, "backbone")
        self.neck = _build(neck, {"HRFPN": HRFPN}, "neck") if neck else None
        head_cfg = dict(bbox_head)
        head_cfg.update(train_cfg=train_cfg, test_cfg=test_cfg)  # as mmdet's SingleStageDetector
        self.bbox_head = _build(head_cfg, {"YOLCHead": YOLCHead}, "bbox_head")
        self.crop_cfg = crops.crop_config(test_cfg)

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
                      gt_labels: List[torch.Tensor], kd_targets: KDTargetsArg = None,
                      kd_cfg: Optional[Mapping] = None, **unused) -> Dict[str, torch.Tensor]:
        """YOLC's supervised losses, plus the KD losses (weighted by kd_cfg, a distill_cfg) when targets are
        given. The targets say where the patches are; all patches go through one forward."""
        heat, coarse, refine = self.bbox_head(self.extract_feat(img))
        losses = self.bbox_head.loss(heat, coarse, refine, gt_bboxes, gt_labels, img_metas)
        if callable(kd_targets):
            kd_targets = kd_targets(heat[0].detach())
        if kd_targets is not None:
            plan = crops.kd_patch_plan(kd_targets.patch_boxes, kd_targets.patch_scales, kd_targets.patch_valid,
                                       img.shape[2:])
            patches = plan.cut(img)
            if patches.shape[0]:
                patch_refine = self.patch_refine(patches)  # all patches, one forward
            else:
                patch_refine = img.new_zeros((0, 4, plan.canvas[0] // 4, plan.canvas[1] // 4))
            losses.update(kd_losses(heat[0], coarse[0], patch_refine, kd_targets, kd_cfg or {},
                                    self.bbox_head.decode_xywh_to_bbox))
        return losses

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

    def inference_patch_plan(self, img: torch.Tensor, img_metas: List[Mapping], coords: List[np.ndarray],
                             max_patches: int) -> crops.PatchPlan:
        """LSM regions -> the inference patch plan (crops.PATCH_MODES) with this model's test_cfg.crop."""
        cfg = self.crop_cfg
        limit = cfg.get("patch_limit", "input")
        if limit not in ("input", "quarter"):
            raise ModelConfigError(f"test_cfg.crop.patch_limit must be 'input' or 'quarter', got {limit!r}")
        canvas = crops.patch_canvas(img.shape[2:]) if limit == "quarter" else tuple(img.shape[2:])
        budget = cfg.get("patch_budget")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0):
            raise ModelConfigError(f"test_cfg.crop.patch_budget must be None or a number > 0, got {budget!r}")
        return crops.plan_patches(coords, img_metas, img.shape[2:], max_patches, int(cfg["min_patch_size"]),
                                  float(cfg["enlarge"]), float(cfg["upscale"]), canvas, mode="inference",
                                  budget=None if budget is None else float(budget))

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def simple_test(self, img: torch.Tensor, img_metas: List[Mapping], rescale: bool = True,
                    fusion: Optional[str] = None, max_patches: Optional[int] = None,
                    return_extras: bool = False, crop_coords: Optional[List[np.ndarray]] = None):
        """Full-image detection -> LSM on this model's heatmap (or the given crop_coords, e.g. another model's
        LSM regions from lsm_coords) -> one batched forward over all patches -> remap -> fusion -> class-wise
        NMS. Returns per image (dets (N,5) [x1,y1,x2,y2,score], labels (N,))."""
        cfg = self.crop_cfg
        fusion = fusion or cfg["fusion"]
        max_patches = cfg["max_patches"] if max_patches is None else max_patches
        heat, coarse, refine = self.bbox_head(self.extract_feat(img))
        blurred = gaussian_blur3x3(heat[0])  # once: for decoding and (YOLC quirk kept) for LSM
        full = self.bbox_head.bboxes_from_blurred(blurred, refine[0], img_metas, rescale=False)
        regions: List[np.ndarray] = [np.zeros((0, 4), np.int64) for _ in img_metas]
        results: List[Dets] = list(full)
        if fusion != "none" and max_patches > 0:
            coords = crop_coords if crop_coords is not None else self._lsm_of_blurred(blurred, img_metas)
            plan = self.inference_patch_plan(img, img_metas, coords, max_patches)
            regions = plan.regions
            results = self._fuse_patches(img, img_metas, full, plan, fusion)
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

    @torch.no_grad()
    def lsm_coords(self, img: torch.Tensor, img_metas: List[Mapping]) -> List[np.ndarray]:
        """The LSM regions inference would crop (content frame): for lending this model's crops to another."""
        feats = self.extract_feat(img)
        assert len(feats) == 1, "YOLC uses one feature level"
        heat = self.bbox_head.forward_heatmap(feats[0])  # the box branch would be thrown away
        return self._lsm_of_blurred(gaussian_blur3x3(heat), img_metas)

    def _lsm_of_blurred(self, blurred: torch.Tensor, img_metas: List[Mapping]) -> List[np.ndarray]:
        # YOLC's get_bboxes blurs the heatmap list in place, so its LSM reads the blurred map; no clusters in padding
        return self.bbox_head.LSM([blurred * _content_mask(blurred, img_metas)], img_metas)

    def _fuse_patches(self, img, img_metas, full: List[Dets], plan: crops.PatchPlan, fusion: str) -> List[Dets]:
        per_img: List[List[Dets]] = [[] for _ in img_metas]
        if plan.valid.any():
            # yolc-kd packs the patches on one canvas instead of a batch padded to the largest patch, and decodes
            # each patch inside its own window (no peaks in padding): far fewer pixels, still one forward
            canvas, windows = plan.pack(img)
            metas = plan.metas(img_metas, canvas.shape[2:])
            ph, _, pr = self.bbox_head(self.extract_feat(canvas))
            # _remap_bboxes_to_full undoes the patch scale (the windows' boxes are in patch pixels)
            for (dets, labels), m, i in zip(self.bbox_head.bboxes_from_windows(gaussian_blur3x3(ph[0]), pr[0], windows),
                                            metas, plan.owners):
                dets = self._remap_bboxes_to_full(dets, m)
                border = np.asarray(img_metas[i].get("border", np.zeros(4)), np.float32)
                dets[:, :4] -= dets.new_tensor(border[[2, 0, 2, 0]])  # tensor -> content frame
                per_img[i].append((dets, labels))
        iou = float(self.test_cfg.get("nms_cfg", {}).get("iou_threshold", 0.6))
        out = []
        for i, (fd, fl) in enumerate(full):
            pd = torch.cat([d for d, _ in per_img[i]]) if per_img[i] else fd.new_zeros((0, 5))
            pl = torch.cat([l for _, l in per_img[i]]) if per_img[i] else fl.new_zeros((0,))
            out.append(crops.fuse_detections((fd, fl), (pd, pl), plan.regions[i], fusion, iou,
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
        raise ModelConfigError(f"{what}: unsupported type {kind!r} (supported: {', '.join(registry)})")
    try:
        return registry[kind](**cfg)
    except TypeError as exc:  # an unknown or missing key in the config dict
        raise ModelConfigError(f"{what} ({kind}): {exc}") from None
