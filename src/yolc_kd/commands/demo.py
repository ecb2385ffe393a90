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
    p.add_argument("--iters", type=int, default=120, help="training iterations per student (default 120)")
    p.add_argument("--variants", type=int, default=2, help="augmented views per image in the cache (default 2)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from yolc_kd.demo import run_demo

    run_demo(Path(args.out), iters=args.iters, variants=args.variants)
    return 0
