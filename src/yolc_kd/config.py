"""mmdet-style Python configs (YOLC's own configs/yolc.py works unmodified) and YOLC's defaults; distill_cfg
becomes settings.DistillSettings here."""
from __future__ import annotations

import copy
import types
from pathlib import Path
from typing import Any, Dict, Mapping, Union

from yolc_kd.data.augment_config import AugmentConfig
from yolc_kd.errors import UserError
from yolc_kd.settings import DistillSettings

YOLC_CLASSES = ("pedestrian", "people", "bicycle", "car", "van", "truck", "tricycle", "awning-tricycle", "bus", "motor")

# Everything but `model` falls back to these (YOLC's configs/yolc.py recipe, single GPU).
DEFAULTS: Dict[str, Any] = dict(
    classes=YOLC_CLASSES,
    num_classes=None,             # YOLC's configs set it for the head; when set, it must be the head's class count
    img_norm_cfg=None,            # when set, it must be what the train pipeline normalises with
    train_pipeline=None,          # None -> YOLC's training augmentation (see yolc_kd.data.augment)
    test_pipeline=None,           # None -> YOLC's test transform (pad to a multiple of 32 around the image)
    crop_size_order=None,         # RandomCenterCropPad.crop_size as 'wh' (None: AugmentConfig's) or mmdet's 'hw'
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
        if key in ("num_classes", "seed") and (key == "seed" or value is not None) \
                and (not isinstance(value, int) or isinstance(value, bool)):
            raise UserError(f"config {path}: '{key}' must be an int, got {type(value).__name__}")
        if key == "crop_size_order" and value not in (None, "wh", "hw"):
            raise UserError(f"config {path}: 'crop_size_order' must be 'wh' or 'hw', got {value!r}")


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


def load_config(path: Union[str, Path], with_defaults: bool = False) -> Dict[str, Any]:
    """Execute an mmdet-style Python config and return its settings as a plain dict, its distill_cfg resolved
    into cfg["distill"] (settings.DistillSettings; the dict itself is not kept).

    with_defaults=True fills every missing setting with YOLC's default."""
    path = Path(path)
    cfg = _exec_file(path)
    _check_types(cfg, path)
    _check_nested_types(cfg, path)
    if "model" not in cfg:
        raise UserError(f"config {path}: missing required key 'model'")
    _check_declared(cfg, path)
    distill = DistillSettings.from_config(cfg.pop("distill_cfg", None), path)
    if with_defaults:
        base = copy.deepcopy(DEFAULTS)
        for key, value in cfg.items():  # a section of another type (Adam vs SGD) replaces the default whole
            if isinstance(value, Mapping) and isinstance(base.get(key), dict) and \
                    value.get("type", base[key].get("type")) != base[key].get("type"):
                base[key] = {}
        base.pop("distill_cfg")
        cfg = _merge(base, cfg)
        if "classes" not in cfg or cfg["classes"] is None:
            cfg["classes"] = YOLC_CLASSES
    cfg["distill"] = distill
    cfg["_path"] = str(path)
    return cfg


def _check_declared(cfg: Mapping, path: Path) -> None:
    """YOLC's configs declare num_classes and img_norm_cfg beside the settings that use them (the head, the
    pipeline's Normalize); a declaration that disagrees with its use is one UserError."""
    declared = cfg.get("num_classes")
    head = (cfg.get("model") or {}).get("bbox_head") if isinstance(cfg.get("model"), Mapping) else None
    used = head.get("num_classes") if isinstance(head, Mapping) else None
    if declared is not None and used is not None and declared != used:
        raise UserError(f"config {path}: 'num_classes' is {declared} but model.bbox_head.num_classes is {used}")
    norm = cfg.get("img_norm_cfg")
    if norm is None:
        return
    if not isinstance(norm, Mapping) or not {"mean", "std"} <= set(norm) <= {"mean", "std", "to_rgb"}:
        raise UserError(f"config {path}: 'img_norm_cfg' must be a dict of mean, std and to_rgb, got {norm!r}")
    aug = augment_config(cfg)
    declared = AugmentConfig(mean=norm["mean"], std=norm["std"], to_rgb=norm.get("to_rgb", True))
    if (declared.mean, declared.std, declared.to_rgb) != (aug.mean, aug.std, aug.to_rgb):
        raise UserError(f"config {path}: 'img_norm_cfg' {dict(norm)} is not what the train pipeline normalises "
                        f"with (mean {list(aug.mean)}, std {list(aug.std)}, to_rgb {aug.to_rgb}): set it in the "
                        f"pipeline's Normalize")


def augment_config(cfg: Mapping) -> AugmentConfig:
    """The training augmentation and test transform of a config's pipelines (YOLC's when it has none), with its
    crop_size_order."""
    order = cfg.get("crop_size_order")
    return AugmentConfig.from_pipeline(cfg.get("train_pipeline"), cfg.get("test_pipeline"),
                                       **({} if order is None else dict(crop_size_order=order)))


def num_classes_of(model_cfg: Mapping) -> int:
    return int(model_cfg["bbox_head"]["num_classes"])


def setting(cfg: Mapping, section: str, key: str) -> Any:
    """cfg[section][key], else YOLC's default from DEFAULTS (the one place defaults live)."""
    value = (cfg.get(section) or {}).get(key) if isinstance(cfg.get(section), Mapping) else None
    return value if value is not None else DEFAULTS[section][key]
