"""`yolc-kd verify CACHE`: check a teacher soft-label cache (data_schema.md) before training on it.

Checks the manifest, every committed shard's files, the crc32c of the small arrays and of every shard index
(`--deep`: of every chunk, decoding all data), dtypes, shapes, value ranges and that every sample sits at
index = image_index * K + variant exactly once. `--recompute N` re-runs the teacher on N random stored
samples (the precompute code path: the same batches, views and thread count) and compares them with the
cache within the documented quantisation tolerance. Prints one line per fault, naming the array and the
samples; exits 0 when the cache is sound, 1 otherwise."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import numpy as np

from yolc_kd.errors import UserError

RECOMPUTE_ATOL = 1e-5  # float32 noise on top of the quantisation bounds (as the precompute tests allow)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("verify", help="check a teacher soft-label cache (checksums, shapes, values)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cache", metavar="CACHE", help="the cache folder written by `yolc-kd precompute`")
    p.add_argument("--deep", action="store_true",
                   help="read and decode every chunk (default: the small arrays and every shard index)")
    p.add_argument("--recompute", type=int, default=0, metavar="N",
                   help="re-run the teacher on N random stored samples and compare (needs --config)")
    p.add_argument("--config", default=None, help="the student's config the cache was made with (for --recompute)")
    p.add_argument("--ckpt", default=None,
                   help="teacher checkpoint (for --recompute; default distill_cfg.teacher_ckpt, else the manifest's)")
    p.add_argument("--ann", default=None, metavar="COCO.json",
                   help="annotations of the cached images (for --recompute; default: the manifest's)")
    p.add_argument("--images", default=None, metavar="DIR", help="their image root (default: the manifest's)")
    p.add_argument("--seed", type=int, default=0, help="picks the --recompute samples (default 0)")
    p.add_argument("--device", default="cpu", help="device of the recompute (use the cache's; default cpu)")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow checkpoints that need pickle code")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from yolc_kd.cache.verify import verify_cache

    if args.recompute < 0:
        raise UserError(f"--recompute must be >= 0, got {args.recompute}")
    if args.recompute and not args.config:
        raise UserError("--recompute needs --config (the student's config the cache was made with) and a teacher "
                        "checkpoint (--ckpt, distill_cfg.teacher_ckpt or the manifest's)")
    path = Path(args.cache)
    faults = verify_cache(path, deep=args.deep, progress=not args.no_progress)
    checked = None
    manifest = _manifest_or_none(path)
    if args.recompute and manifest is not None:
        more, checked = recompute_faults(path, manifest, args)
        faults += more
    for line in faults:
        print(line)
    what = "deep" if args.deep else "quick"
    extra = f", teacher recomputed on {checked} sample(s)" if checked is not None else ""
    if faults:
        print(f"verify: {path}: {len(faults)} fault(s) ({what} check{extra})")
        return 1
    counts = (manifest or {}).get("counts") or {}
    print(f"verify: {path}: OK ({what} check{extra}; {counts.get('samples_written', '?')} stored and "
          f"{counts.get('samples_skipped', '?')} skipped samples of {counts.get('images', '?')} images)")
    return 0


def _manifest_or_none(path: Path) -> Optional[Dict[str, Any]]:
    from yolc_kd.cache.reader import open_manifest

    try:
        return open_manifest(path)
    except UserError:
        return None


def recompute_faults(path: Path, manifest: Mapping[str, Any], args: argparse.Namespace):
    """(faults, samples compared): the teacher re-run on args.recompute random stored samples of the cache."""
    import zarr
    from tqdm import tqdm

    from yolc_kd.cache.manifest import TRAIN_FIELDS, diff_fields, sha256_file
    from yolc_kd.cache.reader import CacheError, CacheReader
    from yolc_kd.cache.schema import STATUS_OK
    from yolc_kd.cache.verify import format_ranges
    from yolc_kd.commands.precompute import _device
    from yolc_kd.commands.train import load_dataset, resolve_data
    from yolc_kd.config import load_config
    from yolc_kd.data.augment import AugmentConfig, TrainAugment
    from yolc_kd.models.distill import build_teacher
    from yolc_kd.precompute.run import deterministic_numerics, run_teacher
    from yolc_kd.precompute.views import ViewJobs, image_ids_of, plan_jobs
    from yolc_kd.train.cache_source import expected_identity

    cfg = load_config(args.config, with_defaults=True)
    dcfg = cfg["distill_cfg"]
    ann_m = manifest.get("annotations") or {}
    ann, images = resolve_data(cfg, args.ann or ann_m.get("path"), args.images or ann_m.get("image_root"))
    coco = load_dataset(cfg, ann, images)
    aug_cfg = AugmentConfig.from_pipeline(cfg.get("train_pipeline"), cfg.get("test_pipeline"))
    # the recompute only means something for the inputs the cache was made from
    faults = [f"recompute: manifest field {d}" for d in
              diff_fields(manifest, expected_identity(cfg, aug_cfg, coco.classes), TRAIN_FIELDS, now="--config")]
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
    amp = bool(manifest.get("amp"))
    device = _device(str(args.device))
    if amp and not str(args.device).startswith("cuda"):
        raise UserError("the cache was made with --amp on CUDA: recompute with --device cuda")
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
    chosen = set(rng.choice(candidates, size=min(int(args.recompute), candidates.size), replace=False).tolist())
    # the very batches precompute ran (batches start at their shard's first sample): bit-identical numerics
    batch = int(run_m.get("batch_size") or 1)
    jobs: List[List[int]] = []
    for idx in sorted(chosen):
        job = next(jb for jb in plan_jobs([idx // lay.shard_size], lay.shard_range, batch) if idx in jb)
        if job not in jobs:
            jobs.append(job)
    config_dir = str(Path(args.config).resolve().parent)
    teacher = build_teacher(dcfg, cfg["model"], config_dir, str(ckpt), args.trust_checkpoint).to(device)
    views = ViewJobs(coco, TrainAugment(aug_cfg), int(manifest.get("seed", 0)), lay.variants,
                     reader.image_ids.tolist(), jobs)
    bad: Dict[str, List[int]] = {}
    notes: Dict[str, str] = {}
    with deterministic_numerics(device, int(run_m.get("cpu_threads") or 1)):
        for k in tqdm(range(len(jobs)), desc="recompute", unit="batch", disable=True if args.no_progress else None,
                      leave=False):
            item = views[k]
            targets = run_teacher(teacher, item, dcfg, device, amp)
            pos = 0
            for rec in item["records"]:
                ok = rec["status"] == STATUS_OK
                if rec["index"] in chosen:
                    if not ok:
                        bad.setdefault("status", []).append(rec["index"])
                        notes["status"] = f"stored, but the image cannot be read now: {rec['reason']}"
                    else:
                        try:
                            _compare(reader, rec, targets, pos, bad, notes)
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
    return out, len(chosen)


def _compare(reader, rec: Mapping[str, Any], targets, pos: int, bad: Dict[str, List[int]],
             notes: Dict[str, str]) -> None:
    """Stored sample rec['index'] vs the teacher's output number `pos` of the batch."""
    from yolc_kd.cache.schema import box_tolerance, dequantize_boxes, dequantize_heatmap, heatmap_tolerance

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

    def excess(stored: np.ndarray, want: np.ndarray, tol: np.ndarray) -> float:
        return float((np.abs(stored - want) - tol - RECOMPUTE_ATOL).max(initial=-1.0))

    e = excess(dequantize_heatmap(s["heatmap"]), live["heatmap"], heatmap_tolerance(live["heatmap"]))
    if e > 0:
        fail("heatmap", f"differs from the recomputed teacher beyond the quantisation bound (by {e:.3g})")
    e = excess(dequantize_boxes(s["coarse"]), live["coarse"], box_tolerance(live["coarse"]))
    if e > 0:
        fail("coarse", f"differs from the recomputed teacher beyond the fixed-point bound (by {e:.3g})")
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
    e = excess(dequantize_boxes(s["refine"][valid]), live["refine"][valid], box_tolerance(live["refine"][valid]))
    if e > 0:
        fail("refine", f"differs from the recomputed teacher beyond the fixed-point bound (by {e:.3g})")
