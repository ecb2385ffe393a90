"""The training loop shared by supervised YOLC training and KD (offline from the cache, or online)."""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional

import torch
import torch.nn as nn
from tqdm import tqdm

from yolc_kd import __version__
from yolc_kd.checkpoint import load_weights, read_checkpoint, save_checkpoint
from yolc_kd.config import setting
from yolc_kd.data.loading import dataset_repeats
from yolc_kd.diskio import append_text, replace_symlink
from yolc_kd.errors import UserError
from yolc_kd.kd import KDLoss, student_losses
from yolc_kd.progress import progress_bar
from yolc_kd.runtime import amp_dtype, init_distributed, mixed_precision, numerics, resolve_device
from yolc_kd.train.data import TargetSource, TrainLoader, TrainSamples, VariantSampler, collate_train
from yolc_kd.train.ema import WeightAverage, ema_hook
from yolc_kd.train.lsm_viz import LSMVisualizer
from yolc_kd.train.precise_bn import recompute_bn_stats
from yolc_kd.train.schedule import build_optimizer, check_lr_config, lr_at, schedule_iters, set_lr


@dataclass
class TrainOptions:
    work_dir: Path
    max_iters: Optional[int] = None
    resume: bool = False
    device: str = "auto"
    workers: Optional[int] = None
    batch_size: Optional[int] = None             # default data.samples_per_gpu
    amp: bool = False
    amp_dtype: Optional[str] = None              # --amp-dtype (None: float16 on CUDA, bfloat16 on CPU)
    log_interval: Optional[int] = None
    eval_fn: Optional[Callable[[nn.Module, int], Dict[str, Any]]] = None  # called on rank 0 after an epoch
    progress: bool = True
    trust: bool = False                          # --trust-checkpoint: allow pickle checkpoints on --resume
    seed: Optional[int] = None                   # sample-order seed (None: the config's seed)
    kd_mode: str = "no KD"                       # what the target source is, for the run's first log line
    deterministic: bool = False                  # --deterministic: runtime.numerics' repeatable settings


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
    batch's KD targets before the student's forward, and KDLoss compares the student's outputs with them."""

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
        self.optimizer = build_optimizer(self.model.parameters(), cfg["optimizer"])
        self.base_lr = float(setting(cfg, "optimizer", "lr"))
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
        self.total_iters, self.steps = schedule_iters(cfg, self.iters_per_epoch, opts.max_iters)
        check_lr_config(cfg.get("lr_config") or {})  # a bad policy fails before the first step
        clip = (cfg.get("optimizer_config") or {}).get("grad_clip") or {}
        self.max_norm = clip.get("max_norm")
        self.log_interval = opts.log_interval or int(setting(cfg, "log_config", "interval"))
        self.ckpt_interval = int(setting(cfg, "checkpoint_config", "interval"))
        self.epoch_runner = (cfg.get("runner") or {}).get("type") != "IterBasedRunner"
        self.eval_interval = int(setting(cfg, "evaluation", "interval"))
        self.work_dir = Path(opts.work_dir)
        self.metrics_path = self.work_dir / "metrics.jsonl"
        self.lsm_viz = LSMVisualizer(self.work_dir / "lsm") \
            if source is not None and cfg["distill"].lsm_visualize and self.rank == 0 else None
        self.start_iter, self.bad_samples = 0, 0
        self.ddp = None
        if self.world > 1:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.amp_dtype = amp_dtype(self.device, opts.amp, opts.amp_dtype)  # an unusable --amp-dtype fails here
        # loss scaling for float16's narrow range only (bfloat16 has float32's)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16
                                           and self.device.type == "cuda")
        self.tb = None
        if self.rank == 0:
            try:  # TensorBoard when it is installed; metrics.jsonl always
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(self.work_dir / "tb"))
            except ImportError:
                pass

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
        if steps and check_lr_config(self.cfg.get("lr_config") or {}) == "step":
            line += "; lr steps at iteration(s) " + ", ".join(
                f"{s} (pass {s * self.repeats / self.iters_per_epoch:.4g})" for s in steps)
        return line

    def _note_repeated_views(self) -> None:
        """One note line when the cache holds fewer distinct views than the schedule's passes (views repeat)."""
        k = self.source.num_variants if self.source is not None else None
        if not k or self.rank != 0:
            return
        distinct = 2 * k if self.sampler.flip else k
        if self.passes > distinct:
            held = f"{k} view(s) per image" + (f" ({distinct} with their mirrors)" if self.sampler.flip else "")
            tqdm.write(f"note: the cache holds {held} and this run makes {self.passes} passes over the data, so views "
                       f"repeat from pass {distinct}; `yolc-kd precompute --variants auto --train-iters "
                       f"{self.total_iters}` caches enough")

    # ------------------------------------------------------------------ checkpoints
    def _meta(self, it: int) -> Dict[str, Any]:
        return dict(iter=it, epoch=it // self.iters_per_epoch, yolc_kd_version=__version__,
                    CLASSES=list(self.cfg.get("classes") or []), seed=int(self.cfg.get("seed", 0)),
                    config=json.dumps(self.cfg.get("model"), default=str),
                    num_variants=self.source.num_variants if self.source is not None else None,
                    ema=self.ema.hook["type"] if self.ema is not None else None)

    @property
    def eval_model(self) -> nn.Module:
        """The weights a checkpoint hands to inference: the EMA average when the config has one."""
        return self.ema.module if self.ema is not None else self.model

    def save(self, it: int) -> Path:
        extra = None
        if self.ema is not None:  # the trained weights, for --resume
            extra = dict(train_state_dict={k: v.detach().cpu() for k, v in self.model.state_dict().items()})
        path = save_checkpoint(self.work_dir / f"iter_{it}.pth", self.eval_model, self._meta(it), self.optimizer,
                               extra)
        replace_symlink(self.work_dir / "latest.pth", path.name)
        return path

    def resume(self) -> None:
        latest = self.work_dir / "latest.pth"
        if not latest.exists():  # killed between writing iter_N.pth and switching latest.pth to it
            found = sorted(self.work_dir.glob("iter_*.pth"), key=lambda p: int(p.stem.split("_")[1]))
            if not found:
                raise UserError(f"--resume: no checkpoint to resume from in {self.work_dir} (latest.pth missing)")
            latest = found[-1]
        saved, meta, obj = read_checkpoint(latest, self.opts.trust)
        load_weights(self.model, saved, latest)
        if "optimizer" in obj:
            self.optimizer.load_state_dict(obj["optimizer"])
        self.start_iter = int(meta.get("iter", 0))
        trained = obj.get("train_state_dict")
        if isinstance(trained, Mapping):  # saved with EMA: state_dict is the average, these are the weights
            load_weights(self.model, trained, latest)
        if self.ema is not None:  # a checkpoint without an average starts it from its weights
            self.ema.restore(saved if isinstance(trained, Mapping) else self.model.state_dict(), self.start_iter)

    # ------------------------------------------------------------------ loop
    def _log(self, record: Dict[str, Any]) -> None:
        if self.rank != 0:
            return
        append_text(self.metrics_path, json.dumps(record) + "\n")
        if self.tb is not None:
            flat = {**record, **{f"eval/{k}": v for k, v in (record.get("eval") or {}).items()}}
            for key, value in flat.items():
                if isinstance(value, (int, float)) and key not in ("iter", "epoch"):
                    self.tb.add_scalar(key, value, record["iter"])

    def step(self, batch: Dict[str, Any], it: int) -> Dict[str, float]:
        lr = lr_at(it, self.base_lr, self.cfg.get("lr_config") or {}, self.steps, self.total_iters)
        set_lr(self.optimizer, lr)
        net = self.ddp or self.model
        with mixed_precision(self.device, self.opts.amp, self.amp_dtype):  # an online teacher runs in it too
            kd_targets = self.source.targets(batch) if self.source is not None else None
            if self.lsm_viz is not None:
                self.lsm_viz(it, batch, kd_targets)
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
        if self.max_norm:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), float(self.max_norm))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model, it)
        return dict(lr=lr, loss=float(total.detach()), **{k: float(v.detach()) for k, v in losses.items()})

    def run(self) -> Dict[str, Any]:
        with numerics(self.device, deterministic=self.opts.deterministic):
            summary = self._run()
        self.dist.close()  # the process group this trainer created (after an error the process exits instead)
        return summary

    def _run(self) -> Dict[str, Any]:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if self.opts.resume:
            self.resume()
        elif self.rank == 0 and self.metrics_path.exists():  # a fresh run: an earlier run's log is kept, not extended
            stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(self.metrics_path.stat().st_mtime))
            kept = self.metrics_path.with_name(f"metrics.{stamp}.jsonl")
            n = 1
            while kept.exists():
                n += 1
                kept = self.metrics_path.with_name(f"metrics.{stamp}-{n}.jsonl")
            os.replace(self.metrics_path, kept)
            tqdm.write(f"note: {self.work_dir} held an earlier run's metrics.jsonl; it is now {kept.name}")
        if self.rank == 0:
            tqdm.write(f"train: {self.plan_line()}")
        self._note_repeated_views()
        self.model.train()
        it = self.start_iter
        bar = progress_bar(total=self.total_iters, initial=it, desc="train", unit="it",
                           disable=not self.opts.progress or self.rank != 0)
        last: Dict[str, float] = {}
        tic = time.perf_counter()
        while it < self.total_iters:
            epoch, skip = divmod(it, self.iters_per_epoch)
            self.sampler.set_epoch(epoch, skip * self.batch_size)
            for batch in self.loader:
                if batch["bad"]:
                    self.bad_samples += len(batch["bad"])
                    for msg in batch["bad"]:
                        tqdm.write(f"warning: skipped damaged sample {msg}")
                if not self.dist.all_true(batch["size"] > 0):  # all ranks skip it, or none: DDP steps together
                    if batch["size"]:
                        tqdm.write(f"warning: batch {batch['keys']} skipped: another rank's batch had no usable "
                                   f"sample")
                    continue
                last = self.step(_to_device(batch, self.device), it)
                it += 1
                bar.update(1)
                bar.set_postfix({k: f"{v:.3g}" for k, v in last.items() if k != "lr"}, refresh=False)
                if it % self.log_interval == 0 or it == self.total_iters:
                    now = time.perf_counter()
                    self._log(dict(iter=it, epoch=epoch, sec=round(now - tic, 3), **last))
                    tic = now
                epoch_done = it % self.iters_per_epoch == 0
                due = (epoch_done and (it // self.iters_per_epoch) % self.ckpt_interval == 0) if self.epoch_runner \
                    else it % self.ckpt_interval == 0
                if self.rank == 0 and (due or it == self.total_iters):
                    self.save(it)
                eval_due = (epoch_done and (it // self.iters_per_epoch) % self.eval_interval == 0) \
                    or it == self.total_iters
                if eval_due and self.opts.eval_fn:
                    if self.rank == 0:
                        self._eval(it)
                    self.dist.wait_for_rank0()
                if it >= self.total_iters:
                    break
        bar.close()
        precise = int((self.cfg.get("precise_bn") or {}).get("num_batches", 0))
        if precise and self.rank == 0 and it == self.total_iters and self.start_iter < self.total_iters:
            # the last trained epoch's views: a cache of K = epochs holds them, and offline and online read the same
            self.sampler.set_epoch((it - 1) // self.iters_per_epoch)
            used = recompute_bn_stats(self.eval_model, self.loader, precise, lambda b: _to_device(b, self.device))
            self.save(it)
            self._log(dict(iter=it, precise_bn_batches=used))
        self.dist.wait_for_rank0()  # rank 0's precise BN and last checkpoint
        return dict(iters=it, last=last, bad_samples=self.bad_samples, work_dir=str(self.work_dir),
                    passes=it / self.iters_per_epoch * self.repeats, kd_mode=self.opts.kd_mode)

    def _eval(self, it: int) -> None:
        model = self.eval_model
        model.eval()
        try:
            result = self.opts.eval_fn(model, it)
        finally:
            model.train()
        self._log(dict(iter=it, eval=result))
        tqdm.write(f"eval @ iter {it}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()
                                                   if isinstance(v, float)))
