"""`yolc-kd eval`: COCO bbox metrics of a predictions json against a COCO annotation file."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from yolc_kd.cli_args import check_count
from yolc_kd.diskio import write_json
from yolc_kd.infer.coco_eval import DEFAULT_MAX_DETS, evaluate_coco, format_table


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "eval", help="COCO bbox AP/AR of a predictions json",
        description="Evaluate COCO-format detections (list of {image_id, category_id, bbox, score}) "
                    "against a COCO annotation file. AP is reported at the largest --max-dets.")
    p.add_argument("--ann", required=True, type=Path, help="COCO annotation json (ground truth)")
    p.add_argument("--preds", required=True, type=Path, help="predictions json (COCO results list)")
    p.add_argument("--max-dets", nargs="+", type=int, default=list(DEFAULT_MAX_DETS), metavar="N",
                   help="detections per image to evaluate at (default: 1 10 100 500)")
    p.add_argument("--out", type=Path, default=None,
                   help="metrics json to write (default: <preds stem>.metrics.json next to --preds)")
    p.add_argument("--verbose", action="store_true", help="show pycocotools' own output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for value in args.max_dets:
        check_count("max-dets", value)
    preds = Path(args.preds)
    result = evaluate_coco(args.ann, preds, max_dets=args.max_dets, quiet=not args.verbose)
    out = Path(args.out) if args.out is not None else preds.with_name(f"{preds.stem}.metrics.json")
    print(format_table(result))
    write_json(out, result, indent=2)
    print(f"metrics written to {out}")
    return 0
