"""The training hooks (detectron2's HookBase): each concern of a run is one class, and `build_hooks` lists the
ones a config and the command line ask for, in the order the trainer calls them."""
from __future__ import annotations

from typing import TYPE_CHECKING, List

from yolc_kd.train.hooks.base import HookBase
from yolc_kd.train.hooks.best import BestCheckpointHook
from yolc_kd.train.hooks.checkpoint import CheckpointHook, Checkpointer
from yolc_kd.train.hooks.ema import EMAHook
from yolc_kd.train.hooks.evaluation import EvalHook
from yolc_kd.train.hooks.logger import LoggerHook
from yolc_kd.train.hooks.lsm import LSMHook
from yolc_kd.train.hooks.precise_bn import PreciseBNHook
from yolc_kd.train.hooks.progress import ProgressHook
from yolc_kd.train.lsm_viz import LSMVisualizer

if TYPE_CHECKING:
    from yolc_kd.train.loop import Trainer

__all__ = ["HookBase", "BestCheckpointHook", "CheckpointHook", "Checkpointer", "EMAHook", "EvalHook", "LoggerHook",
           "LSMHook", "PreciseBNHook", "ProgressHook", "build_hooks"]


def build_hooks(trainer: "Trainer") -> List[HookBase]:
    """The run's hooks. After each step: the weight average first (checkpoints and evaluation see it), then the
    pictures, the metrics line, the bar, the checkpoint, the evaluation; after training the bar closes before
    precise BN rewrites the last checkpoint. The settings are the trainer's ScheduleSettings, checked when the
    config was loaded."""
    cfg, opts, schedule = trainer.cfg, trainer.opts, trainer.schedule
    hooks: List[HookBase] = []
    if trainer.ema is not None:
        hooks.append(EMAHook(trainer.ema))
    if trainer.source is not None and cfg["distill"].lsm_visualize and trainer.rank == 0:
        hooks.append(LSMHook(LSMVisualizer(trainer.work_dir / "lsm")))
    hooks.append(LoggerHook(opts.log_interval or schedule.log_interval))
    hooks.append(ProgressHook(opts.progress))
    hooks.append(CheckpointHook(schedule.checkpoint_interval, schedule.by_epoch))
    if opts.eval_fn:
        hooks.append(EvalHook(schedule.eval_interval, opts.eval_fn))
    if schedule.save_best:
        hooks.append(BestCheckpointHook(schedule.save_best))
    if schedule.precise_bn_batches:
        hooks.append(PreciseBNHook(schedule.precise_bn_batches))
    return hooks
