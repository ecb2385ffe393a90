"""mmdet-style Python configs (YOLC's own configs/yolc.py works unmodified) and YOLC's defaults; distill_cfg
becomes settings.DistillSettings and the schedule's sections schedule_settings.ScheduleSettings here."""
from __future__ import annotations

import types
from pathlib import Path
from typing import Any, Dict, Mapping, Union

from yolc_kd.crop_settings import CropSettings, LSMSettings
from yolc_kd.data.augment_config import AugmentConfig
from yolc_kd.errors import ModelConfigError, UserError
from yolc_kd.schedule_settings import DEFAULT_SECTIONS, ScheduleSettings
from yolc_kd.settings import DistillSettings, merge_config, over_defaults

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
    # optimizer, optimizer_config, lr_config, runner, evaluation, checkpoint_config, log_config, precise_bn:
    # ScheduleSettings' defaults (schedule_settings.py)
    **DEFAULT_SECTIONS,
    seed=0,
    distill_cfg=None,
    # keys YOLC's config carries that yolc-kd reads no meaning from, accepted so the file loads as is
    dataset_type="VisDroneDataset", data_root="", custom_hooks=[], dist_params=dict(backend="nccl"),
    log_level="INFO", load_from=None, resume_from=None, workflow=[("train", 1)], work_dir=None,
    gpu_ids=None, fp16=None, auto_scale_lr=None, opencv_num_threads=0, mp_start_method="fork",
)
REQUIRED = ("model",)

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
            merged = merge_config(merged, _exec_file((path.parent / b).resolve()))
        cfg = merge_config(merged, cfg)
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


# (section, key) -> expected type of values yolc-kd reads from inside config sections (the schedule's sections:
# ScheduleSettings)
_NESTED_TYPES = {
    ("data", "samples_per_gpu"): int, ("data", "workers_per_gpu"): int,
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
    into cfg["distill"] (settings.DistillSettings; the dict itself is not kept) and its schedule's sections into
    cfg["schedule"] (schedule_settings.ScheduleSettings).

    with_defaults=True fills every missing setting with YOLC's default."""
    path = Path(path)
    cfg = _exec_file(path)
    _check_types(cfg, path)
    _check_nested_types(cfg, path)
    if "model" not in cfg:
        raise UserError(f"config {path}: missing required key 'model'")
    _check_declared(cfg, path)
    _check_crop(cfg["model"], path)
    distill = DistillSettings.from_config(cfg.pop("distill_cfg", None), path)
    schedule = ScheduleSettings.from_config(cfg, path)
    if with_defaults:
        cfg = over_defaults({k: v for k, v in DEFAULTS.items() if k != "distill_cfg"}, cfg)
        if "classes" not in cfg or cfg["classes"] is None:
            cfg["classes"] = YOLC_CLASSES
    cfg["distill"] = distill
    cfg["schedule"] = schedule
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


def _check_crop(model: Mapping, path: Path) -> None:
    """The model's test_cfg.crop and test_cfg.lsm as CropSettings checks them when the model is built, here with
    the file named in the one line."""
    test_cfg = model.get("test_cfg")
    if isinstance(test_cfg, Mapping):
        try:
            CropSettings.from_test_cfg(test_cfg)
            LSMSettings.from_test_cfg(test_cfg)
        except ModelConfigError as exc:
            raise ModelConfigError(f"config {path}: {exc}") from None


def augment_config(cfg: Mapping) -> AugmentConfig:
    """The training augmentation and test transform of a config's pipelines (YOLC's when it has none), with its
    crop_size_order."""
    order = cfg.get("crop_size_order")
    return AugmentConfig.from_pipeline(cfg.get("train_pipeline"), cfg.get("test_pipeline"),
                                       crop_size_order=order)


def num_classes_of(model_cfg: Mapping) -> int:
    return int(model_cfg["bbox_head"]["num_classes"])


def setting(cfg: Mapping, section: str, key: str) -> Any:
    """cfg[section][key], else YOLC's default from DEFAULTS (the one place defaults live)."""
    value = (cfg.get(section) or {}).get(key) if isinstance(cfg.get(section), Mapping) else None
    return value if value is not None else DEFAULTS[section][key]
