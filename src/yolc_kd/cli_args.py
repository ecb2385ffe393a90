"""Argument groups several commands share (argparse), and the one-line checks of count arguments."""
from __future__ import annotations

import argparse
from typing import Optional

from yolc_kd.errors import UserError
from yolc_kd.runtime import AMP_DTYPES, DETERMINISTIC_HELP, DEVICE_HELP


def add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ann", default=None, metavar="COCO.json", help="annotations (default: the config's data.train)")
    parser.add_argument("--images", default=None, metavar="DIR", help="image root (default: the config's data.train)")


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help=f"{DEVICE_HELP} (default auto)")


def add_amp_args(parser: argparse.ArgumentParser, covers: str, deterministic: bool = False) -> None:
    """--amp (autocast for what `covers` says), --amp-dtype, and --deterministic where the command's numerics are
    kept (a cache, a checkpoint). check_amp_args checks them after parsing."""
    parser.add_argument("--amp", action="store_true", help=f"mixed precision (autocast) for {covers}")
    parser.add_argument("--amp-dtype", choices=tuple(AMP_DTYPES), default=None,
                        help="dtype of --amp (default: float16 on CUDA, with loss scaling when training; bfloat16 "
                             "on CPU)")
    if deterministic:
        parser.add_argument("--deterministic", action="store_true", help=DETERMINISTIC_HELP)


def check_amp_args(args: argparse.Namespace) -> None:
    """One UserError line for --amp-dtype without --amp."""
    if args.amp_dtype and not args.amp:
        raise UserError("--amp-dtype needs --amp")


def check_count(name: str, value: Optional[int], minimum: int = 1) -> None:
    """One UserError line when a count argument is below its minimum (None = not given)."""
    if value is not None and int(value) < minimum:
        raise UserError(f"--{name} must be at least {minimum}, got {value}")
