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

    python benchmarks/bench_cache.py [--out results.json] [--samples 32] [--rss-images 50 200] ...
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

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
    from yolc_kd.cache.schema import (SAMPLE_ARRAYS, STATUS_OK, Layout, encode_fingerprint, quantize_heatmap,
                                      quantize_boxes)
    from yolc_kd.cache.writer import CacheStore, ShardBuffer
    from yolc_kd.data.augment import TrainAugment
    from yolc_kd.teacher import expected_target_identity

    rng = np.random.default_rng(args.seed)
    cfg, aug_cfg, classes = real_setup()
    dcfg = cfg["distill_cfg"]
    w, h = aug_cfg.input_size
    c, k, variants = len(classes), int(dcfg["max_patches_per_img"]), args.variants
    canvas = crops.patch_canvas((h, w))
    stride = 4
    n_images = max(1, args.samples // variants)
    layout = Layout(num_images=n_images, variants=variants, shard_size=args.shard_size, num_classes=c,
                    input_hw=(h, w), coarse_hw=(h // stride, w // stride), max_patches=k,
                    refine_hw=(canvas[0] // 4, canvas[1] // 4))
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
            q = quantize_heatmap(heat)
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
            row = dict(heatmap=q, coarse=quantize_boxes(coarse_with_objects(rng, vb, layout.coarse_hw, stride,
                                                                           args.map_noise)),
                       patch_boxes=pb, patch_scales=ps, patch_valid=valid, refine=quantize_boxes(refine),
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
    for name in SAMPLE_ARRAYS:
        files = [p for p in (out / name).rglob("*") if p.is_file()]
        data = sum(p.stat().st_size for p in files if p.name != "zarr.json")
        elems = int(np.prod(shapes[name], dtype=np.int64))
        stored = 0 if SAMPLE_ARRAYS[name] == "str" else np.dtype(SAMPLE_ARRAYS[name]).itemsize * elems
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


def bench_read(cache: Path, ctx: Dict[str, Any], args) -> Dict[str, Any]:
    from yolc_kd.cache.schema import dequantize_heatmap
    from yolc_kd.data.coco import CocoDetection
    from yolc_kd.train.cache_source import CacheTargetSource, open_cache_source
    from yolc_kd.cache.reader import CacheReader

    coco = CocoDetection(ctx["ann"], ctx["img_root"], classes=ctx["classes"])
    try:
        source = open_cache_source(cache, ctx["cfg"], ctx["aug_cfg"], coco)
        how = "open_cache_source(...).read"
    except Exception as exc:  # the benchmark's manifest does not match: still the trainer's TargetSource class
        source = CacheTargetSource(CacheReader(cache))
        how = f"CacheTargetSource(CacheReader).read (open_cache_source refused: {str(exc)[:200]})"
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
        dequantize_heatmap(s["heatmap"])
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
    dcfg, seed = cfg["distill_cfg"], int(cfg.get("seed", 0))
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
        return PrecomputeOptions(out=out, ckpt=str(ckpt), variants=k, batch_size=b, shard_size=s, workers=workers,
                                 threads=args.threads, progress=False, config_dir=str(TINY_STUDENT.parent))

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


# ============================================================================ main
def size_arg(text: str) -> Tuple[int, int]:
    w, h = text.lower().split("x")
    return int(w), int(h)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir, removed at the end)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parts", nargs="+", default=["size", "read", "throughput", "rss"],
                   choices=["size", "read", "throughput", "rss"])
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
        "rss_within_10pct": results.get("rss", {}).get("goal_met")}
    emit(results, args.out)


if __name__ == "__main__":
    main()
