"""`yolc-kd demo`: the whole idea in minutes on a laptop CPU (synthetic data, shipped tiny teacher,
offline KD, fused inference, AP table, pictures)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("demo", help="end-to-end KD demo on embedded synthetic data (CPU, minutes)",
                              description=__doc__)
    p.add_argument("--out", default="demo_out", help="output folder (default ./demo_out)")
    from yolc_kd.demo import DEMO_BATCH, DEMO_ITERS

    p.add_argument("--iters", type=int, default=None,
                   help=f"training iterations per student (default {DEMO_ITERS}; the KD benchmark: 400 at batch 4)")
    p.add_argument("--batch-size", type=int, default=None, help=f"images per step (default {DEMO_BATCH})")
    p.add_argument("--kind", choices=("image", "view"), default=None,
                   help="the cache's kind (precompute --kind): image (default: the teacher on the whole images, "
                        "moved into every fresh view) or view (the augmented views the students see)")
    p.add_argument("--variants", default=None,
                   help="--kind view: augmented views per image in the cache (default auto: as many as the "
                        "iterations need)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from yolc_kd.cli_args import check_count
    from yolc_kd.demo import DEMO_BATCH, DEMO_ITERS, DEMO_KIND, run_demo
    from yolc_kd.errors import UserError

    check_count("iters", args.iters)
    check_count("batch-size", args.batch_size)
    kind = args.kind or ("view" if args.variants is not None else DEMO_KIND)
    if kind == "image" and args.variants is not None:
        raise UserError("--variants is for --kind view (an image-level cache serves every view)")
    run_demo(Path(args.out), iters=args.iters or DEMO_ITERS, kind=kind, variants=args.variants or "auto",
             batch=args.batch_size or DEMO_BATCH)
    return 0
