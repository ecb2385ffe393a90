"""YOLC models with mmdet 2.x module names."""
from __future__ import annotations

import copy
from typing import Mapping

from yolc_kd.models.detector import YOLC
from yolc_kd.models.hrfpn import HRFPN
from yolc_kd.models.hrnet import HRNet
from yolc_kd.models.yolc_head import YOLCHead

__all__ = ["build_detector", "YOLC", "HRNet", "HRFPN", "YOLCHead"]


def build_detector(cfg: Mapping, train_cfg: Mapping = None, test_cfg: Mapping = None) -> YOLC:
    """Build from an mmdet-style model dict (type='YOLC')."""
    cfg = copy.deepcopy(dict(cfg))
    kind = cfg.pop("type", "YOLC")
    if kind != "YOLC":
        raise ValueError(f"model type {kind!r} is not supported (only 'YOLC')")
    if train_cfg is not None:
        cfg["train_cfg"] = train_cfg
    if test_cfg is not None:
        cfg["test_cfg"] = test_cfg
    return YOLC(**cfg)
