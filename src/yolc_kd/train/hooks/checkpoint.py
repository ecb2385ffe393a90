"""Checkpoints of a training run in mmdet's layout: `Checkpointer` writes iter_N.pth (and points latest.pth at it)
and restores a run from them for --resume; `CheckpointHook` saves at checkpoint_config.interval."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional

from yolc_kd import __version__
from yolc_kd.checkpoint import load_weights, read_checkpoint, save_checkpoint
from yolc_kd.diskio import replace_symlink
from yolc_kd.errors import UserError
from yolc_kd.train.hooks.base import HookBase

if TYPE_CHECKING:
    from yolc_kd.train.loop import Trainer


class Checkpointer:
    """Saves and restores the trainer's state. With a weight average the checkpoint's `state_dict` is the
    average (what infer and precompute load) and `train_state_dict` the trained weights (what --resume
    continues from).

    Args:
        trainer: the run whose model, optimizer, average and iteration are saved.
        trust: allow checkpoints that need pickle code (--trust-checkpoint) on --resume.
    """

    def __init__(self, trainer: "Trainer", trust: bool = False):
        self.trainer, self.trust = trainer, trust

    def meta(self, it: int) -> Dict[str, Any]:
        """The checkpoint's `meta`: mmdet's keys plus what yolc-kd needs to read the weights back."""
        t = self.trainer
        return dict(iter=it, epoch=it // t.iters_per_epoch, yolc_kd_version=__version__,
                    CLASSES=list(t.cfg.get("classes") or []), seed=int(t.cfg.get("seed", 0)),
                    config=json.dumps(t.cfg.get("model"), default=str),
                    num_variants=t.source.num_variants if t.source is not None else None,
                    ema=t.ema.hook["type"] if t.ema is not None else None)

    def write(self, path: Path, it: int, resumable: bool = True, meta: Optional[Dict[str, Any]] = None) -> Path:
        """Atomically write the weights after `it` iterations to `path` (meta(it) updated with `meta`);
        resumable: with the optimizer state and, under EMA, the trained weights (what --resume reads)."""
        t = self.trainer
        extra = None
        if resumable and t.ema is not None:  # the trained weights, for --resume
            extra = dict(train_state_dict={k: v.detach().cpu() for k, v in t.model.state_dict().items()})
        return save_checkpoint(path, t.eval_model, dict(self.meta(it), **(meta or {})),
                               t.optimizer if resumable else None, extra)

    def save(self, it: int) -> Path:
        """iter_{it}.pth in the work dir, then latest.pth switched to it."""
        path = self.write(self.trainer.work_dir / f"iter_{it}.pth", it)
        replace_symlink(self.trainer.work_dir / "latest.pth", path.name)
        return path

    def resume(self) -> None:
        """Weights, optimizer, average and iteration from the work dir's latest complete checkpoint."""
        t = self.trainer
        latest = t.work_dir / "latest.pth"
        if not latest.exists():  # killed between writing iter_N.pth and switching latest.pth to it
            found = sorted(t.work_dir.glob("iter_*.pth"), key=lambda p: int(p.stem.split("_")[1]))
            if not found:
                raise UserError(f"--resume: no checkpoint to resume from in {t.work_dir} (latest.pth missing)")
            latest = found[-1]
        saved, meta, obj = read_checkpoint(latest, self.trust)
        load_weights(t.model, saved, latest)
        if "optimizer" in obj:
            t.optimizer.load_state_dict(obj["optimizer"])
        t.start_iter = int(meta.get("iter", 0))
        trained = obj.get("train_state_dict")
        if isinstance(trained, Mapping):  # saved with EMA: state_dict is the average, these are the weights
            load_weights(t.model, trained, latest)
        if t.ema is not None:  # a checkpoint without an average starts it from its weights
            t.ema.restore(saved if isinstance(trained, Mapping) else t.model.state_dict(), t.start_iter)


class CheckpointHook(HookBase):
    """Saves iter_N.pth on rank 0 every `interval` epochs (EpochBasedRunner) or iterations (IterBasedRunner),
    and after the last iteration.

    Args:
        interval: checkpoint_config.interval.
        by_epoch: count the interval in epochs (mmdet's EpochBasedRunner) rather than iterations.
    """

    def __init__(self, interval: int, by_epoch: bool):
        self.interval, self.by_epoch = int(interval), by_epoch

    def due(self, trainer: "Trainer") -> bool:
        it, per_epoch = trainer.iter, trainer.iters_per_epoch
        if self.by_epoch:
            return it % per_epoch == 0 and (it // per_epoch) % self.interval == 0
        return it % self.interval == 0

    def after_step(self, trainer: "Trainer") -> None:
        if trainer.rank == 0 and (self.due(trainer) or trainer.iter == trainer.total_iters):
            trainer.checkpointer.save(trainer.iter)
