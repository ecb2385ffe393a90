"""KD quality over seeds: does the student get better because of the teacher?

    python benchmarks/bench_kd_quality.py [--workdir DIR] [--seeds 0 1 2] [--iters 400] [--batch 4] [--parallel 2]

On the demo's synthetic data (200 training images, 40 held-out, 384x256, 4 classes) and the shipped tiny
teacher, for every seed (`yolc-kd train --seed S`: the student's initialisation and sample order, the same
for every student of a seed) five students are trained for the same iterations:

  no_kd_fresh     no KD, a fresh augmentation every epoch (what a user compares against)
  no_kd_cached    no KD, only the cached views (KD weights 0): what the cache's views alone give
  kd_seed         offline KD with the seed's formulas (MSE over all pixels / cells, weights 1e6 / 1 / 1)
  kd_default      offline KD with the shipped configuration (normalised losses, weights 8 / 1 / 1)
  online_default  online KD (live teacher) with the default configuration
  kd_w1           (tuning) offline KD, normalised losses, weights 1 / 1 / 1
  kd_hm8          (tuning) heatmap KD weight 8 written out (= the shipped default); online_hm8 the same online
  no_kd_fresh_noema, kd_default_noema   the first two without the config's weight average (custom_hooks
                  EMA; sessions 3-4 measured every row so): the trained weights are evaluated
  kd_image        offline KD, shipped configuration, from the image-level cache (`precompute --kind image`:
                  the teacher labels each whole image at 3 scales once; every pass draws a fresh view);
                  kd_image_s1 / kd_image_s2 the same with 1 / 2 cached scales
  kd_image_hm, kd_default_hm   (ablation) heatmap KD only (coarse and local KD weights 0), image-level / per-view
  kd_image_w1     (ablation) image-level with heatmap KD weight 1 instead of 8
  kd_image_mS, kd_aligned_mS   image-level with S scales and their mirrored images (precompute --mirror: 2S
                  teacher forwards per image), free / aligned views (distill_cfg.image_views)
  no_kd_P, kd_default_P, kd_image_P, kd_aligned_P   (ablation) no_kd_fresh, kd_default, kd_image and kd_image
                  with image_views='aligned', with steps removed from the training pipeline (P = nophoto: its
                  PhotoMetricDistortion; still: also its RandomFlip; the per-view cache made again, in soft_P):
                  what the image-level teacher's missing colour change and mirroring cost

The cache holds `--variants auto` views (one per epoch: no view is seen twice). Each run is one process with
one CPU thread (`--threads`: more, a run named NAME_tN, e.g. to see how far a change of the floating-point
summation order alone moves a result), `--parallel` at a time; finished runs are reused, so an interrupted
benchmark resumes. Prints
full-image and fused AP per seed, mean and spread, and the share of the student-to-teacher gap KD closes.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List

from _common import emit, log  # benchmarks/ is on sys.path when a script runs

STUDENTS = ("no_kd_fresh", "kd_default", "no_kd_cached", "kd_seed", "online_default", "kd_w1", "kd_hm8",
            "online_hm8", "no_kd_fresh_noema", "kd_default_noema", "kd_image", "kd_image_s1", "kd_image_s2",
            "kd_image_hm", "kd_default_hm", "kd_image_w1") + tuple(
                f"{s}_{p}" for p in ("nophoto", "still") for s in ("no_kd", "kd_default", "kd_image", "kd_aligned")) + (
                "kd_image_m1", "kd_aligned_m1", "kd_image_m3", "kd_aligned_m3")
# the image-level caches (`precompute --kind image --scales S`, S + "m": also --mirror) of the kd_image students
IMAGE_CACHES = {"kd_image": "auto", "kd_image_s1": "1", "kd_image_s2": "2", "kd_image_hm": "auto",
                "kd_image_w1": "auto", **{f"kd_{v}_{p}": "auto" for v in ("image", "aligned")
                                          for p in ("nophoto", "still")},
                "kd_image_m1": "1m", "kd_aligned_m1": "1m", "kd_image_m3": "3m", "kd_aligned_m3": "3m"}
SEED_FORMULAS = "hm_kd='mse', box_kd='mse', kd_weight_global_hm=1e6, kd_weight_global_coarse=1.0, " \
                "kd_weight_local_refine=1.0"
NO_KD = "kd_weight_global_hm=0.0, kd_weight_global_coarse=0.0, kd_weight_local_refine=0.0"
VARIANTS = dict(seed=SEED_FORMULAS, nokd=NO_KD, hm8="kd_weight_global_hm=8.0", w1="kd_weight_global_hm=1.0",
                plain="enable=False", hm="kd_weight_global_coarse=0.0, kd_weight_local_refine=0.0",
                aligned="image_views='aligned'")  # distill_cfg overrides
PIPELINE_VARIANTS = dict(nophoto=("PhotoMetricDistortion",), still=("PhotoMetricDistortion", "RandomFlip"))
NO_EMA = "custom_hooks = []"  # the shipped config without its weight average (sessions 3-4 measured so)


VAL_IMAGES = 40  # the demo's held-out set
# the demo's KD student per cache kind (yolc-kd demo --kind): precompute's default image-level cache (one scale and its
# mirror, aligned views: the shipped config's defaults) or the per-view cache
DEMO_KD = {"image": "kd_aligned_m1", "view": "kd_default"}


def _env(threads: int = 1) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")


def _configs(work: Path, student: Path, batch: int) -> Dict[str, Path]:
    """The student config at the benchmark's batch, and its KD variants (each a `_base_` child)."""
    cfgs = {}
    base = work / "student.py"
    base.write_text(f"_base_ = {str(student)!r}\ndata = dict(samples_per_gpu={batch})\n")
    cfgs["default"] = base
    for name, dcfg in VARIANTS.items():
        path = work / f"student_{name}.py"
        path.write_text(f"_base_ = {str(base)!r}\ndistill_cfg = dict({dcfg})\n")
        cfgs[name] = path
    cfgs["noema"] = work / "student_noema.py"
    cfgs["noema"].write_text(f"_base_ = {str(base)!r}\n{NO_EMA}\n")
    cfgs["noema_plain"] = work / "student_noema_plain.py"
    cfgs["noema_plain"].write_text(f"_base_ = {str(cfgs['noema'])!r}\ndistill_cfg = dict(enable=False)\n")
    from yolc_kd.config import load_config

    for name, removed in PIPELINE_VARIANTS.items():
        pipeline = [step for step in load_config(student)["train_pipeline"] if step["type"] not in removed]
        cfgs[name] = work / f"student_{name}.py"
        cfgs[name].write_text(f"_base_ = {str(base)!r}\ntrain_pipeline = {pipeline!r}\n")
        cfgs[f"{name}_plain"] = work / f"student_{name}_plain.py"
        cfgs[f"{name}_plain"].write_text(f"_base_ = {str(cfgs[name])!r}\ndistill_cfg = dict(enable=False)\n")
        cfgs[f"{name}_aligned"] = work / f"student_{name}_aligned.py"
        cfgs[f"{name}_aligned"].write_text(f"_base_ = {str(cfgs[name])!r}\ndistill_cfg = dict(image_views='aligned')\n")
    return cfgs


def _train_args(name: str, cfgs: Dict[str, Path], cache: Path, teacher: Path) -> List[str]:
    if name in IMAGE_CACHES:
        suffix = name.rsplit("_", 1)[-1]
        cfg = cfgs[suffix] if suffix in ("hm", "w1") else cfgs["default"]
        if suffix in PIPELINE_VARIANTS:
            cfg = cfgs[f"{suffix}_aligned"] if name.startswith("kd_aligned") else cfgs[suffix]
        elif name.startswith("kd_aligned"):
            cfg = cfgs["aligned"]
        return ["--config", str(cfg), "--cache", str(_image_cache(cache, name))]
    return {"no_kd_fresh": ["--config", str(cfgs["plain"])],
            "no_kd_cached": ["--config", str(cfgs["nokd"]), "--cache", str(cache)],
            **{f"no_kd_{p}": ["--config", str(cfgs[f"{p}_plain"])] for p in PIPELINE_VARIANTS},
            **{f"kd_default_{p}": ["--config", str(cfgs[p]), "--cache", str(cache.parent / f"soft_{p}")]
               for p in PIPELINE_VARIANTS},
            "kd_seed": ["--config", str(cfgs["seed"]), "--cache", str(cache)],
            "kd_default": ["--config", str(cfgs["default"]), "--cache", str(cache)],
            "kd_hm8": ["--config", str(cfgs["hm8"]), "--cache", str(cache)],
            "kd_default_hm": ["--config", str(cfgs["hm"]), "--cache", str(cache)],
            "kd_w1": ["--config", str(cfgs["w1"]), "--cache", str(cache)],
            "online_hm8": ["--config", str(cfgs["hm8"]), "--online", "--teacher-ckpt", str(teacher)],
            "online_default": ["--config", str(cfgs["default"]), "--online", "--teacher-ckpt", str(teacher)],
            "no_kd_fresh_noema": ["--config", str(cfgs["noema_plain"])],
            "kd_default_noema": ["--config", str(cfgs["noema"]), "--cache", str(cache)]}[name]


def _image_cache(cache: Path, name: str) -> Path:
    """The image-level cache of a kd_image student, beside the per-view cache."""
    return cache.parent / f"soft_image_{IMAGE_CACHES[name]}"


def _precompute_image(cfg: Path, teacher: Path, train: Path, out: Path, scales: str, threads: int) -> dict:
    """Make (or find) an image-level cache: its wall time, bytes and teacher forwards per image."""
    stamp = out.parent / f"{out.name}.json"
    if stamp.exists():
        return json.loads(stamp.read_text())
    t0 = time.perf_counter()
    mirror = ["--mirror", "on" if scales.endswith("m") else "off"]
    subprocess.run([sys.executable, "-m", "yolc_kd", "precompute", "--kind", "image", "--scales", scales.rstrip("m"),
                    *mirror,
                    "--config", str(cfg), "--ckpt", str(teacher), "--ann", str(train / "annotations.json"),
                    "--images", str(train), "--out", str(out), "--threads", str(threads), "--no-progress"],
                   check=True, env=_env(threads))
    info = _cache_info(out)
    info["precompute_s"] = round(time.perf_counter() - t0, 1)
    stamp.write_text(json.dumps(info))
    return info


def _cache_info(path: Path) -> dict:
    """Kind, bytes, images and teacher full-image forwards per image of a finished cache."""
    from yolc_kd.cache.reader import CacheReader

    m = CacheReader(path).manifest
    counts = m.get("counts", {})
    return dict(kind=m.get("kind", "view"), bytes=int(counts.get("bytes", 0)), images=int(counts.get("images", 0)),
                teacher_forwards_per_image=int(m["variants"]), scales=m.get("scales", []))


def _val_dir(data: Path, n: int) -> Path:
    """The held-out set of n images: the demo's 40 (data/val) or n images of the same seed (the 40 come first)."""
    return data / "val" if n == VAL_IMAGES else data / f"val_{n}"


def _suffix(n: int) -> str:
    return "" if n == VAL_IMAGES else f"_v{n}"


def _evaluate(name: str, cfg: Path, ckpt: Path, val: Path, wd: Path) -> dict:
    code = ("import json,sys; from pathlib import Path; from yolc_kd.demo import evaluate_checkpoint; "
            "print(json.dumps(evaluate_checkpoint(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), "
            "Path(sys.argv[4]), Path(sys.argv[5]))))")
    res = subprocess.run([sys.executable, "-c", code, name, str(cfg), str(ckpt), str(val), str(wd)], check=True,
                         env=_env(), capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _run_one(name: str, seed: int, args, cfgs: Dict[str, Path], cache: Path, teacher: Path, data: Path,
             work: Path) -> dict:
    run = f"{name}_t{args.threads}" if args.threads != 1 else name
    out = work / "runs" / f"{run}_s{seed}.json"
    row = json.loads(out.read_text()) if out.exists() else None
    wd = work / "students" / f"{run}_s{seed}"
    ckpt = wd / f"iter_{args.iters}.pth"
    if row is None:
        train = data / "train"
        t0 = time.perf_counter()
        if not ckpt.exists():
            cmd = [sys.executable, "-m", "yolc_kd", "train", *_train_args(name, cfgs, cache, teacher),
                   "--ann", str(train / "annotations.json"), "--images", str(train), "--work-dir", str(wd),
                   "--max-iters", str(args.iters), "--seed", str(seed), "--log-interval", "20", "--no-progress"]
            log(f"train {name} seed {seed}")
            subprocess.run(cmd, check=True, env=_env(args.threads), stdout=subprocess.DEVNULL)
        train_s = time.perf_counter() - t0
        row = dict(student=name, seed=seed, train_s=round(train_s, 1))
        first = json.loads((wd / "metrics.jsonl").read_text().splitlines()[0])
        row["first_losses"] = {k: v for k, v in first.items() if k.startswith("loss")}
    if "weights_sha256" not in row:
        row["weights_sha256"] = weights_digest(ckpt)
    for n in args.val_images:  # every held-out set asked for; a finished run only gets the ones it lacks
        sfx = _suffix(n)
        if f"full_AP{sfx}" not in row:
            res = _evaluate(f"{name}_s{seed}{sfx}", cfgs["default"], ckpt, _val_dir(data, n), wd)
            row.update({f"{k}{sfx}": v for k, v in res.items()})
            log(f"{name} seed {seed} on {n} held-out images: full AP {res['full_AP']:.4f}, "
                f"fused AP {res['fused_AP']:.4f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=2))
    return row


def summarise(rows: List[dict], teacher: dict, sfx: str = "") -> dict:
    """Per student: mean / spread over seeds; KD rows: wins against no_kd_fresh and the gap share closed.
    sfx picks the held-out set (keys full_AP{sfx}, fused_AP{sfx})."""
    by = {}
    for r in rows:
        by.setdefault(r["student"], {})[r["seed"]] = r
    base = by.get("no_kd_fresh", {})
    out = {}
    for name, seeds in by.items():
        s = {}
        for kind in ("full_AP", "fused_AP"):
            key = kind + sfx
            vals = [seeds[k][key] for k in sorted(seeds)]
            s[key] = dict(per_seed=vals, mean=statistics.mean(vals),
                          stdev=statistics.stdev(vals) if len(vals) > 1 else 0.0)
            common = [k for k in seeds if k in base]
            if name != "no_kd_fresh" and common:
                s[key]["wins_vs_no_kd_fresh"] = sum(seeds[k][key] > base[k][key] for k in common)
                b = statistics.mean(base[k][key] for k in common)
                m = statistics.mean(seeds[k][key] for k in common)
                s[key]["gap_closed"] = (m - b) / (teacher[kind] - b) if teacher[kind] != b else None
            s[kind] = s.pop(key)
        out[name] = s
    return out


def main() -> None:
    from yolc_kd.data.synth import make_synthetic_dataset
    from yolc_kd.demo import ASSET_TEACHER, CLASSES, CONFIGS, SIZE, TRAIN, VAL, evaluate_checkpoint

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--workdir", default="kd_quality_work")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--iters", type=int, default=400)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per training run")
    p.add_argument("--val-images", type=int, nargs="+", default=[VAL_IMAGES],
                   help=f"held-out set sizes to evaluate every student on (default: the demo's {VAL_IMAGES}); "
                        f"n images of the demo's held-out seed, so the demo's {VAL_IMAGES} come first")
    p.add_argument("--students", nargs="+", default=list(STUDENTS[:5]), choices=STUDENTS)
    p.add_argument("--demo-reference", default=None, metavar="JSON",
                   help="also write the demo's seed reference (src/yolc_kd/assets/demo_seeds.json): per seed AP of "
                        "no_kd_fresh and the demo's KD student (--demo-kind) on the 40 held-out images, for "
                        "`yolc-kd demo` to print beside its own run (run with the demo's --iters and --batch)")
    p.add_argument("--demo-kind", choices=tuple(DEMO_KD), default="image",
                   help="the demo's cache kind the reference is for (default image, the demo's default): KD student "
                        + ", ".join(f"{k}: {v}" for k, v in DEMO_KD.items()))
    p.add_argument("--order", choices=("student", "seed"), default="student",
                   help="run order: all seeds of a student first (default), or all students of a seed first")
    args = p.parse_args()
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    data = work / "data"
    sets = [(data / "train", TRAIN["num_images"], TRAIN["seed"])] + \
        [(_val_dir(data, n), n, VAL["seed"]) for n in args.val_images]
    for folder, num, seed in sets:
        if not (folder / "annotations.json").exists():
            make_synthetic_dataset(folder, num, seed, size=SIZE, num_classes=CLASSES, progress=False)
    cfgs = _configs(work, CONFIGS / "tiny_student_synth.py", args.batch)
    cache = work / "soft"
    t0 = time.perf_counter()
    train = data / "train"
    subprocess.run([sys.executable, "-m", "yolc_kd", "precompute", "--config", str(cfgs["default"]), "--ckpt",
                    str(ASSET_TEACHER), "--ann", str(train / "annotations.json"), "--images", str(train),
                    "--out", str(cache), "--variants", "auto", "--train-iters", str(args.iters),
                    "--batch-size", "8", "--threads", str(args.threads), "--no-progress"], check=True)
    precompute_s = time.perf_counter() - t0
    for p in [p for p in PIPELINE_VARIANTS if f"kd_default_{p}" in args.students]:  # their own per-view caches
        subprocess.run([sys.executable, "-m", "yolc_kd", "precompute", "--config", str(cfgs[p]), "--ckpt",
                        str(ASSET_TEACHER), "--ann", str(train / "annotations.json"), "--images", str(train),
                        "--out", str(cache.parent / f"soft_{p}"), "--variants", "auto", "--train-iters",
                        str(args.iters), "--batch-size", "8", "--threads", str(args.threads), "--no-progress"],
                       check=True)
    caches = {"view": dict(_cache_info(cache), precompute_s=round(precompute_s, 1))}
    for name in args.students:
        if name in IMAGE_CACHES:
            caches[name] = _precompute_image(cfgs["default"], ASSET_TEACHER, train, _image_cache(cache, name),
                                             IMAGE_CACHES[name], args.threads)
    for name, info in caches.items():
        log(f"cache {name}: {info['kind']}, {info['teacher_forwards_per_image']} teacher forwards per image, "
            f"{info['bytes'] / 2 ** 20:.1f} MiB, precompute {info['precompute_s']} s")
    teachers = {}
    for n in args.val_images:
        teacher_json = work / "runs" / f"teacher{_suffix(n)}.json"
        if not teacher_json.exists():
            teacher_json.parent.mkdir(parents=True, exist_ok=True)
            teacher_json.write_text(json.dumps(evaluate_checkpoint("teacher", CONFIGS / "tiny_teacher_synth.py",
                                                                   ASSET_TEACHER, _val_dir(data, n), work)))
        teachers[n] = json.loads(teacher_json.read_text())
    jobs = [(name, seed) for name in args.students for seed in args.seeds] if args.order == "student" else \
        [(name, seed) for seed in args.seeds for name in args.students]
    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        rows = list(pool.map(lambda j: _run_one(j[0], j[1], args, cfgs, cache, ASSET_TEACHER, data, work), jobs))
    summaries = {}
    for n in args.val_images:
        sfx = _suffix(n)
        summaries[n] = summary = summarise(rows, teachers[n], sfx)
        lines = [f"held-out images: {n}", f"{'student':<16}"
                 + "".join(f"{'s' + str(s) + ' full/fused':>20}" for s in args.seeds)
                 + f"{'mean full/fused':>20}{'gap closed':>14}"]
        for name in args.students:
            rs = {r["seed"]: r for r in rows if r["student"] == name}
            cells = "".join(f"{rs[s]['full_AP' + sfx]:>10.4f}/{rs[s]['fused_AP' + sfx]:<9.4f}" for s in args.seeds)
            sm = summary[name]
            gap = sm["full_AP"].get("gap_closed")
            lines.append(f"{name:<16}{cells}{sm['full_AP']['mean']:>10.4f}/{sm['fused_AP']['mean']:<9.4f}"
                         + (f"{gap:>8.1%}/{sm['fused_AP']['gap_closed']:.1%}" if gap is not None else ""))
        pair = paired_difference(rows, "online_default", "kd_default", sfx)
        if pair:
            lines.append("online_default - kd_default per seed, full/fused: "
                         + ", ".join(f"{a:+.4f}/{b:+.4f}" for a, b in zip(pair["full_AP"], pair["fused_AP"])))
            by = {(r["student"], r["seed"]): r.get("weights_sha256") for r in rows}
            same = [s for s in args.seeds if by.get(("online_default", s)) is not None
                    and by.get(("online_default", s)) == by.get(("kd_default", s))]
            lines.append(f"online_default and kd_default bit-identical weights: seeds {same} of {args.seeds}")
        for img in [x for x in args.students if x in IMAGE_CACHES]:
            for other in ("kd_default", "no_kd_fresh"):
                pair = paired_difference(rows, img, other, sfx)
                if pair:
                    lines.append(f"{img} - {other} per seed, full/fused: "
                                 + ", ".join(f"{a:+.4f}/{b:+.4f}" for a, b in zip(pair["full_AP"], pair["fused_AP"])))
        lines.append(f"teacher: full AP {teachers[n]['full_AP']:.4f}, fused AP {teachers[n]['fused_AP']:.4f}")
        print("\n".join(lines))
    if args.demo_reference:
        write_demo_reference(Path(args.demo_reference), rows, teachers[VAL_IMAGES], args)
    emit(dict(iters=args.iters, batch=args.batch, seeds=args.seeds, variants=_variants(cache), teacher=teachers,
              rows=rows, summary=summaries, precompute_s=round(precompute_s, 1), caches=caches,
              wall_s=round(time.perf_counter() - t_start, 1)), args.out)


def machine() -> str:
    """'N-core <CPU model>, <vector unit>, torch <version>': numbers that hold on one machine kind only."""
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo", encoding="utf-8")
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        model = platform.processor() or platform.machine()
    import torch

    # the vector unit decides the float rounding of CPU kernels: the same seed trains another student elsewhere
    return f"{os.cpu_count()}-core {model}, {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}"


def write_demo_reference(path: Path, rows: List[dict], teacher: dict, args) -> None:
    """The demo's students over seeds (no_kd_fresh and DEMO_KD[args.demo_kind] on the demo's held-out set) as
    the demo reads it."""
    by = {(r["student"], r["seed"]): r for r in rows}
    kd = DEMO_KD[args.demo_kind]
    seeds = [s for s in args.seeds if ("no_kd_fresh", s) in by and (kd, s) in by]
    if not seeds:
        raise SystemExit(f"--demo-reference needs the students no_kd_fresh and {kd}")
    ref = dict(iters=args.iters, batch=args.batch, cache_kind=args.demo_kind, kd_student=kd, seeds=seeds,
               threads_per_run=args.threads, machine=machine(),
               teacher={k: teacher[k] for k in ("full_AP", "fused_AP")},
               **{key: {k: [round(by[(name, s)][k], 4) for s in seeds] for k in ("full_AP", "fused_AP")}
                  for key, name in (("no_kd", "no_kd_fresh"), ("kd", kd))})
    path.write_text(json.dumps(ref, indent=1) + "\n")
    log(f"demo reference written to {path}")


def paired_difference(rows: List[dict], a: str, b: str, sfx: str = "") -> Dict[str, List[float]]:
    """Per seed that both students ran, student a's AP minus student b's (full and fused); {} if none."""
    by = {(r["student"], r["seed"]): r for r in rows}
    seeds = sorted(s for (name, s) in by if name == a and (b, s) in by)
    if not seeds:
        return {}
    return {kind: [by[(a, s)][kind + sfx] - by[(b, s)][kind + sfx] for s in seeds] for kind in ("full_AP", "fused_AP")}


def weights_digest(ckpt: Path) -> str:
    """sha256 over the checkpoint's state_dict tensors in key order: equal digests = bit-identical students."""
    import hashlib

    import torch

    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].contiguous().numpy().tobytes())
    return h.hexdigest()


def _variants(cache: Path) -> int:
    from yolc_kd.cache.reader import CacheReader

    return int(CacheReader(cache).num_variants)


if __name__ == "__main__":
    main()
