"""`yolc-kd make-crops`: YOLC's crop training set (gen_crop.py): the original images plus LSM crops of
their ground truth (upscaled 1.5x, padded to >= 1024x640) in OUT/images, and OUT/annotations.json."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from yolc_kd.data.images import display_path


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("make-crops", help="YOLC's training set: images plus ground-truth LSM crops",
                                   description=__doc__)
    parser.add_argument("--ann", required=True, metavar="COCO.json", help="annotations of the source images")
    parser.add_argument("--images", required=True, metavar="DIR", help="image root of the source images")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="new or empty output folder (images/ and annotations.json)")
    parser.add_argument("--crops", type=int, default=1, metavar="N",
                        help="largest LSM regions to crop per image (default 1, as YOLC's 1crop set)")
    parser.add_argument("--min-size", type=int, default=96, metavar="PX",
                        help="skip regions with an area under PX*PX before enlarging (default 96)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def _count(n: int, word: str, words: str = "") -> str:
    return f"{n} {word if n == 1 else words or word + 's'}"


def run(args: argparse.Namespace) -> int:
    from yolc_kd.data.make_crops import make_crop_dataset

    s = make_crop_dataset(args.ann, args.images, args.out, crops_per_image=args.crops, min_size=args.min_size,
                          progress=not args.no_progress)
    for w in s.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"wrote {display_path(s.ann_file)}: {_count(s.images, 'image')} + {_count(s.crops, 'crop')}, "
          f"{s.annotations} + {_count(s.crop_annotations, 'box', 'boxes')}; train with --ann {display_path(s.ann_file)} "
          f"--images {display_path(s.image_root)}")
    return 0
