"""`yolc-kd precompute`: run the teacher once and store its soft labels (KD targets) in a Zarr v3 cache for
`yolc-kd train --cache`. --kind image (the default): the teacher labels every training image whole at one or a few
scales (and their mirrors), and training moves those labels into a fresh view every pass, so the teacher's cost does
not grow with the schedule. --kind view (the default when --variants is given): it labels the K augmented views the
student will see (exact: online KD's targets). The config is the STUDENT's: its distill_cfg names the teacher.
Rerunning the same command resumes an interrupted run (of the kind already at --out); under
`torchrun --nproc_per_node N -m yolc_kd precompute ...` the shards are split across the ranks."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional, Tuple

from yolc_kd.cli_args import add_amp_args, add_data_args, add_device_arg, check_amp_args, check_count
from yolc_kd.errors import UserError


def register(subparsers: Any) -> None:
    from yolc_kd.cache.schema import DEFAULT_SHARD_SIZE

    p = subparsers.add_parser("precompute", help="cache the teacher's KD targets for offline distillation",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True,
                   help="the student's mmdet-style config (its distill_cfg names the teacher)")
    p.add_argument("--ckpt", default=None, help="teacher checkpoint (default: distill_cfg.teacher_ckpt)")
    add_data_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="cache folder (created, or resumed when it exists)")
    p.add_argument("--kind", choices=("auto", "image", "view"), default="auto",
                   help="image: whole images at --scales, any schedule, 2-3 teacher forwards per image; view: "
                        "--variants augmented views per image, the teacher runs once per view (exact online-KD "
                        "targets). auto (default): the kind of the cache already at --out, else view when --variants "
                        "is given, else image")
    p.add_argument("--scales", default=None, metavar="S",
                   help="--kind image: image scales to label, 'auto' (default: as many as 3 teacher forwards per image "
                        "allow, spread over the scales the augmentation gives its views: 1 with --mirror, else 3), a "
                        "count, or a list such as 0.9,1.2")
    p.add_argument("--mirror", choices=("auto", "on", "off"), default="auto",
                   help="--kind image: also label the mirrored image at every scale, so mirrored training views get "
                        "the teacher's own targets (it is not mirror-symmetric); twice the teacher forwards. auto "
                        "(default): on when the augmentation flips")
    p.add_argument("--regions", type=int, default=None, metavar="R",
                   help="--kind image: crop slots per image and scale (default: from the image and view sizes)")
    p.add_argument("--variants", default=None, metavar="K",
                   help="--kind view: augmented views per image, or auto (the default): as many as the training schedule "
                        "needs so the student never sees a view twice (one per epoch; halved with "
                        "distill_cfg.cache_flip=True)")
    p.add_argument("--train-iters", type=int, default=None, metavar="N",
                   help="with --variants auto: the student's `train --max-iters N` (default: the config's runner)")
    p.add_argument("--batch-size", type=int, default=None, help="teacher batch (default data.samples_per_gpu)")
    p.add_argument("--shard-size", type=int, default=None, metavar="S",
                   help=f"rows per shard file (default: {DEFAULT_SHARD_SIZE} views, or one image's scales)")
    p.add_argument("--workers", type=int, default=None, help="image loading processes (default data.workers_per_gpu)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads of the teacher (default 1): results depend on it, so keep it when resuming; "
                        "scale out with torchrun instead")
    add_device_arg(p)
    add_amp_args(p, "the teacher; the manifest records the dtype, and the maps are float32 before the cache's "
                    "rounding as without it", deterministic=True)
    p.add_argument("--trust-checkpoint", action="store_true", help="allow checkpoints that need pickle code")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image instead of skipping it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _variants(args: argparse.Namespace, cfg: dict, num_images: int) -> int:
    from yolc_kd.config import setting
    from yolc_kd.train.schedule import views_needed

    if args.variants is None or str(args.variants).strip().lower() == "auto":
        return views_needed(cfg, num_images, int(setting(cfg, "data", "samples_per_gpu")), args.train_iters,
                            flip=cfg["distill"].cache_flip)
    try:
        k = int(args.variants)
    except ValueError:
        raise UserError(f"--variants must be a count or auto, got {args.variants!r}") from None
    check_count("variants", k)
    return k


def _kind(args: argparse.Namespace, existing: Optional[dict]) -> str:
    """--kind auto: the kind of the finished cache at --out (`existing`, its manifest: a rerun resumes it), else
    view when --variants is given, else image."""
    if args.kind != "auto":
        return args.kind
    if existing is not None:
        return str(existing.get("kind", "view"))
    return "view" if args.variants is not None or args.train_iters is not None else "image"


def _image_rows(args: argparse.Namespace, cfg: dict, coco: Any, existing: Optional[dict]) -> Tuple[tuple, bool]:
    """--kind image: (scales, mirrored) from --scales and --mirror (auto: as the image-level cache at --out,
    `existing` its manifest, has it, so a rerun resumes it; else on when the augmentation flips)."""
    from yolc_kd.config import augment_config
    from yolc_kd.precompute.image_level import image_hws, parse_scales, view_scale_range

    aug_cfg = augment_config(cfg)
    if args.mirror == "auto" and existing is not None and existing.get("kind") == "image":
        mirror = bool(existing.get("mirrored", False))
    else:
        mirror = args.mirror == "on" or (args.mirror == "auto" and aug_cfg.flip_ratio > 0)
    return parse_scales(args.scales or "auto", *view_scale_range(aug_cfg, image_hws(coco)), mirrored=mirror), mirror


def _report_skipped(manifest: dict, out: str) -> None:
    """One counted warning line for the images the cache skipped; a UserError when it holds no usable view
    (training from it would fail on its first sample)."""
    from yolc_kd.data.images import display_path

    counts, skipped = manifest.get("counts", {}), manifest.get("skipped") or []
    n, total = int(counts.get("images_skipped", 0)), int(counts.get("images", 0))
    names = ", ".join(display_path(e.get("file_name", "")) for e in skipped[:3]) + (" ..." if n > 3 else "")
    if total and not counts.get("samples_written"):
        first = skipped[0] if skipped else {}
        raise UserError(f"cache {out} holds no usable view: all {total} images were unreadable "
                        f"(first: {display_path(first.get('reason', '?'))}); fix the images, remove {out} and rerun")
    if n:
        print(f"warning: skipped {n} of {total} images (unreadable): {names}")


def run(args: argparse.Namespace) -> int:
    from yolc_kd.config import load_config, setting
    from yolc_kd.data.loading import check_config_counts, load_dataset, resolve_data
    from yolc_kd.cache.writer import open_existing
    from yolc_kd.precompute.run import PrecomputeOptions, precompute
    from yolc_kd.runtime import resolve_device

    for name in ("batch_size", "shard_size", "threads", "train_iters", "regions"):
        check_count(name.replace("_", "-"), getattr(args, name))
    check_count("workers", args.workers, 0)
    check_amp_args(args)
    cfg = load_config(args.config, with_defaults=True)
    check_config_counts(cfg)
    ann, images = resolve_data(cfg, args.ann, args.images)
    coco = load_dataset(cfg, ann, images)
    found = open_existing(Path(args.out))
    existing = found[1] if found is not None else None  # the manifest of a cache already at --out
    kind = _kind(args, existing)
    image_kind = kind == "image"
    if image_kind and args.variants is not None:
        raise UserError("--variants is for --kind view (an image-level cache serves every view); use --scales")
    if image_kind and args.train_iters is not None:
        raise UserError("--train-iters sizes --variants auto of --kind view; an image-level cache serves any schedule")
    for flag, given in (("--mirror", args.mirror != "auto"), ("--scales", args.scales is not None),
                        ("--regions", args.regions is not None)):
        if given and not image_kind:
            raise UserError(f"{flag} is for --kind image (a per-view cache holds each view as the student sees it)")
    scales, mirror = _image_rows(args, cfg, coco, existing) if image_kind else (None, False)
    opts = PrecomputeOptions(
        out=Path(args.out), ckpt=args.ckpt, variants=1 if image_kind else _variants(args, cfg, len(coco)),
        kind=kind, scales=scales, regions=args.regions, mirror=mirror,
        batch_size=args.batch_size if args.batch_size is not None else int(setting(cfg, "data", "samples_per_gpu")),
        device=str(resolve_device(args.device)), amp=args.amp, amp_dtype=args.amp_dtype, trust=args.trust_checkpoint,
        strict=args.strict,
        shard_size=args.shard_size,
        workers=args.workers if args.workers is not None else int(setting(cfg, "data", "workers_per_gpu")),
        threads=args.threads, deterministic=args.deterministic, progress=not args.no_progress,
        config_dir=str(Path(args.config).resolve().parent))
    summary = precompute(cfg, coco, opts)
    if summary["rank"] == 0:
        counts = summary["manifest"].get("counts", {})
        _report_skipped(summary["manifest"], summary["out"])
        m = summary["manifest"]
        if m.get("kind", "view") == "image":
            per_image = counts.get("bytes", 0) / max(1, counts.get("images", 1))
            shape = (f"{counts.get('samples_written', 0)} image-scale rows of {counts.get('images', 0)} images "
                     f"(scales {', '.join(f'{s:g}' for s in m.get('scales', []))}"
                     f"{' and their mirrors' if m.get('mirrored') else ''}, {counts.get('shards', 0)} shards, "
                     f"{per_image / 1024:.1f} KiB per image)")
            unit = "rows"
        else:
            per_sample = counts.get("bytes", 0) / max(1, counts.get("samples", 1))
            shape = (f"{counts.get('samples_written', 0)} views of {counts.get('images', 0)} images ({m['variants']} "
                     f"variants, {counts.get('shards', 0)} shards, {per_sample / 1024:.1f} KiB per view)")
            unit = "views"
        print(f"cache {summary['out']}: {shape}; this run wrote {summary['samples_written']} {unit}"
              + (f", {summary['already_done']} shards were already done" if summary["already_done"] else "")
              + (f"; skipped {counts['images_skipped']} unreadable image(s), listed in the manifest"
                 if counts.get("images_skipped") else ""))
    return 0
