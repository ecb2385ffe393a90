"""`yolc-kd verify CACHE`: check a teacher soft-label cache (data_schema.md) before training on it.

Both kinds of cache: the manifest against the layout, every committed shard's files, the crc32c of the small
arrays and of every shard index (`--deep`: of every chunk, decoding all data), dtypes, shapes, that every row
sits at index = image_index * K + k exactly once, crop boxes, patch scales and crop counts.
  view kind (K views per image): each row's augmentation key is (seed, image_id, variant); crop boxes lie
    inside the view; the layout's crop slots are distill.max_patches_per_img.
  image kind (K = len(scales) rows per image): each row is its whole image at scales[k] (aug_params kind,
    scale, scaled_hw = round(ori_hw * scale), ori_hw against the annotation file's height and width: --ann, or
    the manifest's file if unchanged), the rows of an image share its size and fingerprint, crop boxes lie
    inside the scaled image; --deep: heatmaps are zero outside the scaled image, coarse maps beyond the
    teacher's padded input.
`--recompute N` re-runs the teacher on N random stored rows through the precompute code path (view kind: the
same batches, views and thread count; image kind: the same scaled images and crop slots) and compares them with
the cache within the documented quantisation tolerance (view fingerprint, or the image's fingerprint and
scale; crops equal). Prints one line per fault, naming the array and the rows; exits 0 when the cache is
sound, 1 otherwise."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, Optional

from yolc_kd.cli_args import add_device_arg
from yolc_kd.errors import UserError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("verify", help="check a teacher soft-label cache (checksums, shapes, values)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cache", metavar="CACHE", help="the cache folder written by `yolc-kd precompute`")
    p.add_argument("--deep", action="store_true",
                   help="read and decode every chunk (default: the small arrays and every shard index)")
    p.add_argument("--recompute", type=int, default=0, metavar="N",
                   help="re-run the teacher on N random stored samples and compare (needs --config)")
    p.add_argument("--config", default=None, help="the student's config the cache was made with (for --recompute)")
    p.add_argument("--ckpt", default=None,
                   help="teacher checkpoint (for --recompute; default distill_cfg.teacher_ckpt, else the manifest's)")
    p.add_argument("--ann", default=None, metavar="COCO.json",
                   help="annotations of the cached images (image kind: each row's image size is checked against "
                        "them; for --recompute; default: the manifest's)")
    p.add_argument("--images", default=None, metavar="DIR", help="their image root (default: the manifest's)")
    p.add_argument("--seed", type=int, default=0, help="picks the --recompute samples (default 0)")
    add_device_arg(p)
    p.add_argument("--trust-checkpoint", action="store_true", help="allow checkpoints that need pickle code")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from yolc_kd.cache.verify import check_cache

    if args.ann is not None and not Path(args.ann).is_file():
        raise UserError(f"--ann {args.ann}: no such file")
    if args.recompute < 0:
        raise UserError(f"--recompute must be >= 0, got {args.recompute}")
    if args.recompute and not args.config:
        raise UserError("--recompute needs --config (the student's config the cache was made with) and a teacher "
                        "checkpoint (--ckpt, distill_cfg.teacher_ckpt or the manifest's)")
    path = Path(args.cache)
    faults, notes = check_cache(path, deep=args.deep, progress=not args.no_progress, annotations=args.ann)
    checked = None
    manifest = _manifest_or_none(path)
    if args.recompute and manifest is not None:
        from yolc_kd.precompute.recompute import RecomputeOptions, recompute_faults

        opts = RecomputeOptions(samples=args.recompute, config=args.config, ckpt=args.ckpt, ann=args.ann,
                                images=args.images, seed=args.seed, device=args.device, trust=args.trust_checkpoint,
                                progress=not args.no_progress)
        more, checked = recompute_faults(path, manifest, opts)
        faults += more
    for line in faults:
        print(line)
    for line in notes:
        print(f"note: {line}")
    what = "deep" if args.deep else "quick"
    extra = f", teacher recomputed on {checked} sample(s)" if checked is not None else ""
    if faults:
        print(f"verify: {path}: {len(faults)} fault(s) ({what} check{extra})")
        return 1
    counts = (manifest or {}).get("counts") or {}
    rows = "image-scale rows" if (manifest or {}).get("kind") == "image" else "samples"
    print(f"verify: {path}: OK ({what} check{extra}; {counts.get('samples_written', '?')} stored and "
          f"{counts.get('samples_skipped', '?')} skipped {rows} of {counts.get('images', '?')} images)")
    return 0


def _manifest_or_none(path: Path) -> Optional[Dict[str, Any]]:
    from yolc_kd.cache.reader import open_manifest

    try:
        return open_manifest(path)
    except UserError:
        return None
