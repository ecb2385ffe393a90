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
    p.add_argument("--variants", default="auto",
                   help="augmented views per image in the cache (default auto: as many as the iterations need)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from yolc_kd.cli_args import check_count
    from yolc_kd.demo import DEMO_BATCH, DEMO_ITERS, run_demo

    check_count("iters", args.iters)
    check_count("batch-size", args.batch_size)
    run_demo(Path(args.out), iters=args.iters or DEMO_ITERS, variants=args.variants, batch=args.batch_size or DEMO_BATCH)
    return 0
