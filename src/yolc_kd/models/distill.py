"""The frozen teacher of online distillation: built from distill_cfg, loaded, eval(), no gradients."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

import torch.nn as nn

from yolc_kd.errors import UserError


def teacher_model_cfg(dcfg: Mapping, student_model_cfg: Mapping, config_dir: Optional[str] = None) -> dict:
    """teacher_config: None -> the student's model dict; a dict -> that model dict; a path -> its `model`."""
    from yolc_kd.config import load_config

    spec = dcfg.get("teacher_config")
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


def build_teacher(dcfg: Mapping, student_model_cfg: Mapping, config_dir: Optional[str] = None,
                  ckpt: Optional[str] = None, trust: bool = False) -> nn.Module:
    from yolc_kd.checkpoint import load_checkpoint
    from yolc_kd.models import build_detector

    ckpt = ckpt or dcfg.get("teacher_ckpt")
    if not ckpt:
        raise UserError("distillation needs a teacher checkpoint: set distill_cfg.teacher_ckpt or pass --teacher-ckpt")
    teacher = build_detector(teacher_model_cfg(dcfg, student_model_cfg, config_dir))
    load_checkpoint(teacher, ckpt, strict=True, trust=trust)
    return freeze(teacher)
