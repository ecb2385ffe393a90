"""How close the image-level cache's targets are to the teacher's own targets on each view.

    python benchmarks/bench_image_targets.py --data DIR --cache IMAGE_CACHE [--views 60] [--out results.json]

For fresh training views (the student config's TrainAugment, keys (seed, image id, pass)) of the images in DIR
(a COCO folder, e.g. the KD benchmark's data/train) it compares, inside the part of each view that shows the
image:
  per_view      the shipped tiny teacher run on the view itself (what the per-view cache and online KD give);
  per_view_nophoto   the same teacher on the view without its photometric distortion;
  image_level   the targets moved into the view from the image-level cache (train/image_source.py).
Reported: mean |heatmap difference|, recall of the teacher's heatmap peaks (>= 0.3) within 2 px, median |coarse
box difference| in pixels on cells where the teacher is confident (max class probability >= 0.3), KD crops per
view, and the worker-side seconds per sample of the image-level read and move. The per_view vs
per_view_nophoto row is what the photometric distortion alone changes in the teacher's targets, the floor
against which the image-level row is read. --shift-images N also measures the teacher's own sensitivity to
where its input sits (the same image shifted by 1-32 px on its canvas).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

from _common import emit, log  # benchmarks/ is on sys.path when a script runs

REPO = Path(__file__).resolve().parents[1]
STUDENT = REPO / "src" / "yolc_kd" / "configs" / "tiny_student_synth.py"
TEACHER = REPO / "src" / "yolc_kd" / "assets" / "tiny_teacher_synth.pth"


EDGE_PX = 32  # "near the edge": within this many pixels of the border of the image's part of the view


def _peaks(p: torch.Tensor, thr: float = 0.3) -> torch.Tensor:
    return (p == F.max_pool2d(p, 3, 1, 1)) & (p >= thr)


def _compare(ref, other_heat: torch.Tensor, other_coarse: torch.Tensor, valid: torch.Tensor,
             coarse_valid: torch.Tensor, decode) -> Dict[str, float]:
    """Heatmap |diff| and peak recall inside valid; coarse box |diff| (px) on confident valid cells."""
    m = valid[0, 0]
    diff = (other_heat[0] - ref.heatmap[0]).abs()[:, m]
    pa, pb = _peaks(ref.heatmap[0:1])[0] & m, _peaks(other_heat[0:1])[0]
    near = F.max_pool2d(pb.float()[None], 5, 1, 2)[0] > 0
    recall = float((near & pa).sum()) / max(1, int(pa.sum()))
    conf = F.max_pool2d(ref.heatmap.amax(1, keepdim=True), 4, 4)[0, 0] >= 0.3
    cells = (conf & coarse_valid[0, 0]).reshape(-1)
    box_a, box_b = decode(ref.coarse)[0][cells], decode(other_coarse)[0][cells]
    box = float((box_a - box_b).abs().mul(4).median()) if cells.any() else float("nan")
    return dict(heat_mean_abs=float(diff.mean()), peak_recall=recall, coarse_median_abs_px=box,
                teacher_peaks=int(pa.sum()))


def shift_floor(teacher, coco, aug, images: int, shifts=(1, 2, 4, 8, 16, 32)) -> Dict[int, Dict[str, float]]:
    """The teacher's own sensitivity to where its input sits: each image (normalised, no augmentation) placed at
    (s, s) on a zero canvas 64 px larger than it, against the image at (0, 0); heatmap |diff| and peak recall over
    the image's interior (16 px from its edges)."""
    from yolc_kd.data.augment import normalise

    def heat_at(x: torch.Tensor, s: int) -> torch.Tensor:
        h, w = x.shape[1:]
        canvas = torch.zeros(1, 3, -(-(h + 64) // 32) * 32, -(-(w + 64) // 32) * 32)
        canvas[0, :, s:s + h, s:s + w] = x
        with torch.no_grad():
            heat, _, _ = teacher.bbox_head(teacher.extract_feat(canvas))
        return heat[0][0, :, s:s + h, s:s + w]

    out: Dict[int, List[Tuple[float, float]]] = {s: [] for s in shifts}
    for i in range(min(images, len(coco))):
        x = torch.from_numpy(normalise(coco.load_image(i), aug).transpose(2, 0, 1).copy())
        base = heat_at(x, 0)
        inner = torch.zeros(base.shape[1:], dtype=torch.bool)
        inner[16:-16, 16:-16] = True
        for s in shifts:
            moved = heat_at(x, s)
            pa, pb = _peaks(base[None])[0] & inner, _peaks(moved[None])[0]
            near = F.max_pool2d(pb.float()[None], 5, 1, 2)[0] > 0
            out[s].append((float((moved - base).abs()[:, inner].mean()),
                           float((near & pa).sum()) / max(1, int(pa.sum()))))
    return {s: dict(heat_mean_abs=statistics.mean(v[0] for v in vals),
                    peak_recall=statistics.mean(v[1] for v in vals)) for s, vals in out.items()}


def _without_colour(view, image, aug) -> torch.Tensor:
    """The view's network input with its geometry and no photometric distortion: the view transform on the
    plain image (rounded to uint8 as TrainAugment rounds), normalised, zero-padded as the training input."""
    import numpy as np

    from yolc_kd.data.augment import normalise

    from yolc_kd.data.view import ViewTransform

    if "aligned" in view.params:  # an aligned view is input-sized: its steps end at the network input
        norm = normalise(view.view.apply_image(image), aug)
    else:  # TrainAugment's view: the geometry, then the input padding in normalised space (0)
        *geometry, pad = view.view.steps
        img_u8 = ViewTransform(tuple(geometry)).apply_image(image)
        norm = pad.apply_image(normalise(img_u8, aug), fill=(0.0, 0.0, 0.0))
    return torch.from_numpy(np.ascontiguousarray(norm.transpose(2, 0, 1)))


def main() -> None:
    from yolc_kd.cache.image_view import move_heatmaps
    from yolc_kd.cache.reader import CacheReader
    from yolc_kd.config import load_config
    from yolc_kd.data.augment import AugmentConfig, TrainAugment
    from yolc_kd.data.coco import CocoDetection
    from yolc_kd.teacher import build_teacher, teacher_targets
    from yolc_kd.train.image_source import ImageCacheSource
    from yolc_kd.cache.arrays import dequantize_targets

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="COCO folder (annotations.json + images)")
    p.add_argument("--cache", required=True, help="image-level cache of those images")
    p.add_argument("--ann", default=None, help="annotation file (default DATA/annotations.json)")
    p.add_argument("--heatmap-mode", default="nearest", choices=("bilinear", "nearest"))
    p.add_argument("--views-kind", default="aligned", choices=("aligned", "free"),
                   help="the student's views: aligned with the cached rows (distill_cfg.image_views default) or free")
    p.add_argument("--shift-images", type=int, default=12,
                   help="images for the teacher's own shift sensitivity (0: skip)")
    p.add_argument("--no-flip", action="store_true", help="views never mirrored (the pipeline's flip ratio 0)")
    p.add_argument("--all-flipped", action="store_true", help="every view mirrored (the pipeline's flip ratio 1)")
    p.add_argument("--views", type=int, default=60)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(STUDENT, with_defaults=True)
    dcfg = cfg["distill"]
    data = Path(args.data)
    coco = CocoDetection(args.ann or data / "annotations.json", data)
    aug = AugmentConfig.from_pipeline(cfg["train_pipeline"], cfg.get("test_pipeline"))
    if args.no_flip or args.all_flipped:
        aug = dataclasses.replace(aug, flip_ratio=1.0 if args.all_flipped else 0.0)
    from yolc_kd.data.aligned_views import AlignedViews

    reader = CacheReader(args.cache)
    with_photo = AlignedViews(aug, reader.layout.scales, mirrored_rows=reader.layout.mirrored) \
        if args.views_kind == "aligned" else TrainAugment(aug)
    teacher = build_teacher(dcfg, cfg["model"], str(STUDENT.parent), str(TEACHER))
    source = ImageCacheSource(reader, dcfg.max_patches_per_img, dcfg.min_patch_size)
    decode = teacher.bbox_head.decode_xywh_to_bbox
    rows: Dict[str, List[Dict[str, float]]] = {"image_level": [], "per_view_nophoto": []}
    crops = {"per_view": [], "image_level": []}
    read_s, move_s = [], []
    cpu = torch.device("cpu")
    for k in range(args.views):
        i = k % len(coco)
        info = coco.image_info(i)
        image = coco.load_image(i)
        boxes, labels = coco.annotations(i)
        key = (int(cfg.get("seed", 0)), int(info["id"]), k // len(coco))
        view = with_photo(image, boxes, labels, key)
        with torch.no_grad():
            ref = teacher_targets(teacher, view.img[None], [view.meta], dcfg)
            ref_plain = teacher_targets(teacher, _without_colour(view, image, aug)[None], [view.meta], dcfg)
        t0 = time.perf_counter()
        got = source.sample_targets(int(info["id"]), 0, image, view)
        t1 = time.perf_counter()
        heat, valid = move_heatmaps([(got.heatmap_window, got.heatmap_move)], view.img.shape[-2:], cpu,
                                    args.heatmap_mode)
        move_s.append(time.perf_counter() - t1)
        read_s.append(t1 - t0)
        moved = dequantize_targets(got.targets)
        rows["image_level"].append(_compare(ref, heat, moved.coarse, valid, moved.coarse_valid, decode))
        # where the mismatch is: near the edge of what the view shows of the image (the whole-image teacher saw
        # context there that the view cuts off) or inside; in mirrored views or not
        inner = -F.max_pool2d(-valid.float(), 2 * EDGE_PX + 1, 1, EDGE_PX) > 0
        part = "mirrored" if view.params.get("flipped") else "unmirrored"
        for name, mask in ((f"image_level_inner_{part}", inner), (f"image_level_edge_{part}", valid & ~inner)):
            if mask.any():
                rows.setdefault(name, []).append(_compare(ref, heat, moved.coarse, mask, moved.coarse_valid, decode))
        everywhere = torch.ones_like(valid)
        rows["per_view_nophoto"].append(_compare(ref, ref_plain.heatmap, ref_plain.coarse, everywhere,
                                                 torch.ones_like(moved.coarse_valid), decode))
        crops["per_view"].append(int(ref.patch_valid.sum()))
        crops["image_level"].append(int(moved.patch_valid.sum()))
    summary = {name: {key: statistics.mean(r[key] for r in rs if r[key] == r[key]) for key in rs[0]}
               for name, rs in rows.items()}
    summary["crops_per_view"] = {k: statistics.mean(v) for k, v in crops.items()}
    summary["worker_s_per_sample"] = statistics.median(read_s)
    summary["heatmap_move_s_per_sample"] = statistics.median(move_s)
    for name in [n for n in summary if n.startswith(("per_view_nophoto", "image_level"))]:
        s = summary[name]
        log(f"{name:<32} vs the teacher on the view: heatmap |diff| {s['heat_mean_abs']:.4f}, peak recall "
            f"{s['peak_recall']:.2f}, coarse |diff| {s['coarse_median_abs_px']:.2f} px")
    log(f"KD crops per view: teacher on the view {summary['crops_per_view']['per_view']:.2f}, image-level "
        f"{summary['crops_per_view']['image_level']:.2f}; worker {1e3 * summary['worker_s_per_sample']:.1f} ms, "
        f"heatmap move {1e3 * summary['heatmap_move_s_per_sample']:.1f} ms per sample")
    if args.shift_images:
        summary["teacher_shift_floor"] = floor = shift_floor(teacher, coco, aug, args.shift_images)
        for shift, v in floor.items():
            log(f"teacher input shifted by {shift:>2} px: heatmap |diff| {v['heat_mean_abs']:.4f}, peak recall "
                f"{v['peak_recall']:.2f}")
    emit(dict(views=args.views, views_kind=args.views_kind, cache=str(args.cache), heatmap_mode=args.heatmap_mode,
              summary=summary), args.out)


if __name__ == "__main__":
    main()
