"""`yolc-kd infer`: run a YOLC checkpoint on images and write COCO-format detections."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from yolc_kd.cli_args import add_amp_args, add_device_arg, check_amp_args, check_count
from yolc_kd.data.images import display_path
from yolc_kd.errors import UserError


def register(subparsers: Any) -> None:
    from yolc_kd.crops import DEFAULT_TILE_CFG

    p = subparsers.add_parser(
        "infer", help="detect objects in images with a YOLC checkpoint (COCO results json)",
        description="Run YOLC (full image -> LSM cluster crops -> one batched patch pass -> fusion) on a folder "
                    "of images, or on the images of a COCO json, and write COCO result dicts "
                    "{image_id, category_id, bbox [x,y,w,h], score}. For a folder, image ids are 1..N in "
                    "sorted file-name order and <out stem>.images.json maps them to the files.")
    p.add_argument("--config", required=True, type=Path, help="mmdet-style Python config (.py)")
    p.add_argument("--ckpt", type=Path, default=None, help="checkpoint (.pth) matching the config")
    p.add_argument("--onnx", type=Path, default=None,
                   help="instead of --ckpt: the network exported by `yolc-kd export` (dynamic), run by ONNX Runtime "
                        "(CPU, or CUDA with onnxruntime-gpu); the config still gives the crop, fusion and test "
                        "settings. Needs the deploy extra")
    p.add_argument("--images", required=True, type=Path,
                   help="folder of images (.jpg .jpeg .png .bmp .tif .tiff .webp); with --ann: the image root")
    p.add_argument("--ann", type=Path, default=None,
                   help="COCO json: run on its images (its ids and category ids) and print COCO metrics")
    p.add_argument("--out", required=True, type=Path, help="predictions json to write")
    p.add_argument("--fusion", choices=("nms", "replace", "none"), default=None,
                   help="how patch detections join the full-image ones (default: the config's, else nms)")
    p.add_argument("--max-patches", type=int, default=None, metavar="K",
                   help="crop patches per image (default: the config's, else 4; 0 = full image only)")
    p.add_argument("--viz", type=Path, default=None, metavar="DIR",
                   help="also write one PNG per image (heatmap, crop regions, boxes with score >= 0.3)")
    p.add_argument("--batch-size", type=int, default=1, metavar="N", help="images per forward pass (default 1)")
    p.add_argument("--max-pixels", type=int, default=None, metavar="N",
                   help="pixel budget of one network forward (batch x padded height x width; default: the config's "
                        f"test_cfg.max_pixels, else {DEFAULT_TILE_CFG['max_pixels']:,}): a larger input runs in "
                        "overlapping tiles whose stitched maps equal the untiled ones up to float noise, or is "
                        "downscaled (--large-image). 0: no budget, the whole image in one pass (memory grows with it)")
    p.add_argument("--large-image", choices=("tile", "downscale"), default="tile",
                   help="an image over --max-pixels: 'tile' (default: full resolution in overlapping tiles) or "
                        "'downscale' (resized so its padded input fits the budget, boxes mapped back: faster, "
                        "but objects shrink with it)")
    add_device_arg(p)
    add_amp_args(p, "the forwards")
    p.add_argument("--crop-config", type=Path, default=None,
                   help="config of a second model (e.g. the deployed teacher) whose LSM picks the crops")
    p.add_argument("--crop-ckpt", type=Path, default=None, help="checkpoint of the --crop-config model")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow checkpoints that need arbitrary pickle code (only for trusted files)")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first unreadable image (default: report it and go on)")
    p.set_defaults(func=run)


def _model_and_classes(config: Path) -> Tuple[Dict[str, Any], int, Optional[Tuple[str, ...]]]:
    """(config with defaults, the model's class count, the config's own class names or None)."""
    from yolc_kd.config import load_config

    own = load_config(config)
    cfg = load_config(config, with_defaults=True)
    try:
        num_classes = int(cfg["model"]["bbox_head"]["num_classes"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"config {config}: model.bbox_head.num_classes is missing or not an integer") from None
    classes = own.get("classes")
    if classes is None:
        return cfg, num_classes, None
    classes = tuple(str(c) for c in classes)
    if len(classes) != num_classes:
        raise UserError(f"config {config}: 'classes' lists {len(classes)} names but "
                        f"model.bbox_head.num_classes is {num_classes}")
    return cfg, num_classes, classes


def _folder_names(num_classes: int, classes: Optional[Tuple[str, ...]]) -> Tuple[str, ...]:
    from yolc_kd.config import YOLC_CLASSES

    if classes is not None:
        return classes
    if num_classes == len(YOLC_CLASSES):
        return YOLC_CLASSES
    return tuple(f"class{i + 1}" for i in range(num_classes))


def _load_model(cfg: Dict[str, Any], config: Path, ckpt: Optional[Path], trust: bool):
    from yolc_kd.checkpoint import load_checkpoint
    from yolc_kd.models import build_detector

    try:
        model = build_detector(cfg["model"])
    except (ValueError, TypeError, KeyError) as exc:
        raise UserError(f"config {config}: cannot build the model: {exc}") from None
    if ckpt is None:
        return model  # no weights: an exported network stands in for it (--onnx)
    try:
        load_checkpoint(model, ckpt, strict=True, trust=trust)
    except UserError:
        raise
    except Exception as exc:  # torch's weights-only unpickler raises e.g. IndexError on garbage bytes
        raise UserError(f"checkpoint {display_path(ckpt)} is not a readable torch file "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    return model


def run(args: argparse.Namespace) -> int:
    from yolc_kd.infer import predict as P

    check_count("batch-size", args.batch_size)
    check_count("max-patches", args.max_patches, 0)
    check_count("max-pixels", args.max_pixels, 0)
    check_amp_args(args)
    if args.large_image == "downscale" and args.max_pixels == 0:
        raise UserError("--large-image downscale needs a pixel budget: --max-pixels N with N > 0")
    if (args.ckpt is None) == (args.onnx is None):
        raise UserError("--ckpt and --onnx exclude each other: give one" if args.onnx is not None
                        else "give the network's weights: --ckpt CKPT or --onnx MODEL.onnx")
    if args.onnx is not None and args.amp:
        raise UserError("--amp does not apply to --onnx (the exported graph computes in float32)")
    from yolc_kd.runtime import resolve_device

    if (args.crop_config is None) != (args.crop_ckpt is None):
        raise UserError("--crop-config and --crop-ckpt go together (the model whose LSM picks the crops)")
    if args.onnx is not None:
        from yolc_kd.deploy.onnx_runtime import OnnxNetwork, onnx_device

        device = onnx_device(args.device)
    else:
        device = resolve_device(args.device)
    cfg, num_classes, classes = _model_and_classes(args.config)

    if args.ann is not None:
        source = P.coco_source(args.ann, args.images, classes, num_classes, strict=args.strict)
        for warning in source.dataset.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    else:
        source = P.folder_source(args.images, _folder_names(num_classes, classes))

    model = _load_model(cfg, args.config, args.ckpt, args.trust_checkpoint)
    if args.onnx is not None:  # ONNX Runtime stands in for the network; decoding, LSM, patches, fusion stay
        model.use_network(OnnxNetwork(args.onnx, device=device, num_classes=num_classes))
    crop_model = None
    if args.crop_config is not None:
        crop_cfg, crop_num_classes, _ = _model_and_classes(args.crop_config)
        if crop_num_classes != num_classes:
            raise UserError(f"--crop-config {args.crop_config} predicts {crop_num_classes} classes, "
                            f"--config {num_classes}: the crop model must share the classes")
        crop_model = _load_model(crop_cfg, args.crop_config, args.crop_ckpt, args.trust_checkpoint)
    predictor = P.Predictor(model, cfg, device=device, fusion=args.fusion, max_patches=args.max_patches,
                            crop_model=crop_model, max_pixels=args.max_pixels, large_image=args.large_image,
                            amp=args.amp, amp_dtype=args.amp_dtype)

    summary = P.predict_images(predictor, source, batch_size=args.batch_size, viz_dir=args.viz, strict=args.strict)
    written = P.save_predictions(args.out, summary, source)

    if summary.skipped:
        names = ", ".join(display_path(name) for name, _ in summary.skipped)
        print(f"warning: skipped {len(summary.skipped)} unreadable image(s): {names}", file=sys.stderr)
    extra = f" (+ {display_path(written[1])})" if len(written) > 1 else ""
    viz = f", {len(summary.viz_files)} overlays in {display_path(args.viz)}" if args.viz is not None else ""
    print(f"infer: {summary.num_images} images, {len(summary.results)} detections, "
          f"{summary.seconds_per_image:.3f} s/image -> {display_path(args.out)}{extra}{viz}")
    if args.ann is not None:
        from yolc_kd.infer.coco_eval import evaluate_coco, format_table

        print(format_table(evaluate_coco(args.ann, summary.results, quiet=True)))
    return 0
