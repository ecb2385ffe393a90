"""Typed, validated settings resolved once from a config's sections. `distill_cfg` (the design notes' KD switches and
weights, plus yolc-kd's loss and cache options) becomes DistillSettings here; every other module receives that
object, never the config's dict. The defaults live in the dataclass fields and nowhere else."""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

from yolc_kd.errors import UserError

HM_KD_MODES = ("soft_focal", "mse", "kl")
BOX_KD_MODES = ("weighted", "mse")
BOX_KD_DISTANCES = ("mse", "gwd_l1")
ONLINE_TARGETS = ("cached", "float")
IMAGE_VIEWS = ("aligned", "free")
_NUMBER = (int, float)


@dataclass(frozen=True)
class DistillSettings:
    """distill_cfg, typed and checked (DistillSettings.from_config reads the config's dict).

    Args:
        enable: the KD switch (seed). None: the config has no distill_cfg, KD only where the command line asks.
        teacher_ckpt: teacher weights (seed); --teacher-ckpt / --ckpt override it.
        teacher_config: the teacher's model: None (the student's), a model dict, or a config file's path.
        kd_weight_global_hm: weight of the full-view heatmap KD term (seed).
        kd_weight_global_coarse: weight of the full-view coarse-box KD term (seed).
        kd_weight_local_refine: weight of the KD-patch refine-box term (seed).
        use_teacher_crop: KD patches from the teacher's LSM (seed; True is the only value: the targets fix the
            patches before the student's forward).
        max_patches_per_img: KD patch slots per view (seed), 1..16.
        min_patch_size: LSM regions below this side in view pixels are dropped (seed).
        lsm_visualize: PNGs of the first training batches' KD crops (seed).
        hm_kd: heatmap KD formula: soft_focal (per teacher peak) | mse (seed) | kl.
        hm_kd_temperature: softmax temperature of hm_kd='kl'.
        hm_kd_beta: focusing exponent of hm_kd='soft_focal', 0..8.
        hm_kd_peak_thr: teacher peak threshold of hm_kd='soft_focal' (its normaliser), in (0, 1).
        box_kd: box KD formula: weighted (by teacher confidence) | mse (seed).
        box_kd_distance: per-box distance of box_kd='weighted': gwd_l1 (YOLC's own box loss) | mse.
        cache_flip: training from a cache of K views also sees their mirrors (2K views per image). Off by
            default: mirrored views cost offline KD 0.04-0.07 AP against K fresh views (BENCHMARKS.md).
        online_targets: a live teacher's maps: "cached" rounds them as the cache stores them (online and offline
            KD train on the same numbers, data_schema.md), "float" keeps them unrounded.
        image_views: training from an image-level cache: "aligned" views are windows of the image at the cached
            scales on the teacher's 8-px grid (mirrored views on the mirrored row's), so the targets move cell for
            cell (data/aligned_views.py); "free" views are drawn as without a cache and the targets resampled
            into them. Aligned by default: only exact targets gave students as good as the per-view cache's
            (BENCHMARKS.md, "Image-level cache").
    """
    enable: Optional[bool] = True
    teacher_ckpt: Optional[str] = None
    teacher_config: Union[str, Dict[str, Any], None] = None
    kd_weight_global_hm: float = 1.0
    kd_weight_global_coarse: float = 1.0
    kd_weight_local_refine: float = 1.0
    use_teacher_crop: bool = True
    max_patches_per_img: int = 4
    min_patch_size: int = 64
    lsm_visualize: bool = False
    hm_kd: str = "soft_focal"
    hm_kd_temperature: float = 1.0
    hm_kd_beta: float = 2.0
    hm_kd_peak_thr: float = 0.3
    box_kd: str = "weighted"
    box_kd_distance: str = "gwd_l1"
    cache_flip: bool = False
    online_targets: str = "cached"
    image_views: str = "aligned"

    def __post_init__(self) -> None:
        for key, expected in _TYPES.items():
            if not (key == "enable" and self.enable is None):
                check_type(f"distill_cfg.{key}", getattr(self, key), expected)
        if not 1 <= self.max_patches_per_img <= 16:
            raise UserError("'distill_cfg.max_patches_per_img' must be in 1..16")
        if self.min_patch_size < 1:
            raise UserError(f"'distill_cfg.min_patch_size' must be >= 1, got {self.min_patch_size!r}")
        if not self.use_teacher_crop:
            raise UserError("'distill_cfg.use_teacher_crop' must be True: KD patches are the teacher's LSM crops, "
                            "fixed by the KD targets before the student's forward (cached or live)")
        for key, choices in (("hm_kd", HM_KD_MODES), ("box_kd", BOX_KD_MODES), ("box_kd_distance", BOX_KD_DISTANCES),
                             ("online_targets", ONLINE_TARGETS), ("image_views", IMAGE_VIEWS)):
            if getattr(self, key) not in choices:
                raise UserError(f"'distill_cfg.{key}' must be one of {', '.join(map(repr, choices))}, "
                                f"got {getattr(self, key)!r}")
        for key, ok, allowed in (("hm_kd_temperature", self.hm_kd_temperature > 0, "> 0"),
                                 ("hm_kd_beta", 0 <= self.hm_kd_beta <= 8, "in 0..8"),
                                 ("hm_kd_peak_thr", 0 < self.hm_kd_peak_thr < 1, "in (0, 1)")):
            if not ok:
                raise UserError(f"'distill_cfg.{key}' must be {allowed}, got {getattr(self, key)!r}")
        for key in ("kd_weight_global_hm", "kd_weight_global_coarse", "kd_weight_local_refine"):
            if getattr(self, key) < 0:
                raise UserError(f"'distill_cfg.{key}' must be >= 0, got {getattr(self, key)!r}")

    @classmethod
    def from_config(cls, raw: Optional[Mapping], where: Union[str, Path] = "config") -> "DistillSettings":
        """The settings of a config's distill_cfg (None: no distill_cfg, enable None); an unknown key or a bad
        value is one UserError naming the key and the file."""
        if raw is None:
            return cls(enable=None)
        if not isinstance(raw, Mapping):
            raise UserError(f"config {where}: 'distill_cfg' must be a dict")
        unknown = [k for k in raw if k not in _TYPES]
        if unknown:
            raise UserError(f"config {where}: unknown key 'distill_cfg.{unknown[0]}' (known: {', '.join(_TYPES)})")
        if raw.get("enable", True) is None:
            raise UserError(f"config {where}: 'distill_cfg.enable' must be bool, got NoneType")
        try:
            return cls(**dict(raw))
        except UserError as exc:
            raise UserError(f"config {where}: {exc}") from None

    def replace(self, **changes: Any) -> "DistillSettings":
        """A copy with the given fields changed (checked again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        """Every field by name (what a cache manifest records of them)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def check_type(key: str, value: Any, expected: Tuple[type, ...], shown: str = "") -> None:
    """One UserError "'key' must be <types>, got <type><shown>" unless value is one of the expected types (a bool
    is a number only where bool is expected)."""
    if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
        names = "/".join(t.__name__ for t in expected)
        raise UserError(f"'{key}' must be {names}, got {type(value).__name__}{shown}")


def merge_config(base: Mapping, child: Mapping) -> dict:
    """mmcv-style merge: nested dicts merge key by key unless the child sets _delete_=True."""
    out = copy.deepcopy(dict(base))
    for key, value in child.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict) and not value.get("_delete_", False):
            out[key] = merge_config(out[key], value)
        else:
            out[key] = {k: v for k, v in value.items() if k != "_delete_"} if isinstance(value, Mapping) else value
    return out


def over_defaults(defaults: Mapping, cfg: Mapping) -> dict:
    """cfg merged over defaults (merge_config); a section of another type than its default's (an Adam optimizer
    over the default SGD, an IterBasedRunner over the EpochBasedRunner) replaces the default whole."""
    base = copy.deepcopy(dict(defaults))
    for key, value in cfg.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict) and \
                value.get("type", base[key].get("type")) != base[key].get("type"):
            base[key] = {}
    return merge_config(base, cfg)


_TYPES: Dict[str, Tuple[type, ...]] = dict(
    enable=(bool,), teacher_ckpt=(str, type(None)), teacher_config=(str, dict, type(None)),
    kd_weight_global_hm=_NUMBER, kd_weight_global_coarse=_NUMBER, kd_weight_local_refine=_NUMBER,
    use_teacher_crop=(bool,), max_patches_per_img=(int,), min_patch_size=(int,), lsm_visualize=(bool,),
    hm_kd=(str,), hm_kd_temperature=_NUMBER, hm_kd_beta=_NUMBER, hm_kd_peak_thr=_NUMBER,
    box_kd=(str,), box_kd_distance=(str,), cache_flip=(bool,), online_targets=(str,), image_views=(str,),
)
assert tuple(_TYPES) == tuple(f.name for f in fields(DistillSettings)), "every field has its type check"
