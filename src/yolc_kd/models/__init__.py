"""YOLC models with mmdet 2.x module names."""
from __future__ import annotations

import copy
from typing import Mapping, Optional

from yolc_kd.models.detector import YOLC
from yolc_kd.models.hrfpn import HRFPN
from yolc_kd.models.hrnet import HRNet
from yolc_kd.models.yolc_head import YOLCHead

__all__ = ["build_detector", "YOLC", "HRNet", "HRFPN", "YOLCHead"]


def build_detector(cfg: Mapping, train_cfg: Mapping = None, test_cfg: Mapping = None,
                   distill_cfg: Optional[Mapping] = None, online_teacher: bool = False,
                   config_dir: Optional[str] = None, teacher_ckpt: Optional[str] = None, trust: bool = False) -> YOLC:
    """Build from an mmdet-style model dict (type='YOLC'). With online_teacher the frozen teacher of
    distill_cfg is built and loaded here, in the detector's construction."""
    cfg = copy.deepcopy(dict(cfg))
    kind = cfg.pop("type", "YOLC")
    if kind != "YOLC":
        raise ValueError(f"model type {kind!r} is not supported (only 'YOLC')")
    if train_cfg is not None:
        cfg["train_cfg"] = train_cfg
    if test_cfg is not None:
        cfg["test_cfg"] = test_cfg
    teacher = None
    if online_teacher:
        from yolc_kd.models.distill import build_teacher

        teacher = build_teacher(distill_cfg or {}, cfg | {"type": kind}, config_dir, teacher_ckpt, trust)
    return YOLC(**cfg, distill_cfg=distill_cfg, teacher=teacher)
