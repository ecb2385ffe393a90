"""The `train` stage: config + data + (optionally) a target source -> a trained model in a work dir.
Supervised YOLC training, or a KD student with targets from the cache (offline) or a live teacher (online)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional

import torch

from yolc_kd.config import augment_config, load_config
from yolc_kd.data.augment import AugmentConfig, TrainAugment
from yolc_kd.data.coco import CocoDetection
from yolc_kd.data.loading import check_config_counts, check_images, load_dataset, resolve_data
from yolc_kd.errors import UserError
from yolc_kd.models import build_detector
from yolc_kd.runtime import resolve_device
from yolc_kd.settings import DistillSettings
from yolc_kd.train.data import TargetSource, TrainSamples
from yolc_kd.train.loop import Trainer, TrainOptions


@dataclass
class KDSource:
    """Where KD targets come from, as the command line asks.

    Args:
        cache: a soft-label cache folder (offline KD), or None.
        online: a live teacher computes the targets.
        teacher_ckpt: the teacher checkpoint (overrides distill_cfg.teacher_ckpt), or None.
    """
    cache: Optional[str] = None
    online: bool = False
    teacher_ckpt: Optional[str] = None


def kd_mode(settings: DistillSettings, kd: KDSource, where: str = "the config") -> str:
    """Which KD this run does, from distill_cfg.enable (the config's KD switch) and the command line:
    "offline" (--cache), "online" (a live teacher) or "none". enable=True with a teacher (--teacher-ckpt or
    distill_cfg.teacher_ckpt) and no --cache is online KD; enable=False is no KD, and a KD source asked for with
    it is one UserError; a config without distill_cfg (enable None) distils only when asked to. Every other
    contradiction is one UserError too."""
    if kd.cache and kd.online:
        raise UserError("--cache and --online exclude each other: KD targets come from one source")
    enable = settings.enable
    asked = [flag for flag, on in (("--cache", kd.cache), ("--online", kd.online), ("--teacher-ckpt", kd.teacher_ckpt))
             if on]
    if enable is False:
        if asked:
            raise UserError(f"{' and '.join(asked)} asks for KD but distill_cfg.enable=False in {where} turns it off: "
                            f"drop {asked[0]} or set distill_cfg.enable=True")
        return "none"
    if kd.cache:
        if kd.teacher_ckpt:
            raise UserError("--teacher-ckpt names a live teacher but --cache reads the cached one: pass one of them")
        return "offline"
    if kd.online or kd.teacher_ckpt or (enable and settings.teacher_ckpt):
        return "online"
    if enable:
        raise UserError(f"distill_cfg.enable=True in {where} asks for KD but no teacher is given: pass --cache DIR "
                        f"(offline KD from `yolc-kd precompute`), --teacher-ckpt T or set distill_cfg.teacher_ckpt "
                        f"(online KD), or set distill_cfg.enable=False to train without KD")
    return "none"


def describe_kd(mode: str, settings: DistillSettings, kd: KDSource, source: Optional[TargetSource] = None) -> str:
    """The first words of the run's first log line: what the student learns from."""
    if mode == "offline":
        layout = getattr(getattr(source, "reader", None), "layout", None)
        if layout is not None and layout.kind == "image":
            scales = ", ".join(f"{s:g}" for s in layout.scales) + (" and mirrored" if layout.mirrored else "")
            views = ("views on the cached scales and the teacher's grid" if settings.image_views == "aligned" else
                "drawn as without a cache, targets moved in from the nearest scale")
            return (f"offline KD from the image-level cache {kd.cache} (the teacher on every whole image at scale "
                    f"{scales}; a fresh view each pass: {views})")
        return f"offline KD from the cache {kd.cache}"
    if mode == "online":
        why = "--online" if kd.online else "distill_cfg.enable=True and no --cache"
        return f"online KD from a live teacher ({kd.teacher_ckpt or settings.teacher_ckpt}; {why})"
    return "no KD (" + ("distill_cfg.enable=False" if settings.enable is False else "no distill_cfg") + ")"


def open_target_source(cfg: Mapping, kd: KDSource, aug_cfg: AugmentConfig, coco, trust: bool) -> Optional[TargetSource]:
    mode = kd_mode(cfg["distill"], kd, cfg.get("_path", "the config"))
    if mode == "offline":
        from yolc_kd.train.cache_source import open_cache_source

        return open_cache_source(kd.cache, cfg, aug_cfg, coco)
    if mode == "online":
        from yolc_kd.teacher import build_teacher
        from yolc_kd.train.teacher_source import LiveTeacherSource

        config_dir = str(Path(cfg["_path"]).resolve().parent) if cfg.get("_path") else None
        teacher = build_teacher(cfg["distill"], cfg["model"], config_dir, kd.teacher_ckpt, trust)
        return LiveTeacherSource(teacher, cfg["distill"])
    return None


def train_augment(aug_cfg: AugmentConfig, source: Optional[TargetSource], settings: DistillSettings) -> TrainAugment:
    """The views the student trains on: the pipeline's, or with an image-level cache and
    distill_cfg.image_views='aligned' windows on the cached scales and the teacher's grid."""
    layout = getattr(getattr(source, "reader", None), "layout", None)
    if layout is not None and layout.kind == "image" and settings.image_views == "aligned":
        from yolc_kd.data.aligned_views import AlignedViews

        return AlignedViews(aug_cfg, layout.scales, mirrored_rows=layout.mirrored)
    return TrainAugment(aug_cfg)


def run_training(config: str, ann: Optional[str], images: Optional[str], opts: TrainOptions,
                 kd: KDSource = KDSource(), skip_bad: bool = False, val_ann: Optional[str] = None,
                 val_images: Optional[str] = None) -> Dict[str, Any]:
    """Train the config's model; the student's weights start from opts.seed (default the config's seed)
    whichever target source is used."""
    cfg = load_config(config, with_defaults=True)
    check_config_counts(cfg)
    ann, images = resolve_data(cfg, ann, images)
    coco = load_dataset(cfg, ann, images)
    missing = set(check_images(coco, skip_bad))  # before the first step: every file there (or skipped)
    if val_ann or val_images:
        val_ann, val_images = resolve_data(cfg, val_ann, val_images, "val")
        check_images(CocoDetection(val_ann, val_images), skip_bad=True, flag="--val-images")  # eval skips them
    aug_cfg = augment_config(cfg)
    device = resolve_device(opts.device)
    torch.manual_seed(int(cfg.get("seed", 0)) if opts.seed is None else int(opts.seed))
    model = build_detector(cfg["model"])  # before any teacher: every student of a seed starts the same
    source = open_target_source(cfg, kd, aug_cfg, coco, opts.trust)
    opts.kd_mode = describe_kd(kd_mode(cfg["distill"], kd), cfg["distill"], kd, source)
    dataset = TrainSamples(coco, train_augment(aug_cfg, source, cfg["distill"]), int(cfg.get("seed", 0)), source,
                           skip_bad=skip_bad,
                           indices=[i for i in range(len(coco)) if i not in missing])
    if val_ann or val_images:
        opts.eval_fn = make_eval_fn(cfg, val_ann, val_images, device)
    opts.device = str(device)
    summary = Trainer(cfg, model, dataset, opts, source).run()
    summary["missing_images"] = len(missing)
    return summary


def make_eval_fn(cfg: dict, val_ann: Optional[str], val_images: Optional[str],
                 device: torch.device) -> Callable[[torch.nn.Module, int], Dict[str, float]]:
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
