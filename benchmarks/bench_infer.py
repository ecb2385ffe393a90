"""Inference: full-image only vs fused crop-refine (K = 1, 2, 4 LSM patches) vs uniform sliced inference
(SAHI-style grid of half-size slices, 0.2 overlap, same upscale and fusion): seconds per image and COCO AP
on the synthetic validation set, measured in one run. With --student-config/--student-ckpt also a student
with its own crops and with the crops of the teacher (the --config model, LSM on its heatmap; its time is
counted).

Every image goes through every mode in turn (round robin), so a change of machine load during the run
weighs on all rows alike; the time of a mode is the sum of its calls (the model only, data loading excluded).

    python benchmarks/bench_infer.py --val DIR [--config CFG --ckpt CKPT] [--student-config CFG
        --student-ckpt CKPT] [--threads N] [--out r.json]

With --onnx-compare: PyTorch eager vs ONNX Runtime (the network exported by deploy.onnx_export, dynamic, in each
--onnx-dcn form, or --onnx FILE) for the --config model, full image and fused (the config's crop settings), at
each --onnx-threads count, all round robin per image: median and mean seconds per image (the network's share
apart), the speed-up, AP of each, and per image whether the ONNX detections equal PyTorch's (count, labels,
boxes: after sorting by score, and matched regardless of the order that float-noise ties in the scores can swap).
--random-weights times a model without a checkpoint (seeded initialisation).

    python benchmarks/bench_infer.py --onnx-compare --val DIR --config CFG (--ckpt CKPT | --random-weights)
        [--onnx model.onnx | --onnx-dcn grid_sample deform_conv] [--onnx-threads 1 2] [--out r.json]
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from _common import emit, log  # benchmarks/ is on sys.path when a script runs

REPO = Path(__file__).resolve().parents[1]


def grid_regions(h: int, w: int, overlap: float = 0.2) -> np.ndarray:
    """Half-size slices covering the image with the given overlap, [x, y, w, h]."""
    sh, sw = h // 2, w // 2
    ys = np.unique(np.linspace(0, h - sh, max(2, int(np.ceil((h - sh) / (sh * (1 - overlap)))) + 1)).round())
    xs = np.unique(np.linspace(0, w - sw, max(2, int(np.ceil((w - sw) / (sw * (1 - overlap)))) + 1)).round())
    return np.array([[x, y, sw, sh] for y in ys for x in xs], dtype=np.int64)


def sliced(model, img, metas):
    """Full image + every grid slice (as it is: no enlarging, no size filter), upscaled and fused like LSM patches."""
    from yolc_kd import crops

    heat, coarse, refine = model.bbox_head(model.extract_feat(img))
    full = model.bbox_head.get_bboxes(heat, coarse, refine, metas, rescale=False)
    regions = [grid_regions(*m["img_shape"][:2]) for m in metas]
    cfg = model.crop_cfg
    canvas = crops.patch_canvas(img.shape[2:]) if cfg.get("patch_limit", "input") == "quarter" else tuple(img.shape[2:])
    plan = crops.plan_inference_patches(regions, metas, img.shape[2:], max(len(r) for r in regions), 1, 1.0,
                                        float(cfg["upscale"]), canvas)
    return [(d.clone(), l) for d, l in model._fuse_patches(img, metas, full, plan, "nms")]


def with_crop_cfg(model, fn: Callable, **cfg) -> Callable:
    """fn run with model.crop_cfg temporarily updated (rows of one run differ only in these settings)."""
    def run(img, metas):
        saved = dict(model.crop_cfg)
        model.crop_cfg.update(cfg)
        try:
            return fn(img, metas)
        finally:
            model.crop_cfg.clear()
            model.crop_cfg.update(saved)
    return run


def build_modes(teacher, student) -> Dict[str, Callable]:
    def fused(model, k):
        return lambda img, metas: model.simple_test(img, metas, rescale=False, fusion="nms", max_patches=k)

    def full(model):
        return lambda img, metas: model.simple_test(img, metas, rescale=False, fusion="none")

    modes: Dict[str, Callable] = {"full": full(teacher)}
    for k in (1, 2, 4):
        modes[f"fused K={k}"] = with_crop_cfg(teacher, fused(teacher, k), patch_limit="input")
    if teacher.crop_cfg.get("patch_budget") is not None:  # what the budget saves, in the same run
        modes["fused K=2, no patch budget"] = with_crop_cfg(teacher, fused(teacher, 2), patch_limit="input",
                                                            patch_budget=None)
    modes["fused K=2 (quarter)"] = with_crop_cfg(teacher, fused(teacher, 2), patch_limit="quarter")
    modes["sliced"] = with_crop_cfg(teacher, lambda img, metas: sliced(teacher, img, metas), patch_limit="input")
    if student is not None:
        modes["student full"] = full(student)
        modes["student fused K=2, own crops"] = fused(student, 2)

        def teacher_crops(img, metas):
            coords = teacher.lsm_coords(img, metas)  # the deployed teacher's LSM on the same input
            return student.simple_test(img, metas, rescale=False, fusion="nms", max_patches=2, crop_coords=coords)

        modes["student fused K=2, teacher crops"] = teacher_crops
    return modes


def run_all(modes: Dict[str, Callable], cfg, source, batch_size: int):
    from yolc_kd.data.augment import collate_test
    from yolc_kd.infer.predict import build_test_transform

    transform = build_test_transform(cfg)
    results: Dict[str, List[dict]] = {name: [] for name in modes}
    seconds = dict.fromkeys(modes, 0.0)
    items = source.items
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        arrays = [source.dataset.load_image(start + i) for i in range(len(chunk))]
        img, metas = collate_test([transform(a) for a in arrays])
        for name, fn in modes.items():
            t = time.perf_counter()
            with torch.inference_mode():
                dets = fn(img, metas)
            seconds[name] += time.perf_counter() - t
            for item, (d, l) in zip(chunk, dets):
                for row, lab in zip(d.numpy(), l.tolist()):
                    x1, y1, x2, y2, s = [float(v) for v in row]
                    if x2 > x1 and y2 > y1:
                        results[name].append(dict(image_id=item.image_id, category_id=source.label_to_cat_id[lab],
                                                  bbox=[x1, y1, x2 - x1, y2 - y1], score=s))
    return results, {name: s / len(items) for name, s in seconds.items()}


def _load(config: str, ckpt: Optional[str]):
    """(model, config); ckpt None: seeded random weights (times only)."""
    from yolc_kd.checkpoint import load_checkpoint
    from yolc_kd.config import load_config
    from yolc_kd.models import build_detector

    cfg = load_config(config, with_defaults=True)
    torch.manual_seed(0)
    model = build_detector(cfg["model"])
    if ckpt is not None:
        load_checkpoint(model, ckpt)
    return model.eval(), cfg


# ----------------------------------------------------------------------------- PyTorch eager vs ONNX Runtime

def _sorted_dets(dets: torch.Tensor, labels: torch.Tensor) -> Tuple[np.ndarray, np.ndarray]:
    """Detections by descending score (ties: by box), as numpy."""
    d, lab = dets.double().numpy(), labels.numpy()
    order = np.lexsort((d[:, 3], d[:, 2], d[:, 1], d[:, 0], -d[:, 4]))
    return d[order], lab[order]


def compare_dets(a: Tuple[torch.Tensor, torch.Tensor], b: Tuple[torch.Tensor, torch.Tensor]) -> Dict[str, float]:
    """One image's detections of two runtimes. Sorted by score: whether the labels agree and the largest box
    difference pair by pair. Since scores that differ by float noise can swap places (ties), also a matching that
    ignores the order: each detection paired with the same-label detection of the other run whose box is closest
    (greedy, closest pairs first); its largest box difference, the unmatched count and the lowest score among them
    (a swap at the max_per_img / topk cut leaves detections of the lowest scores unmatched)."""
    (da, la), (db, lb) = _sorted_dets(*a), _sorted_dets(*b)
    n = min(len(da), len(db))
    out = dict(n_pytorch=len(da), n_onnx=len(db),
               sorted_max_box_diff=float(np.abs(da[:n, :4] - db[:n, :4]).max()) if n else 0.0,
               sorted_labels_equal=bool(np.array_equal(la[:n], lb[:n])),
               max_score_diff=float(np.abs(da[:n, 4] - db[:n, 4]).max()) if n else 0.0)
    dist = np.abs(da[:, None, :4] - db[None, :, :4]).max(-1)
    dist[la[:, None] != lb[None, :]] = np.inf
    flat = np.argsort(dist, axis=None)
    used_a, used_b, matched = np.zeros(len(da), bool), np.zeros(len(db), bool), []
    for idx in flat[np.isfinite(dist.reshape(-1)[flat])]:
        i, j = divmod(int(idx), len(db))
        if not used_a[i] and not used_b[j]:
            used_a[i] = used_b[j] = True
            matched.append(dist[i, j])
    unmatched = np.concatenate([da[~used_a, 4], db[~used_b, 4]])
    lowest = min(da[:, 4].min(initial=np.inf), db[:, 4].min(initial=np.inf))
    out.update(matched_max_box_diff=float(max(matched, default=0.0)), unmatched=int(len(unmatched)),
               unmatched_top_score=float(unmatched.max(initial=0.0)), lowest_score=float(lowest))
    return out


def _match_ok(c: dict, tol: float = 1e-3) -> bool:
    return c["n_pytorch"] == c["n_onnx"] and c["unmatched"] == 0 and c["matched_max_box_diff"] <= tol


class TimedNetwork:
    """A network stand-in (YOLC.use_network) that adds up the seconds of its calls: where the time goes."""

    def __init__(self, fn: Callable) -> None:
        self.fn, self.seconds = fn, 0.0

    def __call__(self, img: torch.Tensor):
        t = time.perf_counter()
        out = self.fn(img)
        self.seconds += time.perf_counter() - t
        return out


def onnx_compare(model, cfg, source, onnx_paths: Dict[str, str], thread_counts: Sequence[int]) -> dict:
    """PyTorch eager vs ONNX Runtime (one runtime per exported file: {name: path}), full and fused, at each thread
    count; round robin per image. The network calls of every runtime are timed apart from the rest (decoding, LSM,
    patch packing, fusion: the same code)."""
    from yolc_kd.data.augment import collate_test
    from yolc_kd.deploy.onnx_runtime import OnnxNetwork
    from yolc_kd.infer.predict import build_test_transform

    transform = build_test_transform(cfg)
    sessions = {(name, t): OnnxNetwork(path, threads=t) for name, path in onnx_paths.items() for t in thread_counts}
    runtimes = ["pytorch", *onnx_paths]
    modes = [(t, rt, fusion) for t in thread_counts for rt in runtimes for fusion in ("none", None)]
    network_s: Dict[tuple, List[float]] = {m: [] for m in modes}

    def call(mode, img, metas):
        threads, runtime, fusion = mode
        torch.set_num_threads(threads)
        net = TimedNetwork(sessions[(runtime, threads)] if runtime != "pytorch"
                           else lambda x: model.bbox_head(model.extract_feat(x)))  # = YOLC.network's own path
        model.use_network(net)
        try:
            with torch.inference_mode():
                return model.simple_test(img, metas, rescale=False, fusion=fusion, return_extras=True)
        finally:
            model.use_network(None)
            network_s[mode].append(net.seconds)

    first = source.dataset.load_image(0)
    img, metas = collate_test([transform(first)])
    for mode in modes:  # warm-up: allocator, ORT's first run, thread pools
        call(mode, img, metas)
        network_s[mode].clear()
    times: Dict[tuple, List[float]] = {m: [] for m in modes}
    results: Dict[tuple, List[dict]] = {m: [] for m in modes}
    per_image: Dict[tuple, List[dict]] = {m: [] for m in modes if m[1] != "pytorch"}
    for i, item in enumerate(source.items):
        img, metas = collate_test([transform(source.dataset.load_image(i))])
        outs = {}
        for mode in modes:
            t = time.perf_counter()
            outs[mode] = call(mode, img, metas)
            times[mode].append(time.perf_counter() - t)
            (d, l), = outs[mode][0]
            for row, lab in zip(d.numpy(), l.tolist()):
                x1, y1, x2, y2, sc = [float(v) for v in row]
                if x2 > x1 and y2 > y1:
                    results[mode].append(dict(image_id=item.image_id, category_id=source.label_to_cat_id[lab],
                                              bbox=[x1, y1, x2 - x1, y2 - y1], score=sc))
        for mode in per_image:
            ref = outs[(mode[0], "pytorch", mode[2])]
            cmp = compare_dets(ref[0][0], outs[mode][0][0])
            regions_ref, regions = ref[1]["regions"][0], outs[mode][1]["regions"][0]
            cmp["same_regions"] = bool(np.array_equal(np.asarray(regions_ref), np.asarray(regions)))
            cmp["image_id"] = item.image_id
            per_image[mode].append(cmp)
    return dict(times=times, network_s=network_s, results=results, per_image=per_image, modes=modes)


def onnx_main(args) -> None:
    import tempfile

    import onnxruntime

    from yolc_kd.deploy.onnx_export import check_sizes, export_onnx
    from yolc_kd.infer.coco_eval import evaluate_coco
    from yolc_kd.infer.predict import build_test_transform, coco_source

    model, cfg = _load(args.config, None if args.random_weights else args.ckpt)
    ann = Path(args.val) / "annotations.json"
    source = coco_source(ann, args.val, cfg.get("classes"), cfg["model"]["bbox_head"]["num_classes"])
    exports: Dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        if args.onnx is not None:
            paths["onnx"] = args.onnx
        else:
            input_hw, check_hw = check_sizes(build_test_transform(cfg))
            for dcn in args.onnx_dcn:
                name = "onnx" if dcn == "grid_sample" else f"onnx-{dcn}"
                paths[name] = str(Path(tmp) / f"{name}.onnx")
                log(f"exporting {args.config} (dynamic, --dcn {dcn}) ...")
                report = export_onnx(model, paths[name], input_hw, dynamic=True, check_hw=check_hw, dcn=dcn)
                exports[name] = dict(dcn=dcn, seconds=round(report.seconds, 1), max_diff=report.max_diff,
                                     mib=round(report.size_bytes / 2 ** 20, 1))
                log(f"exported in {report.seconds:.0f} s, check max |diff| {report.max_diff:.2g}")
        log(f"{len(source.items)} images x {len(args.onnx_threads) * 2 * (1 + len(paths))} modes "
            f"(threads {args.onnx_threads})")
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        run = onnx_compare(model, cfg, source, paths, args.onnx_threads)
        timed_s = round(time.perf_counter() - t0, 1)
        load_after = os.getloadavg()
    rows = []
    for mode in run["modes"]:
        threads, runtime, fusion = mode
        ts, net = np.asarray(run["times"][mode]), np.asarray(run["network_s"][mode])
        metrics = evaluate_coco(ann, run["results"][mode], max_dets=(1, 10, 100))
        row = dict(threads=threads, runtime=runtime, mode="full" if fusion == "none" else "fused",
                   median_s=float(np.median(ts)), mean_s=float(ts.mean()), network_median_s=float(np.median(net)),
                   rest_median_s=float(np.median(ts - net)), AP=metrics["AP"], AP50=metrics["AP50"])
        if runtime != "pytorch":
            base = np.asarray(run["times"][(threads, "pytorch", fusion)])
            base_net = np.asarray(run["network_s"][(threads, "pytorch", fusion)])
            row["speedup_median"] = float(np.median(base) / np.median(ts))
            row["network_speedup_median"] = float(np.median(base_net) / np.median(net))
            cmp = run["per_image"][mode]
            row["images_same_count"] = sum(c["n_pytorch"] == c["n_onnx"] for c in cmp)
            row["images_same_order_within_1e-3_px"] = sum(
                c["n_pytorch"] == c["n_onnx"] and c["sorted_labels_equal"] and c["sorted_max_box_diff"] <= 1e-3
                for c in cmp)
            row["images_matched_within_1e-3_px"] = sum(_match_ok(c) for c in cmp)
            row["matched_max_box_diff"] = max(c["matched_max_box_diff"] for c in cmp)
            row["max_score_diff"] = max(c["max_score_diff"] for c in cmp)
            row["images_same_regions"] = sum(c["same_regions"] for c in cmp)
            row["differing_images"] = [c for c in cmp if not (_match_ok(c) and c["sorted_labels_equal"]
                                                              and c["sorted_max_box_diff"] <= 1e-3)]
        rows.append(row)
    out = dict(machine=platform.machine(), processor=platform.processor(), config=args.config,
               ckpt=None if args.random_weights else args.ckpt, onnx=args.onnx, exports=exports,
               torch=torch.__version__, onnxruntime=onnxruntime.__version__, images=len(source.items),
               crop_cfg=dict(model.crop_cfg), timed_s=timed_s, loadavg_before=load_before, loadavg_after=load_after,
               rows=rows)
    emit(out, args.out)


def main() -> None:
    from yolc_kd.infer.coco_eval import evaluate_coco
    from yolc_kd.infer.predict import coco_source

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny_teacher_synth.py"))
    parser.add_argument("--ckpt", default=str(REPO / "src" / "yolc_kd" / "assets" / "tiny_teacher_synth.pth"))
    parser.add_argument("--val", required=True, help="synthetic val folder (annotations.json + images/)")
    parser.add_argument("--student-config", default=None, help="a student evaluated with its own / the teacher's crops")
    parser.add_argument("--student-ckpt", default=None)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--onnx-compare", action="store_true", help="PyTorch eager vs ONNX Runtime rows instead")
    parser.add_argument("--onnx", default=None, help="with --onnx-compare: an exported model (default: export one)")
    parser.add_argument("--onnx-threads", type=int, nargs="+", default=[1, 2], help="thread counts (default 1 2)")
    parser.add_argument("--onnx-dcn", nargs="+", default=["grid_sample"], choices=("grid_sample", "deform_conv"),
                        help="export forms to compare (runtimes 'onnx' and 'onnx-deform_conv'; default grid_sample)")
    parser.add_argument("--random-weights", action="store_true", help="with --onnx-compare: no checkpoint")
    args = parser.parse_args()
    if args.onnx_compare:
        return onnx_main(args)
    if (args.student_config is None) != (args.student_ckpt is None):
        parser.error("--student-config and --student-ckpt go together")
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher, cfg = _load(args.config, args.ckpt)
    student = _load(args.student_config, args.student_ckpt)[0] if args.student_config else None
    ann = Path(args.val) / "annotations.json"
    source = coco_source(ann, args.val, cfg.get("classes"), cfg["model"]["bbox_head"]["num_classes"])
    modes = build_modes(teacher, student)
    run_all({"full": modes["full"]}, cfg, source, args.batch_size)  # warm-up
    log(f"{len(modes)} modes x {len(source.items)} images, {torch.get_num_threads()} threads")
    t0 = time.perf_counter()
    results, spi = run_all(modes, cfg, source, args.batch_size)
    timed_s = round(time.perf_counter() - t0, 1)
    rows = []
    for name in modes:
        metrics = evaluate_coco(ann, results[name], max_dets=(1, 10, 100))
        rows.append(dict(mode=name, sec_per_img=spi[name], time_ratio_vs_full=spi[name] / spi["full"],
                         AP=metrics["AP"], AP50=metrics["AP50"], AP_small=metrics["AP_small"]))
    if student is not None:
        base = spi["student full"]
        for r in rows:
            if r["mode"].startswith("student"):
                r["time_ratio_vs_student_full"] = r["sec_per_img"] / base
    out = dict(machine=platform.machine(), threads=torch.get_num_threads(), config=args.config,
               crop_cfg={k: v for k, v in teacher.crop_cfg.items()}, student_config=args.student_config,
               student_ckpt=args.student_ckpt, images=len(source.items), batch_size=args.batch_size,
               timed_s=timed_s, rows=rows)
    emit(out, args.out)


if __name__ == "__main__":
    main()
