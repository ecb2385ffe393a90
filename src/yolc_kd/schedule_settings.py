"""ScheduleSettings: a config's optimizer, optimizer_config, lr_config, runner, checkpoint_config, evaluation,
log_config and precise_bn sections, typed and checked once (config.load_config resolves them into
cfg["schedule"]; the trainer and its hooks read that object). YOLC's recipe (configs/yolc.py, one GPU) is the
fields' defaults, and config.DEFAULTS' sections are made from them."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch

from yolc_kd.errors import UserError
from yolc_kd.settings import check_type, over_defaults

OPTIMIZERS = {"SGD": torch.optim.SGD, "Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}
LR_POLICIES = ("step", "CosineAnnealing")  # mmcv's names (mmcv also takes "Step")
RUNNERS = ("EpochBasedRunner", "IterBasedRunner")
# mmdet's COCO bbox keys -> the trainer's evaluation (recipe.make_eval_fn); 'auto' is the first, as in mmdet
SAVE_BEST_KEYS = dict(bbox_mAP="AP", bbox_mAP_50="AP50", bbox_mAP_75="AP75", bbox_mAP_s="AP_small")
# log_config.hooks that say what yolc-kd writes anyway (metrics.jsonl and TensorBoard)
LOGGER_HOOKS = ("TextLoggerHook", "TensorboardLoggerHook")
SECTIONS = ("optimizer", "optimizer_config", "lr_config", "runner", "checkpoint_config", "evaluation", "log_config",
            "precise_bn")
_NUMBER = (int, float)


def _sgd_args() -> Dict[str, Any]:
    return dict(momentum=0.9, weight_decay=0.0001)


@dataclass(frozen=True)
class ScheduleSettings:
    """The optimisation schedule of a config, typed and checked (ScheduleSettings.from_config reads the config's
    sections with mmdet's meaning).

    Args:
        optimizer: optimizer.type: SGD, Adam or AdamW (torch.optim's).
        lr: optimizer.lr, the base learning rate.
        optimizer_args: the optimizer's other keyword arguments (SGD's momentum and weight_decay by default; a
            section of another type starts from none).
        grad_clip: optimizer_config.grad_clip.max_norm; None: no clipping.
        grad_clip_norm_type: optimizer_config.grad_clip.norm_type.
        lr_policy: lr_config.policy: step (mmcv's step decay by gamma at `step`) or CosineAnnealing (to min_lr or
            lr x min_lr_ratio over the run's iterations).
        warmup: lr_config.warmup: 'linear' or None.
        warmup_iters: lr_config.warmup_iters.
        warmup_ratio: lr_config.warmup_ratio, the lr's share at iteration 0 of the warmup, in (0, 1].
        step: lr_config.step: epochs (EpochBasedRunner) or iterations (IterBasedRunner) at which the lr drops.
        gamma: lr_config.gamma, the step policy's factor.
        min_lr: lr_config.min_lr of CosineAnnealing.
        min_lr_ratio: lr_config.min_lr_ratio of CosineAnnealing.
        runner: runner.type: EpochBasedRunner (max_epochs, intervals in epochs; an epoch is the RepeatDataset's
            passes) or IterBasedRunner (max_iters, intervals in iterations).
        max_epochs: runner.max_epochs.
        max_iters: runner.max_iters.
        checkpoint_interval: checkpoint_config.interval, in the runner's unit.
        eval_interval: evaluation.interval, in epochs.
        save_best: evaluation.save_best, the mmdet metric the best checkpoint is kept by (None: none kept).
        log_interval: log_config.interval, iterations between metrics records.
        precise_bn_batches: precise_bn.num_batches (0: no precise BN).
    """
    optimizer: str = "SGD"
    lr: float = 0.0025
    optimizer_args: Dict[str, Any] = field(default_factory=_sgd_args)
    grad_clip: Optional[float] = 35
    grad_clip_norm_type: float = 2
    lr_policy: str = "step"
    warmup: Optional[str] = "linear"
    warmup_iters: int = 1000
    warmup_ratio: float = 0.001
    step: Tuple[int, ...] = (18, 24)
    gamma: float = 0.1
    min_lr: Optional[float] = None
    min_lr_ratio: Optional[float] = None
    runner: str = "EpochBasedRunner"
    max_epochs: int = 48
    max_iters: int = 1000
    checkpoint_interval: int = 1
    eval_interval: int = 1
    save_best: Optional[str] = None
    log_interval: int = 50
    precise_bn_batches: int = 0

    def __post_init__(self) -> None:
        for name, (key, expected) in _FIELDS.items():
            check_type(key, getattr(self, name), expected, f" {getattr(self, name)!r}")
        for s in self.step:
            check_type("lr_config.step[]", s, (int,), f" {s!r}")
        choices = (("optimizer", tuple(OPTIMIZERS)), ("lr_policy", LR_POLICIES), ("warmup", ("linear", None)),
                   ("runner", RUNNERS), ("save_best", tuple(SAVE_BEST_KEYS) + (None,)))
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                shown = ("auto",) + allowed if name == "save_best" else allowed
                raise UserError(f"'{_FIELDS[name][0]}' must be one of {', '.join(map(repr, shown))}, "
                                f"got {getattr(self, name)!r}")
        for name, minimum in (("max_iters", 1), ("max_epochs", 1), ("warmup_iters", 0), ("checkpoint_interval", 1),
                              ("log_interval", 1), ("eval_interval", 1), ("precise_bn_batches", 0)):
            if getattr(self, name) < minimum:
                raise UserError(f"'{_FIELDS[name][0]}' must be at least {minimum}, got {getattr(self, name)!r}")
        for name, ok, allowed in (("lr", self.lr > 0, "> 0"), ("gamma", self.gamma > 0, "> 0"),
                                  ("warmup_ratio", 0 < self.warmup_ratio <= 1, "in (0, 1]"),
                                  ("grad_clip", self.grad_clip is None or self.grad_clip > 0,
                                   "> 0 (grad_clip=None: no clipping)"),
                                  ("grad_clip_norm_type", self.grad_clip_norm_type > 0, "> 0"),
                                  ("min_lr", self.min_lr is None or self.min_lr >= 0, ">= 0"),
                                  ("min_lr_ratio", self.min_lr_ratio is None or self.min_lr_ratio >= 0, ">= 0")):
            if not ok:
                raise UserError(f"'{_FIELDS[name][0]}' must be {allowed}, got {getattr(self, name)!r}")
        if self.lr_policy == "CosineAnnealing" and ((self.min_lr is None) == (self.min_lr_ratio is None)):
            raise UserError("lr_config with policy='CosineAnnealing' needs exactly one of min_lr and min_lr_ratio")
        known = set(inspect.signature(OPTIMIZERS[self.optimizer]).parameters) - {"params", "lr"}
        unknown = [k for k in self.optimizer_args if k not in known]
        if unknown:
            raise UserError(f"'optimizer.{unknown[0]}' is not an argument of torch.optim.{self.optimizer} "
                            f"(it takes {', '.join(sorted(known))})")

    @property
    def by_epoch(self) -> bool:
        """Counts, lr steps and checkpoint intervals in epochs (EpochBasedRunner) rather than iterations."""
        return self.runner == "EpochBasedRunner"

    @classmethod
    def from_config(cls, cfg: Mapping, where: Union[str, Path] = "config") -> "ScheduleSettings":
        """The settings of a config's sections over YOLC's (config.DEFAULTS'); an unknown key or a bad value is
        one UserError naming the key and the file."""
        try:
            return cls._from_sections(over_defaults(DEFAULT_SECTIONS, {k: cfg[k] for k in SECTIONS if k in cfg}))
        except UserError as exc:
            raise UserError(f"config {where}: {exc}") from None

    @classmethod
    def _from_sections(cls, s: Dict[str, Any]) -> "ScheduleSettings":
        for section in SECTIONS:
            if s.get(section) is not None and not isinstance(s[section], Mapping):
                raise UserError(f"'{section}' must be a dict, got {type(s[section]).__name__}")
            s[section] = dict(s.get(section) or {})
        if "paramwise_cfg" in s["optimizer"]:
            raise UserError("'optimizer.paramwise_cfg' is not supported: every parameter trains with the "
                            "optimizer's settings")
        if "save_best" in s["checkpoint_config"]:
            raise UserError("checkpoint_config.save_best: mmdet reads save_best from the evaluation settings; write "
                            "evaluation = dict(interval=1, metric='bbox', save_best='bbox_mAP')")
        for section, known in _KNOWN.items():
            unknown = [k for k in s[section] if k not in known]
            if unknown:
                raise UserError(f"unknown key '{section}.{unknown[0]}' (known: {', '.join(known)})")
        optimizer, clip, lr_cfg = s["optimizer"], s["optimizer_config"].get("grad_clip"), s["lr_config"]
        if clip is not None and (not isinstance(clip, Mapping) or "max_norm" not in clip
                                 or not set(clip) <= {"max_norm", "norm_type"}):
            raise UserError(f"'optimizer_config.grad_clip' must be None or dict(max_norm=..., norm_type=...), "
                            f"got {clip!r}")
        evaluation, log = s["evaluation"], s["log_config"]
        if evaluation.get("metric", "bbox") not in ("bbox", ["bbox"], ("bbox",)):
            raise UserError(f"'evaluation.metric' must be 'bbox' (COCO box AP), got {evaluation['metric']!r}")
        if evaluation.get("save_best") is not None and evaluation.get("rule") not in (None, "greater"):
            raise UserError(f"evaluation.rule={evaluation['rule']!r}: {evaluation.get('save_best')} is an AP, "
                            f"greater is better (rule='greater' or leave it out)")
        hooks = log.get("hooks") or []
        if not isinstance(hooks, (list, tuple)) or any(not isinstance(h, Mapping) or h.get("type") not in LOGGER_HOOKS
                                                       for h in hooks):
            raise UserError(f"'log_config.hooks' may list {' and '.join(LOGGER_HOOKS)} (yolc-kd writes "
                            f"metrics.jsonl and TensorBoard logs), got {hooks!r}")
        save_best = evaluation.get("save_best")
        policy = lr_cfg.get("policy", "step")
        step, warmup_iters = lr_cfg.get("step"), lr_cfg.get("warmup_iters")
        d = cls()
        return cls(
            optimizer=optimizer.get("type", d.optimizer), lr=optimizer.get("lr", d.lr),
            optimizer_args={k: v for k, v in optimizer.items() if k not in ("type", "lr")},
            grad_clip=None if clip is None else clip["max_norm"],
            grad_clip_norm_type=(clip or {}).get("norm_type", d.grad_clip_norm_type),
            lr_policy="step" if policy == "Step" else policy, warmup=lr_cfg.get("warmup"),
            warmup_iters=0 if warmup_iters is None else warmup_iters,
            warmup_ratio=lr_cfg.get("warmup_ratio", d.warmup_ratio),
            step=tuple(step) if isinstance(step, (list, tuple)) else (() if step is None else step),
            gamma=lr_cfg.get("gamma", d.gamma), min_lr=lr_cfg.get("min_lr"), min_lr_ratio=lr_cfg.get("min_lr_ratio"),
            runner=s["runner"].get("type", d.runner), max_epochs=s["runner"].get("max_epochs", d.max_epochs),
            max_iters=s["runner"].get("max_iters", d.max_iters),
            checkpoint_interval=s["checkpoint_config"].get("interval", d.checkpoint_interval),
            eval_interval=evaluation.get("interval", d.eval_interval),
            save_best=next(iter(SAVE_BEST_KEYS)) if save_best == "auto" else save_best,
            log_interval=log.get("interval", d.log_interval),
            precise_bn_batches=s["precise_bn"].get("num_batches", d.precise_bn_batches))

    def sections(self) -> Dict[str, Any]:
        """The settings as an mmdet config's sections (config.DEFAULTS' are those of the defaults)."""
        lr_config: Dict[str, Any] = dict(policy=self.lr_policy, warmup=self.warmup, warmup_iters=self.warmup_iters,
                                         warmup_ratio=self.warmup_ratio, step=list(self.step), gamma=self.gamma)
        lr_config.update({k: getattr(self, k) for k in ("min_lr", "min_lr_ratio") if getattr(self, k) is not None})
        length = dict(max_epochs=self.max_epochs) if self.by_epoch else dict(max_iters=self.max_iters)
        evaluation: Dict[str, Any] = dict(interval=self.eval_interval, metric="bbox")
        if self.save_best is not None:
            evaluation["save_best"] = self.save_best
        return dict(
            optimizer=dict(type=self.optimizer, lr=self.lr, **self.optimizer_args),
            optimizer_config=dict(grad_clip=None if self.grad_clip is None else
                                  dict(max_norm=self.grad_clip, norm_type=self.grad_clip_norm_type)),
            lr_config=lr_config, runner=dict(type=self.runner, **length), evaluation=evaluation,
            checkpoint_config=dict(interval=self.checkpoint_interval),
            log_config=dict(interval=self.log_interval, hooks=[]),
            precise_bn=dict(num_batches=self.precise_bn_batches) if self.precise_bn_batches else None)


# field -> (its config key, its types)
_FIELDS: Dict[str, Tuple[str, Tuple[type, ...]]] = dict(
    optimizer=("optimizer.type", (str,)), lr=("optimizer.lr", _NUMBER), optimizer_args=("optimizer", (dict,)),
    grad_clip=("optimizer_config.grad_clip.max_norm", _NUMBER + (type(None),)),
    grad_clip_norm_type=("optimizer_config.grad_clip.norm_type", _NUMBER),
    lr_policy=("lr_config.policy", (str,)), warmup=("lr_config.warmup", (str, type(None))),
    warmup_iters=("lr_config.warmup_iters", (int,)), warmup_ratio=("lr_config.warmup_ratio", _NUMBER),
    step=("lr_config.step", (list, tuple)), gamma=("lr_config.gamma", _NUMBER),
    min_lr=("lr_config.min_lr", _NUMBER + (type(None),)),
    min_lr_ratio=("lr_config.min_lr_ratio", _NUMBER + (type(None),)),
    runner=("runner.type", (str,)), max_epochs=("runner.max_epochs", (int,)), max_iters=("runner.max_iters", (int,)),
    checkpoint_interval=("checkpoint_config.interval", (int,)), eval_interval=("evaluation.interval", (int,)),
    save_best=("evaluation.save_best", (str, type(None))), log_interval=("log_config.interval", (int,)),
    precise_bn_batches=("precise_bn.num_batches", (int,)),
)
assert tuple(_FIELDS) == tuple(f.name for f in fields(ScheduleSettings)), "every field has its key and types"
# the keys each section may hold (optimizer: also the optimizer's own arguments, checked against its signature)
_KNOWN: Dict[str, Tuple[str, ...]] = dict(
    optimizer_config=("grad_clip",), runner=("type", "max_epochs", "max_iters"),
    lr_config=("policy", "warmup", "warmup_iters", "warmup_ratio", "step", "gamma", "min_lr", "min_lr_ratio"),
    checkpoint_config=("interval",), evaluation=("interval", "metric", "save_best", "rule"),
    log_config=("interval", "hooks"), precise_bn=("num_batches",),
)
DEFAULT_SECTIONS: Dict[str, Any] = ScheduleSettings().sections()
