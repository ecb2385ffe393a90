"""Inference: full-image only vs fused crop-refine (K = 1, 2, 4 LSM patches) vs uniform sliced inference
(SAHI-style grid of half-size slices, 0.2 overlap, same upscale and fusion): seconds per image and COCO AP
on the synthetic validation set, measured in one run.

    python benchmarks/bench_infer.py --config configs/tiny_teacher_synth.py --ckpt CKPT --val DIR [--out r.json]
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path
from typing import List

import numpy as np
import torch
from _common import emit  # benchmarks/ is on sys.path when a script runs

REPO = Path(__file__).resolve().parents[1]


def grid_regions(h: int, w: int, overlap: float = 0.2) -> np.ndarray:
    """Half-size slices covering the image with the given overlap, [x, y, w, h]."""
    sh, sw = h // 2, w // 2
    ys = np.unique(np.linspace(0, h - sh, max(2, int(np.ceil((h - sh) / (sh * (1 - overlap)))) + 1)).round())
    xs = np.unique(np.linspace(0, w - sw, max(2, int(np.ceil((w - sw) / (sw * (1 - overlap)))) + 1)).round())
    return np.array([[x, y, sw, sh] for y in ys for x in xs], dtype=np.int64)


def run_mode(model, cfg, source, mode: str, k: int, batch_size: int):
    from yolc_kd.data.augment import collate_test
    from yolc_kd.infer.predict import build_test_transform

    transform = build_test_transform(cfg)
    results: List[dict] = []
    seconds = 0.0
    items = source.items
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        arrays = [source.dataset.load_image(start + i) for i in range(len(chunk))]
        img, metas = collate_test([transform(a) for a in arrays])
        t = time.perf_counter()
        with torch.inference_mode():
            if mode == "sliced":
                heat, coarse, refine = model.bbox_head(model.extract_feat(img))
                full = model.bbox_head.get_bboxes(heat, coarse, refine, metas, rescale=False)
                regions = [grid_regions(*m["img_shape"][:2]) for m in metas]
                dets = model._fuse_patches(img, metas, full, regions, "nms")
                dets = [(d.clone(), l) for d, l in dets]
            else:
                dets = model.simple_test(img, metas, rescale=False, fusion="none" if mode == "full" else "nms",
                                         max_patches=k)
        seconds += time.perf_counter() - t
        for item, (d, l) in zip(chunk, dets):
            d = d.numpy()
            for row, lab in zip(d, l.tolist()):
                x1, y1, x2, y2, s = [float(v) for v in row]
                if x2 > x1 and y2 > y1:
                    results.append(dict(image_id=item.image_id, category_id=source.label_to_cat_id[lab],
                                        bbox=[x1, y1, x2 - x1, y2 - y1], score=s))
    return results, seconds / len(items)


def main() -> None:
    from yolc_kd.checkpoint import load_checkpoint
    from yolc_kd.config import load_config
    from yolc_kd.infer.coco_eval import evaluate_coco
    from yolc_kd.infer.predict import coco_source
    from yolc_kd.models import build_detector

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny_teacher_synth.py"))
    parser.add_argument("--ckpt", default=str(REPO / "src" / "yolc_kd" / "assets" / "tiny_teacher_synth.pth"))
    parser.add_argument("--val", required=True, help="synthetic val folder (annotations.json + images/)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--out", default=None)
    parser.add_argument("--patch-limits", nargs="+", default=["input", "quarter"])
    args = parser.parse_args()
    cfg = load_config(args.config, with_defaults=True)
    model = build_detector(cfg["model"])
    load_checkpoint(model, args.ckpt)
    model.eval()
    ann = Path(args.val) / "annotations.json"
    source = coco_source(ann, args.val, cfg.get("classes"), cfg["model"]["bbox_head"]["num_classes"])
    runs = [("full", 0, None)] + [("fused", k, lim) for lim in args.patch_limits for k in (1, 2, 4)] \
        + [("sliced", 0, lim) for lim in args.patch_limits]
    rows = []
    run_mode(model, cfg, source, "full", 0, args.batch_size)  # warm-up
    for mode, k, limit in runs:
        if limit:
            model.crop_cfg["patch_limit"] = limit
        results, spi = run_mode(model, cfg, source, mode, k, args.batch_size)
        metrics = evaluate_coco(ann, results, max_dets=(1, 10, 100))
        name = mode if mode != "fused" else f"fused K={k}"
        rows.append(dict(mode=name + (f" ({limit})" if limit else ""), sec_per_img=spi, AP=metrics["AP"],
                         AP50=metrics["AP50"], AP_small=metrics["AP_small"]))
    base = rows[0]["sec_per_img"]
    for r in rows:
        r["time_ratio_vs_full"] = r["sec_per_img"] / base
    out = dict(machine=platform.machine(), threads=torch.get_num_threads(), config=args.config,
               images=len(source.items), batch_size=args.batch_size, rows=rows)
    emit(out, args.out)


if __name__ == "__main__":
    main()
