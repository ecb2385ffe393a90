"""The training loop shared by supervised YOLC training and KD (offline from the cache, or online): the Trainer
runs the steps, and hooks (train/hooks/) do everything else at fixed points of the run."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch
import torch.nn as nn
from tqdm import tqdm

from yolc_kd.config import setting
from yolc_kd.data.loading import dataset_repeats
from yolc_kd.errors import UserError
from yolc_kd.kd import KDLoss, student_losses
from yolc_kd.runtime import amp_dtype, init_distributed, mixed_precision, numerics, resolve_device
from yolc_kd.schedule_settings import ScheduleSettings
from yolc_kd.train.data import TargetSource, TrainLoader, TrainSamples, VariantSampler, collate_train
from yolc_kd.train.ema import WeightAverage, ema_hook
from yolc_kd.train.hooks import Checkpointer, HookBase, build_hooks
from yolc_kd.train.metrics_log import MetricsLog
from yolc_kd.train.schedule import build_optimizer, lr_at, schedule_iters, set_lr


@dataclass
class TrainOptions:
    """What `yolc-kd train` says beyond the config.

    Args:
        work_dir: checkpoints, metrics.jsonl and pictures go here.
        max_iters: --max-iters (None: the config's runner).
        resume: --resume from work_dir's latest checkpoint.
        device: --device (auto, cpu, cuda, cuda:N).
        workers: loader processes (None: data.workers_per_gpu).
        batch_size: images per step and process (None: data.samples_per_gpu).
        amp: --amp mixed precision.
        amp_dtype: --amp-dtype (None: float16 on CUDA, bfloat16 on the CPU).
        log_interval: iterations between metric records (None: log_config.interval).
        eval_fn: (model, iteration) -> COCO metrics, called on rank 0 at the evaluation interval.
        progress: show the progress bar.
        trust: --trust-checkpoint: allow checkpoints that need pickle code on --resume.
        seed: sample-order seed (None: the config's seed).
        kd_mode: what the target source is, for the run's first log line.
        deterministic: --deterministic: runtime.numerics' repeatable settings.
    """
    work_dir: Path
    max_iters: Optional[int] = None
    resume: bool = False
    device: str = "auto"
    workers: Optional[int] = None
    batch_size: Optional[int] = None
    amp: bool = False
    amp_dtype: Optional[str] = None
    log_interval: Optional[int] = None
    eval_fn: Optional[Callable[[nn.Module, int], Dict[str, Any]]] = None
    progress: bool = True
    trust: bool = False
    seed: Optional[int] = None
    kd_mode: str = "no KD"
    deterministic: bool = False


def _to_device(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    """The batch's tensors on the device; copies from the loader's pinned memory run asynchronously."""
    out = dict(batch)
    out["img"] = batch["img"].to(device, non_blocking=True)
    out["gt_bboxes"] = [b.to(device, non_blocking=True) for b in batch["gt_bboxes"]]
    out["gt_labels"] = [l.to(device, non_blocking=True) for l in batch["gt_labels"]]
    if "kd_targets" in batch:
        out["kd_targets"] = batch["kd_targets"].to(device, non_blocking=True)
    return out


class Trainer:
    """Trains `model` on `dataset`; with a target source (cache or live teacher) it asks the source for each
    batch's KD targets before the student's forward, and KDLoss compares the student's outputs with them. `step`
    is one optimizer step; `run` iterates the steps and calls the hooks (train/hooks/: weight average, LSM
    pictures, metrics, progress, checkpoints, evaluation, best checkpoint, precise BN) at their points.

    State the hooks read: model, optimizer, ema, sampler, loader, source, cfg, schedule (cfg["schedule"]), opts,
    work_dir, rank, dist, iter (iterations finished), start_iter, epoch, total_iters, iters_per_epoch, last (the
    last step's lr and losses), batch and kd_targets (the step's inputs, until its after_step hooks are done),
    checkpointer, metrics.

    Args:
        cfg: the config with YOLC's defaults filled in (load_config(..., with_defaults=True)).
        model: the student, on any device (moved to opts.device).
        dataset: the training samples.
        opts: the command line's settings.
        source: where KD targets come from (None: supervised training).
    """

    def __init__(self, cfg: Mapping, model: nn.Module, dataset: TrainSamples, opts: TrainOptions,
                 source: Optional[TargetSource] = None):
        self.cfg, self.opts, self.dataset = cfg, opts, dataset
        self.device = resolve_device(opts.device)  # under torchrun: cuda:LOCAL_RANK, or the CPU
        self.dist = init_distributed(self.device)  # nccl for CUDA, gloo for the CPU
        self.rank, self.world = self.dist.rank, self.dist.world
        self.model = model.to(self.device)
        hook = ema_hook(cfg)  # custom_hooks' EMA: the average is what checkpoints hand to infer
        self.ema = WeightAverage(self.model, hook) if hook else None
        self.source = source.to(self.device) if source is not None else None
        self.kd_loss = KDLoss(cfg["distill"]) if source is not None else None
        self.schedule: ScheduleSettings = cfg["schedule"]
        self.optimizer = build_optimizer(self.model.parameters(), self.schedule)
        self.batch_size = int(opts.batch_size or setting(cfg, "data", "samples_per_gpu"))
        order_seed = int(cfg.get("seed", 0)) if opts.seed is None else int(opts.seed)
        num_variants = source.num_variants if source is not None else None
        flip = bool(source is not None and num_variants and cfg["distill"].cache_flip)
        self.repeats = dataset_repeats(cfg)  # RepeatDataset(times=T): an epoch is T passes over every image
        self.sampler = VariantSampler(len(dataset), order_seed, num_variants, self.rank, self.world, flip=flip,
                                      repeats=self.repeats)
        workers = opts.workers if opts.workers is not None else int(setting(cfg, "data", "workers_per_gpu"))
        self.loader = TrainLoader(dataset, batch_size=self.batch_size, sampler=self.sampler, num_workers=workers,
                                  collate_fn=collate_train, pin_memory=self.device.type == "cuda",
                                  persistent_workers=workers > 0)  # workers stay up across epochs
        self.iters_per_epoch = max(1, math.ceil(len(self.sampler) / self.batch_size))
        self.total_iters, self.steps = schedule_iters(self.schedule, self.iters_per_epoch, opts.max_iters)
        self.work_dir = Path(opts.work_dir)
        self.start_iter = self.iter = self.epoch = self.bad_samples = 0
        self.last: Dict[str, float] = {}
        self.batch: Optional[Dict[str, Any]] = None
        self.kd_targets: Any = None
        self.ddp = None
        if self.world > 1:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.amp_dtype = amp_dtype(self.device, opts.amp, opts.amp_dtype)  # an unusable --amp-dtype fails here
        # loss scaling for float16's narrow range only (bfloat16 has float32's)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16
                                           and self.device.type == "cuda")
        self.checkpointer = Checkpointer(self, opts.trust)
        self.hooks: List[HookBase] = build_hooks(self)
        self.metrics = MetricsLog(self.work_dir / "metrics.jsonl", self.work_dir / "tb", self.rank)

    @property
    def passes(self) -> int:
        """Passes over every image that this run starts (started epochs x the RepeatDataset's times)."""
        return math.ceil(self.total_iters / self.iters_per_epoch) * self.repeats

    def plan_line(self) -> str:
        """What this run does, said once before the first step: the KD source, the schedule in iterations,
        epochs and passes per image, and where the learning rate steps."""
        epochs = self.total_iters / self.iters_per_epoch
        line = (f"{self.opts.kd_mode}; {self.total_iters} iteration(s) at batch {self.batch_size} x {self.world} "
                f"process(es), {self.iters_per_epoch} per epoch: {epochs:.4g} epoch(s)")
        if self.repeats > 1:
            line += f" of {self.repeats} passes (RepeatDataset)"
        line += f" = {epochs * self.repeats:.4g} passes per image"
        steps = [s for s in self.steps if s < self.total_iters]  # the ones this run reaches
        if steps and self.schedule.lr_policy == "step":
            line += "; lr steps at iteration(s) " + ", ".join(
                f"{s} (pass {s * self.repeats / self.iters_per_epoch:.4g})" for s in steps)
        return line

    @property
    def eval_model(self) -> nn.Module:
        """The weights a checkpoint hands to inference: the EMA average when the config has one."""
        return self.ema.module if self.ema is not None else self.model

    def to_device(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        """A loader batch on the trainer's device."""
        return _to_device(batch, self.device)

    def log(self, record: Dict[str, Any]) -> None:
        """One record in metrics.jsonl (and TensorBoard), from rank 0."""
        self.metrics.write(record)

    def call_hooks(self, event: str, *args: Any) -> None:
        """Every hook's `event` method (a HookBase method name), in list order."""
        for hook in self.hooks:
            getattr(hook, event)(self, *args)

    def step(self, batch: Dict[str, Any], it: int) -> Dict[str, float]:
        """One optimizer step on `batch` at 0-based iteration `it`: its lr, total loss and loss terms."""
        lr = lr_at(it, self.schedule, self.steps, self.total_iters)
        set_lr(self.optimizer, lr)
        net = self.ddp or self.model
        with mixed_precision(self.device, self.opts.amp, self.amp_dtype):  # an online teacher runs in it too
            kd_targets = self.source.targets(batch) if self.source is not None else None
            self.batch, self.kd_targets = batch, kd_targets  # for the after_step hooks (LSM pictures)
            losses = student_losses(net, batch["img"], batch["img_metas"], batch["gt_bboxes"], batch["gt_labels"],
                                    kd_targets, self.kd_loss)
        total = sum(losses.values())
        finite = torch.isfinite(total)
        if not self.dist.all_true(finite):  # every rank stops together (none is left in DDP's all-reduce)
            where = f"became {float(total)}" if not bool(finite) else \
                f"became non-finite on another rank ({float(total):.4g} here)"
            raise UserError(f"loss {where} at iteration {it} (samples {batch['keys']}); "
                            f"lower the learning rate or check the data")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.schedule.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), float(self.schedule.grad_clip),
                                     float(self.schedule.grad_clip_norm_type))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return dict(lr=lr, loss=float(total.detach()), **{k: float(v.detach()) for k, v in losses.items()})

    # ------------------------------------------------------------------ the core loop
    def run(self) -> Dict[str, Any]:
        with numerics(self.device, deterministic=self.opts.deterministic):
            summary = self._run()
        self.dist.close()  # the process group this trainer created (after an error the process exits instead)
        return summary

    def _run(self) -> Dict[str, Any]:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if self.opts.resume:
            self.checkpointer.resume()
        self.iter = self.start_iter
        self.call_hooks("before_train")
        self.model.train()
        while self.iter < self.total_iters:
            self.epoch, skip = divmod(self.iter, self.iters_per_epoch)
            self.sampler.set_epoch(self.epoch, skip * self.batch_size)
            for batch in self.loader:
                if not self._usable(batch):
                    continue
                self.call_hooks("before_step")
                self.last = self.step(self.to_device(batch), self.iter)
                self.iter += 1
                self.call_hooks("after_step")
                self.batch = self.kd_targets = None
                if self.iter >= self.total_iters:
                    break
        self.call_hooks("after_train")
        self.dist.wait_for_rank0()  # rank 0's precise BN and last checkpoint
        return dict(iters=self.iter, last=self.last, bad_samples=self.bad_samples, work_dir=str(self.work_dir),
                    passes=self.iter / self.iters_per_epoch * self.repeats, kd_mode=self.opts.kd_mode)

    def _usable(self, batch: Dict[str, Any]) -> bool:
        """Counts and reports the batch's damaged samples; False when some rank's batch has no usable sample
        (all ranks skip it, or none: DDP steps together)."""
        if batch["bad"]:
            self.bad_samples += len(batch["bad"])
            for msg in batch["bad"]:
                tqdm.write(f"warning: skipped damaged sample {msg}")
        if self.dist.all_true(batch["size"] > 0):
            return True
        if batch["size"]:
            tqdm.write(f"warning: batch {batch['keys']} skipped: another rank's batch had no usable sample")
        return False
