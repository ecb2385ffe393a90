"""`yolc-kd export`: a YOLC checkpoint's network (backbone, neck, head) as an ONNX model for ONNX Runtime."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Tuple

from yolc_kd.data.images import display_path
from yolc_kd.errors import UserError


def _size(text: str) -> Tuple[int, int]:
    """'WxH' -> (h, w)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WxH, e.g. 1024x640, got {text!r}") from None
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError(f"width and height must be positive, got {text!r}")
    return h, w


def register(subparsers: Any) -> None:
    from yolc_kd.deploy.onnx_export import DCN_MODES, DEFAULT_DCN, DEFAULT_OPSET, DEFAULT_TOLERANCE

    p = subparsers.add_parser(
        "export", help="export a YOLC checkpoint's network to ONNX (checked against PyTorch with onnxruntime)",
        description="Export the network (backbone, neck, head: heatmap probabilities, coarse and refine maps) with "
                    "torch's dynamo exporter and check it against PyTorch with onnxruntime on a random input (and a "
                    "second batch and size when dynamic) before the file takes its name. `yolc-kd infer --onnx` runs "
                    "it in the fused pipeline (which feeds patch canvases of many sizes: export it dynamic). Needs "
                    "the deploy extra: pip install 'yolc-kd[deploy]'.")
    p.add_argument("--config", required=True, type=Path, help="mmdet-style Python config (.py)")
    p.add_argument("--ckpt", required=True, type=Path, help="checkpoint (.pth) matching the config")
    p.add_argument("--out", required=True, type=Path, help="ONNX file to write (e.g. model.onnx)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--input-size", type=_size, default=None, metavar="WxH",
                      help="a graph for this network input size only (batch 1); default: dynamic")
    size.add_argument("--dynamic", action="store_true",
                      help="dynamic batch, height and width (the default); checked at the config's test input "
                           "size and a second batch and size")
    p.add_argument("--dcn", choices=DCN_MODES, default=DEFAULT_DCN,
                   help="how the deformable refine conv is written: grid_sample (Conv + GridSample, runs on every "
                        "runtime; default) or deform_conv (ONNX DeformConv, opset >= 19, for runtimes that have it)")
    p.add_argument("--no-check", action="store_true",
                   help="keep the file without comparing it to PyTorch (e.g. --dcn deform_conv where the installed "
                        "onnxruntime has no DeformConv kernel)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help="largest |onnxruntime - PyTorch| the check accepts, times max(1, the map's largest value) "
                        f"(default {DEFAULT_TOLERANCE:g})")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow checkpoints that need arbitrary pickle code (only for trusted files)")
    p.set_defaults(func=run)


def _load(config: Path, ckpt: Path, trust: bool):
    from yolc_kd.checkpoint import load_checkpoint
    from yolc_kd.config import load_config
    from yolc_kd.models import build_detector

    cfg = load_config(config, with_defaults=True)
    try:
        model = build_detector(cfg["model"])
    except (ValueError, TypeError, KeyError) as exc:
        raise UserError(f"config {config}: cannot build the model: {exc}") from None
    try:
        load_checkpoint(model, ckpt, strict=True, trust=trust)
    except UserError:
        raise
    except Exception as exc:  # torch's weights-only unpickler raises e.g. IndexError on garbage bytes
        raise UserError(f"checkpoint {display_path(ckpt)} is not a readable torch file "
                        f"({type(exc).__name__})") from None
    return cfg, model


def run(args: argparse.Namespace) -> int:
    from yolc_kd.deploy.onnx_export import check_requirements, check_sizes, describe, export_onnx
    from yolc_kd.infer.predict import build_test_transform

    if not args.tolerance > 0:
        raise UserError(f"--tolerance must be > 0, got {args.tolerance}")
    check_requirements(args.opset, args.dcn, not args.no_check)  # before the model: a missing package first
    cfg, model = _load(args.config, args.ckpt, args.trust_checkpoint)
    dynamic = args.input_size is None
    if dynamic:
        input_hw, check_hw = check_sizes(build_test_transform(cfg))
    else:
        input_hw, check_hw = args.input_size, None
    print(f"export: tracing {display_path(args.config)} at {input_hw[1]}x{input_hw[0]} "
          f"(a minute or more for an HRNet on a CPU)", file=sys.stderr, flush=True)
    metadata = {"yolc_kd.config": Path(args.config).name,
                "yolc_kd.num_classes": str(cfg["model"]["bbox_head"]["num_classes"])}
    report = export_onnx(model, args.out, input_hw, dynamic=dynamic, check_hw=check_hw, opset=args.opset,
                         dcn=args.dcn, check=not args.no_check, tolerance=args.tolerance, metadata=metadata)
    print(f"export: {describe(report)}")
    return 0
