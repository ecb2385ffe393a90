"""Argument groups several commands share (argparse), and the one-line checks of count arguments."""
from __future__ import annotations

import argparse
from typing import Optional

from yolc_kd.errors import UserError
from yolc_kd.runtime import DEVICE_HELP


def add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ann", default=None, metavar="COCO.json", help="annotations (default: the config's data.train)")
    parser.add_argument("--images", default=None, metavar="DIR", help="image root (default: the config's data.train)")


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help=f"{DEVICE_HELP} (default auto)")


def check_count(name: str, value: Optional[int], minimum: int = 1) -> None:
    """One UserError line when a count argument is below its minimum (None = not given)."""
    if value is not None and int(value) < minimum:
        raise UserError(f"--{name} must be at least {minimum}, got {value}")
