"""A YOLC model as the frozen KD teacher: built from the distill settings, loaded, eval(), no gradients; and its
soft labels (KDTargets) for a batch of views. Used by precompute, the live-teacher source and verify."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from yolc_kd import crops
from yolc_kd.cache.manifest import target_identity
from yolc_kd.checkpoint import load_checkpoint
from yolc_kd.config import load_config
from yolc_kd.errors import UserError
from yolc_kd.kd import KDTargets
from yolc_kd.models import YOLC, build_detector, tiling
from yolc_kd.settings import DistillSettings
from yolc_kd.stride import BOX_STRIDE


def teacher_model_cfg(settings: DistillSettings, student_model_cfg: Mapping,
                      config_dir: Optional[str] = None) -> dict:
    """teacher_config: None -> the student's model dict; a dict -> that model dict; a path -> its `model`."""
    spec = settings.teacher_config
    if spec is None:
        return dict(student_model_cfg)
    if isinstance(spec, Mapping):
        return dict(spec)
    path = Path(spec)
    if not path.is_absolute() and config_dir and not path.exists():
        path = Path(config_dir) / path
    return load_config(path)["model"]


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def build_teacher(settings: DistillSettings, student_model_cfg: Mapping, config_dir: Optional[str] = None,
                  ckpt: Optional[str] = None, trust: bool = False) -> YOLC:
    """The frozen teacher of the distill settings (ckpt overrides their teacher_ckpt). Its construction draws
    from a forked RNG, so building a teacher never changes the student's initialisation."""
    ckpt = ckpt or settings.teacher_ckpt
    if not ckpt:
        raise UserError("distillation needs a teacher checkpoint: set distill_cfg.teacher_ckpt or pass --teacher-ckpt")
    with torch.random.fork_rng(devices=[]):
        teacher = build_detector(teacher_model_cfg(settings, student_model_cfg, config_dir))
    load_checkpoint(teacher, ckpt, strict=True, trust=trust)
    return freeze(teacher)


@torch.no_grad()
def teacher_targets(teacher: YOLC, img: torch.Tensor, img_metas: List[Mapping],
                    settings: DistillSettings) -> KDTargets:
    """Soft labels of a batch of views: heatmap and coarse maps, the LSM crops (max_patches_per_img slots,
    min_patch_size), the refine maps of every patch (one batched forward). The maps are float32 (what the
    cache's codec takes) whatever the autocast or the teacher's dtype."""
    heat, coarse, _ = teacher.bbox_head(teacher.extract_feat(img))
    # KD crops: LSM on the raw teacher heatmap (inference reads the blurred one); cached targets depend on it
    # (LSM's content frame is the view's: a training view's image starts at its top-left corner)
    regions_view_xywh = teacher.bbox_head.LSM(heat, img_metas)
    plan = crops.plan_kd_patches(regions_view_xywh, img.shape[2:], settings.max_patches_per_img,
                                 settings.min_patch_size, float(teacher.crop_cfg.enlarge),
                                 float(teacher.crop_cfg.upscale))
    return _with_refine(teacher, plan, img, heat[0].float(), coarse[0].float())


def _with_refine(teacher: YOLC, plan: crops.KDPatchPlan, img: torch.Tensor, heat: torch.Tensor,
                 coarse: torch.Tensor) -> KDTargets:
    """The KD targets of the views of img: its heatmap and coarse maps, and the plan's patches cut from img run
    through the teacher's refine branch in one batched forward (zero maps in empty slots), float32."""
    patches = plan.cut(img)
    canvas = plan.canvas
    refine = img.new_zeros((img.shape[0], plan.valid.shape[1], 4, canvas[0] // BOX_STRIDE, canvas[1] // BOX_STRIDE),
                           dtype=torch.float32)
    if patches.shape[0]:
        refine[plan.valid.to(img.device)] = teacher.patch_refine(patches).float()
    return KDTargets(heatmap=heat, coarse=coarse, patch_boxes=plan.boxes.to(img.device),
                     patch_scales=plan.scales.to(img.device), patch_valid=plan.valid.to(img.device), refine=refine)


@torch.no_grad()
def image_targets(teacher: YOLC, img: torch.Tensor, content_hw: Sequence[int], view_hw: Sequence[int],
                  settings: DistillSettings, max_regions: int) -> KDTargets:
    """Soft labels of one whole image (image-level cache): img (1,3,H,W) is the (scaled) image in its top-left
    [:h, :w] (content_hw), zero-padded to multiples of 32. Heatmap and coarse maps of the full-image pass (in
    overlapping tiles above test_cfg.max_pixels, models/tiling.py), LSM over the whole image at a view's cell
    size (crops.image_lsm_regions), the max_regions largest crops planned as a view's KD crops are (min_patch_size,
    enlarge, upscale, the view's patch canvas), and the refine maps of every crop (one batched forward).
    Float32 maps; the heatmap is zero outside the image."""
    tiles = tiling.batch_tiles(1, img.shape[2], img.shape[3], teacher.tile_cfg["max_pixels"],
                               teacher.tile_cfg["tile_overlap"])
    if tiles is None:
        heat, coarse, _ = teacher.bbox_head(teacher.extract_feat(img))
        heat, coarse = heat[0].float(), coarse[0].float()
    else:
        def maps(window: torch.Tensor) -> Dict[str, torch.Tensor]:
            h, c, _ = teacher.bbox_head(teacher.extract_feat(window))
            return dict(heat=h[0].float(), coarse=c[0].float())
        stitched = tiling.run_tiled(img, tiles, maps)
        heat, coarse = stitched["heat"], stitched["coarse"]
    h, w = int(content_hw[0]), int(content_hw[1])
    heat[:, :, h:] = 0
    heat[:, :, :, w:] = 0
    regions_image_xywh = crops.image_lsm_regions(heat, (h, w), view_hw, teacher.bbox_head.lsm_cfg)
    plan = crops.plan_kd_patches([regions_image_xywh], (h, w), int(max_regions), settings.min_patch_size,
                                 float(teacher.crop_cfg.enlarge), float(teacher.crop_cfg.upscale),
                                 crops.patch_canvas(view_hw))
    return _with_refine(teacher, plan, img[:, :, :h, :w], heat, coarse)


def expected_target_identity(cfg: Mapping, aug_cfg: Any, classes: Sequence[str]) -> Dict[str, Any]:
    """What the teacher targets for this (student) training config are made with: the manifest's TRAIN_FIELDS
    a cache must carry to fit it. aug_cfg is the config's data.augment.AugmentConfig."""
    settings: DistillSettings = cfg["distill"]
    config_dir = str(Path(cfg["_path"]).resolve().parent) if cfg.get("_path") else None
    teacher = teacher_model_cfg(settings, cfg["model"], config_dir)
    return target_identity(teacher_model=teacher, augment=aug_cfg.to_dict(), input_size=aug_cfg.input_size,
                           classes=classes, distill=settings.to_dict(),
                           crop=crops.crop_config(teacher.get("test_cfg")).to_dict(),
                           patch_canvas=crops.patch_canvas(aug_cfg.input_hw), seed=int(cfg.get("seed", 0)))
