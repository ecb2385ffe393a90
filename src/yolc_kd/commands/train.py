"""`yolc-kd train`: YOLC supervised training, or student KD from a soft-label cache (--cache) or a live
teacher (--online). Any setting the config omits falls back to YOLC's recipe (listed below)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from yolc_kd.cli_args import add_amp_args, add_data_args, add_device_arg


def _defaults_text() -> str:
    from yolc_kd.config import DEFAULTS

    keys = ("optimizer", "optimizer_config", "lr_config", "runner", "data", "evaluation", "checkpoint_config", "seed")
    lines = ["defaults used when the config omits them (YOLC's recipe):"]
    lines += [f"  {k} = {json.dumps(DEFAULTS[k], default=str)}" for k in keys]
    lines += ["  data.train = dict(type='RepeatDataset', times=T, dataset=...) as in mmdet: one epoch is T passes over",
              "    every image; runner.max_epochs, lr_config.step, the checkpoint / evaluation intervals and",
              "    `precompute --variants auto` count those epochs (YOLC's VisDrone recipe: T = 5 x 48 epochs = 240",
              "    passes, lr steps after passes 90 and 120). The first log line says the passes per image."]
    lines.append("  train_pipeline = YOLC's: PhotoMetricDistortion, RandomCenterCropPad(1024x640, ratios 0.6..1.3), "
                 "Resize(1024x640, keep_ratio), RandomFlip(0.5), Normalize")
    return "\n".join(lines)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("train", help="train a YOLC model (supervised, or KD student with --cache/--online)",
                              description=__doc__, epilog=_defaults_text(),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="mmdet-style Python config")
    add_data_args(p)
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default data.samples_per_gpu)")
    p.add_argument("--work-dir", required=True, help="checkpoints (mmdet layout) and metrics.jsonl go here")
    p.add_argument("--max-iters", type=int, default=None, help="stop after N iterations (overrides the runner)")
    p.add_argument("--resume", action="store_true", help="continue from WORK_DIR/latest.pth")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of weight init and sample order (default: the config's seed); the augmentation "
                        "keeps the config's seed, so a cache still fits")
    p.add_argument("--cache", default=None, metavar="DIR", help="KD from this teacher soft-label cache (offline)")
    p.add_argument("--online", action="store_true", help="KD from a live teacher (reference mode)")
    p.add_argument("--teacher-ckpt", default=None, help="teacher checkpoint for --online (default distill_cfg)")
    p.add_argument("--val-ann", default=None, help="COCO json of a validation set, evaluated after epochs")
    p.add_argument("--val-images", default=None, help="image root of the validation set")
    add_device_arg(p)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default data.workers_per_gpu)")
    add_amp_args(p, "the student's step and, with --online, the teacher; the heatmap sigmoid, the DCN offsets "
                    "and deformable conv, and the losses stay float32", deterministic=True)
    p.add_argument("--skip-bad", action="store_true",
                   help="skip unreadable images and damaged cache samples with a counted warning")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow checkpoints that need pickle code")
    p.add_argument("--log-interval", type=int, default=None, help="iterations between metrics lines")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from yolc_kd.cli_args import check_amp_args, check_count
    from yolc_kd.train.loop import TrainOptions
    from yolc_kd.train.recipe import KDSource, run_training

    for name in ("max_iters", "batch_size", "log_interval"):
        check_count(name.replace("_", "-"), getattr(args, name))
    check_count("workers", args.workers, 0)
    check_amp_args(args)
    opts = TrainOptions(work_dir=Path(args.work_dir), max_iters=args.max_iters, resume=args.resume,
                        device=args.device, workers=args.workers, batch_size=args.batch_size, amp=args.amp,
                        amp_dtype=args.amp_dtype,
                        log_interval=args.log_interval, progress=not args.no_progress, trust=args.trust_checkpoint,
                        seed=args.seed, deterministic=args.deterministic)
    kd = KDSource(cache=args.cache, online=args.online, teacher_ckpt=args.teacher_ckpt)
    summary = run_training(args.config, args.ann, args.images, opts, kd, skip_bad=args.skip_bad,
                           val_ann=args.val_ann, val_images=args.val_images)
    last = summary["last"]
    print(f"trained to iteration {summary['iters']} ({summary['passes']:.4g} passes per image, {summary['kd_mode']}): "
          f"loss {last.get('loss', float('nan')):.4f}; "
          f"checkpoints and metrics.jsonl in {summary['work_dir']}"
          + (f"; {summary['bad_samples']} damaged samples skipped" if summary["bad_samples"] else "")
          + (f"; {summary['missing_images']} missing images skipped" if summary.get("missing_images") else ""))
    return 0
