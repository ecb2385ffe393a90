"""`yolc-kd convert-visdrone`: VisDrone-DET txt annotations -> one COCO json."""
from __future__ import annotations

import argparse
from typing import Any

from yolc_kd.data.images import display_path


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("convert-visdrone", help="convert VisDrone-DET annotations to COCO json",
                                   description=__doc__)
    parser.add_argument("--images", required=True, help="directory with the images")
    parser.add_argument("--annotations", required=True, help="directory with one VisDrone .txt per image")
    parser.add_argument("--out", required=True, help="COCO json to write")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from yolc_kd.data.visdrone import convert_visdrone

    _, stats = convert_visdrone(args.images, args.annotations, args.out, progress=True)
    dropped = stats.get("dropped_ignored_or_others", 0) + stats.get("dropped_empty_box", 0)
    print(f"wrote {display_path(args.out)}: {stats['images']} images, {stats['annotations']} boxes "
          f"({dropped} dropped, {stats.get('clipped', 0)} clipped, "
          f"{stats['images_without_txt']} images without a txt)")
    return 0
