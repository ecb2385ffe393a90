"""Real-scale timings and memory: the HRNet-w48 teacher (configs/yolc_hrnet_w48_visdrone.py) and the
HRNet-w18 KD student (configs/yolc_hrnet_w18_visdrone_kd.py) at 1024x640, 10 classes, RANDOM weights, on
synthetic 1024x640 images with real VisDrone box layouts. The numbers are timings and memory, not accuracy.

One run measures, each heavy part in its own process (so every peak memory is that part's own):
  1. teacher precompute (`yolc-kd precompute`): seconds per view, peak RSS, cache bytes per view;
  2. one student training step (the real Trainer.step: forward, targets, losses, backward, clipping, SGD) in the
     three modes supervised / offline KD (targets from the cache just written) / online KD (live teacher): s/step
     after a warm-up step, peak RSS (CPU) or torch.cuda.max_memory_allocated (CUDA), online / offline ratio;
  3. where the step's peak memory goes: one extra, profiled step per mode (torch.profiler memory timeline by
     category and by phase: data, forward backbone / neck / head, targets, losses, KD patch forward, backward,
     optimizer) and the bytes autograd saves for backward per phase;
  4. full-image vs fused (crop-refine, fusion='nms') inference time per image for both models, and the student
     fused with the teacher's crops (`infer --crop-ckpt`; the teacher's heatmap pass is counted).

    python benchmarks/bench_real_scale.py [--quick] [--out results.json] [--batch 2] [--steps 2]
    python benchmarks/bench_real_scale.py --device cuda --amp --batch 4 --steps 5    # what run_gpu.py runs

--quick: 512x320 input, 1 timed step, 1 image per inference mode (minutes; for development).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from _common import emit, log  # benchmarks/ is on sys.path when a script runs
from _cache_rss import run_measured

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TEACHER_CFG = REPO / "configs" / "yolc_hrnet_w48_visdrone.py"
STUDENT_CFG = REPO / "configs" / "yolc_hrnet_w18_visdrone_kd.py"
LAYOUTS = Path("/work/shared/data/visdrone2019-det-train-first50image.json")
MODES = ("supervised", "offline", "online")
MiB = 1024.0 ** 2

STUDENT_CONFIG = """# bench_real_scale.py: the w18 KD student at {w}x{h}, random-weight w48 teacher
_base_ = {base!r}
train_pipeline = [
    dict(type='LoadImageFromFile', to_float32=True, color_type='color'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PhotoMetricDistortion', brightness_delta=32, contrast_range=(0.5, 1.5),
         saturation_range=(0.5, 1.5), hue_delta=18),
    dict(type='RandomCenterCropPad', crop_size=({w}, {h}), ratios=(0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3),
         mean=[0, 0, 0], std=[1, 1, 1], to_rgb=True, test_pad_mode=None),
    dict(type='Resize', img_scale=({w}, {h}), keep_ratio=True),
    dict(type='RandomFlip', flip_ratio=0.5),
    dict(type='Normalize', mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True),
]
data = dict(samples_per_gpu={batch}, workers_per_gpu=0)
distill_cfg = dict(teacher_config={teacher!r}, teacher_ckpt={ckpt!r})
"""


# ============================================================================ worker side (one process per part)

def _status_kib(field: str) -> int:
    """VmRSS / VmHWM of this process in KiB (VmHWM is per address space: an exec'd child starts afresh)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Phases:
    """A stack of phase names; each phase is also a profiler range ('phase:a/b') and labels what autograd saves."""

    def __init__(self):
        self.stack: List[str] = []
        self._ranges: List[Any] = []

    @property
    def label(self) -> str:
        return "/".join(self.stack) or "(outside)"

    def push(self, name: str) -> None:
        import torch

        self.stack.append(name)
        rf = torch.profiler.record_function("phase:" + self.label)
        rf.__enter__()
        self._ranges.append(rf)

    def pop(self, name: Optional[str] = None) -> None:
        if name is not None and (not self.stack or self.stack[-1] != name):
            return
        self._ranges.pop().__exit__(None, None, None)
        self.stack.pop()

    def wrap(self, fn: Callable, name: str) -> Callable:
        def inner(*args, **kwargs):
            self.push(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self.pop()
        return inner

    def hook_module(self, module, name: str) -> List[Any]:
        return [module.register_forward_pre_hook(lambda m, a: self.push(name)),
                module.register_forward_hook(lambda m, a, o: self.pop(name))]


def _instrument(trainer, phases: Phases) -> Callable[[], None]:
    """Phase markers around the parts of Trainer.step (nothing in the computation changes). Returns an undo."""
    import torch

    from yolc_kd.kd import loss as kd_loss
    from yolc_kd.models import yolc_head

    model, head = trainer.model, trainer.model.bbox_head
    undo: List[Callable[[], None]] = []
    handles = phases.hook_module(model, "forward")
    for name in ("backbone", "neck"):
        handles += phases.hook_module(getattr(model, name), name)
    handles += phases.hook_module(head, "head")
    undo.append(lambda: [h.remove() for h in handles])

    def patch(obj, attr, name, instance=True):
        orig = getattr(obj, attr)
        setattr(obj, attr, phases.wrap(orig, name))
        undo.append((lambda: delattr(obj, attr)) if instance else (lambda: setattr(obj, attr, orig)))

    patch(head, "loss", "sup_loss")
    patch(yolc_head, "yolc_targets", "sup_targets", instance=False)
    patch(model, "patch_refine", "kd_patch_forward")
    patch(kd_loss, "kd_losses", "kd_loss", instance=False)
    if trainer.source is not None:
        patch(trainer.source, "targets", "kd_targets_source")
    opt = trainer.optimizer
    orig_zero, orig_step, orig_clip = opt.zero_grad, opt.step, torch.nn.utils.clip_grad_norm_

    def zero_grad(*a, **k):  # the loop calls zero_grad right before backward
        orig_zero(*a, **k)
        phases.push("backward")

    def clip(*a, **k):
        phases.pop("backward")
        phases.push("clip_grad")
        try:
            return orig_clip(*a, **k)
        finally:
            phases.pop("clip_grad")

    def step(*a, **k):
        phases.pop("backward")
        phases.push("optimizer_step")
        try:
            return orig_step(*a, **k)
        finally:
            phases.pop("optimizer_step")

    opt.zero_grad, opt.step = zero_grad, step
    torch.nn.utils.clip_grad_norm_ = clip
    undo += [lambda: delattr(opt, "zero_grad"), lambda: delattr(opt, "step"),
             lambda: setattr(torch.nn.utils, "clip_grad_norm_", orig_clip)]
    return lambda: [u() for u in reversed(undo)]


def _breakdown(trainer, batch_fn: Callable[[], Dict[str, Any]], device, step_index: int) -> Dict[str, Any]:
    """One profiled step: the memory timeline (tensor bytes by category), the peak per phase and what autograd
    saves for backward per phase. The profiler's own bookkeeping stays out of these tensor numbers."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    phases = Phases()
    undo = _instrument(trainer, phases)
    params = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
    saved: Dict[int, tuple] = {}

    def pack(t):
        try:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params and ptr not in saved:
                saved[ptr] = (t.untyped_storage().nbytes(), phases.label)
        except Exception:  # a tensor without storage (e.g. a functional wrapper)
            pass
        return t

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        with profile(activities=activities, profile_memory=True, record_shapes=True, with_stack=True) as prof:
            phases.push("data")
            batch = batch_fn()
            phases.pop("data")
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                trainer.step(batch, step_index)
            _sync(device)
            del batch
    finally:
        undo()
    out: Dict[str, Any] = dict(saved_for_backward_mib={})
    for nbytes, label in saved.values():
        out["saved_for_backward_mib"][label] = out["saved_for_backward_mib"].get(label, 0.0) + nbytes / MiB
    out["saved_for_backward_mib"] = dict(sorted(out["saved_for_backward_mib"].items(), key=lambda kv: -kv[1]))
    out["saved_for_backward_total_mib"] = sum(out["saved_for_backward_mib"].values())
    try:
        out.update(_memory_timeline(prof, "cuda:0" if device.type == "cuda" else "cpu"))
    except Exception as exc:  # the memory timeline is a private profiler API
        out["timeline_error"] = f"{type(exc).__name__}: {exc}"
    return out


def _memory_timeline(prof, device_str: str) -> Dict[str, Any]:
    from torch.profiler import _memory_profiler as mp

    timeline = mp.MemoryProfileTimeline(prof._memory_profile())
    times, sizes = timeline._coalesce_timeline(device_str)  # times in us, sizes by category (index + 1)
    names = {i + 1: (c.name.lower() if c is not None else "unknown") for c, i in mp._CATEGORY_TO_INDEX.items()}
    totals = [sum(s) for s in sizes]
    ranges = []  # (start_us, end_us, label) of every phase range, from the event tree (same clock as times)

    def walk(nodes):
        for n in nodes:
            if n.name.startswith("phase:"):
                ranges.append((n.start_time_ns / 1000, n.end_time_ns / 1000, n.name[len("phase:"):]))
            walk(n.children)
    walk(prof.profiler.kineto_results.experimental_event_tree())

    def phase_at(t):
        inside = [r for r in ranges if r[0] <= t <= r[1]]
        return max(inside, key=lambda r: r[2].count("/"))[2] if inside else "(outside)"

    k = max(range(len(totals)), key=totals.__getitem__)
    by_phase: Dict[str, Dict[str, float]] = {}
    for start, end, label in ranges:
        inside = [totals[i] for i, t in enumerate(times) if start <= t <= end]
        before = [totals[i] for i, t in enumerate(times) if t < start]
        at_end = [totals[i] for i, t in enumerate(times) if t <= end]
        entry = by_phase.setdefault(label, dict(peak_mib=0.0, start_mib=(before[-1] if before else 0) / MiB,
                                                end_mib=(at_end[-1] if at_end else 0) / MiB))
        entry["peak_mib"] = max(entry["peak_mib"], max(inside, default=0) / MiB)
    return dict(device=device_str, peak_tensor_mib=totals[k] / MiB, peak_in_phase=phase_at(times[k]),
                at_peak_by_category_mib={names[i]: v / MiB for i, v in enumerate(sizes[k]) if v and i in names},
                start_tensor_mib=totals[0] / MiB, by_phase=by_phase)


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(max(1, int(n)))


def worker_step(spec: Dict[str, Any]) -> Dict[str, Any]:
    """One mode's training steps through the real Trainer (data loading timed apart), then a profiled step."""
    import torch

    from yolc_kd.config import load_config
    from yolc_kd.data.augment import AugmentConfig
    from yolc_kd.data.loading import load_dataset
    from yolc_kd.models import build_detector
    from yolc_kd.runtime import resolve_device
    from yolc_kd.train.data import TrainSamples
    from yolc_kd.train.loop import Trainer, TrainOptions, _to_device
    from yolc_kd.train.recipe import KDSource, open_target_source, train_augment

    _threads(spec["threads"])
    mode, _, variant = spec["mode"].partition("+")
    device = resolve_device(spec["device"])
    if variant == "plain":  # the heatmap losses with their intermediates kept for backward, not recomputed
        from yolc_kd.models import losses as model_losses

        model_losses.checkpoint = lambda fn, *tensors, **_: fn(*tensors)
    elif variant:
        raise SystemExit(f"unknown mode variant {variant!r} (known: plain)")
    rss0 = _status_kib("VmRSS")
    cfg = load_config(spec["config"], with_defaults=True)
    coco = load_dataset(cfg, spec["ann"], spec["images"])
    aug_cfg = AugmentConfig.from_pipeline(cfg.get("train_pipeline"), cfg.get("test_pipeline"))
    torch.manual_seed(int(cfg.get("seed", 0)))
    model = build_detector(cfg["model"])
    cache = {"offline": spec["cache"], "offline_image": spec.get("image_cache")}.get(mode)
    kd = KDSource(cache=cache, online=mode == "online")
    source = open_target_source(cfg, kd, aug_cfg, coco, trust=False)
    dataset = TrainSamples(coco, train_augment(aug_cfg, source, cfg["distill"]), int(cfg.get("seed", 0)), source)
    opts = TrainOptions(work_dir=Path(spec["work_dir"]), max_iters=1000, device=str(device), workers=0,
                        batch_size=spec["batch"], amp=spec["amp"], progress=False)
    trainer = Trainer(cfg, model, dataset, opts, source)
    trainer.model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_setup = _status_kib("VmRSS")

    def batches():
        while True:
            trainer.sampler.set_epoch(0)
            for b in trainer.loader:
                yield b
    stream = batches()
    n_total = spec["warmup"] + spec["steps"]
    data_s, step_s, losses, patches = [], [], [], []
    for i in range(n_total):
        t0 = time.perf_counter()
        batch = _to_device(next(stream), device)
        t1 = time.perf_counter()
        record = trainer.step(batch, i)
        _sync(device)
        t2 = time.perf_counter()
        if "kd_targets" in batch:
            patches.append(int(batch["kd_targets"].patch_valid.sum()))
        del batch
        if i >= spec["warmup"]:
            data_s.append(t1 - t0)
            step_s.append(t2 - t1)
        losses.append({k: round(v, 6) for k, v in record.items() if k != "lr"})
        log(f"{spec['mode']}: step {i + 1}/{n_total} {t2 - t1:.2f} s (data {t1 - t0:.2f} s)")
    out = dict(mode=spec["mode"], device=str(device), amp=spec["amp"], batch=spec["batch"], threads=torch.get_num_threads(),
               warmup_steps=spec["warmup"], timed_steps=spec["steps"], sec_per_step=step_s,
               sec_per_step_median=float(statistics.median(step_s)), data_sec_per_batch=data_s,
               losses=losses, student_params_m=sum(p.numel() for p in model.parameters()) / 1e6,
               rss_start_mib=rss0 / 1024, rss_after_setup_mib=rss_setup / 1024,
               peak_rss_mib=_status_kib("VmHWM") / 1024)
    out["step_rss_above_setup_mib"] = out["peak_rss_mib"] - out["rss_after_setup_mib"]
    if mode == "online":
        out["teacher_params_m"] = sum(p.numel() for p in source.teacher.parameters()) / 1e6
    if patches:
        out["kd_patches_per_batch"] = patches
    if device.type == "cuda":
        out["cuda_max_memory_allocated_mib"] = torch.cuda.max_memory_allocated(device) / MiB
        out["cuda_max_memory_reserved_mib"] = torch.cuda.max_memory_reserved(device) / MiB
    if spec["breakdown"]:
        # the first batch again (a fresh epoch 0): the profiled step sees the data of the warm-up step
        trainer.sampler.set_epoch(0)
        first = iter(trainer.loader)
        log(f"{mode}: profiled step for the memory breakdown")
        out["breakdown"] = _breakdown(trainer, lambda: _to_device(next(first), device), device, n_total)
    return out


def worker_infer(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Full-image and fused inference time per image (batch 1) for the teacher and the student."""
    import contextlib

    import torch

    from yolc_kd.checkpoint import load_checkpoint
    from yolc_kd.config import load_config
    from yolc_kd.data.coco import CocoDetection
    from yolc_kd.data.images import load_image_rgb
    from yolc_kd.infer.predict import Predictor
    from yolc_kd.models import build_detector
    from yolc_kd.runtime import resolve_device

    _threads(spec["threads"])
    device = resolve_device(spec["device"])
    coco = CocoDetection(spec["ann"], spec["images"])
    images = [load_image_rgb(coco.image_info(i)["path"]) for i in range(spec["images_n"] + 1)]
    autocast = (lambda: torch.autocast("cuda", dtype=torch.float16)) if spec["amp"] and device.type == "cuda" \
        else contextlib.nullcontext
    out: Dict[str, Any] = dict(device=str(device), amp=spec["amp"], threads=torch.get_num_threads(),
                               image_hw=list(images[0].shape[:2]), timed_images=spec["images_n"], models={})
    teacher = None
    for name, cfg_path, ckpt in (("teacher_w48", spec["teacher_config"], spec["ckpt"]),
                                 ("student_w18", spec["config"], None)):
        cfg = load_config(cfg_path, with_defaults=True)
        torch.manual_seed(0)
        model = build_detector(cfg["model"])
        if ckpt:
            load_checkpoint(model, ckpt)
        res: Dict[str, Any] = {}
        # the student also with the deployed teacher's crops (infer --crop-ckpt): the teacher's heatmap pass counts
        runs = [("none", None), ("nms", None)] + ([("nms", teacher)] if teacher is not None else [])
        for fusion, crop_model in runs:
            predictor = Predictor(model, cfg, device, fusion=fusion, crop_model=crop_model)
            times, regions = [], []
            for j, img in enumerate(images):  # image 0 warms up
                _sync(device)
                t0 = time.perf_counter()
                with autocast():
                    pred = predictor([img])[0]
                _sync(device)
                if j:
                    times.append(time.perf_counter() - t0)
                    regions.append(int(len(pred.regions)))
            key = "full" if fusion == "none" else "fused_nms" if crop_model is None else "fused_nms_teacher_crops"
            res[key] = dict(sec_per_image=times, sec_per_image_median=float(statistics.median(times)),
                            crops_per_image=regions if fusion != "none" else None)
            log(f"infer {name} {key}: {res[key]['sec_per_image_median']:.2f} s/image")
        for key in ("fused_nms", "fused_nms_teacher_crops"):
            if key in res:
                res[key.replace("fused_nms", "fused") + "_over_full"] = \
                    res[key]["sec_per_image_median"] / res["full"]["sec_per_image_median"]
        out["models"][name] = res
        teacher = model if teacher is None else teacher  # kept for the student's teacher-crops row
    return out


def worker_ckpt(spec: Dict[str, Any]) -> Dict[str, Any]:
    """A random-weight w48 teacher (seed 0) saved with yolc_kd.checkpoint.save_checkpoint."""
    import torch

    from yolc_kd.checkpoint import save_checkpoint
    from yolc_kd.config import load_config
    from yolc_kd.models import build_detector

    torch.manual_seed(0)
    model = build_detector(load_config(spec["teacher_config"])["model"])
    save_checkpoint(spec["ckpt"], model, dict(note="random weights (bench_real_scale.py): timings, not accuracy"))
    return dict(teacher_params_m=sum(p.numel() for p in model.parameters()) / 1e6)


WORKERS = dict(step=worker_step, infer=worker_infer, ckpt=worker_ckpt)


def worker_main(kind: str, spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    Path(out_path).write_text(json.dumps(WORKERS[kind](spec), indent=2))


# ============================================================================ parent side

class LoadSampler:
    """The machine's 1-minute load average every few seconds while the benchmark runs (shared-machine context)."""

    def __init__(self, every: float = 15.0):
        self.samples: List[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _run(self, every: float) -> None:
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(every)

    def stop(self) -> Dict[str, float]:
        self._stop.set()
        s = self.samples or [os.getloadavg()[0]]
        return dict(min=min(s), mean=sum(s) / len(s), max=max(s))


def run_worker(kind: str, spec: Dict[str, Any], tmp: Path, tag: str) -> Dict[str, Any]:
    spec_path, out_path, log_path = tmp / f"{tag}.spec.json", tmp / f"{tag}.out.json", tmp / f"{tag}.log"
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, str(spec_path), str(out_path)]
    t0 = time.perf_counter()
    with open(log_path, "w") as fh:
        rc = subprocess.run(cmd, cwd=str(REPO), stdout=fh, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    if rc != 0 or not out_path.is_file():
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
        raise SystemExit(f"{tag} worker failed (exit {rc}):\n" + "\n".join(tail))
    result = json.loads(out_path.read_text())
    result["process_wall_s"] = wall
    return result


def _elapsed_s(text: str) -> Optional[float]:
    """Seconds of the precompute loop from its progress bar's last line ('precompute: 6/6 (100%) 01:23<...')."""
    found = re.findall(r"precompute: \d+/\d+ \(\d+%\) (?:(\d+):)?(\d+):(\d+)<", text)
    if not found:
        return None
    h, m, s = found[-1]
    return int(h or 0) * 3600 + int(m) * 60 + int(s)


def bench_precompute(config: Path, ckpt: Path, data: Path, cache: Path, views: int, args, tmp: Path,
                     image_kind: bool = False) -> Dict[str, Any]:
    """`yolc-kd precompute` in its own process: per-view (--variants 1: `views` views) or image-level (`views`
    images at the auto scales) timings, peak RSS and bytes."""
    shutil.rmtree(cache, ignore_errors=True)
    kind = ["--kind", "image"] if image_kind else ["--variants", "1"]
    cmd = [sys.executable, "-m", "yolc_kd", "precompute", "--config", str(config), "--ckpt", str(ckpt),
           "--ann", str(data / "annotations.json"), "--images", str(data), "--out", str(cache), *kind,
           "--batch-size", str(args.batch), "--workers", str(args.precompute_workers), "--threads", str(args.threads),
           "--device", args.device]
    if args.amp:
        cmd.append("--amp")
    env_log = tmp / ("precompute_image.log" if image_kind else "precompute.log")
    rc, rss_kib, wall = run_measured(cmd, env_log)
    text = env_log.read_text(errors="replace")
    if rc != 0:
        raise SystemExit("precompute failed:\n" + "\n".join(text.strip().splitlines()[-10:]))
    per_view = re.findall(r"([\d.]+) KiB per (?:view|image)", text)
    files = [p for p in cache.rglob("*") if p.is_file()]
    loop_s = _elapsed_s(text)
    return dict(views=views, batch=args.batch, variants=1, workers=args.precompute_workers, threads=args.threads,
                wall_s=wall,
                sec_per_view_wall=wall / views, loop_s=loop_s,
                sec_per_view_loop=(loop_s / views) if loop_s else None,
                peak_rss_mib=rss_kib / 1024, measured="ru_maxrss via RUSAGE_CHILDREN of a launcher: the max over "
                "the CLI process and its DataLoader worker",
                cache_kib_per_view_reported=float(per_view[-1]) if per_view else None,
                cache_bytes_all_files=sum(p.stat().st_size for p in files),
                cache_bytes_per_view_all_files=sum(p.stat().st_size for p in files) / views,
                last_line=text.strip().splitlines()[-1] if text.strip() else "")


def bench_image_level(config: Path, ckpt: Path, args, tmp: Path) -> Dict[str, Any]:
    """`precompute --kind image` on args.image_count synthetic images of a real VisDrone size (args.image_size,
    VisDrone layouts): seconds and bytes per image, rows, scales and crop slots."""
    w, h = (int(v) for v in args.image_size.split("x"))
    data = tmp / f"data_{w}x{h}"
    if not (data / "annotations.json").is_file():
        layout = ["--layout-from", str(LAYOUTS)] if LAYOUTS.is_file() else []
        subprocess.run([sys.executable, "-m", "yolc_kd", "synth", "--out", str(data), "--num-images",
                        str(args.image_count), "--seed", "1", "--size", f"{w}x{h}", "--classes", "10", *layout],
                       check=True, stdout=subprocess.DEVNULL)
    res = bench_precompute(config, ckpt, data, tmp / f"image_cache_{w}x{h}", args.image_count, args, tmp,
                           image_kind=True)
    from yolc_kd.cache.reader import CacheReader

    reader = CacheReader(tmp / f"image_cache_{w}x{h}")
    valid = [int(reader.read_sample(r, ["num_valid_patches"])["num_valid_patches"])
             for r in range(reader.layout.num_samples)]
    res.update(image_wh=[w, h], scales=list(reader.layout.scales), mirrored=bool(reader.layout.mirrored),
               rows_per_image=int(reader.layout.variants), crop_slots=reader.layout.max_patches,
               crops_per_row=valid, sec_per_image_wall=res["wall_s"] / args.image_count,
               sec_per_image_loop=(res["loop_s"] / args.image_count) if res.get("loop_s") else None,
               bytes_per_image_all_files=res["cache_bytes_all_files"] / args.image_count,
               note="random weights: LSM's crop count and the bytes are not a trained teacher's")
    return res


def kd_cost(results: Dict[str, Any], passes: int) -> Dict[str, Any]:
    """Teacher + student compute per image for a schedule of `passes` passes, from the measured rates, relative
    to supervised training: per-view cache (a teacher forward per pass), image-level cache (one precompute per
    image), online KD."""
    tr, b = results.get("train", {}), results["batch"]
    per_pass = {m: tr[m]["sec_per_step_median"] / b for m in tr}
    if "supervised" not in per_pass:
        return {}
    sup = passes * per_pass["supervised"]
    out: Dict[str, Any] = dict(passes=passes, supervised_s_per_image=sup)
    pre = results.get("precompute", {})
    view_s = pre.get("sec_per_view_loop") or pre.get("sec_per_view_wall")
    if view_s and "offline" in per_pass:
        out["per_view_cache"] = dict(teacher_s=passes * view_s, student_s=passes * per_pass["offline"],
                                     teacher_forwards=passes,
                                     ratio=(passes * (view_s + per_pass["offline"])) / sup)
    img = results.get("image_level", {})
    image_s = img.get("sec_per_image_loop") or img.get("sec_per_image_wall")
    student = per_pass.get("offline_image", per_pass.get("offline"))
    if image_s and student:
        out["image_cache"] = dict(teacher_s=image_s, student_s=passes * student, teacher_forwards=img.get("rows_per_image", len(img["scales"])),
                                  student_mode="offline_image" if "offline_image" in per_pass else "offline",
                                  ratio=(image_s + passes * student) / sup)
    if "online" in per_pass:
        out["online"] = dict(ratio=passes * per_pass["online"] / sup, teacher_forwards=passes)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "SPEC", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    parser.add_argument("--quick", action="store_true", help="512x320, 1 timed step, 1 image per inference mode")
    parser.add_argument("--size", default=None, help="WIDTHxHEIGHT (default 1024x640, --quick 512x320)")
    parser.add_argument("--batch", type=int, default=2, help="training and precompute batch (default 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps after one warm-up (default 2, quick 1)")
    parser.add_argument("--infer-images", type=int, default=None, help="timed images per mode (default 3, quick 1)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="training modes to run (default all three); MODE+plain: the heatmap losses without "
                             "recomputation in backward (intermediates kept), e.g. offline+plain")
    parser.add_argument("--parts", default="precompute,train,infer",
                        help="what to run (default precompute,train,infer; 'image' adds the image-level cache's "
                             "precompute at --image-size and, with mode offline_image, its training step)")
    parser.add_argument("--image-size", default="1400x1050",
                        help="image-level precompute: image size (default 1400x1050, VisDrone's most common)")
    parser.add_argument("--image-count", type=int, default=2, help="image-level precompute: images (default 2)")
    parser.add_argument("--passes", type=int, default=240,
                        help="passes per image of the cost summary (default 240: YOLC's VisDrone recipe)")
    parser.add_argument("--no-breakdown", action="store_true", help="no profiled step per mode")
    parser.add_argument("--precompute-workers", type=int, default=1, help="precompute's image loaders (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--amp", action="store_true", help="float16 autocast (CUDA only)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--workdir", default=None, help="keep data, configs, checkpoint and cache here")
    args = parser.parse_args()
    if args.worker:
        worker_main(*args.worker)
        return
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: real-scale GPU benchmark skipped")
        return
    args.amp = bool(args.amp and args.device.startswith("cuda"))
    args.threads = args.threads or os.cpu_count() or 1
    w, h = (int(v) for v in (args.size or ("512x320" if args.quick else "1024x640")).split("x"))
    steps = args.steps or (1 if args.quick else 2)
    infer_n = args.infer_images or (1 if args.quick else 3)
    modes = [m for m in args.modes.split(",") if m]
    parts = set(args.parts.split(","))
    warmup = 1
    n_images = max(args.batch * (warmup + steps), infer_n + 1)
    load = LoadSampler()
    t_start = time.perf_counter()
    tmp_ctx = tempfile.TemporaryDirectory(prefix="bench_real_scale_") if args.workdir is None else None
    tmp = Path(args.workdir or tmp_ctx.name)
    tmp.mkdir(parents=True, exist_ok=True)
    results: Dict[str, Any] = dict(
        note="random weights: timings and memory only, not accuracy",
        machine=dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                     cpus=os.cpu_count(), python=platform.python_version(), torch=torch.__version__,
                     gpu=torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None),
        input_wh=[w, h], classes=10, batch=args.batch, threads=args.threads, device=args.device, amp=args.amp,
        teacher_config=str(TEACHER_CFG.relative_to(REPO)), student_config=str(STUDENT_CFG.relative_to(REPO)))
    try:
        data = tmp / "data"
        if not (data / "annotations.json").is_file():
            log(f"synthesising {n_images} {w}x{h} images with VisDrone layouts")
            layout = ["--layout-from", str(LAYOUTS)] if LAYOUTS.is_file() else []
            subprocess.run([sys.executable, "-m", "yolc_kd", "synth", "--out", str(data), "--num-images",
                            str(n_images), "--seed", "0", "--size", f"{w}x{h}", "--classes", "10", *layout],
                           check=True, stdout=subprocess.DEVNULL)
        results["data"] = dict(images=n_images, layouts=str(LAYOUTS) if LAYOUTS.is_file() else "synthetic")
        ckpt = tmp / "teacher_w48_random.pth"
        if not ckpt.is_file():
            log("saving a random-weight w48 teacher")
            results["teacher"] = run_worker("ckpt", dict(teacher_config=str(TEACHER_CFG), ckpt=str(ckpt)), tmp, "ckpt")
        config = tmp / "student_w18.py"
        config.write_text(STUDENT_CONFIG.format(w=w, h=h, batch=args.batch, base=str(STUDENT_CFG),
                                                teacher=str(TEACHER_CFG), ckpt=str(ckpt)))
        from yolc_kd.config import load_config

        dcfg = load_config(config)["distill"].to_dict()
        results["distill_cfg"] = {k: dcfg[k] for k in ("hm_kd", "box_kd", "box_kd_distance", "kd_weight_global_hm",
                                                          "kd_weight_global_coarse", "kd_weight_local_refine",
                                                          "max_patches_per_img", "min_patch_size")}
        cache = tmp / "cache"
        offline = any(m.startswith("offline") for m in modes)
        if "precompute" in parts or (offline and "train" in parts and not (cache / "zarr.json").exists()):
            log(f"precompute: {n_images} views, batch {args.batch}")
            results["precompute"] = bench_precompute(config, ckpt, data, cache, n_images, args, tmp)
            log(f"precompute: {results['precompute']['sec_per_view_wall']:.1f} s/view (wall), "
                f"peak RSS {results['precompute']['peak_rss_mib']:.0f} MiB")
        if "image" in parts:
            log(f"image-level precompute: {args.image_count} images of {args.image_size}")
            results["image_level"] = bench_image_level(config, ckpt, args, tmp)
            log(f"image-level precompute: {results['image_level']['sec_per_image_wall']:.1f} s/image (wall)")
        image_cache = tmp / "image_cache_steps"
        if "offline_image" in modes and "train" in parts and not (image_cache / "zarr.json").exists():
            log(f"image-level cache of the {n_images} step images")
            results["image_cache_steps"] = bench_precompute(config, ckpt, data, image_cache, n_images, args, tmp,
                                                            image_kind=True)
        base = dict(config=str(config), ann=str(data / "annotations.json"), images=str(data), cache=str(cache),
                    image_cache=str(image_cache), device=args.device, amp=args.amp, threads=args.threads,
                    batch=args.batch)
        if "train" in parts:
            results["train"] = {}
            for mode in modes:
                log(f"train step: {mode}")
                spec = dict(base, mode=mode, warmup=warmup, steps=steps, breakdown=not args.no_breakdown,
                            work_dir=str(tmp / f"work_{mode}"))
                results["train"][mode] = run_worker("step", spec, tmp, f"step_{mode.replace('+', '_')}")
            tr = results["train"]
            if "offline" in tr and "online" in tr:
                key = "cuda_max_memory_allocated_mib" if args.device.startswith("cuda") else "peak_rss_mib"
                results["online_over_offline_peak_memory"] = tr["online"][key] / tr["offline"][key]
                results["online_over_offline_step_memory"] = \
                    tr["online"]["step_rss_above_setup_mib"] / tr["offline"]["step_rss_above_setup_mib"]
                results["online_over_offline_time"] = \
                    tr["online"]["sec_per_step_median"] / tr["offline"]["sec_per_step_median"]
            for m in [m for m in tr if m.endswith("+plain") and m.split("+")[0] in tr]:
                before, after = tr[m], tr[m.split("+")[0]]
                results.setdefault("recompute_vs_plain", {})[m.split("+")[0]] = dict(
                    peak_rss_mib=[before["peak_rss_mib"], after["peak_rss_mib"]],
                    peak_tensor_mib=[before.get("breakdown", {}).get("peak_tensor_mib"),
                                     after.get("breakdown", {}).get("peak_tensor_mib")],
                    sec_per_step_median=[before["sec_per_step_median"], after["sec_per_step_median"]],
                    same_losses=before["losses"] == after["losses"], order="[plain (before), recomputed (now)]")
            if "offline" in tr and "supervised" in tr:
                results["offline_over_supervised_time"] = \
                    tr["offline"]["sec_per_step_median"] / tr["supervised"]["sec_per_step_median"]
        if "infer" in parts:
            log("inference")
            results["infer"] = run_worker("infer", dict(base, teacher_config=str(TEACHER_CFG), ckpt=str(ckpt),
                                                        images_n=infer_n), tmp, "infer")
        results["kd_cost"] = kd_cost(results, args.passes)
    finally:
        results["load_average_1min"] = load.stop()
        results["wall_s"] = time.perf_counter() - t_start
        if tmp_ctx is not None:
            tmp_ctx.cleanup()
    emit(results, args.out)


if __name__ == "__main__":
    main()
