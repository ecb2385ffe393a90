"""verify --recompute: re-run the teacher on random stored samples of a cache, along the precompute code path
(the same batches, views, thread count and --deterministic setting), and compare with the stored targets within
the documented quantisation tolerance. Where the teacher's floats cannot repeat the cache's bit for bit (another
device type or GPU model, CUDA without --deterministic, another torch), the maps are compared within a looser
tolerance and crops that LSM chose differently are noted, not counted as faults."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
import zarr
from tqdm import tqdm

from yolc_kd.cache.manifest import TRAIN_FIELDS, diff_fields, sha256_file
from yolc_kd.cache.reader import CacheError, CacheReader
from yolc_kd.cache.schema import (BOX_STEP, HEATMAP_LEVELS, STATUS_OK, box_tolerance, dequantize_boxes,
                                  dequantize_heatmap, heatmap_tolerance)
from yolc_kd.cache.verify import format_ranges
from yolc_kd.config import load_config
from yolc_kd.data.augment import AugmentConfig, TrainAugment
from yolc_kd.data.loading import load_dataset, resolve_data
from yolc_kd.errors import UserError
from yolc_kd.precompute.run import run_teacher
from yolc_kd.progress import progress_bar
from yolc_kd.precompute.views import ViewJobs, image_ids_of, plan_jobs
from yolc_kd.runtime import device_name, mixed_precision, numerics, resolve_device
from yolc_kd.teacher import build_teacher, expected_target_identity

RECOMPUTE_ATOL = 1e-5  # float32 noise on top of the quantisation bounds (as the precompute tests allow)
# where the numerics differ from the cache's: one more quantisation step plus 1 % of the value (TF32 convolutions,
# other kernels and summation orders; chosen, not yet measured against a GPU: benchmarks/run_gpu.py reports it)
CROSS_STEPS, CROSS_RTOL = 1.0, 1e-2


def numerics_difference(run_m: Mapping[str, Any], device: str) -> Optional[str]:
    """Why the teacher cannot repeat the cache's floats bit for bit on `device` (None: it can). run_m is the
    manifest's `run` (device_name, deterministic and torch are absent in caches of older versions)."""
    cached = str(run_m.get("device") or "cpu")
    then, now = torch.device(cached).type, torch.device(device).type
    if then != now:
        return f"the cache was made on {cached}, this run uses {device}"
    if run_m.get("torch") and run_m["torch"] != torch.__version__:
        return f"the cache was made with torch {run_m['torch']}, this run has {torch.__version__}"
    if now == "cuda":
        if run_m.get("device_name") != device_name(device):
            return f"the cache was made on {run_m.get('device_name') or 'an unrecorded GPU'}, this run uses " \
                   f"{device_name(device)}"
        if not run_m.get("deterministic"):
            return "the cache was made on CUDA without --deterministic (cuDNN picks its algorithms per run)"
    return None


@dataclass
class RecomputeOptions:
    samples: int                        # how many random stored samples to re-run
    config: str                         # the student's config the cache was made with
    ckpt: Optional[str] = None          # default distill_cfg.teacher_ckpt, else the manifest's
    ann: Optional[str] = None           # default the manifest's
    images: Optional[str] = None
    seed: int = 0                       # picks the samples
    device: str = "auto"
    trust: bool = False
    progress: bool = True


def recompute_faults(path: Path, manifest: Mapping[str, Any], args: RecomputeOptions) -> Tuple[List[str], int]:
    """(faults, samples compared): the teacher re-run on args.samples random stored samples of the cache."""
    cfg = load_config(args.config, with_defaults=True)
    dcfg = cfg["distill_cfg"]
    ann_m = manifest.get("annotations") or {}
    ann, images = resolve_data(cfg, args.ann or ann_m.get("path"), args.images or ann_m.get("image_root"))
    coco = load_dataset(cfg, ann, images)
    aug_cfg = AugmentConfig.from_pipeline(cfg.get("train_pipeline"), cfg.get("test_pipeline"))
    # the recompute only means something for the inputs the cache was made from
    faults = [f"recompute: manifest field {d}" for d in
              diff_fields(manifest, expected_target_identity(cfg, aug_cfg, coco.classes), TRAIN_FIELDS, now="--config")]
    if ann_m.get("sha256") and sha256_file(ann) != ann_m["sha256"]:
        faults.append(f"recompute: manifest field annotations.sha256: {ann} is not the COCO file the cache was "
                      f"made from")
    ckpt = args.ckpt or dcfg.get("teacher_ckpt") or (manifest.get("teacher") or {}).get("ckpt_path")
    if not ckpt:
        raise UserError("--recompute needs the teacher checkpoint: pass --ckpt")
    if not Path(ckpt).is_file():
        raise UserError(f"teacher checkpoint not found: {ckpt}")
    want_sha = (manifest.get("teacher") or {}).get("ckpt_sha256")
    if want_sha and sha256_file(ckpt) != want_sha:
        faults.append(f"recompute: manifest field teacher.ckpt_sha256: {ckpt} is not the checkpoint the cache was "
                      f"made with")
    reader = CacheReader(path)
    lay = reader.layout
    if image_ids_of(coco) != reader.image_ids.tolist():
        faults.append(f"recompute: array 'image_ids' does not list the images of {ann} in order")
    if faults:
        return faults + ["recompute: skipped (the cache was not made from these inputs)"], 0

    run_m = manifest.get("run") or {}
    # the teacher runs in the autocast dtype the cache was made with (`true`: recorded without it, CUDA's float16)
    amp = manifest.get("amp") or None
    amp = "float16" if amp is True else amp
    device = str(resolve_device(args.device))
    try:
        mixed_precision(device, amp is not None, amp)
    except UserError as exc:
        raise UserError(f"the cache was made with --amp ({amp}): {exc}") from None
    try:
        status = np.asarray(zarr.open_group(str(path), mode="r", zarr_format=3)["status"][:])
    except Exception as exc:
        raise UserError(f"array 'status' is damaged ({type(exc).__name__}); run `yolc-kd verify` without "
                        f"--recompute first") from None
    done = np.array([reader.shard_done(j) for j in range(lay.num_shards)])
    candidates = np.flatnonzero((status == STATUS_OK) & np.repeat(done, lay.shard_size)[:lay.num_samples])
    if candidates.size == 0:
        return ["recompute: the cache holds no stored sample to compare"], 0
    rng = np.random.default_rng(int(args.seed))
    chosen = set(rng.choice(candidates, size=min(int(args.samples), candidates.size), replace=False).tolist())
    # the very batches precompute ran (batches start at their shard's first sample): bit-identical numerics
    batch = int(run_m.get("batch_size") or 1)
    jobs: List[List[int]] = []
    for idx in sorted(chosen):
        job = next(jb for jb in plan_jobs([idx // lay.shard_size], lay.shard_range, batch) if idx in jb)
        if job not in jobs:
            jobs.append(job)
    config_dir = str(Path(args.config).resolve().parent)
    teacher = build_teacher(dcfg, cfg["model"], config_dir, str(ckpt), args.trust).to(device)
    views = ViewJobs(coco, TrainAugment(aug_cfg), int(manifest.get("seed", 0)), lay.variants,
                     reader.image_ids.tolist(), jobs)
    bad: Dict[str, List[int]] = {}
    notes: Dict[str, str] = {}
    why = numerics_difference(run_m, device)
    other_crops: List[int] = []  # cross-numerics only: samples whose crops LSM chose differently
    with numerics(device, int(run_m.get("cpu_threads") or 1), bool(run_m.get("deterministic"))):
        for k in progress_bar(range(len(jobs)), desc="recompute", unit="batch", disable=not args.progress,
                              leave=False):
            item = views[k]
            targets = run_teacher(teacher, item, dcfg, device, amp is not None, amp)
            pos = 0
            for rec in item["records"]:
                ok = rec["status"] == STATUS_OK
                if rec["index"] in chosen:
                    if not ok:
                        bad.setdefault("status", []).append(rec["index"])
                        notes["status"] = f"stored, but the image cannot be read now: {rec['reason']}"
                    else:
                        try:
                            _compare(reader, rec, targets, pos, bad, notes, why is not None, other_crops)
                        except CacheError as exc:
                            bad.setdefault("read", []).append(rec["index"])
                            notes["read"] = str(exc)
                pos += ok
    out = []
    for name, rows in bad.items():
        shards = sorted({r // lay.shard_size for r in rows})
        label = "recompute" if name == "read" else f"recompute: array '{name}'"
        out.append(f"{label}, sample{'s' if len(rows) > 1 else ''} {format_ranges(rows)} "
                   f"(shard{'s' if len(shards) > 1 else ''} {format_ranges(shards, 3)}): {notes[name]}")
    if why is not None:
        tqdm.write(f"note: recompute compared within one more quantisation step + {CROSS_RTOL:.0%} of the value: "
                   f"{why}" + (f"; LSM chose other crops in sample(s) {format_ranges(other_crops)}, their refine "
                               f"maps not compared" if other_crops else ""))
    return out, len(chosen)


def _compare(reader, rec: Mapping[str, Any], targets, pos: int, bad: Dict[str, List[int]],
             notes: Dict[str, str], cross: bool = False, other_crops: Optional[List[int]] = None) -> None:
    """Stored sample rec['index'] vs the teacher's output number `pos` of the batch. cross: the numerics differ
    from the cache's (numerics_difference): looser map tolerances, and other crops go to other_crops."""
    idx = rec["index"]
    s = reader.read_sample(idx)

    def fail(name: str, note: str) -> None:
        bad.setdefault(name, []).append(idx)
        notes.setdefault(name, note)

    if reader.fingerprint(s) != rec["fingerprint"]:
        fail("fingerprint", "the replayed view differs from the one the teacher saw (image file, augmentation "
                            "or package version changed)")
        return
    live = {name: getattr(targets, name)[pos].float().cpu().numpy()
            for name in ("heatmap", "coarse", "patch_boxes", "patch_scales", "refine")}
    valid = targets.patch_valid[pos].cpu().numpy().astype(bool)

    def excess(stored: np.ndarray, want: np.ndarray, tol: np.ndarray, step: float) -> float:
        if cross:
            tol = tol + CROSS_STEPS * step + CROSS_RTOL * np.abs(want)
        return float((np.abs(stored - want) - tol - RECOMPUTE_ATOL).max(initial=-1.0))

    bound = "the quantisation bound" + (" + one step + 1 %" if cross else "")
    e = excess(dequantize_heatmap(s["heatmap"]), live["heatmap"], heatmap_tolerance(live["heatmap"]),
               1.0 / HEATMAP_LEVELS)
    if e > 0:
        fail("heatmap", f"differs from the recomputed teacher beyond {bound} (by {e:.3g})")
    e = excess(dequantize_boxes(s["coarse"]), live["coarse"], box_tolerance(live["coarse"]), BOX_STEP)
    if e > 0:
        fail("coarse", f"differs from the recomputed teacher beyond {bound} (by {e:.3g})")
    same_crops = np.array_equal(s["patch_valid"].astype(bool), valid) and \
        np.array_equal(s["patch_boxes"][valid], live["patch_boxes"][valid])
    if cross and not same_crops:  # LSM's choices are discrete: a heatmap a few bits off may move a crop
        if other_crops is not None:
            other_crops.append(idx)
        return
    if not np.array_equal(s["patch_valid"].astype(bool), valid):
        fail("patch_valid", "other crop slots than the recomputed teacher's")
        return
    if int(s["num_valid_patches"]) != int(valid.sum()):
        fail("num_valid_patches", "differs from the recomputed teacher's crop count")
    if not np.array_equal(s["patch_boxes"][valid], live["patch_boxes"][valid]):
        fail("patch_boxes", "crop boxes differ from the recomputed teacher's")
        return
    if not np.allclose(s["patch_scales"][valid], live["patch_scales"][valid], rtol=1e-6, atol=0):
        fail("patch_scales", "patch scales differ from the recomputed teacher's")
    e = excess(dequantize_boxes(s["refine"][valid]), live["refine"][valid], box_tolerance(live["refine"][valid]),
               BOX_STEP)
    if e > 0:
        fail("refine", f"differs from the recomputed teacher beyond {bound} (by {e:.3g})")
