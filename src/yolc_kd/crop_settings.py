"""CropSettings and LSMSettings: a model's test_cfg.crop (the patches fused inference cuts from the LSM regions) and
test_cfg.lsm (how LSM finds the regions) typed and checked once, when the model is built. The defaults live in the
dataclass fields and nowhere else."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Dict, Mapping, Optional, Tuple

from yolc_kd.errors import ModelConfigError, UserError
from yolc_kd.settings import check_type

FUSIONS = ("nms", "replace", "none")
PATCH_LIMITS = ("input", "quarter")
LSM_KEYS = ("grid", "topk_cells", "threshold", "viz_dir")  # test_cfg.lsm: LSMSettings' fields
_NUMBER = (int, float)


@dataclass(frozen=True)
class CropSettings:
    """test_cfg.crop, typed and checked (CropSettings.from_test_cfg reads a model's test_cfg).

    Args:
        max_patches: the most LSM regions fused inference cuts per image (--max-patches overrides it).
        min_patch_size: regions with a side below this (image pixels) are not cut.
        enlarge: each region grows by this factor about its centre before the cut (KD crops too), >= 1.
        upscale: each patch is upscaled by up to this factor before its forward (KD crops too), >= 1.
        fusion: how patch detections join the full image's (crops.fuse_detections): nms (union, then class-wise
            NMS), replace (YOLC: full-image boxes inside a region give way) or none (full image only).
        patch_limit: a patch is upscaled only while it fits the input ("input") or a quarter of it ("quarter":
            bounded cost).
        patch_budget: None (YOLC: no bound) or the most patch pixels per image as a share of its area, > 0
            (crops.plan_inference_patches).
    """
    max_patches: int = 4
    min_patch_size: int = 64
    enlarge: float = 1.2
    upscale: float = 1.5
    fusion: str = "nms"
    patch_limit: str = "input"
    patch_budget: Optional[float] = None

    def __post_init__(self) -> None:
        try:
            for key, expected in _TYPES.items():
                check_type(f"test_cfg.crop.{key}", getattr(self, key), expected, f" {getattr(self, key)!r}")
        except UserError as exc:
            raise ModelConfigError(str(exc)) from None
        for key, ok, allowed in (("max_patches", self.max_patches >= 0, ">= 0"),
                                 ("min_patch_size", self.min_patch_size >= 1, ">= 1"),
                                 ("enlarge", self.enlarge >= 1, ">= 1"), ("upscale", self.upscale >= 1, ">= 1"),
                                 ("fusion", self.fusion in FUSIONS, "one of " + ", ".join(map(repr, FUSIONS))),
                                 ("patch_limit", self.patch_limit in PATCH_LIMITS, "'input' or 'quarter'"),
                                 ("patch_budget", self.patch_budget is None or self.patch_budget > 0,
                                  "None or a number > 0")):
            if not ok:
                raise ModelConfigError(f"test_cfg.crop.{key} must be {allowed}, got {getattr(self, key)!r}")

    @classmethod
    def from_test_cfg(cls, test_cfg: Optional[Mapping]) -> "CropSettings":
        """The crop settings of a model's test_cfg (test_cfg.lsm is LSMSettings', which the head builds); an
        unknown key or a bad value is one ModelConfigError naming the key."""
        test_cfg = test_cfg or {}
        crop = test_cfg.get("crop") or {}
        if not isinstance(crop, Mapping):
            raise ModelConfigError(f"test_cfg.crop must be a dict, got {type(crop).__name__}")
        unknown = [k for k in crop if k not in _TYPES]
        if unknown:
            raise ModelConfigError(f"unknown key test_cfg.crop.{unknown[0]} (known: {', '.join(_TYPES)})")
        return cls(**dict(crop))

    def replace(self, **changes: Any) -> "CropSettings":
        """A copy with the given fields changed (checked again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        """Every field by name (what a cache manifest records of them)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class LSMSettings:
    """test_cfg.lsm, typed and checked (LSMSettings.from_test_cfg reads a model's test_cfg); YOLC's constants are
    the defaults.

    Args:
        grid: (cells across, cells down) of the grid LSM scores on a view's max-over-classes heatmap.
        topk_cells: the highest-scoring cells kept.
        threshold: the binarisation level of the inverted, peak-normalised heatmap (YOLC's 10 / 11: a pixel
            counts when that map is at most floor(threshold x 255); crops.find_clusters).
        viz_dir: folder of the LSM pictures (None: the model's default).
    """
    grid: Tuple[int, int] = (16, 10)
    topk_cells: int = 15
    threshold: float = 10.0 / 11.0
    viz_dir: Optional[str] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", tuple(self.grid) if isinstance(self.grid, (list, tuple)) else self.grid)
        _check_lsm(self.to_dict())

    @classmethod
    def from_test_cfg(cls, test_cfg: Optional[Mapping]) -> "LSMSettings":
        """The LSM settings of a model's test_cfg (test_cfg.lsm over the defaults); an unknown key or a bad value
        is one ModelConfigError naming the key."""
        lsm = (test_cfg or {}).get("lsm") or {}
        if not isinstance(lsm, Mapping):
            raise ModelConfigError(f"test_cfg.lsm must be a dict, got {type(lsm).__name__}")
        unknown = [k for k in lsm if k not in LSM_KEYS]
        if unknown:
            raise ModelConfigError(f"unknown key test_cfg.lsm.{unknown[0]} (known: {', '.join(LSM_KEYS)})")
        return cls(**dict(lsm))

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _check_lsm(lsm: Mapping) -> None:
    grid = lsm.get("grid", (1, 1))
    if not isinstance(grid, (list, tuple)) or len(grid) != 2 or \
            any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in grid):
        raise ModelConfigError(f"test_cfg.lsm.grid must be two integers >= 1 (cells across, down), got {grid!r}")
    topk = lsm.get("topk_cells", 1)
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ModelConfigError(f"test_cfg.lsm.topk_cells must be an integer >= 1, got {topk!r}")
    threshold = lsm.get("threshold", 1.0)
    if isinstance(threshold, bool) or not isinstance(threshold, _NUMBER) or threshold <= 0:
        raise ModelConfigError(f"test_cfg.lsm.threshold must be a number > 0, got {threshold!r}")
    viz_dir = lsm.get("viz_dir")
    if viz_dir is not None and not isinstance(viz_dir, str):
        raise ModelConfigError(f"test_cfg.lsm.viz_dir must be a folder path, got {viz_dir!r}")


_TYPES: Dict[str, Tuple[type, ...]] = dict(
    max_patches=(int,), min_patch_size=(int,), enlarge=_NUMBER, upscale=_NUMBER, fusion=(str,), patch_limit=(str,),
    patch_budget=_NUMBER + (type(None),),
)
assert tuple(_TYPES) == tuple(f.name for f in fields(CropSettings)), "every field has its type check"
