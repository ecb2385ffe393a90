"""The COCO data a command works on: paths from the arguments or the config's data.<split>, and the dataset
checked against the model's classes."""
from __future__ import annotations

from typing import Mapping, Optional, Tuple

from yolc_kd.data.coco import CocoDetection
from yolc_kd.errors import UserError


def data_paths(cfg: Mapping, split: str = "train") -> Tuple[Optional[str], Optional[str], Optional[list]]:
    """(ann_file, img_prefix, classes) of data.<split> in an mmdet config, unwrapping RepeatDataset."""
    spec = (cfg.get("data") or {}).get(split) or {}
    while isinstance(spec, Mapping) and "dataset" in spec:
        spec = spec["dataset"]
    return spec.get("ann_file"), spec.get("img_prefix"), spec.get("classes")


def resolve_data(cfg: Mapping, ann: Optional[str], images: Optional[str], split: str = "train") -> Tuple[str, str]:
    """--ann / --images, else the config's data.<split>.ann_file / img_prefix."""
    c_ann, c_img, _ = data_paths(cfg, split)
    ann, images = ann or c_ann, images or c_img
    if not ann or not images:
        raise UserError(f"no {split} data: pass --ann and --images or set data.{split}.ann_file/img_prefix in the config")
    return ann, images


def load_dataset(cfg: Mapping, ann: str, images: str) -> CocoDetection:
    """The COCO dataset, its classes checked against the model's; warnings printed."""
    from yolc_kd.config import num_classes_of

    coco = CocoDetection(ann, images, classes=cfg.get("classes"))
    if coco.num_classes != num_classes_of(cfg["model"]):
        raise UserError(f"{ann} has {coco.num_classes} classes but the model has {num_classes_of(cfg['model'])}")
    for w in coco.warnings:
        print(f"warning: {w}")
    return coco
