"""YOLCHead: full-resolution class heatmap + coarse/refined (deformable) box regression at stride 4."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import batched_nms

from yolc_kd import crops
from yolc_kd.crop_settings import LSMSettings
from yolc_kd.data.view_meta import meta_content, meta_to_image
from yolc_kd.models.deform import DeformConv2d
from yolc_kd.models.losses import build_loss, recomputed_in_backward
from yolc_kd.models.targets import yolc_targets
from yolc_kd.stride import BOX_STRIDE

Dets = Tuple[torch.Tensor, torch.Tensor]

DEFAULT_TEST_CFG = dict(topk=1000, local_maximum_kernel=3, max_per_img=300, nms_cfg=dict(iou_threshold=0.6))


def grid_points(h: int, w: int, device, dtype=torch.float32) -> torch.Tensor:
    """(h*w, 2) [x, y] integer grid, row-major (mmdet's MlvlPointGenerator, stride 1, offset 0)."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=dtype),
                            torch.arange(w, device=device, dtype=dtype), indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1)


def decode_xywh_to_bbox(xywh: torch.Tensor) -> torch.Tensor:
    """(B,4,h,w) raw coarse or refine output -> (B,h*w,4) [cx, cy, w/2, h/2] in the regression-grid frame (the
    loss frame)."""
    b, _, h, w = xywh.shape
    boxes = xywh.permute(0, 2, 3, 1).reshape(b, h * w, 4)
    grid = grid_points(h, w, xywh.device, xywh.dtype)
    return torch.cat([boxes[..., :2] + grid.unsqueeze(0), boxes[..., 2:]], dim=-1)


def gaussian_blur3x3(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Separable 3x3 gaussian blur with reflect padding (what kornia.gaussian_blur2d does for YOLC)."""
    g = torch.exp(-torch.tensor([-1.0, 0.0, 1.0], dtype=x.dtype, device=x.device) ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (1, 1, 0, 0), mode="reflect"), g.view(1, 1, 1, 3).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, 1, 1), mode="reflect"), g.view(1, 1, 3, 1).repeat(c, 1, 1, 1), groups=c)


def local_maximum(heat: torch.Tensor, kernel: int = 3) -> torch.Tensor:
    """Peaks of a (non-negative) heatmap: values equal to their kernel x kernel maximum, the rest 0.
    kernel 1 keeps every value (a map of peaks passes through unchanged)."""
    if kernel <= 1:
        return heat
    hmax = F.max_pool2d(heat, kernel, stride=1, padding=(kernel - 1) // 2)
    return torch.where(hmax == heat, heat, heat.new_zeros(()))  # = heat * (hmax == heat), one pass less


class YOLCHead(nn.Module):
    """YOLC's head on one feature map: a class heatmap upsampled to full input resolution (local_head), and box
    maps at stride BOX_STRIDE, coarse (xywh_init, decoded by decode_xywh_to_bbox) and their deformable refinement
    (xywh_refine); its losses (gaussian focal on the heatmap, GWD + L1 on the boxes), decoding and LSM.

    Args:
        in_channel: channels of the feature map (the neck's output).
        feat_channel: channels of the box branch's hidden convolutions.
        num_classes: object classes (heatmap channels).
        loss_center_local: heatmap loss config (default GaussianFocalLoss, weight 1).
        loss_xywh: box loss config for coarse and refine maps (default GWDLoss, weight 2); an L1 loss of
            weight 0.5 is added to each.
        train_cfg: mmdet's train_cfg (kept as given).
        test_cfg: decoding options over DEFAULT_TEST_CFG (topk, local_maximum_kernel, max_per_img, nms_cfg) plus
            the LSM and crop settings the detector reads.
        init_cfg: accepted for mmdet config compatibility and not read.
        heatmap_prior_prob: start the heatmap at this probability (a yolc-kd option; None: YOLC's init, 0.5).
    """

    def __init__(self, in_channel: int, feat_channel: int, num_classes: int,
                 loss_center_local: Optional[Mapping] = None, loss_xywh: Optional[Mapping] = None,
                 train_cfg: Optional[Mapping] = None, test_cfg: Optional[Mapping] = None, init_cfg=None,
                 heatmap_prior_prob: Optional[float] = None):
        super().__init__()
        self.num_classes = num_classes
        self.local_head = nn.Sequential(
            nn.Conv2d(in_channel, in_channel, 1),
            nn.BatchNorm2d(in_channel, momentum=0.01),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(in_channel, num_classes * 8, 4, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(num_classes * 8, num_classes * 8, 4, stride=2, padding=1),
            nn.Conv2d(num_classes * 8, num_classes, 1, groups=num_classes))
        self.reg_conv = nn.Sequential(
            nn.Conv2d(in_channel, feat_channel, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(feat_channel, feat_channel, 3, padding=1))
        self.xywh_init = nn.Conv2d(feat_channel, 4, 1)
        self.bbox_offset = nn.Conv2d(feat_channel, 18, 1)
        self.xywh_refine = DeformConv2d(feat_channel, 4, 3, padding=1, bias=False)
        self.loss_center_local = build_loss(loss_center_local or dict(type="GaussianFocalLoss", loss_weight=1.0))
        xywh_cfg = loss_xywh or dict(type="GWDLoss", loss_weight=2.0)
        self.loss_xywh_coarse = build_loss(xywh_cfg)
        self.loss_xywh_refine = build_loss(xywh_cfg)
        self.loss_xywh_coarse_l1 = build_loss(dict(type="L1Loss", loss_weight=0.5))
        self.loss_xywh_refine_l1 = build_loss(dict(type="L1Loss", loss_weight=0.5))
        base = torch.arange(-1, 2, dtype=torch.float64)
        # mmcv offset layout (dy, dx) per kernel point, row-major over the 3x3 kernel
        self.register_buffer("dcn_base_offset", torch.stack([base.repeat_interleave(3), base.repeat(3)], 1)
                             .reshape(1, -1, 1, 1), persistent=False)
        self.train_cfg = dict(train_cfg or {})
        self.test_cfg = {**DEFAULT_TEST_CFG, **dict(test_cfg or {})}
        self.lsm_cfg = LSMSettings.from_test_cfg(self.test_cfg)  # test_cfg.lsm over YOLC's constants, checked once
        self.heatmap_prior_prob = heatmap_prior_prob
        self.init_weights()

    def init_weights(self) -> None:
        """YOLC's init (normal std 0.001, zero bias: heatmaps start at 0.5). heatmap_prior_prob (a yolc-kd
        option, off by default) starts the heatmap at that probability instead, which trains faster."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, DeformConv2d)):
                nn.init.normal_(m.weight, 0, 0.001)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.ConvTranspose2d):
                nn.init.normal_(m.weight, 0, 0.02)
        if self.heatmap_prior_prob:
            p = float(self.heatmap_prior_prob)
            nn.init.constant_(self.local_head[-1].bias, float(np.log(p / (1 - p))))

    # ------------------------------------------------------------------ forward
    def forward(self, feats: Sequence[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]]:
        outs = [self.forward_single(f) for f in feats]
        return [o[0] for o in outs], [o[1] for o in outs], [o[2] for o in outs]

    def forward_single(self, feat: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        heatmap = self.forward_heatmap(feat)
        coarse, refine = self.forward_boxes(feat)
        return heatmap, coarse, refine

    def forward_heatmap(self, feat: torch.Tensor) -> torch.Tensor:
        """The class heatmap only (probabilities, not logits; float32 also under autocast): what LSM needs."""
        logits = self.local_head(feat)
        # float16's sigmoid is exactly 0 / 1 beyond logits of about -17 / +8, where the focal and KD losses'
        # gradients through it turn NaN; float32 as torchvision's sigmoid_focal_loss
        with torch.autocast(logits.device.type, enabled=False):
            return logits.float().sigmoid()

    def forward_boxes(self, feat: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Coarse and refine maps only (no heatmap branch): what patch KD needs. The DCN sampling points, the
        deformable conv and so the refine maps are float32 also under autocast."""
        reg_feat = self.reg_conv(feat)
        coarse = self.xywh_init(reg_feat)
        logits = self.bbox_offset(reg_feat)
        with torch.autocast(logits.device.type, enabled=False):
            offset = logits.float().sigmoid()
        return coarse, self.xywh_refine(reg_feat, self.gen_dcn_offset(coarse.detach(), offset))

    def gen_dcn_offset(self, coarse: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """Sampling points spread over the detached coarse box, minus the regular 3x3 grid; float32 whatever the
        inputs' dtype or autocast (grid coordinates up to W/4 and the box terms cancel in float16)."""
        with torch.autocast(coarse.device.type, enabled=False):
            coarse, offset = coarse.float(), offset.float()
            b, _, h, w = coarse.shape
            grid = grid_points(h, w, coarse.device, coarse.dtype).T.reshape(1, 2, h, w)
            centre = coarse[:, 0:2] + grid
            top_left = centre - coarse[:, 2:4]
            size = 2 * coarse[:, 2:4]
            dcn = torch.empty(b, 18, h, w, dtype=offset.dtype, device=offset.device)
            # YOLC quirk kept: x-terms fill the even (dy) channels and y-terms the odd (dx) channels
            dcn[:, 0::2] = top_left[:, 0:1] + size[:, 0:1] * offset[:, 0::2]
            dcn[:, 1::2] = top_left[:, 1:2] + size[:, 1:2] * offset[:, 1::2]
            anchor = grid.repeat(1, 9, 1, 1) + self.dcn_base_offset.to(offset.dtype)
            return dcn - anchor

    def decode_xywh_to_bbox(self, xywh: torch.Tensor) -> torch.Tensor:
        """The module-level decode_xywh_to_bbox, as a method of the head (the loss calls it so)."""
        return decode_xywh_to_bbox(xywh)

    # ------------------------------------------------------------------ loss
    def loss(self, center_local_preds: List[torch.Tensor], xywh_preds_coarse: List[torch.Tensor],
             xywh_preds_refine: List[torch.Tensor], gt_bboxes: List[torch.Tensor], gt_labels: List[torch.Tensor],
             img_metas: List[Mapping], gt_bboxes_ignore=None) -> Dict[str, torch.Tensor]:
        assert len(center_local_preds) == len(xywh_preds_coarse) == len(xywh_preds_refine) == 1
        with torch.autocast(center_local_preds[0].device.type, enabled=False):  # the losses in float32
            return self._loss(center_local_preds[0], xywh_preds_coarse[0].float(), xywh_preds_refine[0].float(),
                              gt_bboxes, gt_labels, img_metas)

    def _loss(self, heatmap: torch.Tensor, coarse: torch.Tensor, refine: torch.Tensor, gt_bboxes: List[torch.Tensor],
              gt_labels: List[torch.Tensor], img_metas: List[Mapping]) -> Dict[str, torch.Tensor]:
        b = coarse.shape[0]
        # YOLC quirk kept: the target frame comes from the first image's pad_shape for the whole batch
        targets, avg_factor = yolc_targets(gt_bboxes, gt_labels, coarse.shape, img_metas[0]["pad_shape"],
                                           self.num_classes)
        box_coarse = self.decode_xywh_to_bbox(coarse)
        box_refine = self.decode_xywh_to_bbox(refine)
        xywh_t = targets["xywh_target"].reshape(b, -1, 4)
        w = targets["xywh_target_weight"].reshape(b, -1)
        w_l1 = targets["xywh_l1target_weight"].reshape(b, -1, 4)
        # the focal loss's full-resolution intermediates are recomputed in backward, not kept (bit-identical); it
        # casts a lower-precision heatmap to float32 inside, so that copy is not kept either
        heatmap_loss = recomputed_in_backward(
            lambda pred, target: self.loss_center_local(pred, target, avg_factor=avg_factor),
            heatmap, targets["center_heatmap_target"])
        return dict(
            loss_center_heatmap=heatmap_loss,
            loss_xywh_coarse=self.loss_xywh_coarse(box_coarse, xywh_t, w, avg_factor=avg_factor),
            loss_xywh_coarse_l1=self.loss_xywh_coarse_l1(box_coarse, xywh_t, w_l1, avg_factor=avg_factor),
            loss_xywh_refine=self.loss_xywh_refine(box_refine, xywh_t, w, avg_factor=avg_factor),
            loss_xywh_refine_l1=self.loss_xywh_refine_l1(box_refine, xywh_t, w_l1, avg_factor=avg_factor))

    # ------------------------------------------------------------------ inference
    def get_bboxes(self, center_heatmap_preds: List[torch.Tensor], xywh_preds_init: List[torch.Tensor],
                   xywh_preds: List[torch.Tensor], img_metas: List[Mapping], rescale: bool = True,
                   with_nms: bool = False) -> List[Dets]:
        """Top-k peaks of the blurred full-resolution heatmap, boxes from the refined regression (input pixels)."""
        assert len(center_heatmap_preds) == len(xywh_preds) == 1
        return self.bboxes_from_blurred(gaussian_blur3x3(center_heatmap_preds[0]), xywh_preds[0], img_metas,
                                        rescale, with_nms)

    def bboxes_from_blurred(self, heat: torch.Tensor, xywh: torch.Tensor, img_metas: List[Mapping],
                            rescale: bool = True, with_nms: bool = False, kernel: Optional[int] = None) -> List[Dets]:
        """get_bboxes after the blur: heat (B,C,H,W) already blurred, xywh (B,4,h,w) refined maps. kernel: the
        peak search's (None: test_cfg.local_maximum_kernel; 1 for a map that holds only its peaks already)."""
        kernel = self.test_cfg["local_maximum_kernel"] if kernel is None else kernel
        dets, labels = self.decode_heatmap(heat, xywh, img_metas[0]["batch_input_shape"],
                                           k=self.test_cfg["topk"], kernel=kernel)
        hw = tuple(heat.shape[2:])
        # tensor -> image frame (rescale=False: the image as the network took it), boxes not clipped
        per_image = [(meta_to_image(m, hw, rescale).apply_xyxy(d), l) for d, l, m in zip(dets, labels, img_metas)]
        if not with_nms:
            return per_image
        return [self.bboxes_nms(d, l) for d, l in per_image]

    def bboxes_from_windows(self, heat: torch.Tensor, xywh: torch.Tensor,
                            windows: Sequence[Tuple[int, int, int, int, int]]) -> List[Dets]:
        """Detections of several images laid out on one batch (e.g. patches packed on one canvas).

        heat (B,C,H,W) already blurred, xywh (B,4,H/4,W/4); windows (b, y, x, h, w) in heatmap pixels, y and x
        multiples of 4. Peaks are found on the whole map (a peak at a window's edge is compared with its real
        neighbours, as when decoding the whole map), then each window takes its own top-k: boxes in the
        window's frame, no peak outside it. A window covering a whole map gives get_bboxes' detections."""
        peaks = local_maximum(heat, self.test_cfg["local_maximum_kernel"])
        out = []
        for b, y, x, h, w in windows:
            s = BOX_STRIDE
            ch, cw = -(-h // s), -(-w // s)
            # kernel 1: the peaks are already found; (s ch, s cw) keeps the regression stride at BOX_STRIDE
            out.append(tuple(t[0] for t in self.decode_heatmap(
                peaks[b:b + 1, :, y:y + h, x:x + w], xywh[b:b + 1, :, y // s:y // s + ch, x // s:x // s + cw],
                (s * ch, s * cw), k=self.test_cfg["topk"], kernel=1)))
        return out

    def decode_heatmap(self, heat: torch.Tensor, xywh: torch.Tensor, img_shape: Sequence[int], k: int = 100,
                       kernel: int = 3) -> Tuple[torch.Tensor, torch.Tensor]:
        height, width = xywh.shape[2:]
        inp_h, inp_w = img_shape[:2]
        heat = local_maximum(heat, kernel)
        b, _, hh, hw = heat.shape
        scores, inds = torch.topk(heat.reshape(b, -1), min(k, heat[0].numel()))
        labels = inds // (hh * hw)
        inds = inds % (hh * hw)
        # full-resolution peak -> its stride-4 regression cell (floor division by 4); the row length is the
        # regression map's (= hw // 4 for a whole map, also right for a window whose width is not a multiple of 4)
        ys = (inds // hw).div(BOX_STRIDE, rounding_mode="floor").float()
        xs = (inds % hw).div(BOX_STRIDE, rounding_mode="floor").float()
        cell = (width * ys + xs).long()
        box = xywh.permute(0, 2, 3, 1).reshape(b, -1, 4).gather(1, cell.unsqueeze(-1).expand(-1, -1, 4))
        cx, cy = xs + box[..., 0], ys + box[..., 1]
        sx, sy = inp_w / width, inp_h / height
        boxes = torch.stack([(cx - box[..., 2]) * sx, (cy - box[..., 3]) * sy,
                             (cx + box[..., 2]) * sx, (cy + box[..., 3]) * sy], dim=2)
        return torch.cat([boxes, scores[..., None]], dim=-1), labels

    def bboxes_nms(self, dets: torch.Tensor, labels: torch.Tensor) -> Dets:
        """Class-wise NMS then the best max_per_img by score."""
        nms_cfg = self.test_cfg.get("nms_cfg")
        if labels.numel() == 0 or not nms_cfg:
            return dets, labels
        keep = batched_nms(dets[:, :4].float(), dets[:, 4].float(), labels, float(nms_cfg.get("iou_threshold", 0.6)))
        keep = keep[:self.test_cfg["max_per_img"]]  # batched_nms returns keep by descending score
        return dets[keep], labels[keep]

    # ------------------------------------------------------------------ LSM
    def LSM(self, center_heatmap_preds: List[torch.Tensor], img_metas: List[Mapping], visualize: bool = False,
            viz_dir: Optional[str] = None) -> List[np.ndarray]:
        """Cluster regions [x, y, w, h] (int, input pixels without border: the image content frame) for EVERY
        image of the batch."""
        regions_content_xywh, binaries = crops.lsm_regions(center_heatmap_preds[0], img_metas, self.lsm_cfg,
                                                           with_binary=True)
        if visualize:
            viz_dir = self._viz_dir(viz_dir)
            for i, (meta, binary) in enumerate(zip(img_metas, binaries)):
                name = Path(str(meta.get("filename", f"img{i}"))).stem
                x0, y0, _, _ = meta_content(meta, binary.shape)
                regions_tensor_xywh = regions_content_xywh[i] + np.array([x0, y0, 0, 0])  # the binary map's frame
                crops.save_cluster_png(binary, regions_tensor_xywh, Path(viz_dir) / f"lsm_{name}.png")
        return regions_content_xywh

    def _viz_dir(self, viz_dir: Optional[str]) -> str:
        viz_dir = viz_dir or self.lsm_cfg.viz_dir
        if not viz_dir:
            raise ValueError("LSM visualisation needs viz_dir (or test_cfg.lsm.viz_dir)")
        return str(viz_dir)
