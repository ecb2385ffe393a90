"""The embedded default run: synthetic aerial data -> shipped tiny teacher -> precomputed soft labels ->
tiny student trained without and with KD -> fused inference -> one AP table, pictures and loss curves."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Dict, List, Optional

import yolc_kd
from yolc_kd.diskio import write_errors, write_json, write_text
from yolc_kd.errors import UserError
from yolc_kd.progress import progress_bar

ASSET_TEACHER = Path(yolc_kd.__file__).resolve().parent / "assets" / "tiny_teacher_synth.pth"
# the configs ship in the package; they name each other by relative path, so they are read from its folder
_CONFIGS = resources.files(yolc_kd) / "configs"
CONFIGS: Optional[Path] = Path(_CONFIGS) if isinstance(_CONFIGS, os.PathLike) else None  # None: a zipped install
TRAIN = dict(num_images=200, seed=0)  # the data the shipped teacher was trained on (same seed -> same bytes)
VAL = dict(num_images=40, seed=1)
SIZE, CLASSES = (384, 256), 4


def run_step(argv: List[str]) -> None:
    from yolc_kd.cli import main

    print(f"\n$ yolc-kd {shlex.join(argv)}", flush=True)
    if main(argv) != 0:
        raise UserError(f"demo step failed: yolc-kd {shlex.join(argv)}")


def run_parallel(steps: Dict[Path, List[str]], iters: int) -> None:
    """`yolc-kd train` runs at the same time, each in its own process with an equal share of the CPU threads
    (on 2 cores one each: both students finish sooner than one after the other with two threads, and each run
    is deterministic for its thread count). Output goes to WORK_DIR/train.log; one progress bar follows the
    iterations logged in their metrics.jsonl. A failed run stops the others and raises one line."""
    if not steps:
        return
    threads = str(max(1, (os.cpu_count() or 2) // len(steps)))
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    procs: Dict[Path, subprocess.Popen] = {}
    try:
        for work, argv in steps.items():
            work.mkdir(parents=True, exist_ok=True)
            (work / "metrics.jsonl").unlink(missing_ok=True)  # an unfinished earlier run's lines (training appends)
            print(f"\n$ yolc-kd {shlex.join(argv)}   [{threads} thread(s); log {work / 'train.log'}]", flush=True)
            with write_errors(work / "train.log"), open(work / "train.log", "w", encoding="utf-8") as log:
                procs[work] = subprocess.Popen([sys.executable, "-m", "yolc_kd", *argv, "--no-progress"],
                                               stdout=log, stderr=subprocess.STDOUT, env=env)
        with progress_bar(total=iters * len(procs), desc=f"train {len(procs)} students", unit="it") as bar:
            while any(p.poll() is None for p in procs.values()):
                failed = [w for w, p in procs.items() if p.returncode not in (None, 0)]
                if failed:
                    break
                time.sleep(2)
                bar.update(sum(_logged_iter(w) for w in procs) - bar.n)
            bar.update(sum(_logged_iter(w) for w in procs) - bar.n)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
                p.wait()
    for work, p in procs.items():
        if p.returncode != 0:
            lines = (work / "train.log").read_text(encoding="utf-8", errors="replace").strip().splitlines()
            raise UserError(f"demo step failed: yolc-kd {shlex.join(steps[work])}: "
                            f"{lines[-1] if lines else 'no output'} (log: {work / 'train.log'})")


def _logged_iter(work: Path) -> int:
    """The last iteration a run has written to its metrics.jsonl (0 before the first)."""
    try:
        lines = (work / "metrics.jsonl").read_text(encoding="utf-8").strip().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line).get("iter", 0))
        except ValueError:  # a line being written
            continue
    return 0


def _pictures(model, cfg: dict, val: Path, viz: Path, count: int = 4) -> None:
    """Detections, crop regions and heatmap of the first val images."""
    from yolc_kd.data.coco import CocoDetection
    from yolc_kd.infer.predict import Predictor
    from yolc_kd.infer.viz import save_detections

    ds = CocoDetection(val / "annotations.json", val)
    images = [ds.load_image(i) for i in range(min(count, len(ds)))]
    for i, (img, pred) in enumerate(zip(images, Predictor(model, cfg, fusion="nms")(images, keep_heatmap=True))):
        save_detections(viz / f"val_{i}.png", img, pred.boxes, pred.labels, pred.scores, cfg["classes"],
                        pred.regions, pred.heatmap)


def evaluate_checkpoint(name: str, config: Path, ckpt: Path, val: Path, out: Path,
                        viz: Optional[Path] = None) -> Dict[str, float]:
    from yolc_kd.checkpoint import load_checkpoint
    from yolc_kd.config import load_config
    from yolc_kd.infer.coco_eval import evaluate_coco
    from yolc_kd.infer.predict import predict_dataset
    from yolc_kd.models import build_detector

    cfg = load_config(config, with_defaults=True)
    model = build_detector(cfg["model"])
    load_checkpoint(model, ckpt)
    row: Dict[str, float] = {}
    for fusion in ("none", "nms"):
        summary = predict_dataset(model, cfg, val / "annotations.json", val, fusion=fusion)
        write_json(out / f"preds_{name}_{fusion}.json", summary.results)
        metrics = evaluate_coco(val / "annotations.json", summary.results, max_dets=(1, 10, 100))
        key = "full" if fusion == "none" else "fused"
        row[f"{key}_AP"], row[f"{key}_AP50"] = metrics["AP"], metrics["AP50"]
        row[f"{key}_sec_per_img"] = summary.seconds_per_image
    if viz is not None:
        _pictures(model, cfg, val, viz)
    return row


# per student: 400 steps of 2 images (the KD gain shows; at 200 x 4 it did not; BENCHMARKS.md). The cache is
# precompute's default kind: the whole images and their mirrors, moved into every fresh view
DEMO_ITERS, DEMO_BATCH, DEMO_KIND = 400, 2, "image"


def run_demo(out_dir: Path, iters: int = DEMO_ITERS, kind: str = DEMO_KIND, variants: str = "auto",
             batch: int = DEMO_BATCH) -> Dict[str, Dict[str, float]]:
    """The demo in out_dir. kind: the cache's, 'image' (teacher on the whole images) or 'view' (`variants`
    augmented views per image, auto: as many as `iters` need)."""
    from yolc_kd.data.synth import make_synthetic_dataset
    from yolc_kd.infer.viz import plot_loss_curves

    if not ASSET_TEACHER.exists():
        raise UserError(f"the shipped teacher checkpoint is missing: {ASSET_TEACHER}")
    if CONFIGS is None or not (CONFIGS / "tiny_student_synth.py").is_file():
        raise UserError(f"the packaged configs are missing ({_CONFIGS}): reinstall yolc-kd (pip install .)")
    start = time.perf_counter()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the demo's output folder {out_dir}: {exc.strerror or exc}") from None
    train, val = out_dir / "data" / "train", out_dir / "data" / "val"
    print(f"making the synthetic aerial dataset in {out_dir / 'data'}", flush=True)
    for folder, spec in ((train, TRAIN), (val, VAL)):
        if not (folder / "annotations.json").exists():
            make_synthetic_dataset(folder, spec["num_images"], spec["seed"], size=SIZE, num_classes=CLASSES,
                                   progress=True)
    student, teacher_cfg = CONFIGS / "tiny_student_synth.py", CONFIGS / "tiny_teacher_synth.py"
    data = ["--ann", str(train / "annotations.json"), "--images", str(train)]
    cache = out_dir / "soft"
    student_b = out_dir / f"student_batch{batch}.py"  # the default student at the demo's batch
    write_text(student_b, f"_base_ = {str(student)!r}\ndata = dict(samples_per_gpu={int(batch)})\n")
    student = student_b
    plain = out_dir / f"student_batch{batch}_nokd.py"  # the same student with the config's KD switch off
    write_text(plain, f"_base_ = {str(student_b)!r}\ndistill_cfg = dict(enable=False)\n")
    # the image-level cache as the seed reference made it (one thread, the config's batch: the teacher's rounding
    # depends on both), so that on the reference's machine kind this run is its seed 0
    rows = ["--kind", "image", "--threads", "1"] if kind == "image" else \
        ["--variants", str(variants), "--train-iters", str(iters), "--batch-size", "8", "--threads", "2"]
    run_step(["precompute", "--config", str(student), "--ckpt", str(ASSET_TEACHER), *data, "--out", str(cache / kind),
              *rows])
    runs = {"student (no KD)": out_dir / "student_plain", "student (KD from cache)": out_dir / "student_kd"}
    run_parallel({work: ["train", "--config", str(student if work.name == "student_kd" else plain), *data,
                         "--work-dir", str(work), "--max-iters", str(iters), "--log-interval", "5",
                         *(["--cache", str(cache / kind)] if work.name == "student_kd" else [])]
                  for work in runs.values() if not (work / f"iter_{iters}.pth").exists()}, iters)
    print("\nevaluating on the held-out synthetic images (full-image only and fused crop-refine)", flush=True)
    table = {"teacher": evaluate_checkpoint("teacher", teacher_cfg, ASSET_TEACHER, val, out_dir)}
    for name, work in runs.items():
        viz = out_dir / "viz" if work.name == "student_kd" else None
        table[name] = evaluate_checkpoint(work.name, student, work / f"iter_{iters}.pth", val, out_dir, viz)
    plot_loss_curves({name: work / "metrics.jsonl" for name, work in runs.items()}, out_dir / "loss_curves.png",
                     keys=["loss_center_heatmap"])  # the supervised heatmap term: comparable across runs
    write_json(out_dir / "results.json", table, indent=2)
    print(format_table(table))
    print(kd_gain_line(table))
    print(seed_spread_line(seed_reference(iters, batch, kind)))
    print(f"\npictures: {out_dir / 'viz'} (detections + crop regions), {out_dir / 'loss_curves.png'}; "
          f"total {time.perf_counter() - start:.0f} s")
    return table


# assets/demo_seeds.json: the demo's students over several seeds on a named machine, written by
# `benchmarks/bench_kd_quality.py --demo-reference` (per seed AP of the no-KD and the KD student of the demo's
# settings, the teacher's AP)
SEED_REFERENCE = "demo_seeds.json"


def seed_reference(iters: int, batch: int, kind: str = DEMO_KIND) -> Optional[dict]:
    """The shipped benchmark over seeds for these demo settings, or None (other settings, or not shipped)."""
    path = resources.files(yolc_kd) / "assets" / SEED_REFERENCE
    try:
        ref = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    same = ref.get("iters") == iters and ref.get("batch") == batch and ref.get("cache_kind", "view") == kind
    return ref if same else None


def gains(ref: dict, kind: str) -> List[float]:
    """Per seed, the KD student's AP minus the no-KD student's ('full' or 'fused')."""
    return [k - n for k, n in zip(ref["kd"][f"{kind}_AP"], ref["no_kd"][f"{kind}_AP"])]


def seed_spread_line(ref: Optional[dict]) -> str:
    """What a user should expect: the demo's KD gain over the benchmark's seeds (mean, min, max), and why this
    run is one draw from it."""
    if ref is None:
        return ("\nno benchmark over seeds ships for these settings (the defaults have one): one run is one draw, "
                "see BENCHMARKS.md for spreads")
    parts = []
    for kind in ("full", "fused"):
        g = gains(ref, kind)
        parts.append(f"{kind} AP {sum(g) / len(g):+.4f} (min {min(g):+.4f}, max {max(g):+.4f}; KD ahead on "
                     f"{sum(x > 0 for x in g)} of {len(g)})")
    seeds = ref["seeds"]
    return (f"\nthe same demo over seeds {seeds[0]}-{seeds[-1]} (`bench_kd_quality.py`, {ref['machine']}): KD gain "
            + ", ".join(parts) + ". This run is one more draw from that spread: a one-thread run repeats exactly "
            "on one machine, but CPUs round differently and a few hundred steps turn that into another student.")


def kd_gain_line(table: Dict[str, Dict[str, float]]) -> str:
    """The KD student's AP gain over the no-KD student, and the share of the student-to-teacher gap it closes."""
    kd, plain, teacher = table["student (KD from cache)"], table["student (no KD)"], table["teacher"]
    parts = []
    for key in ("full", "fused"):
        gain = kd[f"{key}_AP"] - plain[f"{key}_AP"]
        gap = teacher[f"{key}_AP"] - plain[f"{key}_AP"]
        parts.append(f"{key} AP {gain:+.4f}" + (f" ({gain / gap:.0%} of the gap to the teacher)" if gap > 0 else ""))
    return "\nKD gain of this run over the student trained without KD (same seed, iterations and fresh-augmentation " \
        "baseline): " + ", ".join(parts)


def format_table(table: Dict[str, Dict[str, float]]) -> str:
    lines = [f"\n{'model':<26}{'full AP':>9}{'full AP50':>11}{'fused AP':>10}{'fused AP50':>12}{'s/img fused':>13}"]
    for name, row in table.items():
        lines.append(f"{name:<26}{row['full_AP']:>9.4f}{row['full_AP50']:>11.4f}{row['fused_AP']:>10.4f}"
                     f"{row['fused_AP50']:>12.4f}{row['fused_sec_per_img']:>13.3f}")
    return "\n".join(lines)
