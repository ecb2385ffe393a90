"""mmdet-style Python configs (YOLC's own configs/yolc.py works unmodified), YOLC's defaults, distill_cfg."""
from __future__ import annotations

import copy
import types
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

from yolc_kd.errors import UserError

YOLC_CLASSES = ("pedestrian", "people", "bicycle", "car", "van", "truck", "tricycle", "awning-tricycle", "bus", "motor")
IMG_NORM = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)

# Everything but `model` falls back to these (YOLC's configs/yolc.py recipe, single GPU).
DEFAULTS: Dict[str, Any] = dict(
    classes=YOLC_CLASSES,
    num_classes=10,
    img_norm_cfg=IMG_NORM,
    train_pipeline=None,          # None -> YOLC's training augmentation (see yolc_kd.data.augment)
    test_pipeline=None,           # None -> YOLC's test transform (pad to a multiple of 32 around the image)
    data=dict(samples_per_gpu=4, workers_per_gpu=2, train=None, val=None, test=None),
    optimizer=dict(type="SGD", lr=0.0025, momentum=0.9, weight_decay=0.0001),
    optimizer_config=dict(grad_clip=dict(max_norm=35, norm_type=2)),
    lr_config=dict(policy="step", warmup="linear", warmup_iters=1000, warmup_ratio=0.001, step=[18, 24]),
    runner=dict(type="EpochBasedRunner", max_epochs=48),
    evaluation=dict(interval=1, metric="bbox"),
    checkpoint_config=dict(interval=1),
    log_config=dict(interval=50, hooks=[]),
    seed=0,
    distill_cfg=None,
    precise_bn=None,              # e.g. dict(num_batches=20): recompute head BN statistics after training
    # keys YOLC's config carries that yolc-kd reads no meaning from, accepted so the file loads as is
    dataset_type="VisDroneDataset", data_root="", custom_hooks=[], dist_params=dict(backend="nccl"),
    log_level="INFO", load_from=None, resume_from=None, workflow=[("train", 1)], work_dir=None,
    gpu_ids=None, fp16=None, auto_scale_lr=None, opencv_num_threads=0, mp_start_method="fork",
)
REQUIRED = ("model",)

ONLINE_TARGETS = ("cached", "float")  # distill_cfg.online_targets
IMAGE_VIEWS = ("aligned", "free")     # distill_cfg.image_views
DISTILL_DEFAULTS: Dict[str, Any] = dict(
    enable=True, teacher_ckpt=None, teacher_config=None,
    kd_weight_global_hm=1.0, kd_weight_global_coarse=1.0, kd_weight_local_refine=1.0,
    use_teacher_crop=True, max_patches_per_img=4, min_patch_size=64, lsm_visualize=False,
    # hm_kd: soft_focal (per teacher peak) | mse (seed) | kl; box_kd: weighted (by teacher confidence) | mse (seed);
    # box_kd_distance (weighted only): gwd_l1 (YOLC's own box loss) | mse (squared error, summed over x, y, w, h)
    hm_kd="soft_focal", hm_kd_temperature=1.0, hm_kd_beta=2.0, hm_kd_peak_thr=0.3,
    box_kd="weighted", box_kd_distance="gwd_l1",
    # true: training from a cache of K views also sees their mirrors (2K views per image from K). Off by default:
    # mirrored views cost offline KD 0.04-0.07 AP against K fresh views (BENCHMARKS.md, session 6)
    cache_flip=False,
    # online KD's targets: "cached" passes the live teacher's maps through the cache's quantisation, so online
    # and offline KD train on the same numbers (data_schema.md); "float" uses them unrounded
    online_targets="cached",
    # training from an image-level cache: "aligned" views are windows of the image at the cached scales on the
    # teacher's 8-px grid (mirrored views on the mirrored row's), so the targets move cell for cell
    # (data/aligned_views.py); "free" views are drawn as without a cache and the targets resampled into them.
    # Aligned is the default: the teacher's output changes under sub-grid shifts and mirroring, and only exact
    # targets gave students as good as the per-view cache's (BENCHMARKS.md, "Image-level cache")
    image_views="aligned",
)
_DISTILL_TYPES = dict(
    enable=bool, teacher_ckpt=(str, type(None)), teacher_config=(str, dict, type(None)),
    kd_weight_global_hm=(int, float), kd_weight_global_coarse=(int, float), kd_weight_local_refine=(int, float),
    use_teacher_crop=bool, max_patches_per_img=int, min_patch_size=int, lsm_visualize=bool,
    hm_kd=str, hm_kd_temperature=(int, float), hm_kd_beta=(int, float), hm_kd_peak_thr=(int, float),
    box_kd=str, box_kd_distance=str, cache_flip=bool, online_targets=str, image_views=str,
)


def _merge(base: dict, child: Mapping) -> dict:
    """mmcv-style merge: nested dicts merge key by key unless the child sets _delete_=True."""
    out = copy.deepcopy(base)
    for key, value in child.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict) and not value.get("_delete_", False):
            out[key] = _merge(out[key], value)
        else:
            out[key] = {k: v for k, v in value.items() if k != "_delete_"} if isinstance(value, Mapping) else value
    return out


def _exec_file(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    if path.suffix != ".py":
        raise UserError(f"config {path}: only mmdet-style Python configs (.py) are supported")
    namespace: Dict[str, Any] = {"__file__": str(path), "__name__": "__config__"}
    try:
        exec(compile(path.read_text(encoding="utf-8"), str(path), "exec"), namespace)
    except Exception as exc:  # a config is user code: report where it broke in one line
        raise UserError(f"config {path}: {type(exc).__name__}: {exc}") from None
    cfg = {k: v for k, v in namespace.items()
           if not k.startswith("__") and not isinstance(v, (types.ModuleType, types.FunctionType, type))}
    dcfg = cfg.get("distill_cfg")
    if isinstance(dcfg, dict) and isinstance(dcfg.get("teacher_config"), str) \
            and not Path(dcfg["teacher_config"]).is_absolute():  # relative to the file that names it
        dcfg["teacher_config"] = str((path.parent / dcfg["teacher_config"]).resolve())
    bases = cfg.pop("_base_", None)
    if bases:
        merged: dict = {}
        for b in [bases] if isinstance(bases, str) else bases:
            merged = _merge(merged, _exec_file((path.parent / b).resolve()))
        cfg = _merge(merged, cfg)
    return cfg


def _check_types(cfg: Mapping, path: Path) -> None:
    for key, value in cfg.items():
        if key not in DEFAULTS and key not in REQUIRED:
            raise UserError(f"config {path}: unknown key '{key}'")
        default = DEFAULTS.get(key)
        if key == "model" and not isinstance(value, Mapping):
            raise UserError(f"config {path}: 'model' must be a dict, got {type(value).__name__}")
        if isinstance(default, Mapping) and value is not None and not isinstance(value, Mapping):
            raise UserError(f"config {path}: '{key}' must be a dict, got {type(value).__name__}")
        if isinstance(default, (tuple, list)) and key in ("classes",) and not isinstance(value, (tuple, list)):
            raise UserError(f"config {path}: '{key}' must be a list of names, got {type(value).__name__}")
        if isinstance(default, int) and not isinstance(default, bool) and key in ("num_classes", "seed") \
                and (not isinstance(value, int) or isinstance(value, bool)):
            raise UserError(f"config {path}: '{key}' must be an int, got {type(value).__name__}")


# (section, key) -> expected type of values yolc-kd reads from inside config sections
_NESTED_TYPES = {
    ("data", "samples_per_gpu"): int, ("data", "workers_per_gpu"): int,
    ("optimizer", "lr"): (int, float), ("optimizer", "momentum"): (int, float),
    ("optimizer", "weight_decay"): (int, float),
    ("lr_config", "warmup_iters"): int, ("lr_config", "warmup_ratio"): (int, float), ("lr_config", "step"): (list, tuple),
    ("runner", "max_epochs"): int, ("runner", "max_iters"): int,
    ("checkpoint_config", "interval"): int, ("log_config", "interval"): int, ("evaluation", "interval"): int,
    ("precise_bn", "num_batches"): int,
}


def _check_nested_types(cfg: Mapping, path: Union[str, Path]) -> None:
    for (section, key), expected in _NESTED_TYPES.items():
        value = (cfg.get(section) or {}).get(key) if isinstance(cfg.get(section), Mapping) else None
        if value is None:
            continue
        if not isinstance(value, expected) or (isinstance(value, bool)):
            names = "/".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
            raise UserError(f"config {path}: '{section}.{key}' must be {names}, got {type(value).__name__} {value!r}")


def validate_distill_cfg(dcfg: Optional[Mapping], where: Union[str, Path] = "config") -> Dict[str, Any]:
    """distill_cfg with defaults filled; unknown keys or wrong types name the key and the file."""
    if dcfg is None:  # no distill_cfg: KD only where the command line asks for it, with these defaults
        return dict(DISTILL_DEFAULTS, enable=None)
    if not isinstance(dcfg, Mapping):
        raise UserError(f"config {where}: 'distill_cfg' must be a dict")
    out = dict(DISTILL_DEFAULTS)
    for key, value in dcfg.items():
        if key not in _DISTILL_TYPES:
            raise UserError(f"config {where}: unknown key 'distill_cfg.{key}' (known: {', '.join(_DISTILL_TYPES)})")
        expected = _DISTILL_TYPES[key]
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)) or \
                (isinstance(value, bool) and expected == (int, float)):
            names = "/".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
            raise UserError(f"config {where}: 'distill_cfg.{key}' must be {names}, got {type(value).__name__}")
        out[key] = value
    if not 1 <= out["max_patches_per_img"] <= 16:
        raise UserError(f"config {where}: 'distill_cfg.max_patches_per_img' must be in 1..16")
    choices_of = dict(hm_kd=("soft_focal", "mse", "kl"), box_kd=("weighted", "mse"), box_kd_distance=("mse", "gwd_l1"),
                      online_targets=ONLINE_TARGETS, image_views=IMAGE_VIEWS)
    for key, choices in choices_of.items():
        if out[key] not in choices:
            raise UserError(f"config {where}: 'distill_cfg.{key}' must be one of {', '.join(map(repr, choices))}, "
                            f"got {out[key]!r}")
    for key, ok, allowed in (("hm_kd_temperature", out["hm_kd_temperature"] > 0, "> 0"),
                             ("hm_kd_beta", 0 <= out["hm_kd_beta"] <= 8, "in 0..8"),
                             ("hm_kd_peak_thr", 0 < out["hm_kd_peak_thr"] < 1, "in (0, 1)")):
        if not ok:
            raise UserError(f"config {where}: 'distill_cfg.{key}' must be {allowed}, got {out[key]!r}")
    for key in ("kd_weight_global_hm", "kd_weight_global_coarse", "kd_weight_local_refine"):
        if out[key] < 0:
            raise UserError(f"config {where}: 'distill_cfg.{key}' must be >= 0, got {out[key]!r}")
    return out


def load_config(path: Union[str, Path], with_defaults: bool = False) -> Dict[str, Any]:
    """Execute an mmdet-style Python config and return its settings as a plain dict.

    with_defaults=True fills every missing setting with YOLC's default and validates distill_cfg."""
    path = Path(path)
    cfg = _exec_file(path)
    _check_types(cfg, path)
    _check_nested_types(cfg, path)
    if "model" not in cfg:
        raise UserError(f"config {path}: missing required key 'model'")
    if cfg.get("distill_cfg") is not None:
        validate_distill_cfg(cfg["distill_cfg"], path)
    if with_defaults:
        base = copy.deepcopy(DEFAULTS)
        for key, value in cfg.items():  # a section of another type (Adam vs SGD) replaces the default whole
            if isinstance(value, Mapping) and isinstance(base.get(key), dict) and \
                    value.get("type", base[key].get("type")) != base[key].get("type"):
                base[key] = {}
        cfg = _merge(base, cfg)
        cfg["distill_cfg"] = validate_distill_cfg(cfg.get("distill_cfg"), path)
        if "classes" not in cfg or cfg["classes"] is None:
            cfg["classes"] = YOLC_CLASSES
    cfg["_path"] = str(path)
    return cfg


def num_classes_of(model_cfg: Mapping) -> int:
    return int(model_cfg["bbox_head"]["num_classes"])


def setting(cfg: Mapping, section: str, key: str) -> Any:
    """cfg[section][key], else YOLC's default from DEFAULTS (the one place defaults live)."""
    value = (cfg.get(section) or {}).get(key) if isinstance(cfg.get(section), Mapping) else None
    return value if value is not None else DEFAULTS[section][key]
