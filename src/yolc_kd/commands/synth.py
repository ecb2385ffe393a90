"""`yolc-kd synth`: write a synthetic aerial detection dataset (PNG images + COCO json)."""
from __future__ import annotations

import argparse
import re
from typing import Any

from yolc_kd.data.images import display_path
from yolc_kd.errors import UserError


def parse_size(text: str) -> tuple[int, int]:
    """'512x320' -> (512, 320)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise UserError(f"--size must look like WIDTHxHEIGHT (e.g. 512x320), got {text!r}")
    return int(match.group(1)), int(match.group(2))


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("synth", help="generate a synthetic aerial tiny-object dataset",
                                   description=__doc__)
    parser.add_argument("--out", required=True, help="output directory (images/ and annotations.json)")
    parser.add_argument("--num-images", type=int, required=True, help="number of images")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed -> identical files")
    parser.add_argument("--size", default="512x320", help="image size WIDTHxHEIGHT (default 512x320)")
    parser.add_argument("--classes", type=int, default=10, help="number of classes, 1..10 (default 10)")
    parser.add_argument("--layout-from", default=None, metavar="COCO.json",
                        help="place objects at the (rescaled) boxes of this COCO file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from yolc_kd.data.synth import make_synthetic_dataset

    out = make_synthetic_dataset(args.out, args.num_images, args.seed, size=parse_size(args.size),
                                 num_classes=args.classes, layout_from=args.layout_from, progress=True)
    print(f"wrote {args.num_images} images and {display_path(out / 'annotations.json')}")
    return 0
