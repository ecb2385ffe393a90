"""`precompute` stage: run the frozen teacher once over every augmented view the student will see and
store its KD targets in the Zarr cache. Resumable (whole shards), and split by shard across torchrun ranks."""
from __future__ import annotations

import json
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Set, Tuple

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from yolc_kd import __version__, crops
from yolc_kd.cache.manifest import jsonable, sha256_file, target_identity
from yolc_kd.cache.arrays import (STATUS_OK, STATUS_SKIPPED, quantization, quantize_targets, row_map_names,
                                  target_specs)
from yolc_kd.cache.codec import cast
from yolc_kd.cache.schema import CACHE_KINDS, DEFAULT_SHARD_SIZE, Layout, encode_fingerprint
from yolc_kd.cache.writer import BackgroundWriter, CacheStore, ShardBuffer
from yolc_kd.config import augment_config
from yolc_kd.data.augment import AugmentConfig, TrainAugment
from yolc_kd.data.coco import CocoDetection
from yolc_kd.data.loading import OneLineLoader, check_images
from yolc_kd.errors import UserError
from yolc_kd.kd import KDTargets
from yolc_kd.precompute.image_level import (ImageRows, auto_regions, canvas_hw, image_hws, parse_scales,
                                            largest_scaled, view_scale_range)
from yolc_kd.precompute.views import ViewJobs, image_ids_of, passthrough, plan_jobs
from yolc_kd.progress import progress_bar
from yolc_kd.runtime import amp_dtype, device_name, init_distributed, mixed_precision, numerics
from yolc_kd.settings import DistillSettings
from yolc_kd.teacher import build_teacher, image_targets, teacher_model_cfg, teacher_targets


@dataclass
class PrecomputeOptions:
    """How `precompute` writes a cache.

    Args:
        out: the cache directory.
        variants: view kind: augmented views per image (the command resolves `auto`).
        device: a resolved device (runtime.resolve_device; the command resolves `auto`).
        ckpt: the teacher checkpoint (None: distill_cfg.teacher_ckpt).
        batch_size: teacher batch.
        kind: "view" or "image" (cache/schema.py CACHE_KINDS).
        scales: image kind: cached scales (None: auto over the views' range).
        regions: image kind: crop slots per row (None: image_level.auto_regions).
        mirror: image kind: every scale also as the mirrored image.
        amp: run the teacher under autocast.
        amp_dtype: --amp-dtype (None: float16 on CUDA, bfloat16 on CPU).
        trust: allow checkpoints that need pickle code.
        strict: stop at the first unreadable image instead of skipping it.
        shard_size: rows per shard (None: 16 views, or one image's scales).
        workers: image loading processes.
        threads: CPU intra-op threads, pinned: float results depend on the count.
        progress: show a progress bar.
        config_dir: resolves a relative distill_cfg.teacher_config.
        deterministic: --deterministic: runtime.numerics' repeatable settings.
    """
    out: Path
    variants: int
    device: str
    ckpt: Optional[str] = None
    batch_size: int = 4
    kind: str = "view"
    scales: Optional[Tuple[float, ...]] = None
    regions: Optional[int] = None
    mirror: bool = False
    amp: bool = False
    amp_dtype: Optional[str] = None
    trust: bool = False
    strict: bool = False
    shard_size: Optional[int] = None
    workers: int = 0
    threads: int = 1
    progress: bool = True
    config_dir: Optional[str] = None
    deterministic: bool = False


def _check_options(opts: PrecomputeOptions) -> None:
    if opts.kind not in CACHE_KINDS:
        raise UserError(f"--kind must be one of {', '.join(CACHE_KINDS)}, got {opts.kind!r}")
    for name in ("variants", "batch_size", "shard_size", "regions"):
        if getattr(opts, name) is not None and int(getattr(opts, name)) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(opts, name)}")
    if opts.threads < 1:
        raise UserError(f"--threads must be at least 1, got {opts.threads}")
    if opts.workers < 0:
        raise UserError(f"--workers must be >= 0, got {opts.workers}")
    amp_dtype(opts.device, opts.amp, opts.amp_dtype)  # a dtype the device cannot autocast to: one UserError


def _layout(teacher: nn.Module, coco: CocoDetection, opts: PrecomputeOptions, input_hw: Tuple[int, int],
            settings: DistillSettings) -> Layout:
    """Array shapes from one forward of the teacher on a blank view (the map strides are the model's business)."""
    h, w = input_hw
    meta = dict(batch_input_shape=(h, w), pad_shape=(h, w, 3), img_shape=(h, w, 3), ori_shape=(h, w, 3),
                scale_factor=np.ones(4, np.float32), border=np.zeros(4, np.float32), flip=False)
    with torch.inference_mode():
        t = teacher_targets(teacher, torch.zeros(1, 3, h, w, device=opts.device), [meta], settings)
    return Layout(num_images=len(coco), variants=int(opts.variants), shard_size=int(opts.shard_size or DEFAULT_SHARD_SIZE),
                  num_classes=int(t.heatmap.shape[1]), input_hw=(h, w), coarse_hw=tuple(t.coarse.shape[2:]),
                  max_patches=int(t.patch_valid.shape[1]), refine_hw=tuple(t.refine.shape[3:]))


def _image_layout(teacher: nn.Module, coco: CocoDetection, opts: PrecomputeOptions, input_hw: Tuple[int, int],
                  settings: DistillSettings, aug_cfg: AugmentConfig) -> Layout:
    """Image kind: a row per (image, scale) on a canvas holding the largest scaled image; the map strides and the
    refine canvas from a view's blank forward (_layout)."""
    hws = image_hws(coco)
    scales = tuple(opts.scales) if opts.scales else parse_scales("auto", *view_scale_range(aug_cfg, hws),
                                                                 mirrored=opts.mirror)
    view = _layout(teacher, coco, opts, input_hw, settings)
    canvas = canvas_hw(hws, scales)
    stride = input_hw[0] // view.coarse_hw[0]
    regions = int(opts.regions or auto_regions(settings.max_patches_per_img, largest_scaled(hws, scales),
                                               input_hw))
    rows = len(scales) * (2 if opts.mirror else 1)
    return replace(view, variants=rows, shard_size=int(opts.shard_size or rows), input_hw=canvas,
                   coarse_hw=(canvas[0] // stride, canvas[1] // stride), max_patches=regions, kind="image",
                   scales=scales, mirrored=bool(opts.mirror))


def build_manifest(cfg: Mapping, coco: CocoDetection, aug_cfg: AugmentConfig, teacher_cfg: Mapping,
                   teacher: nn.Module, ckpt: str, layout: Layout, canvas: Tuple[int, int], opts: PrecomputeOptions,
                   world: int) -> Dict[str, Any]:
    m = target_identity(teacher_model=teacher_cfg, augment=aug_cfg.to_dict(), input_size=aug_cfg.input_size,
                        classes=coco.classes, distill=cfg["distill"].to_dict(), crop=teacher.crop_cfg.to_dict(),
                        patch_canvas=canvas, seed=int(cfg.get("seed", 0)))
    m["teacher"].update(ckpt_sha256=sha256_file(ckpt), ckpt_path=str(ckpt))
    dtype = amp_dtype(opts.device, opts.amp, opts.amp_dtype)
    m.update(jsonable(dict(
        package_version=__version__, kind=layout.kind, variants=layout.variants, shard_size=layout.shard_size,
        scales=list(layout.scales), **({"mirrored": True} if layout.mirrored else {}),
        amp=str(dtype).removeprefix("torch.") if dtype is not None else False,  # --amp's dtype, or false
        annotations=dict(sha256=sha256_file(coco.ann_file), path=str(coco.ann_file), image_root=str(coco.img_root),
                         num_images=len(coco)),
        layout=layout.to_dict(), index="image_index * variants + variant" if layout.kind == "view" else
        ("image_index * 2 * len(scales) + 2 * scale index + mirrored" if layout.mirrored else
         "image_index * len(scales) + scale index"),
        quantization=quantization(),
        run=dict(device=str(opts.device), device_name=device_name(opts.device), batch_size=int(opts.batch_size),
                 world_size=world, cpu_threads=int(opts.threads), deterministic=bool(opts.deterministic),
                 torch=torch.__version__),
        complete=False)))
    return m


def _rows(targets: Optional[KDTargets], records: List[Dict[str, Any]], seed: int) -> List[Dict[str, Any]]:
    """Cache rows (numpy, stored dtypes) of the records of one batch; the teacher ran on the ok ones in order.
    The target arrays through their codecs (cache/arrays.py): maps from a GPU are quantised there (torch
    back-end), so uint8 / int16 maps cross to the host instead of float32 ones; maps on the CPU with the numpy
    back-end (about 3x faster than torch's there, BENCHMARKS.md). Both give the same bytes (tests/test_codec.py)."""
    arr = {}
    if targets is not None:
        if targets.heatmap.device.type != "cpu":
            targets = quantize_targets(targets)
        for s in target_specs():
            x = getattr(targets, s.name)
            if s.codec is not None and not s.codec.encoded(x):
                arr[s.name] = s.codec.encode(x.float().numpy())
            else:
                arr[s.name] = cast(x, s.dtype).cpu().numpy()
        arr["num_valid_patches"] = arr["patch_valid"].sum(axis=1)
    rows, k = [], 0
    for rec in records:
        row: Dict[str, Any] = dict(image_id=rec["image_id"], variant=rec["variant"], seed=seed, status=rec["status"])
        if rec["status"] == STATUS_OK:
            row.update({name: a[k] for name, a in arr.items()})
            row.update(fingerprint=encode_fingerprint(rec["fingerprint"]), aug_params=rec["params"])
            k += 1
        else:
            row["aug_params"] = json.dumps({"skipped": rec["reason"]})
        rows.append(row)
    return rows


def run_teacher(teacher: nn.Module, item: Mapping[str, Any], settings: DistillSettings, device: str,
                amp: bool, dtype: Optional[str] = None) -> Optional[KDTargets]:
    """One batched teacher.kd_targets call on the readable views of a job (None when there is none); with amp
    under autocast to dtype (mixed_precision's default when None). The maps are float32 either way."""
    if item["img"] is None:
        return None
    img = item["img"].to(device, non_blocking=True)
    with torch.inference_mode(), mixed_precision(device, amp, dtype):
        return teacher_targets(teacher, img, item["metas"], settings)


def precompute(cfg: Mapping, coco: CocoDetection, opts: PrecomputeOptions) -> Dict[str, Any]:
    """Fill (or finish) the cache at opts.out; returns a summary. Rank r of W does the shards j with j % W == r."""
    with numerics(opts.device, opts.threads, opts.deterministic):
        return _precompute(cfg, coco, opts)


def _precompute(cfg: Mapping, coco: CocoDetection, opts: PrecomputeOptions) -> Dict[str, Any]:
    settings: DistillSettings = cfg["distill"]
    _check_options(opts)
    ckpt = opts.ckpt or settings.teacher_ckpt
    if not ckpt:
        raise UserError("precompute needs the teacher checkpoint: pass --ckpt or set distill_cfg.teacher_ckpt")
    image_ids = image_ids_of(coco)
    missing = check_images(coco, skip_bad=not opts.strict, warn=tqdm.write,  # before the teacher loads
                           skip_hint="without --strict they are skipped and recorded in the manifest")
    teacher = build_teacher(settings, cfg["model"], opts.config_dir, ckpt, opts.trust).to(opts.device)
    if teacher.bbox_head.num_classes != coco.num_classes:
        raise UserError(f"the teacher predicts {teacher.bbox_head.num_classes} classes but {coco.ann_file} "
                        f"has {coco.num_classes}")
    aug_cfg = augment_config(cfg)
    input_hw = aug_cfg.input_hw
    canvas = crops.patch_canvas(input_hw)
    if opts.kind == "image":
        layout = _image_layout(teacher, coco, opts, input_hw, settings, aug_cfg)
    else:
        layout = _layout(teacher, coco, opts, input_hw, settings)
    env = init_distributed(opts.device, backend="gloo", timeout=timedelta(hours=24))  # barriers only; ranks may finish far apart
    rank, world = env.rank, env.world
    manifest = build_manifest(cfg, coco, aug_cfg, teacher_model_cfg(settings, cfg["model"], opts.config_dir), teacher,
                              ckpt, layout, canvas, opts, world)
    try:
        store = CacheStore.prepare(opts.out, manifest, image_ids) if rank == 0 else None
        env.barrier()  # rank 0 has created (or checked) the store
        store = store or CacheStore.attach(opts.out, manifest)
        done = store.done_shards()
        mine = [j for j in range(layout.num_shards) if j % world == rank and j not in done]
        desc = f"precompute[{rank}]" if world > 1 else "precompute"
        written = _fill(store, mine, teacher, coco, aug_cfg, image_ids, settings, opts, int(cfg.get("seed", 0)), desc,
                        reported={image_ids[i] for i in missing})
        env.barrier()  # every rank has committed its shards
        final = store.finalize([coco.image_info(i) for i in range(len(coco))]) if rank == 0 else store.manifest
    finally:
        env.close()
    return dict(out=str(opts.out), rank=rank, world=world, shards_written=len(mine), samples_written=written,
                already_done=len(done), manifest=final)


def _fill(store: CacheStore, shards: List[int], teacher: nn.Module, coco: CocoDetection, aug_cfg: AugmentConfig,
          image_ids: List[int], settings: DistillSettings, opts: PrecomputeOptions, seed: int, desc: str,
          reported: Set[int] = frozenset()) -> int:
    """Label the given shards: rows from a DataLoader (augmented views, or whole images at the cached scales),
    the teacher on the main thread, writes on a thread. An unreadable image gets one warning, unless its id is in
    `reported` (already counted in one line). Returns the number of rows labelled (skipped ones are recorded,
    not counted)."""
    layout = store.layout
    wanted = set(shards)
    if layout.kind == "image":
        images = sorted({r // layout.variants for j in shards for r in range(*layout.shard_range(j))})
        jobs: Any = ImageRows(coco, aug_cfg, layout.image_rows(), image_ids, images)
        view_hw = aug_cfg.input_hw
        label: Callable[[Mapping[str, Any]], Any] = lambda item: _label_images(
            teacher, item, view_hw, settings, opts.device, opts.amp, opts.amp_dtype, layout.max_patches)
        to_rows: Callable[..., List[Dict[str, Any]]] = lambda t, r: _image_rows(t, r, seed, layout)
        total = len(images) * layout.variants
    else:
        plan = plan_jobs(shards, layout.shard_range, int(opts.batch_size))
        jobs = ViewJobs(coco, TrainAugment(aug_cfg), seed, layout.variants, image_ids, plan)
        label = lambda item: run_teacher(teacher, item, settings, opts.device, opts.amp, opts.amp_dtype)
        to_rows = lambda t, r: _rows(t, r, seed)
        total = sum(len(j) for j in plan)
    loader = OneLineLoader(jobs, batch_size=None, shuffle=False, num_workers=int(opts.workers),
                           collate_fn=passthrough, pin_memory=str(opts.device).startswith("cuda"))
    writer = BackgroundWriter(store, max_pending=2)
    buffers: Dict[int, ShardBuffer] = {}
    warned = set(reported)
    usable = 0  # rows the teacher labelled (the skipped ones are recorded, not counted)
    bar = progress_bar(total=total, desc=desc, unit="view" if layout.kind == "view" else "row",
                       disable=not opts.progress)
    # quantising a batch runs on a thread while the teacher labels the next one (numpy and torch release the GIL)
    quantizer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="yolc-kd-quantize")
    pending: Deque[Tuple[Future, List[Dict[str, Any]]]] = deque()

    def store_rows(fut: Future, records: List[Dict[str, Any]]) -> None:
        for rec, row in zip(records, fut.result()):
            j = rec["index"] // layout.shard_size
            if j not in wanted:  # an image's row in a shard that is already done (image kind)
                continue
            buf = buffers.get(j)
            if buf is None:
                buf = buffers[j] = ShardBuffer(layout, j)
            buf.put(rec["index"], row)
            if buf.full:
                writer.submit(buffers.pop(j))
        bar.update(len(records))

    try:
        for item in loader:
            records = item["records"]
            usable += sum(1 for rec in records if rec["status"] == STATUS_OK)
            for rec in records:
                if rec["status"] == STATUS_SKIPPED:
                    if opts.strict:
                        raise UserError(f"image id {rec['image_id']}: {rec['reason']} (--strict; without it the "
                                        f"image is skipped and recorded in the manifest)")
                    if rec["image_id"] not in warned:
                        warned.add(rec["image_id"])
                        tqdm.write(f"warning: skipping image id {rec['image_id']}: {rec['reason']}")
            targets = label(item)
            pending.append((quantizer.submit(to_rows, targets, records), records))
            while len(pending) > 1 or (pending and pending[0][0].done()):
                store_rows(*pending.popleft())
        while pending:
            store_rows(*pending.popleft())
    finally:
        quantizer.shutdown(wait=True, cancel_futures=True)
        bar.close()
        writer.close()
    return usable


def _label_images(teacher: nn.Module, item: Mapping[str, Any], view_hw: Tuple[int, int], settings: DistillSettings,
                  device: str, amp: bool, dtype: Optional[str], max_regions: int) -> List[KDTargets]:
    """teacher.image_targets on every readable row of an image (one scale at a time: the sizes differ); with amp
    under autocast to dtype (mixed_precision's default when None)."""
    out = []
    for img, content in zip(item["imgs"], item["content"]):
        with torch.inference_mode(), mixed_precision(device, amp, dtype):
            out.append(image_targets(teacher, img.to(device, non_blocking=True), content, view_hw, settings,
                                     max_regions))
    return out


def _fit(a: np.ndarray, shape: Tuple[int, ...]) -> np.ndarray:
    """a in the top-left corner of a zero array of `shape` (the row canvas of the image kind)."""
    if tuple(a.shape) == tuple(shape):
        return a
    out = np.zeros(shape, a.dtype)
    out[tuple(slice(0, n) for n in a.shape)] = a
    return out


def _image_rows(targets: List[KDTargets], records: List[Dict[str, Any]], seed: int,
                layout: Layout) -> List[Dict[str, Any]]:
    """Cache rows of one image's records (image kind): each labelled row's maps placed on the row canvas."""
    shapes = layout.sample_shapes()
    rows, k = [], 0
    for rec in records:
        if rec["status"] != STATUS_OK:
            rows += _rows(None, [rec], seed)
            continue
        row = _rows(targets[k], [rec], seed)[0]
        k += 1
        for name in row_map_names():
            row[name] = _fit(row[name], shapes[name])
        rows.append(row)
    return rows
