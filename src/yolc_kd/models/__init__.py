"""YOLC models with mmdet 2.x module names."""
from __future__ import annotations

import copy
from typing import Mapping

from yolc_kd.errors import ModelConfigError
from yolc_kd.models.detector import YOLC
from yolc_kd.models.hrfpn import HRFPN
from yolc_kd.models.hrnet import HRNet
from yolc_kd.models.yolc_head import YOLCHead

__all__ = ["build_detector", "YOLC", "HRNet", "HRFPN", "YOLCHead"]


def build_detector(cfg: Mapping) -> YOLC:
    """Build from one mmdet-style model dict (type='YOLC', with its train_cfg / test_cfg inside).
    Weights are loaded afterwards with yolc_kd.checkpoint.load_checkpoint."""
    cfg = copy.deepcopy(dict(cfg))
    kind = cfg.pop("type", "YOLC")
    if kind != "YOLC":
        raise ModelConfigError(f"model type {kind!r} is not supported (only 'YOLC')")
    return YOLC(**cfg)
