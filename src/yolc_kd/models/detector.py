"""The YOLC detector: HRNet -> HRFPN -> YOLCHead, with YOLC's crop-refine-fuse inference."""
from __future__ import annotations

from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from yolc_kd import crops
from yolc_kd.data.view_meta import meta_rescale, meta_to_image, meta_view
from yolc_kd.errors import ModelConfigError
from yolc_kd.models.hrfpn import HRFPN
from yolc_kd.models import tiling
from yolc_kd.models.hrnet import HRNet
from yolc_kd.models.yolc_head import Dets, YOLCHead, gaussian_blur3x3, local_maximum
from yolc_kd.stride import BOX_STRIDE

# what the network (backbone + neck + head) returns: ([heatmap], [coarse], [refine]), one entry per feature level
NetworkOutputs = Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]]


class StudentOutputs(NamedTuple):
    """The maps of one training forward, for losses computed beside the model (e.g. distillation).

    Args:
        heatmap: (B,C,H,W) class probabilities of the full view.
        coarse: (B,4,H/4,W/4) raw coarse box maps.
        refine: (B,4,H/4,W/4) raw refine box maps.
        patch_refine: (Np,4,ph/4,pw/4) refine maps of the patches the forward was given, in the plan's order;
            None when it was given none.
    """
    heatmap: torch.Tensor
    coarse: torch.Tensor
    refine: torch.Tensor
    patch_refine: Optional[torch.Tensor]


class YOLC(nn.Module):
    """YOLC: HRNet backbone -> HRFPN neck -> YOLCHead (a full-resolution class heatmap, coarse and refine box
    maps at stride BOX_STRIDE), with YOLC's inference: LSM crops of dense regions, refine maps of the crops,
    detections of the view and of the crops fused (simple_test). Built from an mmdet-style model dict.

    Args:
        backbone: the backbone's config dict (type HRNet).
        neck: the neck's config dict (type HRFPN), or None for none.
        bbox_head: the head's config dict (type YOLCHead); train_cfg and test_cfg are handed to it.
        train_cfg: training options of the head (mmdet's train_cfg), or None.
        test_cfg: inference options (topk, NMS, LSM and crop settings, tiling: crops.crop_config,
            crops.tile_config), or None for YOLCHead's defaults.
        pretrained: accepted for mmdet config compatibility and not read (load a checkpoint instead).
        init_cfg: accepted for mmdet config compatibility and not read.
    """

    def __init__(self, backbone: Mapping, neck: Optional[Mapping], bbox_head: Mapping,
                 train_cfg: Optional[Mapping] = None, test_cfg: Optional[Mapping] = None,
                 pretrained: Optional[str] = None, init_cfg=None):
        super().__init__()
        self.backbone = _build(backbone, {"HRNet": HRNet}, "backbone")
        self.neck = _build(neck, {"HRFPN": HRFPN}, "neck") if neck else None
        head_cfg = dict(bbox_head)
        head_cfg.update(train_cfg=train_cfg, test_cfg=test_cfg)  # as mmdet's SingleStageDetector
        self.bbox_head = _build(head_cfg, {"YOLCHead": YOLCHead}, "bbox_head")
        self.crop_cfg = crops.crop_config(test_cfg)  # test_cfg.crop checked here, once (.lsm: the head's)
        self.tile_cfg = crops.tile_config(test_cfg)
        self._network: Optional[Callable[[torch.Tensor], NetworkOutputs]] = None  # see use_network

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

    def use_network(self, network: Optional[Callable[[torch.Tensor], NetworkOutputs]]) -> None:
        """Let `network` (e.g. deploy.onnx_runtime.OnnxNetwork) stand in for backbone + neck + head at inference
        (simple_test, lsm_coords): called with an image batch it returns the head's ([heatmap], [coarse],
        [refine]). None: the PyTorch modules again. Training and KD always run the PyTorch modules."""
        self._network = network

    def network(self, img: torch.Tensor) -> NetworkOutputs:
        """Backbone + neck + head at inference: the PyTorch modules, or the stand-in set by use_network."""
        if self._network is not None:
            return self._network(img)
        return self.bbox_head(self.extract_feat(img))

    def forward_train(self, img: torch.Tensor, img_metas: List[Mapping], gt_bboxes: List[torch.Tensor],
                      gt_labels: List[torch.Tensor], patches: Optional[crops.KDPatchPlan] = None,
                      **unused) -> Tuple[Dict[str, torch.Tensor], StudentOutputs]:
        """(YOLC's supervised losses, the outputs): the full view's maps and, when a patch plan is given, the
        refine maps of its patches, cut from img and run in one batched forward after the full view."""
        heat, coarse, refine = self.bbox_head(self.extract_feat(img))
        losses = self.bbox_head.loss(heat, coarse, refine, gt_bboxes, gt_labels, img_metas)
        patch_refine = None
        if patches is not None:
            cut = patches.cut(img)
            if cut.shape[0]:
                patch_refine = self.patch_refine(cut)  # all patches, one forward
            else:
                patch_refine = img.new_zeros((0, 4, patches.canvas[0] // BOX_STRIDE, patches.canvas[1] // BOX_STRIDE))
        return losses, StudentOutputs(heat[0], coarse[0], refine[0], patch_refine)

    def patch_refine(self, patches: torch.Tensor) -> torch.Tensor:
        """Refine maps of a batch of patches; the heatmap branch is skipped (only their refine maps are used)."""
        feats = self.extract_feat(patches)
        assert len(feats) == 1, "YOLC uses one feature level"
        return self.bbox_head.forward_boxes(feats[0])[1]

    def inference_patch_plan(self, img: torch.Tensor, img_metas: List[Mapping],
                             regions_content_xywh: List[np.ndarray], max_patches: int) -> crops.InferencePatchPlan:
        """LSM regions (per image (K,4) [x, y, w, h] in its content frame) -> the inference patch plan with this
        model's test_cfg.crop."""
        cfg = self.crop_cfg
        canvas = crops.patch_canvas(img.shape[2:]) if cfg.patch_limit == "quarter" else tuple(img.shape[2:])
        budget = cfg.patch_budget
        return crops.plan_inference_patches(regions_content_xywh, img_metas, img.shape[2:], max_patches,
                                            cfg.min_patch_size, float(cfg.enlarge), float(cfg.upscale), canvas,
                                            budget=None if budget is None else float(budget))

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def simple_test(self, img: torch.Tensor, img_metas: List[Mapping], rescale: bool = True,
                    fusion: Optional[str] = None, max_patches: Optional[int] = None,
                    return_extras: bool = False, crop_coords: Optional[List[np.ndarray]] = None,
                    max_pixels: Optional[int] = None, keep_heatmap: bool = True):
        """Full-image detection -> LSM on this model's heatmap (or the given crop_coords, e.g. another model's
        LSM regions from lsm_coords: per image (K,4) [x, y, w, h] in its content frame) -> one batched forward
        over all patches -> remap -> fusion -> class-wise NMS. Returns per image (dets (N,5) [x1,y1,x2,y2,score],
        labels (N,)); with return_extras also dict(heatmap=(B,C,H,W) or None without keep_heatmap, regions=per
        image (K,4) int64 [x, y, w, h] of the selected crops in its content frame).

        max_pixels (None: test_cfg.max_pixels): an input of more pixels runs the network in overlapping tiles
        (models/tiling.py), the patch canvas too; 0 never tiles."""
        cfg = self.crop_cfg
        fusion = fusion or cfg.fusion
        max_patches = cfg.max_patches if max_patches is None else max_patches
        max_pixels = self.tile_cfg["max_pixels"] if max_pixels is None else int(max_pixels)
        tiles = self._tiles(img, max_pixels)
        heat = None
        if tiles is None:
            heat, _, refine = self.network(img)
            heat, refine = heat[0], refine[0]
            blurred = gaussian_blur3x3(heat)  # once: for decoding and (YOLC quirk kept) for LSM
            heat = heat if keep_heatmap else None
            full = self.bbox_head.bboxes_from_blurred(blurred, refine, img_metas, rescale=False)
            lsm_map = None
            if fusion != "none" and max_patches > 0 and crop_coords is None:
                lsm_map = blurred.amax(dim=1, keepdim=True)
            del blurred
        else:  # stitched peaks of the blurred heatmap, its max over classes for LSM, refine (and the heatmap)
            maps = tiling.run_tiled(img, tiles, lambda window: self._tile_maps(window, keep_heatmap))
            heat, refine, lsm_map = maps.pop("heat", None), maps.pop("refine"), maps.pop("lsm")
            full = self.bbox_head.bboxes_from_blurred(maps.pop("peaks"), refine, img_metas, rescale=False, kernel=1)
        del refine
        regions: List[np.ndarray] = [np.zeros((0, 4), np.int64) for _ in img_metas]
        results: List[Dets] = list(full)
        if fusion != "none" and max_patches > 0:
            regions_content_xywh = crop_coords if crop_coords is not None else self._lsm_of_max(lsm_map, img_metas)
            del lsm_map
            plan = self.inference_patch_plan(img, img_metas, regions_content_xywh, max_patches)
            regions = plan.regions
            results = self._fuse_patches(img, img_metas, full, plan, fusion, max_pixels)
        out = []
        for (dets, labels), meta in zip(results, img_metas):
            dets = dets.clone()
            h, w = meta.get("img_shape", img.shape[2:])[:2]
            dets[:, 0:4:2] = dets[:, 0:4:2].clamp(0, w)  # yolc-kd clips to the image (YOLC does not)
            dets[:, 1:4:2] = dets[:, 1:4:2].clamp(0, h)
            back = meta_rescale(meta, img.shape[2:]) if rescale else None
            if back is not None:  # the image as the network took it -> the image itself
                dets = back.apply_xyxy(dets)
            out.append((dets, labels))
        if return_extras:
            return out, dict(heatmap=heat, regions=regions)
        return out

    @torch.no_grad()
    def lsm_coords(self, img: torch.Tensor, img_metas: List[Mapping],
                   max_pixels: Optional[int] = None) -> List[np.ndarray]:
        """The LSM regions inference would crop (content frame): for lending this model's crops to another.
        Heatmap branch only (the box branch would be thrown away); tiled as simple_test."""
        def lsm_map(window: torch.Tensor) -> torch.Tensor:
            if self._network is not None:  # a stand-in runs the whole network
                return gaussian_blur3x3(self._network(window)[0][0]).amax(dim=1, keepdim=True)
            feats = self.extract_feat(window)
            assert len(feats) == 1, "YOLC uses one feature level"
            return gaussian_blur3x3(self.bbox_head.forward_heatmap(feats[0])).amax(dim=1, keepdim=True)

        tiles = self._tiles(img, self.tile_cfg["max_pixels"] if max_pixels is None else int(max_pixels))
        if tiles is None:
            return self._lsm_of_max(lsm_map(img), img_metas)
        return self._lsm_of_max(tiling.run_tiled(img, tiles, lambda w: dict(lsm=lsm_map(w)))["lsm"], img_metas)

    def _tiles(self, img: torch.Tensor, max_pixels: int) -> Optional[List[tiling.Tile]]:
        """None when img fits one forward of max_pixels, else its tiles (test_cfg.tile_overlap of context)."""
        return tiling.batch_tiles(img.shape[0], img.shape[2], img.shape[3], max_pixels, self.tile_cfg["tile_overlap"])

    def _tile_maps(self, window: torch.Tensor, keep_heatmap: bool) -> Dict[str, torch.Tensor]:
        """What the stitched full-image pass needs from one tile: the peaks of the blurred heatmap (blur and peak
        search are 3x3-local, exact inside the core), its max over classes (LSM), refine, and the heatmap if kept."""
        heat, _, refine = self.network(window)
        blurred = gaussian_blur3x3(heat[0])
        out = dict(peaks=local_maximum(blurred, self.test_cfg["local_maximum_kernel"]),
                   lsm=blurred.amax(dim=1, keepdim=True), refine=refine[0])
        if keep_heatmap:
            out["heat"] = heat[0]
        return out

    def _lsm_of_max(self, lsm_map: torch.Tensor, img_metas: List[Mapping]) -> List[np.ndarray]:
        """LSM on the (B,1,H,W) max over classes of the blurred heatmap (YOLC's get_bboxes blurs the heatmap list
        in place, so its LSM reads the blurred map); zeroed in place outside each image: no clusters in padding."""
        hw = lsm_map.shape[2:]
        for i, meta in enumerate(img_metas):
            y0, y1, x0, x1 = meta_view(meta, hw).valid_window(out_size=hw)  # the image's pixels in the tensor
            lsm_map[i, :, :y0] = 0
            lsm_map[i, :, y1:] = 0
            lsm_map[i, :, :, :x0] = 0
            lsm_map[i, :, :, x1:] = 0
        return self.bbox_head.LSM([lsm_map], img_metas)

    def memory_estimate(self, batch: int, height: int, width: int, max_pixels: Optional[int] = None,
                        keep_heatmap: bool = False) -> Tuple[int, str]:
        """Estimated peak bytes (and what they are made of) of simple_test's full-image pass on a (batch, 3,
        height, width) input: see tiling.pass_bytes."""
        head = self.bbox_head
        neck_in = list(self.neck.in_channels) if self.neck is not None else [head.local_head[0].in_channels]
        neck_out = self.neck.reduction_conv.conv.out_channels if self.neck is not None else 0
        per_px = tiling.forward_bytes_per_pixel(head.num_classes, head.local_head[0].in_channels, neck_in, neck_out)
        max_pixels = self.tile_cfg["max_pixels"] if max_pixels is None else int(max_pixels)
        return tiling.pass_bytes(batch, height, width, head.num_classes, per_px, max_pixels,
                                 self.tile_cfg["tile_overlap"], keep_heatmap)

    def _fuse_patches(self, img, img_metas, full: List[Dets], plan: crops.InferencePatchPlan, fusion: str,
                      max_pixels: int = 0) -> List[Dets]:
        per_img: List[List[Dets]] = [[] for _ in img_metas]
        if plan.valid.any():
            # yolc-kd packs the patches on one canvas instead of a batch padded to the largest patch, and decodes
            # each patch inside its own window (no peaks in padding): far fewer pixels, still one forward
            canvas, windows = plan.pack(img)
            metas = plan.metas(img_metas, canvas.shape[2:])
            tiles = self._tiles(canvas, max_pixels)
            if tiles is None:
                ph, _, pr = self.network(canvas)
                ph, pr = gaussian_blur3x3(ph[0]), pr[0]
            else:  # a canvas over the budget runs in tiles; bboxes_from_windows' peak search keeps the peaks as they are
                maps = tiling.run_tiled(canvas, tiles, lambda window: self._tile_maps(window, False))
                ph, pr = maps["peaks"], maps["refine"]
                del maps
            del canvas
            # remap_bboxes_to_full undoes the patch scale (the windows' boxes are in patch pixels)
            for (dets, labels), m, i in zip(self.bbox_head.bboxes_from_windows(ph, pr, windows), metas, plan.owners):
                dets = crops.remap_bboxes_to_full(dets, m)
                dets = meta_to_image(img_metas[i], img.shape[2:], rescale=False).apply_xyxy(dets)
                per_img[i].append((dets, labels))
        iou = float(self.test_cfg.get("nms_cfg", {}).get("iou_threshold", 0.6))
        out = []
        for i, (fd, fl) in enumerate(full):
            pd = torch.cat([d for d, _ in per_img[i]]) if per_img[i] else fd.new_zeros((0, 5))
            pl = torch.cat([l for _, l in per_img[i]]) if per_img[i] else fl.new_zeros((0,))
            out.append(crops.fuse_detections((fd, fl), (pd, pl), plan.regions[i], fusion, iou,
                                             int(self.test_cfg["max_per_img"])))
        return out


def _build(cfg: Mapping, registry: Mapping, what: str) -> nn.Module:
    cfg = dict(cfg)
    kind = cfg.pop("type", None)
    if kind not in registry:
        raise ModelConfigError(f"{what}: unsupported type {kind!r} (supported: {', '.join(registry)})")
    try:
        return registry[kind](**cfg)
    except TypeError as exc:  # an unknown or missing key in the config dict
        raise ModelConfigError(f"{what} ({kind}): {exc}") from None
