"""Teacher soft-label cache (issue "Offline teacher precompute into Zarr shards"): size, read speed,
precompute speed and memory, measured in ONE run (ratios are taken within the run, timings interleaved).

1. size:     bytes per sample at the real layout (1024x640 input, 10 classes, K=4 patch slots) for realistic
             targets: CenterNet-style Gaussian peaks at the boxes of real VisDrone layouts (passed through the
             project's TrainAugment) plus background noise below 1/255, and smooth raw float16 box maps; written
             with the project's cache writer (same codecs and sharding as precompute). Goal <= 300 KB/sample.
2. read:     samples/s through the trainer's path (open_cache_source(...).read, i.e. zarr read + decode +
             dequantise, KDTargets.stack collate) in a torch DataLoader with 0, 1 and 2 workers, on cache 1.
3. throughput: the precompute entry point (in process) vs teacher.kd_targets alone on the same augmented
             views and batches (tiny teacher, random weights with a spread head, synthetic 384x256 images).
             Goal >= 0.9x.
4. memory:   peak RSS of `python -m yolc_kd precompute` (fresh subprocess each) at --rss-images counts
             (default 50 and 200 tiny images). Goal: within 10 % of each other.
5. image_size: the image-level cache (precompute --kind image: rows = image x scale, the real config's auto
             scales and auto crop slots R) of the first --image-images real layouts, teacher-like rows as
             teacher.image_targets gives them (heatmap of the boxes on the scaled image, LSM over it, kd-mode
             crop plan, refine maps of the valid crops), written with the project's writer. Bytes per image (all
             scales) vs 240 x part 1's bytes per view (YOLC's 240 passes per image): goal <= 10 %; teacher
             full-image forwards per image S: goal <= 3.
6. image_read: samples/s of ImageCacheSource.sample_targets (the DataLoader worker's share) on TrainAugment
             views (keys (seed, id, pass)) in a DataLoader with 0/1/2 workers, interleaved round by round with
             part 2's per-view loaders; the heatmap move (move_heatmaps: the training process, on its device)
             per sample on this CPU (1 thread) apart; a cProfile of the worker's call. Goal >= 100 samples/s
             per worker.

    python benchmarks/bench_cache.py [--out results.json] [--samples 32] [--rss-images 50 200] ...
    python benchmarks/bench_cache.py --image-level [--image-images 16] [--image-read-samples 96]
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import platform
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from _cache_rss import bench_rss
from _common import emit, log  # benchmarks/ is on sys.path when a script runs
from _teacher_like import coarse_with_objects, read_layouts, render_heatmap, smooth_maps

REPO = Path(__file__).resolve().parents[1]
VISDRONE_LAYOUTS = REPO.parent / "shared" / "data" / "visdrone2019-det-train-first50image.json"
REAL_CONFIG = REPO / "configs" / "yolc_hrnet_w18_visdrone_kd.py"      # w48 -> w18 at 1024x640, K=4
TINY_STUDENT = REPO / "configs" / "tiny_student_synth.py"              # its teacher: tiny_teacher_synth.py
TINY_TEACHER = REPO / "configs" / "tiny_teacher_synth.py"
GOAL_BYTES_PER_SAMPLE = 300_000
GOAL_THROUGHPUT_RATIO = 0.9
PARTS = ("size", "read", "image_size", "image_read", "throughput", "rss")

def machine() -> Dict[str, Any]:
    import numcodecs
    import zarr

    return dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                python=platform.python_version(), cpu_count=os.cpu_count(),
                cpu_affinity=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                torch_threads=torch.get_num_threads(), torch=torch.__version__, zarr=zarr.__version__,
                numcodecs=numcodecs.__version__, numpy=np.__version__, loadavg_start=list(os.getloadavg()))


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# ============================================================================ 1. size at the real layout
def real_setup():
    """The w48 -> w18 VisDrone config: its augmentation (1024x640), classes, distill settings and manifest identity."""
    from yolc_kd.config import load_config
    from yolc_kd.data.augment import AugmentConfig
    from yolc_kd.data.synth import default_class_names

    cfg = load_config(REAL_CONFIG, with_defaults=True)
    aug_cfg = AugmentConfig.from_pipeline(cfg.get("train_pipeline"), cfg.get("test_pipeline"))
    classes = tuple(cfg.get("classes") or default_class_names(10))
    return cfg, aug_cfg, classes


def bench_size(tmp: Path, args) -> Tuple[Dict[str, Any], Path, Dict[str, Any]]:
    from yolc_kd import __version__, crops
    from yolc_kd.cache.manifest import jsonable
    from yolc_kd.cache.arrays import STATUS_OK, sample_names, spec
    from yolc_kd.cache.codec import BOXES, HEATMAP
    from yolc_kd.cache.schema import Layout, encode_fingerprint
    from yolc_kd.cache.writer import CacheStore, ShardBuffer
    from yolc_kd.data.augment import TrainAugment
    from yolc_kd.stride import BOX_STRIDE
    from yolc_kd.teacher import expected_target_identity

    rng = np.random.default_rng(args.seed)
    cfg, aug_cfg, classes = real_setup()
    dcfg = cfg["distill"]
    w, h = aug_cfg.input_size
    c, k, variants = len(classes), dcfg.max_patches_per_img, args.variants
    canvas = crops.patch_canvas((h, w))
    stride = BOX_STRIDE
    n_images = max(1, args.samples // variants)
    layout = Layout(num_images=n_images, variants=variants, shard_size=args.shard_size, num_classes=c,
                    input_hw=(h, w), coarse_hw=(h // stride, w // stride), max_patches=k,
                    refine_hw=(canvas[0] // stride, canvas[1] // stride))
    source, layouts = read_layouts(Path(args.layout_json), rng)
    # a COCO file with the cache's image ids and classes, so the trainer's open_cache_source accepts the cache
    ann = tmp / "real_layout_coco.json"
    images = [dict(id=i + 1, file_name=f"images/{i:06d}.jpg", width=layouts[i % len(layouts)]["width"],
                   height=layouts[i % len(layouts)]["height"]) for i in range(n_images)]
    ann.write_text(json.dumps(dict(images=images, annotations=[],
                                   categories=[dict(id=j + 1, name=n) for j, n in enumerate(classes)])))
    out = tmp / "real_cache"
    shutil.rmtree(out, ignore_errors=True)
    manifest = expected_target_identity(cfg, aug_cfg, classes)
    manifest["teacher"].update(ckpt_sha256="0" * 64, ckpt_path="(synthetic targets, no teacher)")
    manifest.update(jsonable(dict(
        package_version=__version__, variants=variants, shard_size=args.shard_size, amp=True,
        annotations=dict(sha256="0" * 64, path=str(ann), image_root=str(tmp), num_images=n_images),
        layout=layout.to_dict(), index="image_index * variants + variant", quantization={},
        run=dict(device="synthetic", batch_size=0, world_size=1, cpu_threads=1), complete=False)))
    store = CacheStore.prepare(out, manifest, [im["id"] for im in images])
    augment = TrainAugment(aug_cfg)

    n_obj, nz_frac, n_valid, aug_s, gen_s, write_s = [], [], [], 0.0, 0.0, 0.0
    buf = None
    for i in range(n_images):
        lay = layouts[i % len(layouts)]
        blank = np.full((lay["height"], lay["width"], 3), 96, np.uint8)
        for v in range(variants):
            index = i * variants + v
            t0 = time.perf_counter()
            view = augment(blank, lay["boxes"], lay["labels"], (int(cfg.get("seed", 0)), i + 1, v))
            aug_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            vb = np.asarray(view.boxes, np.float32).reshape(-1, 4)
            vl = np.asarray(view.labels, np.int64).reshape(-1)
            heat, nobj = render_heatmap(vb, vl, c, (h, w), rng)
            q = HEATMAP.encode(heat)
            nv = int(rng.choice([2, 3, 4], p=[0.2, 0.3, 0.5])) if k >= 4 else k
            valid = np.arange(k) < nv
            refine = np.zeros((k, 4, *layout.refine_hw), np.float32)
            refine[:nv] = smooth_maps(rng, nv, layout.refine_hw, args.map_noise)
            pb = np.zeros((k, 4), np.float32)
            ps = np.zeros(k, np.float32)
            for s in range(nv):
                bw, bh = int(rng.integers(64, canvas[1] + 1)), int(rng.integers(64, canvas[0] + 1))
                pb[s] = (int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh)), bw, bh)
                ps[s] = min(1.5, canvas[0] / bh, canvas[1] / bw)
            row = dict(heatmap=q, coarse=BOXES.encode(coarse_with_objects(rng, vb, layout.coarse_hw, stride,
                                                                           args.map_noise)),
                       patch_boxes=pb, patch_scales=ps, patch_valid=valid, refine=BOXES.encode(refine),
                       num_valid_patches=nv, image_id=i + 1, variant=v, seed=int(cfg.get("seed", 0)),
                       status=STATUS_OK, fingerprint=encode_fingerprint(view.fingerprint),
                       aug_params=json.dumps(jsonable(view.params), sort_keys=True, separators=(",", ":")))
            gen_s += time.perf_counter() - t0
            n_obj.append(nobj)
            nz_frac.append(float((q > 0).mean()))
            n_valid.append(nv)
            j = index // layout.shard_size
            if buf is None or buf.j != j:
                buf = ShardBuffer(layout, j)
            buf.put(index, row)
            if buf.full:  # the writer's own shard write: one write per array, fsync, done marker
                t0 = time.perf_counter()
                store.write_shard(j, buf.data)
                write_s += time.perf_counter() - t0
                buf = None
    final = store.finalize([dict(file_name=im["file_name"]) for im in images])
    n = layout.num_samples

    shapes = layout.sample_shapes()
    per_array, f32 = {}, {}
    for name in sample_names():
        files = [p for p in (out / name).rglob("*") if p.is_file()]
        data = sum(p.stat().st_size for p in files if p.name != "zarr.json")
        elems = int(np.prod(shapes[name], dtype=np.int64))
        dtype = spec(name).dtype
        stored = 0 if dtype == "str" else np.dtype(dtype).itemsize * elems
        per_array[name] = dict(bytes_per_sample=data / n, raw_stored_dtype_bytes=stored)
        # reference: the float maps and boxes as float32 tensors, everything else as stored (aug_params: 0)
        f32[name] = 4 * elems if name in ("heatmap", "coarse", "refine", "patch_boxes", "patch_scales") else stored
    total = folder_bytes(out)
    chunk_total = sum(v["bytes_per_sample"] for v in per_array.values())
    f32_total = sum(f32.values())
    refine_per_slot = per_array["refine"]["bytes_per_sample"] / max(1e-9, float(np.mean(n_valid)))
    all_valid = chunk_total - per_array["refine"]["bytes_per_sample"] + refine_per_slot * k
    res = dict(
        layout_source=source, samples=n, images=n_images, variants=variants, shard_size=args.shard_size,
        input_hw=[h, w], classes=c, coarse_hw=list(layout.coarse_hw), max_patches=k, patch_canvas=list(canvas),
        refine_hw=list(layout.refine_hw), map_noise=args.map_noise,
        objects_per_view_mean=float(np.mean(n_obj)), objects_per_view_max=int(np.max(n_obj)),
        heatmap_nonzero_fraction_mean=float(np.mean(nz_frac)), valid_patches_mean=float(np.mean(n_valid)),
        bytes_per_sample=per_array,
        chunk_bytes_per_sample_total=chunk_total,
        folder_bytes_per_sample_incl_metadata=total / n,
        manifest_counts_bytes_per_sample=final["counts"]["bytes"] / n,
        float32_bytes_per_sample=f32_total, float32_bytes_per_array=f32,
        compression_ratio_vs_float32=f32_total / chunk_total,
        heatmap_ratio_vs_uint8=per_array["heatmap"]["raw_stored_dtype_bytes"] / per_array["heatmap"]["bytes_per_sample"],
        refine_bytes_per_valid_slot=refine_per_slot,
        projected_bytes_per_sample_all_slots_valid=all_valid,
        goal_bytes_per_sample=GOAL_BYTES_PER_SAMPLE,
        goal_met=bool(total / n <= GOAL_BYTES_PER_SAMPLE),
        goal_met_all_slots_valid=bool(all_valid <= GOAL_BYTES_PER_SAMPLE),
        train_augment_s_per_view=aug_s / n, target_generation_s_per_sample=gen_s / n,
        shard_write_s_per_sample=write_s / n)
    return res, out, dict(cfg=cfg, aug_cfg=aug_cfg, ann=ann, img_root=tmp, classes=classes)


# ============================================================================ 2. read + decode
class CacheReads(Dataset):
    """Item k -> the KDTargets of (image id, variant) keys[k] through the trainer's TargetSource."""

    def __init__(self, source, keys: Sequence[Tuple[int, int]]):
        self.source, self.keys = source, list(keys)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, k: int):
        image_id, v = self.keys[k]
        return self.source.read(image_id, v)[1]


def collate_targets(items):
    from yolc_kd.kd import KDTargets

    return KDTargets.stack(items)


def view_source(cache: Path, ctx: Dict[str, Any]):
    """(the trainer's TargetSource over the per-view cache, how it was opened)."""
    from yolc_kd.cache.reader import CacheReader
    from yolc_kd.data.coco import CocoDetection
    from yolc_kd.train.cache_source import CacheTargetSource, open_cache_source

    coco = CocoDetection(ctx["ann"], ctx["img_root"], classes=ctx["classes"])
    try:
        return open_cache_source(cache, ctx["cfg"], ctx["aug_cfg"], coco), "open_cache_source(...).read"
    except Exception as exc:  # the benchmark's manifest does not match: still the trainer's TargetSource class
        return (CacheTargetSource(CacheReader(cache)),
                f"CacheTargetSource(CacheReader).read (open_cache_source refused: {str(exc)[:200]})")


def bench_read(cache: Path, ctx: Dict[str, Any], args) -> Dict[str, Any]:
    from yolc_kd.cache.codec import HEATMAP

    source, how = view_source(cache, ctx)
    reader = source.reader
    rng = np.random.default_rng(args.seed + 1)
    keys = [(int(reader.image_ids[i // reader.num_variants]), i % reader.num_variants)
            for i in rng.permutation(reader.num_samples)]  # random access, as a shuffled epoch

    # main-process split of one batch's cost, interleaved: zarr read + decode alone, the full TargetSource.read
    # (+ dequantise to float32 tensors), and the collate (KDTargets.stack of the float32 targets)
    from yolc_kd.kd import KDTargets

    t_zarr, t_full, t_stack = [], [], []
    for a in range(0, len(keys), args.read_batch):
        items = []
        for image_id, v in keys[a:a + args.read_batch]:
            idx = reader.index_of(image_id, v)
            t0 = time.perf_counter()
            s = reader.read_sample(idx, ["heatmap", "coarse", "patch_boxes", "patch_scales", "patch_valid", "refine",
                                         "fingerprint", "status", "aug_params"])
            t1 = time.perf_counter()
            items.append(source.read(image_id, v)[1])
            t2 = time.perf_counter()
            t_zarr.append(t1 - t0)
            t_full.append(t2 - t1)
        t0 = time.perf_counter()
        KDTargets.stack(items)
        t_stack.append((time.perf_counter() - t0) / len(items))
        del items
    t0 = time.perf_counter()
    for _ in range(3):
        HEATMAP.decode(s["heatmap"])
    t_deq = (time.perf_counter() - t0) / 3

    loaders = {nw: DataLoader(CacheReads(source, keys), batch_size=args.read_batch, shuffle=False, num_workers=nw,
                              collate_fn=collate_targets, persistent_workers=nw > 0)
               for nw in args.read_workers}
    epochs: Dict[int, List[float]] = {nw: [] for nw in loaders}
    for nw, loader in loaders.items():  # warm-up epoch: starts the workers and opens zarr in each
        for _ in loader:
            pass
    for r in range(args.read_rounds):  # interleaved epochs, order rotated each round
        order = list(loaders)[r % len(loaders):] + list(loaders)[:r % len(loaders)]
        for nw in order:
            t0 = time.perf_counter()
            got = 0
            for batch in loaders[nw]:
                got += batch.heatmap.shape[0]
            epochs[nw].append(got / (time.perf_counter() - t0))
    for loader in loaders.values():
        it = getattr(loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
    sps = {str(nw): float(np.median(v)) for nw, v in epochs.items()}
    base = sps.get("0")
    return dict(path=how, samples_per_epoch=len(keys), batch_size=args.read_batch, rounds=args.read_rounds,
                samples_per_s_median=sps, samples_per_s_epochs={str(k): v for k, v in epochs.items()},
                speedup_vs_0_workers={k: v / base for k, v in sps.items()} if base else None,
                main_process_ms_per_sample=dict(zarr_read_decode=1e3 * float(np.median(t_zarr)),
                                                full_source_read=1e3 * float(np.median(t_full)),
                                                collate_stack=1e3 * float(np.median(t_stack)),
                                                heatmap_dequantise_only=1e3 * t_deq),
                float32_bytes_per_sample_delivered=int(s["heatmap"].size * 4 + s["coarse"].size * 4
                                                       + s["refine"].size * 4))


# ============================================================================ 3. precompute vs teacher-only
def save_spread_teacher(path: Path, model_cfg: Dict[str, Any], seed: int = 0) -> Path:
    """Random weights with the head's outputs spread (as tests/test_precompute.py) so LSM finds crops."""
    from yolc_kd.checkpoint import save_checkpoint
    from yolc_kd.models import build_detector

    torch.manual_seed(seed)
    model = build_detector(model_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("bbox_head"):
                p.add_(torch.randn_like(p) * 0.3)
        model.bbox_head.local_head[-1].bias.fill_(-3.0)
    return save_checkpoint(path, model)


def bench_throughput(tmp: Path, ckpt: Path, args) -> Dict[str, Any]:
    from yolc_kd.config import load_config
    from yolc_kd.data.augment import AugmentConfig, TrainAugment
    from yolc_kd.data.coco import CocoDetection
    from yolc_kd.data.synth import make_synthetic_dataset
    from yolc_kd.precompute.run import PrecomputeOptions, precompute, run_teacher
    from yolc_kd.runtime import numerics
    from yolc_kd.teacher import build_teacher
    from yolc_kd.precompute.views import ViewJobs, image_ids_of, plan_jobs

    data = make_synthetic_dataset(tmp / "synth_tp", args.tp_images, seed=0, size=(384, 256), num_classes=4)
    coco = CocoDetection(data / "annotations.json", data)
    cfg = load_config(TINY_STUDENT, with_defaults=True)
    dcfg, seed = cfg["distill"], int(cfg.get("seed", 0))
    aug_cfg = AugmentConfig.from_pipeline(cfg.get("train_pipeline"), cfg.get("test_pipeline"))
    k, b, s = args.tp_variants, args.tp_batch, args.tp_shard
    n = len(coco) * k
    jobs = plan_jobs(list(range(math.ceil(n / s))), lambda j: (j * s, min((j + 1) * s, n)), b)
    views = ViewJobs(coco, TrainAugment(aug_cfg), seed, k, image_ids_of(coco), jobs)
    items = [views[i] for i in range(len(views))]  # the same augmented views and batches precompute makes
    teacher = build_teacher(dcfg, cfg["model"], str(TINY_STUDENT.parent), str(ckpt))
    patches = 0

    def teacher_only() -> float:
        nonlocal patches
        with numerics("cpu", args.threads):
            t0 = time.perf_counter()
            for item in items:
                t = run_teacher(teacher, item, dcfg, "cpu", False)
            dt = time.perf_counter() - t0
        patches = int(t.patch_valid.sum())
        return dt

    counter = [0]

    def opts_for(workers: int, out: Path) -> PrecomputeOptions:
        return PrecomputeOptions(out=out, ckpt=str(ckpt), variants=k, device="cpu", batch_size=b, shard_size=s,
                                 workers=workers, threads=args.threads, progress=False, config_dir=str(TINY_STUDENT.parent))

    def run_pre(workers: int) -> Tuple[float, float, Dict[str, Any]]:
        counter[0] += 1
        out = tmp / f"tp_cache_{counter[0]}"
        t0 = time.perf_counter()
        summary = precompute(cfg, coco, opts_for(workers, out))
        full = time.perf_counter() - t0
        t0 = time.perf_counter()  # the same command on the finished cache: every fixed cost, no views
        precompute(cfg, coco, opts_for(workers, out))
        fixed = time.perf_counter() - t0
        shutil.rmtree(out, ignore_errors=True)
        return full, fixed, summary

    teacher_only()  # warm-up (allocator, first-call costs), as precompute's own layout probe does
    t_teacher: List[float] = []
    t_pre: Dict[int, List[float]] = {w: [] for w in args.tp_workers}
    t_fixed: Dict[int, List[float]] = {w: [] for w in args.tp_workers}
    written = None
    for r in range(args.tp_rounds):
        steps = [("teacher", None)] + [("pre", w) for w in args.tp_workers]
        steps = steps[r % len(steps):] + steps[:r % len(steps)]
        for kind, w in steps:
            if kind == "teacher":
                t_teacher.append(teacher_only())
            else:
                full, fixed, summary = run_pre(w)
                t_pre[w].append(full)
                t_fixed[w].append(fixed)
                written = summary["manifest"]["counts"]
    tt = float(np.median(t_teacher))
    per_workers = {}
    for w in args.tp_workers:
        tp, tf = float(np.median(t_pre[w])), float(np.median(t_fixed[w]))
        # the headline: per round (teacher-only and precompute measured back to back), then the median
        paired = [a / b for a, b in zip(t_teacher, t_pre[w])]
        paired_excl = [a / max(1e-9, b - f) for a, b, f in zip(t_teacher, t_pre[w], t_fixed[w])]
        ratio = float(np.median(paired))
        per_workers[str(w)] = dict(
            precompute_s=t_pre[w], rerun_fixed_cost_s=t_fixed[w], precompute_s_median=tp,
            fixed_cost_s_median=tf, views_per_s=n / tp,
            throughput_ratio_vs_teacher_per_round=paired,
            throughput_ratio_vs_teacher=ratio,
            throughput_ratio_vs_teacher_excl_fixed=float(np.median(paired_excl)),
            throughput_ratio_of_medians=tt / tp,
            goal_met=bool(ratio >= GOAL_THROUGHPUT_RATIO))
    return dict(images=len(coco), variants=k, views=n, batch_size=b, shard_size=s, input_wh=list(aug_cfg.input_size),
                threads=args.threads, rounds=args.tp_rounds, teacher="configs/tiny_teacher_synth.py (random, spread head)",
                valid_patches_last_batch=patches, cache_counts=written,
                teacher_only_s=t_teacher, teacher_only_s_median=tt, teacher_only_views_per_s=n / tt,
                precompute_by_workers=per_workers, goal_ratio=GOAL_THROUGHPUT_RATIO)


# ============================================================================ 5-6. image-level cache
# YOLC's VisDrone schedule: 240 passes over each of the 6,471 training images, each pass a fresh view
YOLC_PASSES_PER_IMAGE = 240
VISDRONE_TRAIN_IMAGES = 6471
GOAL_IMAGE_BYTES_RATIO = 0.10            # image-level bytes per image <= 10 % of 240 per-view samples
GOAL_MAX_SCALES = 3                      # teacher full-image forwards per image: S <= 3 and <= 240 / 50
GOAL_SAMPLES_PER_S_PER_WORKER = 100.0


def plain_images(layouts: Sequence[Dict[str, Any]]) -> Dict[int, np.ndarray]:
    """Image id (1..n) -> a plain uint8 (h, w, 3) array of the layout's size: what the worker gets as `image`
    (the rows' fingerprints are taken from these same arrays)."""
    return {i + 1: np.full((lay["height"], lay["width"], 3), 96, np.uint8) for i, lay in enumerate(layouts)}


def bench_image_size(tmp: Path, args, per_view: Dict[str, Any] = None) -> Tuple[Dict[str, Any], Path, Dict[str, Any]]:
    """The image-level cache (rows = image x scale) of the first --image-images real layouts, written with the
    project's writer at the real config's auto scales and auto crop slots; teacher-like rows as
    teacher.image_targets would give them (heatmap on the scaled image, LSM over it, kd-mode crop plan)."""
    from yolc_kd import __version__, crops
    from yolc_kd.cache.manifest import jsonable
    from yolc_kd.cache.arrays import STATUS_OK, quantization, sample_names
    from yolc_kd.cache.codec import BOXES, HEATMAP
    from yolc_kd.cache.schema import Layout, encode_fingerprint
    from yolc_kd.cache.writer import CacheStore, ShardBuffer
    from yolc_kd.data.augment import fingerprint_image
    from yolc_kd.models.tiling import batch_tiles
    from yolc_kd.precompute.image_level import (auto_regions, auto_scales, canvas_hw, padded, scaled_hw,
                                                view_scale_range)
    from yolc_kd.stride import BOX_STRIDE
    from yolc_kd.teacher import expected_target_identity

    rng = np.random.default_rng(args.seed + 5)
    cfg, aug_cfg, classes = real_setup()
    dcfg, seed = cfg["distill"], int(cfg.get("seed", 0))
    w, h = aug_cfg.input_size
    c, k = len(classes), dcfg.max_patches_per_img
    source, layouts = read_layouts(Path(args.layout_json), rng)
    n_images = args.image_images
    lays = [layouts[i % len(layouts)] for i in range(n_images)]
    hws = [(int(lay["height"]), int(lay["width"])) for lay in lays]
    lo, hi = view_scale_range(aug_cfg, hws)
    scales = auto_scales(lo, hi)                       # precompute --scales auto --mirror off (3 plain scales)
    canvas = canvas_hw(hws, scales)
    try:  # precompute --regions auto, as precompute/run.py _image_layout calls it
        from yolc_kd.precompute.image_level import largest_scaled
        regions = auto_regions(k, largest_scaled(hws, scales), (h, w))
    except ImportError:  # older image_level: auto_regions of the canvas
        regions = auto_regions(k, canvas, (h, w))
    view_canvas = crops.patch_canvas((h, w))
    stride = BOX_STRIDE
    layout = Layout(num_images=n_images, variants=len(scales), shard_size=len(scales), num_classes=c,
                    input_hw=canvas, coarse_hw=(canvas[0] // stride, canvas[1] // stride), max_patches=regions,
                    refine_hw=(view_canvas[0] // stride, view_canvas[1] // stride), kind="image", scales=scales)
    images = plain_images(lays)
    ann = tmp / "image_layout_coco.json"
    info = [dict(id=i + 1, file_name=f"images/{i:06d}.jpg", width=hw[1], height=hw[0]) for i, hw in enumerate(hws)]
    ann.write_text(json.dumps(dict(images=info, annotations=[],
                                   categories=[dict(id=j + 1, name=n) for j, n in enumerate(classes)])))
    manifest = expected_target_identity(cfg, aug_cfg, classes)
    from yolc_kd.crop_settings import LSMSettings

    test_cfg = dict(manifest["teacher"]["model"].get("test_cfg") or {})
    lsm_cfg = LSMSettings.from_test_cfg(test_cfg)
    tile_cfg = crops.tile_config(test_cfg)
    enlarge, upscale = float(manifest["crop"]["enlarge"]), float(manifest["crop"]["upscale"])
    manifest["teacher"].update(ckpt_sha256="0" * 64, ckpt_path="(synthetic targets, no teacher)")
    manifest.update(jsonable(dict(   # as precompute/run.py build_manifest for --kind image
        package_version=__version__, kind="image", variants=layout.variants, shard_size=layout.shard_size,
        scales=list(scales), amp=False,
        annotations=dict(sha256="0" * 64, path=str(ann), image_root=str(tmp), num_images=n_images),
        layout=layout.to_dict(), index="image_index * len(scales) + scale index",
        quantization=quantization(),
        run=dict(device="synthetic", batch_size=1, world_size=1, cpu_threads=1), complete=False)))
    out = tmp / "image_cache"
    shutil.rmtree(out, ignore_errors=True)
    store = CacheStore.prepare(out, manifest, [im["id"] for im in info])

    per_row, gen_s, write_s = [], 0.0, 0.0
    for i, lay in enumerate(lays):
        fp = encode_fingerprint(fingerprint_image(images[i + 1]))
        buf = ShardBuffer(layout, i)  # shard i = the rows of image i (shard_size = len(scales), as precompute)
        t0 = time.perf_counter()
        for v, s in enumerate(scales):
            hs, ws = scaled_hw(hws[i], s)
            boxes = np.asarray(lay["boxes"], np.float32).reshape(-1, 4) * np.float32(s)
            heat, nobj = render_heatmap(boxes, np.asarray(lay["labels"]), c, (hs, ws), rng)
            # teacher.image_targets: LSM over the whole scaled image at a view's cell size, the kd-mode plan
            coords = crops.image_lsm_regions(torch.from_numpy(heat)[None], (hs, ws), (h, w), lsm_cfg)
            plan = crops.plan_kd_patches([coords], (hs, ws), regions, dcfg.min_patch_size, enlarge,
                                         upscale, view_canvas)
            valid = plan.valid[0].numpy().astype(bool)
            nv = int(valid.sum())
            refine = np.zeros((regions, 4, *layout.refine_hw), np.float32)
            if nv:
                refine[valid] = smooth_maps(rng, nv, layout.refine_hw, args.map_noise)
            q = np.zeros((c, *canvas), np.uint8)
            q[:, :hs, :ws] = HEATMAP.encode(heat)
            ch, cw = padded(hs) // stride, padded(ws) // stride  # the teacher's coarse maps of its padded input
            coarse = np.zeros((4, *layout.coarse_hw), np.float32)
            coarse[:, :ch, :cw] = coarse_with_objects(rng, boxes, (ch, cw), stride, args.map_noise)
            params = dict(kind="image", ori_hw=list(hws[i]), scale=s, scaled_hw=[hs, ws])
            buf.put(i * len(scales) + v, dict(
                heatmap=q, coarse=BOXES.encode(coarse), patch_boxes=plan.boxes[0].numpy().astype(np.float32),
                patch_scales=plan.scales[0].numpy().astype(np.float32), patch_valid=valid, refine=BOXES.encode(refine),
                num_valid_patches=nv, image_id=i + 1, variant=v, seed=seed, status=STATUS_OK, fingerprint=fp,
                aug_params=json.dumps(params, sort_keys=True, separators=(",", ":"))))
            tiles = batch_tiles(1, padded(hs), padded(ws), int(tile_cfg["max_pixels"]), int(tile_cfg["tile_overlap"]))
            per_row.append(dict(image=i + 1, hw=list(hws[i]), scale=s, scaled_hw=[hs, ws], objects=nobj,
                                lsm_regions=int(len(coords)), crops=nv, teacher_input_px=padded(hs) * padded(ws),
                                teacher_tiles=1 if tiles is None else len(tiles),
                                heatmap_nonzero_fraction=float((q[:, :hs, :ws] > 0).mean())))
            del heat, q
        gen_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        store.write_shard(i, buf.data)
        write_s += time.perf_counter() - t0
        del buf
    final = store.finalize([dict(file_name=im["file_name"]) for im in info])

    # bytes: shard i of every array is image i's rows, so each image's bytes are its shard files
    per_image = np.zeros((n_images, len(sample_names())))
    for a, name in enumerate(sample_names()):
        arr = store.arrays[name]
        for i in range(n_images):
            f = out / name / arr.metadata.encode_chunk_key((i,) + (0,) * (arr.ndim - 1))
            per_image[i, a] = f.stat().st_size if f.is_file() else 0
    arrays = {name: float(per_image[:, a].mean()) for a, name in enumerate(sample_names())}
    chunk_per_image = per_image.sum(axis=1)
    folder = folder_bytes(out)
    meta_per_image = (folder - chunk_per_image.sum()) / n_images
    bytes_per_image = folder / n_images
    by_size: Dict[str, List[float]] = {}
    for i, hw in enumerate(hws):
        by_size.setdefault(f"{hw[1]}x{hw[0]}", []).append(float(chunk_per_image[i] + meta_per_image))
    # the same means weighted by the layout file's (all its images') size mix
    mix: Dict[str, int] = {}
    for lay in layouts:
        mix[f"{lay['width']}x{lay['height']}"] = mix.get(f"{lay['width']}x{lay['height']}", 0) + 1
    covered = {key: n for key, n in mix.items() if key in by_size}
    weighted = (sum(n * float(np.mean(by_size[key])) for key, n in covered.items()) / sum(covered.values())
                if covered else bytes_per_image)
    crops_row = [r["crops"] for r in per_row]
    res = dict(
        layout_source=source, images=n_images, scales=list(scales), view_scale_range=[lo, hi], rows=layout.num_samples,
        canvas_hw=list(canvas), coarse_hw=list(layout.coarse_hw), crop_slots_R=regions, refine_hw=list(layout.refine_hw),
        image_sizes={key: len(v) for key, v in by_size.items()}, map_noise=args.map_noise,
        lsm_cfg=jsonable(lsm_cfg.to_dict()), crop=dict(enlarge=enlarge, upscale=upscale, min_patch_size=dcfg.min_patch_size),
        crops_per_row_mean=float(np.mean(crops_row)), crops_per_row_min=int(np.min(crops_row)),
        crops_per_row_max=int(np.max(crops_row)),
        crops_per_row_by_scale={f"{s:g}": float(np.mean([r["crops"] for r in per_row if r["scale"] == s]))
                                for s in scales},
        rows_at_R=int(sum(n >= regions for n in crops_row)),
        objects_per_image_mean=float(np.mean([r["objects"] for r in per_row])),
        heatmap_nonzero_fraction_mean=float(np.mean([r["heatmap_nonzero_fraction"] for r in per_row])),
        bytes_per_image=bytes_per_image, chunk_bytes_per_image=float(chunk_per_image.mean()),
        metadata_bytes_per_image=meta_per_image, bytes_per_image_by_array=arrays,
        bytes_per_row=bytes_per_image / len(scales),
        refine_bytes_per_crop=arrays["refine"] / max(1e-9, float(np.sum(crops_row)) / n_images),
        bytes_per_image_by_size={key: float(np.mean(v)) for key, v in by_size.items()},
        bytes_per_image_size_weighted=weighted, size_mix=mix,
        manifest_counts_bytes_per_image=final["counts"]["bytes"] / n_images,
        teacher_input_px_per_image=float(np.mean([sum(r["teacher_input_px"] for r in per_row if r["image"] == i + 1)
                                                  for i in range(n_images)])),
        teacher_forwards_incl_tiles_per_image=float(np.mean([sum(r["teacher_tiles"] for r in per_row
                                                                 if r["image"] == i + 1) for i in range(n_images)])),
        tile_cfg=jsonable(tile_cfg), rows_detail=per_row,
        target_generation_s_per_image=gen_s / n_images, shard_write_s_per_image=write_s / n_images)
    if per_view:
        view_b = float(per_view["folder_bytes_per_sample_incl_metadata"])
        per_view_image = YOLC_PASSES_PER_IMAGE * view_b
        ratio = bytes_per_image / per_view_image
        s_n = len(scales)
        res["vs_per_view"] = dict(
            per_view_bytes_per_sample=view_b, passes_per_image=YOLC_PASSES_PER_IMAGE,
            per_view_bytes_per_image=per_view_image, image_level_bytes_per_image=bytes_per_image,
            ratio=ratio, ratio_size_weighted=weighted / per_view_image, goal_ratio=GOAL_IMAGE_BYTES_RATIO,
            goal_met=bool(ratio <= GOAL_IMAGE_BYTES_RATIO),
            teacher_full_image_forwards_per_image=dict(per_view=YOLC_PASSES_PER_IMAGE, image_level=s_n),
            teacher_forwards_incl_tiles_per_image=res["teacher_forwards_incl_tiles_per_image"],
            teacher_input_px_per_image=dict(per_view=YOLC_PASSES_PER_IMAGE * w * h,
                                            image_level=res["teacher_input_px_per_image"]),
            goal_forwards_met=bool(s_n <= GOAL_MAX_SCALES and s_n <= YOLC_PASSES_PER_IMAGE / 50),
            dataset_images=VISDRONE_TRAIN_IMAGES,
            dataset_GB=dict(per_view=per_view_image * VISDRONE_TRAIN_IMAGES / 1e9,
                            image_level=bytes_per_image * VISDRONE_TRAIN_IMAGES / 1e9,
                            image_level_size_weighted=weighted * VISDRONE_TRAIN_IMAGES / 1e9))
    return res, out, dict(cfg=cfg, aug_cfg=aug_cfg, ann=ann, img_root=tmp, classes=classes, images=images,
                          layouts=lays)


class ImageViewReads(Dataset):
    """Item j -> ImageCacheSource.sample_targets of key j (image id, pass) on its TrainAugment view, as
    train/data.py TrainSamples calls it in a worker: (targets, (heatmap window, move)). The views are drawn
    beforehand (the augmentation is the trainer's cost with or without a cache) and kept without their pixels."""

    def __init__(self, source, images: Mapping[int, np.ndarray], keys: Sequence[Tuple[int, int]], samples):
        self.source, self.images, self.keys, self.samples = source, images, list(keys), list(samples)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, j: int):
        image_id, p = self.keys[j]
        got = self.source.sample_targets(image_id, p, self.images[image_id], self.samples[j])
        return got.targets, (got.heatmap_window, got.heatmap_move)


def collate_image_views(items):
    """collate_train's KD part: the stored-dtype targets stacked, the heatmap windows as a list."""
    from yolc_kd.kd import KDTargets

    return KDTargets.stack([t for t, _ in items]), [hm for _, hm in items]


def profile_top(prof, n: int = 10) -> Dict[str, List[Dict[str, Any]]]:
    import pstats

    st = pstats.Stats(prof)
    rows = []
    for (file, line, name), (cc, nc, tt, ct, _) in st.stats.items():
        short = "/".join(Path(file).parts[-3:]) if file not in ("~", "") else "builtin"
        rows.append(dict(function=f"{short}:{line}({name})", ncalls=nc, tottime_s=tt, cumtime_s=ct))
    return dict(by_tottime=sorted(rows, key=lambda r: -r["tottime_s"])[:n],
                by_cumtime=sorted(rows, key=lambda r: -r["cumtime_s"])[:2 * n])


class StackSampler:
    """Where the time of every thread goes while it runs (cProfile sees only its own thread, and zarr decodes on
    its event loop's threads): every `interval` s, the Python stack of each busy thread (one not parked in a
    lock / queue / selector wait). Self = the innermost Python function (a C call that releases the GIL, such as
    blosc or blake2b, counts for the Python function that made it), inclusive = anywhere on the stack."""
    IDLE = {("threading.py", "wait"), ("selectors.py", "select"), ("thread.py", "_worker"), ("queue.py", "get")}
    PACKAGES = ("yolc_kd", "zarr", "numcodecs")  # the inclusive list: these packages' functions only

    def __init__(self, interval: float = 0.002):
        import threading

        self.interval, self.ticks, self.busy = interval, 0, 0
        self.self_counts: Dict[str, int] = collections.Counter()
        self.incl_counts: Dict[str, int] = collections.Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _label(code) -> str:
        return f"{'/'.join(Path(code.co_filename).parts[-3:])}:{code.co_firstlineno}({code.co_name})"

    def _run(self) -> None:
        import sys
        import threading

        me = threading.get_ident()
        while not self._stop.wait(self.interval):
            self.ticks += 1
            for tid, frame in sys._current_frames().items():
                if tid == me:
                    continue
                code = frame.f_code
                if (Path(code.co_filename).name, code.co_name) in self.IDLE:
                    continue
                self.busy += 1
                self.self_counts[self._label(code)] += 1
                seen = set()
                while frame is not None:
                    label = self._label(frame.f_code)
                    if label not in seen and any(k in frame.f_code.co_filename for k in self.PACKAGES):
                        seen.add(label)
                        self.incl_counts[label] += 1
                    frame = frame.f_back

    def __enter__(self) -> "StackSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def top(self, n: int = 10) -> Dict[str, Any]:
        def rows(counts):
            return [dict(function=f, busy_share=c / max(1, self.busy), ms_per_tick_share=c / max(1, self.ticks))
                    for f, c in counts.most_common(n)]
        return dict(interval_s=self.interval, ticks=self.ticks, busy_thread_samples=self.busy,
                    by_self=rows(self.self_counts), by_inclusive=rows(self.incl_counts))


def bench_image_read(cache: Path, ictx: Dict[str, Any], args, view_cache: Path = None,
                     vctx: Dict[str, Any] = None) -> Dict[str, Any]:
    """samples/s of ImageCacheSource.sample_targets in a DataLoader (0/1/2 workers), interleaved round by round
    with the per-view cache's reads (part 2's loader) when that cache is there; the main-process heatmap move
    (move_heatmaps, and the source's whole targets() with dequantisation) per sample on this CPU; a cProfile of
    the worker's call in the main process."""
    import cProfile
    from yolc_kd.cache.image_view import move_heatmaps
    from yolc_kd.data.augment import TrainAugment
    from yolc_kd.data.coco import CocoDetection
    from yolc_kd.train.cache_source import open_cache_source

    cfg, aug_cfg = ictx["cfg"], ictx["aug_cfg"]
    coco = CocoDetection(ictx["ann"], ictx["img_root"], classes=ictx["classes"])
    source = open_cache_source(cache, cfg, aug_cfg, coco)  # the trainer's own opening (kind image)
    images, lays, seed = ictx["images"], ictx["layouts"], int(cfg.get("seed", 0))
    w, h = aug_cfg.input_size
    rng = np.random.default_rng(args.seed + 6)
    n = args.image_read_samples
    keys = [(int(rng.integers(1, len(images) + 1)), int(rng.integers(0, YOLC_PASSES_PER_IMAGE))) for _ in range(n)]
    augment = TrainAugment(aug_cfg)
    samples, t_aug = [], []
    for image_id, p in keys:  # fresh views, key (seed, id, pass) as the trainer draws them
        lay = lays[image_id - 1]
        t0 = time.perf_counter()
        sample = augment(images[image_id], lay["boxes"], lay["labels"], (seed, image_id, p))
        t_aug.append(time.perf_counter() - t0)
        samples.append(replace(sample, img=None, img_uint8=None))
    used = collections.Counter(image_view_scale(source, s) for s in samples)

    # main process: the worker's call alone (warm), then a cProfile of it
    ds = ImageViewReads(source, images, keys, samples)
    for j in range(min(4, n)):
        ds[j]
    t_call = []
    for j in range(n):
        t0 = time.perf_counter()
        ds[j]
        t_call.append(time.perf_counter() - t0)
    load_call = list(os.getloadavg())
    split = image_read_split(source, ds, n)
    prof = cProfile.Profile()
    m = min(n, args.image_profile_samples)
    t0 = time.perf_counter()
    prof.enable()
    for j in range(m):
        ds[j]
    prof.disable()
    t_prof = (time.perf_counter() - t0) / m
    profile = profile_top(prof)
    t0 = time.perf_counter()
    with StackSampler() as sampler:  # every thread (zarr's decode threads too)
        for j in range(m):
            ds[j]
    t_sampled = (time.perf_counter() - t0) / m
    sampled = sampler.top(15)

    loaders: Dict[Tuple[str, int], DataLoader] = {}
    for nw in args.read_workers:
        loaders[("image", nw)] = DataLoader(ds, batch_size=args.read_batch, shuffle=False, num_workers=nw,
                                            collate_fn=collate_image_views, persistent_workers=nw > 0)
    view_keys = None
    if view_cache is not None:
        vsource, _ = view_source(view_cache, vctx)
        r = vsource.reader
        view_keys = [(int(r.image_ids[i // r.num_variants]), i % r.num_variants)
                     for i in np.random.default_rng(args.seed + 1).permutation(r.num_samples)]
        for nw in args.read_workers:
            loaders[("view", nw)] = DataLoader(CacheReads(vsource, view_keys), batch_size=args.read_batch,
                                               shuffle=False, num_workers=nw, collate_fn=collate_targets,
                                               persistent_workers=nw > 0)
    for loader in loaders.values():  # warm-up epoch: starts the workers and opens zarr in each
        for _ in loader:
            pass
    epochs: Dict[Tuple[str, int], List[Dict[str, Any]]] = {key: [] for key in loaders}
    batches = []
    for r in range(args.read_rounds):  # interleaved epochs, order rotated each round
        order = list(loaders)[r % len(loaders):] + list(loaders)[:r % len(loaders)]
        for key in order:
            got = 0
            t0 = time.perf_counter()
            for batch in loaders[key]:
                got += len(batch[1]) if key[0] == "image" else batch.heatmap.shape[0]
                if key == ("image", 0) and r == 0:
                    batches.append(batch)
            dt = time.perf_counter() - t0
            epochs[key].append(dict(samples_per_s=got / dt, loadavg=list(os.getloadavg())))
    for loader in loaders.values():
        it = getattr(loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    # the main process's share: the heatmap windows moved into the views (on the training device; here the CPU)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t_move, t_targets = [], []
    cpu = torch.device("cpu")
    for kd, heat in batches:
        t0 = time.perf_counter()
        move_heatmaps(heat, (h, w), cpu)
        t_move.append((time.perf_counter() - t0) / len(heat))
        t0 = time.perf_counter()
        source.targets(dict(kd_targets=kd, kd_heatmaps=heat, img=torch.empty(len(heat), 3, h, w)))
        t_targets.append((time.perf_counter() - t0) / len(heat))
    load_move = list(os.getloadavg())
    torch.set_num_threads(threads)

    def summary(kind: str) -> Dict[str, Any]:
        out = {}
        for (k2, nw), eps in epochs.items():
            if k2 != kind:
                continue
            sps = float(np.median([e["samples_per_s"] for e in eps]))
            out[str(nw)] = dict(samples_per_s=sps, samples_per_s_per_worker=sps / max(1, nw),
                                epochs=[e["samples_per_s"] for e in eps], loadavg=[e["loadavg"] for e in eps])
        return out

    image_sps = summary("image")
    view_sps = summary("view") if view_keys else None
    call_ms = 1e3 * float(np.median(t_call))
    move_ms = 1e3 * float(np.median(t_move)) if t_move else None
    per_worker_0 = image_sps.get("0", {}).get("samples_per_s")
    res = dict(
        source=type(source).__name__, samples_per_epoch=n, batch_size=args.read_batch, rounds=args.read_rounds,
        passes_drawn_from=YOLC_PASSES_PER_IMAGE, view_scales_used={f"{s:g}": c for s, c in sorted(used.items())},
        image_samples_per_s=image_sps, per_view_samples_per_s=view_sps,
        per_view_samples_per_epoch=len(view_keys) if view_keys else None,
        main_process=dict(sample_targets_ms_median=call_ms, sample_targets_ms_mean=1e3 * float(np.mean(t_call)),
                          sample_targets_per_s=1e3 / call_ms, loadavg=load_call,
                          train_augment_ms_per_view=1e3 * float(np.median(t_aug)),
                          move_heatmaps_ms_per_sample_cpu_1thread=move_ms,
                          source_targets_ms_per_sample_cpu_1thread=1e3 * float(np.median(t_targets)) if t_targets
                          else None, move_loadavg=load_move,
                          read_plus_move_per_s_if_moved_on_this_cpu=1e3 / (call_ms + move_ms) if move_ms else None),
        main_process_split=split,
        profile=dict(samples=m, ms_per_sample_under_profile=1e3 * t_prof, **profile),
        sampled_all_threads=dict(samples=m, ms_per_sample_while_sampled=1e3 * t_sampled, **sampled),
        goal_samples_per_s_per_worker=GOAL_SAMPLES_PER_S_PER_WORKER,
        goal_met_worker_read=bool(per_worker_0 and per_worker_0 >= GOAL_SAMPLES_PER_S_PER_WORKER),
        where_the_heatmap_moves="the training process, on the training device (ImageCacheSource.targets -> "
                                "cache.image_view.move_heatmaps), not in the loader worker")
    if view_sps:
        res["image_vs_per_view_rate"] = {nw: image_sps[nw]["samples_per_s"] / view_sps[nw]["samples_per_s"]
                                         for nw in image_sps if nw in view_sps}
    return res


def image_read_split(source, ds: "ImageViewReads", n: int) -> Dict[str, Any]:
    """The worker's call (train/image_source.py sample_targets) taken apart step by step in the main process,
    each step timed alone on the same views: the heatmap window, the coarse window and the chosen crops' refine maps
    (read_requests, as the worker reads them), the small arrays (read_parts, uncached: sample_targets keeps a
    shard's), the image fingerprint (sample_targets hashes each image once per worker), the choice of crops and
    the move of coarse maps + crops (move_row). The sum is above the call's time."""
    from yolc_kd.cache import image_view
    from yolc_kd.data.augment import fingerprint_image
    from yolc_kd.stride import BOX_STRIDE
    small = ("status", "aug_params", "fingerprint", "variant", "patch_boxes", "patch_scales", "patch_valid")

    reader, layout, st = source.reader, source.layout, BOX_STRIDE
    steps: Dict[str, List[float]] = collections.defaultdict(list)
    window_px, decoded = [], []
    for j in range(n):
        image_id, _ = ds.keys[j]
        image, view = ds.images[image_id], ds.samples[j].view
        v = layout.row_variant(image_view.nearest_scale(view, layout.scales), image_view.view_mirrored(view))
        index = reader.index_of(image_id, v)
        image_hw = tuple(image.shape[:2])
        row_hw = image_view.scaled_hw(image_hw, layout.row_scale(v))
        move = image_view.row_to_view(image_hw, layout.row_scale(v), layout.row_mirrored(v), view)
        x0, y0, x1, y1 = window = image_view.source_window(move, row_hw)
        parts = dict(heatmap=(slice(None), slice(y0, y1), slice(x0, x1)),
                     coarse=(slice(None), slice(y0 // st, -(-y1 // st)), slice(x0 // st, -(-x1 // st))))
        row = {}
        for name, sel in [("heatmap", parts["heatmap"]), ("coarse", parts["coarse"]),
                          ("small", {k: () for k in small})]:
            t0 = time.perf_counter()
            if name == "small":
                row.update(reader.read_parts(index, sel))
            else:  # the worker's read: read_requests (map windows straight from the shard files)
                row[name] = reader.read_requests([(name, (index, *sel))])[0]
            steps[f"read_{name}"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        fingerprint_image(image)
        steps["fingerprint_image"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        chosen = image_view.crops_in_view(row, move, source.min_patch_size, source.max_patches)
        steps["crops_in_view"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        refine = dict(zip([k for k, _ in chosen], reader.read_requests([("refine", (index, k)) for k, _ in chosen])))
        steps["read_refine_of_chosen_crops"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        image_view.move_row(row, refine, layout, image_hw, view, window, chosen, source.max_patches)
        steps["move_row_coarse_and_crops"].append(time.perf_counter() - t0)
        window_px.append((y1 - y0) * (x1 - x0))
        decoded.append(row["heatmap"].nbytes + row["coarse"].nbytes + sum(r.nbytes for r in refine.values()))
        steps["crops_moved"].append(len(chosen))
    out = {f"{k}_ms": 1e3 * float(np.median(v)) for k, v in steps.items() if k != "crops_moved"}
    out.update(crops_moved_mean=float(np.mean(steps["crops_moved"])),
               heatmap_window_px_mean=float(np.mean(window_px)), decoded_bytes_per_sample_mean=float(np.mean(decoded)),
               sum_of_steps_ms=sum(v for k, v in out.items() if k.endswith("_ms")), loadavg=list(os.getloadavg()))
    return out


def image_view_scale(source, sample) -> float:
    from yolc_kd.cache.image_view import nearest_scale

    return float(source.layout.scales[nearest_scale(sample.view, source.layout.scales)])


# ============================================================================ main
def size_arg(text: str) -> Tuple[int, int]:
    w, h = text.lower().split("x")
    return int(w), int(h)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir, removed at the end)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    p.add_argument("--image-level", action="store_true",
                   help="only the image-level parts and the per-view parts they compare with: "
                        "--parts size read image_size image_read")
    g = p.add_argument_group("1-2: real layout cache")
    g.add_argument("--samples", type=int, default=32, help="samples written (images x variants)")
    g.add_argument("--variants", type=int, default=4)
    g.add_argument("--shard-size", type=int, default=16)
    g.add_argument("--layout-json", default=str(VISDRONE_LAYOUTS), help="COCO file with real box layouts")
    g.add_argument("--map-noise", type=float, default=0.01,
                   help="relative high-frequency noise of the synthetic raw box maps (0 = perfectly smooth)")
    g.add_argument("--read-workers", type=int, nargs="+", default=[0, 1, 2])
    g.add_argument("--read-batch", type=int, default=4, help="DataLoader batch (w18 config: samples_per_gpu=4)")
    g.add_argument("--read-rounds", type=int, default=3)
    g = p.add_argument_group("5-6: image-level cache (rows = image x scale) of the same real layouts")
    g.add_argument("--image-images", type=int, default=16,
                   help="images written (the first 16 of the VisDrone file hold each of its 6 sizes)")
    g.add_argument("--image-read-samples", type=int, default=96, help="views read per loader epoch")
    g.add_argument("--image-profile-samples", type=int, default=48, help="worker calls under cProfile")
    g = p.add_argument_group("3: precompute vs teacher-only (tiny teacher, 384x256)")
    g.add_argument("--tp-images", type=int, default=24,
                   help="images (x tp-variants views); startup (worker spawn, first batch) weighs less with more")
    g.add_argument("--tp-variants", type=int, default=4)
    g.add_argument("--tp-batch", type=int, default=8, help="tiny config: samples_per_gpu=8")
    g.add_argument("--tp-shard", type=int, default=16)
    g.add_argument("--tp-workers", type=int, nargs="+", default=[1, 0],
                   help="precompute --workers values (tiny config default 1)")
    g.add_argument("--tp-rounds", type=int, default=3)
    g.add_argument("--threads", type=int, default=1, help="teacher CPU threads (precompute --threads, default 1)")
    g = p.add_argument_group("4: peak RSS (fresh `python -m yolc_kd precompute` per count)")
    g.add_argument("--rss-images", type=int, nargs="+", default=[50, 200])
    g.add_argument("--rss-size", type=size_arg, default=(128, 96), help="WxH of images and network input")
    g.add_argument("--rss-variants", type=int, default=4)
    g.add_argument("--rss-batch", type=int, default=8)
    g.add_argument("--rss-shard", type=int, default=16)
    g.add_argument("--rss-workers", type=int, default=1)
    args = p.parse_args()
    if args.image_level:
        args.parts = ["size", "read", "image_size", "image_read"]

    t_start = time.perf_counter()
    results: Dict[str, Any] = dict(benchmark="bench_cache", machine=machine(), args={
        k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()})
    tmp = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_cache_"))
    tmp.mkdir(parents=True, exist_ok=True)
    timings = {}
    try:
        cache, ctx = None, None
        def timed(part: str, what: str, fn):
            log(f"{part}: {what}")
            t0 = time.perf_counter()
            out = fn()
            timings[part] = time.perf_counter() - t0
            return out

        if "size" in args.parts or "read" in args.parts:
            results["size"], cache, ctx = timed("size", "rendering and writing the real-layout cache",
                                                lambda: bench_size(tmp, args))
        if "read" in args.parts:
            results["read"] = timed("read", "DataLoader throughput over the trainer's cache source",
                                    lambda: bench_read(cache, ctx, args))
        if "image_size" in args.parts or "image_read" in args.parts:
            results["image_size"], icache, ictx = timed(
                "image_size", "rendering and writing the image-level cache of the real layouts",
                lambda: bench_image_size(tmp, args, results.get("size")))
        if "image_read" in args.parts:
            results["image_read"] = timed(
                "image_read", "DataLoader throughput of ImageCacheSource.sample_targets (interleaved with per-view)",
                lambda: bench_image_read(icache, ictx, args, cache, ctx))
        ckpt = None
        if "throughput" in args.parts or "rss" in args.parts:
            from yolc_kd.config import load_config

            ckpt = save_spread_teacher(tmp / "tiny_teacher_random.pth", load_config(TINY_TEACHER)["model"])
        if "throughput" in args.parts:
            results["throughput"] = timed("throughput", "precompute vs teacher.kd_targets alone",
                                          lambda: bench_throughput(tmp, ckpt, args))
        if "rss" in args.parts:
            results["rss"] = timed("rss", "precompute subprocesses", lambda: bench_rss(tmp, ckpt, args))
    finally:
        if not args.workdir:
            shutil.rmtree(tmp, ignore_errors=True)
    results["machine"]["loadavg_end"] = list(os.getloadavg())
    results["wall_s"] = dict(timings, total=time.perf_counter() - t_start)
    results["goals"] = {
        "bytes_per_sample_le_300KB": results.get("size", {}).get("goal_met"),
        "precompute_ge_0.9x_teacher": {w: v["goal_met"] for w, v in
                                       results.get("throughput", {}).get("precompute_by_workers", {}).items()} or None,
        "rss_within_10pct": results.get("rss", {}).get("goal_met"),
        "image_bytes_le_10pct_of_240_views": results.get("image_size", {}).get("vs_per_view", {}).get("goal_met"),
        "image_scales_le_3": results.get("image_size", {}).get("vs_per_view", {}).get("goal_forwards_met"),
        "image_read_ge_100_per_s_per_worker": results.get("image_read", {}).get("goal_met_worker_read")}
    emit(results, args.out)


if __name__ == "__main__":
    main()
