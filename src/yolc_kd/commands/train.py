"""`yolc-kd train`: YOLC supervised training, or student KD from a soft-label cache (--cache) or a live
teacher (--online). Any setting the config omits falls back to YOLC's recipe (listed below)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from yolc_kd.errors import UserError


def _defaults_text() -> str:
    from yolc_kd.config import DEFAULTS

    keys = ("optimizer", "optimizer_config", "lr_config", "runner", "data", "evaluation", "checkpoint_config", "seed")
    lines = ["defaults used when the config omits them (YOLC's recipe):"]
    lines += [f"  {k} = {json.dumps(DEFAULTS[k], default=str)}" for k in keys]
    lines.append("  train_pipeline = YOLC's: PhotoMetricDistortion, RandomCenterCropPad(1024x640, ratios 0.6..1.3), "
                 "Resize(1024x640, keep_ratio), RandomFlip(0.5), Normalize")
    return "\n".join(lines)


def add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ann", default=None, metavar="COCO.json", help="annotations (default: the config's data.train)")
    parser.add_argument("--images", default=None, metavar="DIR", help="image root (default: the config's data.train)")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("train", help="train a YOLC model (supervised, or KD student with --cache/--online)",
                              description=__doc__, epilog=_defaults_text(),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="mmdet-style Python config")
    add_data_args(p)
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
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu; under torchrun cuda:LOCAL_RANK)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default data.workers_per_gpu)")
    p.add_argument("--amp", action="store_true", help="mixed precision on CUDA")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip unreadable images and damaged cache samples with a counted warning")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow checkpoints that need pickle code")
    p.add_argument("--log-interval", type=int, default=None, help="iterations between metrics lines")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def resolve_data(cfg: dict, ann: str | None, images: str | None, split: str = "train"):
    from yolc_kd.train.data import data_paths

    c_ann, c_img, _ = data_paths(cfg, split)
    ann, images = ann or c_ann, images or c_img
    if not ann or not images:
        raise UserError(f"no {split} data: pass --ann and --images or set data.{split}.ann_file/img_prefix in the config")
    return ann, images


def load_dataset(cfg: dict, ann: str, images: str):
    from yolc_kd.config import num_classes_of
    from yolc_kd.data.coco import CocoDetection

    coco = CocoDetection(ann, images, classes=cfg.get("classes"))
    if coco.num_classes != num_classes_of(cfg["model"]):
        raise UserError(f"{ann} has {coco.num_classes} classes but the model has {num_classes_of(cfg['model'])}")
    for w in coco.warnings:
        print(f"warning: {w}")
    return coco


def _device(name: str) -> str:
    import os

    import torch

    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available")
        if "LOCAL_RANK" in os.environ and name == "cuda":
            name = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(name)
    return name


def run(args: argparse.Namespace) -> int:
    import torch

    from yolc_kd.config import load_config
    from yolc_kd.data.augment import AugmentConfig, TrainAugment
    from yolc_kd.models import build_detector
    from yolc_kd.train.data import TrainSamples
    from yolc_kd.train.loop import Trainer, TrainOptions

    if args.cache and args.online:
        raise UserError("--cache and --online exclude each other: KD targets come from one source")
    cfg = load_config(args.config, with_defaults=True)
    ann, images = resolve_data(cfg, args.ann, args.images)
    coco = load_dataset(cfg, ann, images)
    aug_cfg = AugmentConfig.from_pipeline(cfg.get("train_pipeline"), cfg.get("test_pipeline"))
    torch.manual_seed(int(cfg.get("seed", 0)) if args.seed is None else args.seed)
    dcfg = cfg["distill_cfg"]
    source, num_variants, model = None, None, None
    config_dir = str(Path(args.config).resolve().parent)
    if args.cache:
        from yolc_kd.train.cache_source import open_cache_source

        source = open_cache_source(args.cache, cfg, aug_cfg, coco)
        num_variants = source.num_variants
        model = build_detector(cfg["model"], distill_cfg=dict(dcfg, enable=True))
    elif args.online:
        model = build_detector(cfg["model"], distill_cfg=dict(dcfg, enable=True), online_teacher=True,
                               config_dir=config_dir, teacher_ckpt=args.teacher_ckpt, trust=args.trust_checkpoint)
    else:
        model = build_detector(cfg["model"])
    dataset = TrainSamples(coco, TrainAugment(aug_cfg), int(cfg.get("seed", 0)), source, skip_bad=args.skip_bad)
    eval_fn = None
    if args.val_ann or args.val_images:
        eval_fn = make_eval_fn(cfg, args.val_ann, args.val_images, _device(args.device))
    opts = TrainOptions(work_dir=Path(args.work_dir), max_iters=args.max_iters, resume=args.resume,
                        device=_device(args.device), workers=args.workers, amp=args.amp,
                        log_interval=args.log_interval, num_variants=num_variants, eval_fn=eval_fn,
                        progress=not args.no_progress, trust=args.trust_checkpoint, seed=args.seed)
    summary = Trainer(cfg, model, dataset, opts).run()
    last = summary["last"]
    print(f"trained to iteration {summary['iters']}: loss {last.get('loss', float('nan')):.4f}; "
          f"checkpoints and metrics.jsonl in {summary['work_dir']}"
          + (f"; {summary['bad_samples']} damaged samples skipped" if summary["bad_samples"] else ""))
    return 0


def make_eval_fn(cfg: dict, val_ann: str | None, val_images: str | None, device: str):
    """Fused-inference COCO evaluation on a validation set, for the trainer to call after epochs."""
    from yolc_kd.infer.coco_eval import evaluate_coco
    from yolc_kd.infer.predict import predict_dataset

    ann, images = resolve_data(cfg, val_ann, val_images, "val")

    def evaluate(model, it: int) -> dict:
        was_training = model.training
        summary = predict_dataset(model, cfg, ann, images, device=device)
        model.train(was_training)
        result = evaluate_coco(ann, summary.results)
        return {k: result[k] for k in ("AP", "AP50", "AP75", "AP_small")}

    return evaluate
