"""verify --recompute: re-run the teacher on random stored samples of a cache, along the precompute code path
(view kind: the same batches, views, thread count and --deterministic setting; image kind: the same scaled
images through ImageRows and _label_images), and compare with the stored targets within the documented
quantisation tolerance. Where the teacher's floats cannot repeat the cache's bit for bit (another
device type or GPU model, CUDA without --deterministic, another torch), the maps are compared within a looser
tolerance and crops that LSM chose differently are noted, not counted as faults."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Set, Tuple

import numpy as np
import torch
import zarr
from tqdm import tqdm

from yolc_kd.cache.manifest import IMAGE_TRAIN_FIELDS, TRAIN_FIELDS, diff_fields, sha256_file
from yolc_kd.cache.reader import CacheError, CacheReader
from yolc_kd.cache.arrays import STATUS_OK, row_map_names, spec
from yolc_kd.cache.verify import format_ranges
from yolc_kd.config import augment_config, load_config
from yolc_kd.data.augment import AugmentConfig, TrainAugment
from yolc_kd.data.coco import CocoDetection
from yolc_kd.data.loading import load_dataset, resolve_data
from yolc_kd.errors import UserError
from yolc_kd.kd import KDTargets
from yolc_kd.precompute.image_level import ImageRows
from yolc_kd.precompute.run import _fit, _label_images, run_teacher
from yolc_kd.precompute.views import ViewJobs, image_ids_of, plan_jobs
from yolc_kd.progress import progress_bar
from yolc_kd.runtime import device_name, mixed_precision, numerics, resolve_device
from yolc_kd.settings import DistillSettings
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
    """What `verify --recompute` re-runs the teacher with.

    Args:
        samples: how many random stored samples to re-run.
        config: the student's config the cache was made with.
        ckpt: the teacher checkpoint (None: distill_cfg.teacher_ckpt, else the manifest's).
        ann: the annotation file (None: the manifest's).
        images: the image root (None: the manifest's).
        seed: picks the samples.
        device: where the teacher runs ("auto" or a device name).
        trust: allow checkpoints that need pickle code.
        progress: show a progress bar.
    """
    samples: int
    config: str
    ckpt: Optional[str] = None
    ann: Optional[str] = None
    images: Optional[str] = None
    seed: int = 0
    device: str = "auto"
    trust: bool = False
    progress: bool = True


def recompute_faults(path: Path, manifest: Mapping[str, Any], args: RecomputeOptions) -> Tuple[List[str], int]:
    """(faults, samples compared): the teacher re-run on args.samples random stored samples of the cache (view
    kind: their augmented views; image kind: their images at the row's scale)."""
    cfg = load_config(args.config, with_defaults=True)
    settings: DistillSettings = cfg["distill"]
    ann_m = manifest.get("annotations") or {}
    ann, images = resolve_data(cfg, args.ann or ann_m.get("path"), args.images or ann_m.get("image_root"))
    coco = load_dataset(cfg, ann, images)
    aug_cfg = augment_config(cfg)
    ckpt = args.ckpt or settings.teacher_ckpt or (manifest.get("teacher") or {}).get("ckpt_path")
    if not ckpt:
        raise UserError("--recompute needs the teacher checkpoint: pass --ckpt")
    if not Path(ckpt).is_file():
        raise UserError(f"teacher checkpoint not found: {ckpt}")
    reader = CacheReader(path)
    faults = _input_faults(manifest, cfg, aug_cfg, coco, reader, str(ann), str(ckpt))
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
    chosen = _choose(path, reader, int(args.samples), int(args.seed))
    if not chosen:
        return ["recompute: the cache holds no stored sample to compare"], 0
    config_dir = str(Path(args.config).resolve().parent)
    teacher = build_teacher(settings, cfg["model"], config_dir, str(ckpt), args.trust).to(device)
    label = _Labeller(teacher, settings, device, amp)
    if reader.layout.kind == "image":
        n, batches = _image_batches(coco, aug_cfg, reader, sorted(chosen), label)
    else:
        n, batches = _view_batches(coco, aug_cfg, reader, int(manifest.get("seed", 0)),
                                   int(run_m.get("batch_size") or 1), sorted(chosen), label)
    why = numerics_difference(run_m, device)
    cmp = _Comparison(reader, why is not None)
    with numerics(device, int(run_m.get("cpu_threads") or 1), bool(run_m.get("deterministic"))):
        for records, live in progress_bar(batches, total=n, desc="recompute", unit="batch",
                                          disable=not args.progress, leave=False):
            cmp.records(records, live, chosen)
    if why is not None:
        tqdm.write(f"note: recompute compared within one more quantisation step + {CROSS_RTOL:.0%} of the value: "
                   f"{why}" + (f"; LSM chose other crops in sample(s) {format_ranges(cmp.other_crops)}, their "
                               f"refine maps not compared" if cmp.other_crops else ""))
    return cmp.lines(reader.layout.shard_size), len(chosen)


# fields a recompute of an image-kind row depends on: IMAGE_TRAIN_FIELDS and the input normalisation
IMAGE_RECOMPUTE_FIELDS = IMAGE_TRAIN_FIELDS + ("augment.mean", "augment.std", "augment.to_rgb")


def _input_faults(manifest: Mapping[str, Any], cfg: Mapping, aug_cfg: AugmentConfig, coco: CocoDetection,
                  reader: CacheReader, ann: str, ckpt: str) -> List[str]:
    """Why the cache was not made from these inputs (config fields its rows depend on, annotation file, teacher
    checkpoint, image order): the recompute only means something for those."""
    fields = IMAGE_RECOMPUTE_FIELDS if reader.layout.kind == "image" else TRAIN_FIELDS
    faults = [f"recompute: manifest field {d}" for d in
              diff_fields(manifest, expected_target_identity(cfg, aug_cfg, coco.classes), fields, now="--config")]
    ann_m = manifest.get("annotations") or {}
    if ann_m.get("sha256") and sha256_file(ann) != ann_m["sha256"]:
        faults.append(f"recompute: manifest field annotations.sha256: {ann} is not the COCO file the cache was "
                      f"made from")
    want_sha = (manifest.get("teacher") or {}).get("ckpt_sha256")
    if want_sha and sha256_file(ckpt) != want_sha:
        faults.append(f"recompute: manifest field teacher.ckpt_sha256: {ckpt} is not the checkpoint the cache was "
                      f"made with")
    if image_ids_of(coco) != reader.image_ids.tolist():
        faults.append(f"recompute: array 'image_ids' does not list the images of {ann} in order")
    return faults


def _choose(path: Path, reader: CacheReader, n: int, seed: int) -> Set[int]:
    """n random stored rows (status 1) of committed shards (fewer if the cache has fewer), picked by seed."""
    lay = reader.layout
    try:
        status = np.asarray(zarr.open_group(str(path), mode="r", zarr_format=3)["status"][:])
    except Exception as exc:
        raise UserError(f"array 'status' is damaged ({type(exc).__name__}); run `yolc-kd verify` without "
                        f"--recompute first") from None
    done = np.array([reader.shard_done(j) for j in range(lay.num_shards)])
    candidates = np.flatnonzero((status == STATUS_OK) & np.repeat(done, lay.shard_size)[:lay.num_samples])
    if candidates.size == 0:
        return set()
    rng = np.random.default_rng(seed)
    return set(rng.choice(candidates, size=min(n, candidates.size), replace=False).tolist())


@dataclass
class _Labeller:
    """The frozen teacher as precompute runs it (device, autocast dtype)."""
    teacher: torch.nn.Module
    settings: DistillSettings
    device: str
    amp: Optional[str]

    def views(self, item: Mapping[str, Any]) -> Optional[KDTargets]:
        return run_teacher(self.teacher, item, self.settings, self.device, self.amp is not None, self.amp)

    def images(self, item: Mapping[str, Any], view_hw: Tuple[int, int], max_regions: int) -> List[KDTargets]:
        return _label_images(self.teacher, item, view_hw, self.settings, self.device, self.amp is not None, self.amp,
                             max_regions)


# (records of a batch, live(p) -> the teacher's targets of its p-th readable record as numpy arrays)
Batch = Tuple[List[Dict[str, Any]], Callable[[int], Dict[str, np.ndarray]]]


def _view_batches(coco: CocoDetection, aug_cfg: AugmentConfig, reader: CacheReader, seed: int, batch: int,
                  chosen: List[int], label: _Labeller) -> Tuple[int, Iterator[Batch]]:
    """View kind: (count, batches) of the very batches precompute ran for the chosen rows (batches start at
    their shard's first sample: bit-identical numerics)."""
    lay = reader.layout
    jobs: List[List[int]] = []
    for idx in chosen:
        job = next(jb for jb in plan_jobs([idx // lay.shard_size], lay.shard_range, batch) if idx in jb)
        if job not in jobs:
            jobs.append(job)
    views = ViewJobs(coco, TrainAugment(aug_cfg), seed, lay.variants, reader.image_ids.tolist(), jobs)

    def run() -> Iterator[Batch]:
        for k in range(len(jobs)):
            item = views[k]
            targets = label.views(item)
            yield item["records"], lambda p, t=targets: _live(t, p, None)
    return len(jobs), run()


def _image_batches(coco: CocoDetection, aug_cfg: AugmentConfig, reader: CacheReader, chosen: List[int],
                   label: _Labeller) -> Tuple[int, Iterator[Batch]]:
    """Image kind: (count, batches): per image of the chosen rows, its rows at the chosen scales as precompute
    makes them (ImageRows, then _label_images: one scale at a time, so the other scales do not matter)."""
    lay = reader.layout
    images = sorted({r // lay.variants for r in chosen})
    rows = ImageRows(coco, aug_cfg, lay.image_rows(), reader.image_ids.tolist(), images)
    view_hw = aug_cfg.input_hw
    shapes = lay.sample_shapes()
    wanted = set(chosen)

    def run() -> Iterator[Batch]:
        for k in range(len(images)):
            item = _only(rows[k], wanted)
            targets = label.images(item, view_hw, lay.max_patches)
            yield item["records"], lambda p, t=targets: _live(t[p], 0, shapes)
    return len(images), run()


def _only(item: Mapping[str, Any], wanted: Set[int]) -> Dict[str, Any]:
    """An ImageRows item cut to the records whose index is in `wanted` (and their inputs)."""
    ok = [rec for rec in item["records"] if rec["status"] == STATUS_OK]
    keep = [k for k, rec in enumerate(ok) if rec["index"] in wanted]
    return dict(records=[rec for rec in item["records"] if rec["index"] in wanted],
                imgs=[item["imgs"][k] for k in keep], content=[item["content"][k] for k in keep])


def _live(targets: KDTargets, pos: int, shapes: Optional[Mapping[str, Tuple[int, ...]]]) -> Dict[str, np.ndarray]:
    """Row `pos` of the teacher's targets as float32 numpy arrays (+ 'valid'); with `shapes` (image kind) the
    heatmap and coarse maps in the top-left corner of the row canvas, zeros elsewhere, as precompute stores them."""
    live = {name: getattr(targets, name)[pos].float().cpu().numpy()
            for name in ("heatmap", "coarse", "patch_boxes", "patch_scales", "refine")}
    if shapes is not None:
        for name in row_map_names(targets=True):
            live[name] = _fit(live[name], shapes[name])
    live["valid"] = targets.patch_valid[pos].cpu().numpy().astype(bool)
    return live


class _Comparison:
    """Stored rows vs the recomputed teacher: the rows that differ, per array, with the first reason."""

    def __init__(self, reader: CacheReader, cross: bool):
        self.reader, self.cross = reader, cross
        self.bad: Dict[str, List[int]] = {}
        self.notes: Dict[str, str] = {}
        self.other_crops: List[int] = []  # cross-numerics only: rows whose crops LSM chose differently

    def fail(self, name: str, idx: int, note: str) -> None:
        self.bad.setdefault(name, []).append(idx)
        self.notes.setdefault(name, note)

    def records(self, records: List[Mapping[str, Any]], live: Callable[[int], Dict[str, np.ndarray]],
                chosen: Set[int]) -> None:
        """Compare the chosen ones of a batch's records (live(p): the p-th readable record's targets)."""
        pos = 0
        for rec in records:
            ok = rec["status"] == STATUS_OK
            if rec["index"] in chosen:
                if not ok:
                    self.fail("status", rec["index"], f"stored, but the image cannot be read now: {rec['reason']}")
                else:
                    try:
                        self.row(rec, live(pos))
                    except CacheError as exc:
                        self.fail("read", rec["index"], str(exc))
            pos += ok

    def lines(self, shard_size: int) -> List[str]:
        out = []
        for name, rows in self.bad.items():
            shards = sorted({r // shard_size for r in rows})
            label = "recompute" if name == "read" else f"recompute: array '{name}'"
            out.append(f"{label}, sample{'s' if len(rows) > 1 else ''} {format_ranges(rows)} "
                       f"(shard{'s' if len(shards) > 1 else ''} {format_ranges(shards, 3)}): {self.notes[name]}")
        return out

    def row(self, rec: Mapping[str, Any], live: Mapping[str, np.ndarray]) -> None:
        """Stored row rec['index'] vs the teacher's targets `live` of the same view or scaled image."""
        idx = rec["index"]
        s = self.reader.read_sample(idx)
        if self.reader.fingerprint(s) != rec["fingerprint"]:
            self.fail("fingerprint", idx, "the image differs from the one the teacher saw (image file changed)"
                      if self.reader.layout.kind == "image" else "the replayed view differs from the one the "
                      "teacher saw (image file, augmentation or package version changed)")
            return
        if self.reader.layout.kind == "image" and json.loads(str(s["aug_params"])) != json.loads(rec["params"]):
            self.fail("aug_params", idx, "the row's image size or scale differs from the recomputed row's")
            return
        self.maps(idx, s, live)
        self.crops(idx, s, live)

    def excess(self, name: str, stored: np.ndarray, want: np.ndarray) -> float:
        """How far the stored codes of array `name` decode beyond its codec's quantisation bound of the teacher's
        values `want` (<= 0: within it)."""
        codec = spec(name).codec
        tol = codec.tolerance(want)
        if self.cross:
            tol = tol + CROSS_STEPS * codec.step + CROSS_RTOL * np.abs(want)
        return float((np.abs(codec.decode(stored) - want) - tol - RECOMPUTE_ATOL).max(initial=-1.0))

    def bound(self) -> str:
        return "the quantisation bound" + (" + one step + 1 %" if self.cross else "")

    def maps(self, idx: int, s: Mapping[str, np.ndarray], live: Mapping[str, np.ndarray]) -> None:
        for name in row_map_names(targets=True):
            e = self.excess(name, s[name], live[name])
            if e > 0:
                self.fail(name, idx, f"differs from the recomputed teacher beyond {self.bound()} (by {e:.3g})")

    def crops(self, idx: int, s: Mapping[str, np.ndarray], live: Mapping[str, np.ndarray]) -> None:
        """Crop slots, boxes and scales equal; refine maps within the bound. Across numerics, crops that LSM
        chose differently go to other_crops (its choices are discrete: a heatmap a few bits off may move one)."""
        valid = live["valid"]
        same_crops = np.array_equal(s["patch_valid"].astype(bool), valid) and \
            np.array_equal(s["patch_boxes"][valid], live["patch_boxes"][valid])
        if self.cross and not same_crops:
            self.other_crops.append(idx)
            return
        if not np.array_equal(s["patch_valid"].astype(bool), valid):
            self.fail("patch_valid", idx, "other crop slots than the recomputed teacher's")
            return
        if int(s["num_valid_patches"]) != int(valid.sum()):
            self.fail("num_valid_patches", idx, "differs from the recomputed teacher's crop count")
        if not np.array_equal(s["patch_boxes"][valid], live["patch_boxes"][valid]):
            self.fail("patch_boxes", idx, "crop boxes differ from the recomputed teacher's")
            return
        if not np.allclose(s["patch_scales"][valid], live["patch_scales"][valid], rtol=1e-6, atol=0):
            self.fail("patch_scales", idx, "patch scales differ from the recomputed teacher's")
        e = self.excess("refine", s["refine"][valid], live["refine"][valid])
        if e > 0:
            self.fail("refine", idx, f"differs from the recomputed teacher beyond {self.bound()} (by {e:.3g})")
