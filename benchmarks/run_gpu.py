"""The GPU check of yolc-kd, sized for one short slot on a fresh GPU machine (torch + CUDA, no package index):
it brings its own dependencies, skips CPU-only work and writes what it has after every stage.

    bash benchmarks/gpu_wheels.sh                 # here, once: wheels of what the GPU machine lacks (.gpu_wheels/)
    # on the GPU machine, from the repository root (the device tool: carry=[".gpu_wheels"], timeout_s=600):
    PYTHONUNBUFFERED=1 python3 benchmarks/run_gpu.py --quick          # about 5 minutes
    PYTHONUNBUFFERED=1 python3 benchmarks/run_gpu.py                  # about 9 minutes
    python benchmarks/run_gpu.py --dry-run [--stages env,host_syncs]  # toy sizes on the CPU, seconds

Dependencies: the modules it misses (zarr, numcodecs, donfig, google-crc32c, pycocotools) are installed from
<repo>/.gpu_wheels into a folder under /tmp with `pip install --no-index`, and src/ goes on the path (no install of
the package). Results: DIR/run_gpu.json, rewritten after each stage, and DIR/run_gpu.log; DIR is --out, else $OUT,
else benchmarks/gpu_results. Every stage's entry has its status (ok, skipped with the reason, failed with the
error) and its seconds; a stage that would not fit the time budget (--budget) is skipped with a note.

Stages, most telling first:
  env            Python (printed first: the GPU machine's is not known in advance), torch, CUDA, the GPU, the install
  cuda_tests     the test suite's CUDA subset (YOLC_KD_TEST_DEVICE=cuda pytest -m cuda, the files that mark
                 tests cuda)                                                                       [CUDA only]
  caches         the tiny teacher's cache made on the CPU, on the device, and twice with --deterministic on the
                 device: how far the maps differ (in quantisation steps) and how often the crops do; `verify
                 --recompute` of the CPU cache on the device
  kd_equivalence offline (cache) vs online (live teacher) KD of the tiny student on the device, with and without
                 --deterministic: the largest loss difference per step and whether the weights are bit-identical
  host_syncs     benchmarks/bench_host_syncs.py on the device: target building (500 objects), the KD patch plan,
                 precompute's quantisation on the device vs the host; reads counted and CUDA's own sync count
  teacher        w48 teacher at 1024x640 (fp16 autocast): forward, kd_targets and fused inference, images/s
  train_step     bench_train_step.measure: w18 student step supervised / offline / online KD at 1024x640
  real_scale     bench_real_scale.py --device cuda --amp (precompute s/view, step time and memory, inference)
                 as a child process with the time that is left                                   [CUDA only]
Without CUDA (or with --dry-run) every stage runs on the CPU at toy sizes and the CUDA-only ones are skipped
with a note: a dry run of the stages, not a measurement.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WHEELS = REPO / ".gpu_wheels"
# module -> distribution of what the GPU machine's image lacks (benchmarks/gpu_wheels.sh downloads them)
NEEDED = {"zarr": "zarr", "numcodecs": "numcodecs", "donfig": "donfig", "google_crc32c": "google-crc32c",
          "pycocotools": "pycocotools"}
TEACHER_CFG, STUDENT_CFG = "configs/yolc_hrnet_w48_visdrone.py", "configs/yolc_hrnet_w18_visdrone_kd.py"
TINY_TEACHER_CFG, TINY_STUDENT_CFG = "configs/tiny_teacher_synth.py", "configs/tiny_student_synth.py"
TINY_TEACHER_CKPT = REPO / "src" / "yolc_kd" / "assets" / "tiny_teacher_synth.pth"


def ensure_dependencies() -> Dict[str, Any]:
    """src/ on the path; the NEEDED modules this Python lacks installed from .gpu_wheels (no index). Sets
    PYTHONPATH so child processes (pytest, bench_real_scale, `python -m yolc_kd`) see the same."""
    paths = [str(REPO / "src"), str(HERE)]
    missing = [dist for mod, dist in NEEDED.items() if importlib.util.find_spec(mod) is None]
    info: Dict[str, Any] = dict(missing=missing)
    if missing:
        if not WHEELS.is_dir():
            raise SystemExit(f"run_gpu: {', '.join(missing)} not installed and no {WHEELS}: run `bash "
                             f"benchmarks/gpu_wheels.sh` where pip reaches an index and carry .gpu_wheels")
        site = Path(tempfile.gettempdir()) / "yolc_kd_gpu_site"
        t = time.perf_counter()
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--disable-pip-version-check", "--find-links", str(WHEELS), "--target", str(site),
               *missing]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"run_gpu: installing {', '.join(missing)} from {WHEELS} failed (Python "
                             f"{platform.python_version()}): {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
        info.update(installed_into=str(site), install_s=round(time.perf_counter() - t, 1))
        paths.insert(0, str(site))
    for p in reversed(paths):
        if p not in sys.path:
            sys.path.insert(0, p)
    importlib.invalidate_caches()
    os.environ["PYTHONPATH"] = os.pathsep.join(paths + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                                        if p])
    return info


class Run:
    """One run's results and its time budget.

    Args:
        out: folder of run_gpu.json and run_gpu.log.
        mode: 'dry' (toy sizes on the CPU), 'quick' or 'full'.
        device: 'cuda' or 'cpu'.
        budget: seconds the stages may take in all, counted from the script's start.
    """

    def __init__(self, out: Path, mode: str, device: str, budget: float, started: float):
        self.out, self.mode, self.device, self.budget, self.started = out, mode, device, budget, started
        self.work = Path(tempfile.mkdtemp(prefix="yolc_kd_gpu_"))
        self.results: Dict[str, Any] = dict(mode=mode, device=device, budget_s=budget, stages={})
        out.mkdir(parents=True, exist_ok=True)
        self.log_path = out / "run_gpu.log"

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.budget - self.elapsed()

    def log(self, msg: str) -> None:
        line = f"[run_gpu {self.elapsed():6.1f}s] {msg}"
        print(line, file=sys.stderr, flush=True)
        with open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")

    def save(self) -> None:
        """run_gpu.json with everything so far (written whole, then renamed: never half a file)."""
        self.results["elapsed_s"] = round(self.elapsed(), 1)
        tmp = self.out / "run_gpu.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=2, default=str))
        os.replace(tmp, self.out / "run_gpu.json")

    def child(self, cmd: List[str], tag: str, timeout: float, env: Optional[Dict[str, str]] = None) -> Dict:
        """A child process, its output appended to the log; returns code, its last line and tail."""
        proc = subprocess.run(cmd, cwd=str(REPO), env=dict(os.environ, **(env or {})), capture_output=True,
                              text=True, timeout=max(10.0, timeout))
        text = (proc.stdout + proc.stderr).strip()
        with open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(f"----- {tag}: {' '.join(cmd)} (exit {proc.returncode})\n{text}\n-----\n")
        lines = text.splitlines()
        return dict(returncode=proc.returncode, last_line=lines[-1] if lines else "", tail=lines[-25:])


def cli(*argv: str) -> Dict[str, Any]:
    """`yolc-kd ARGV` in this process: exit code and output lines."""
    from yolc_kd.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        rc = main([str(a) for a in argv])
    return dict(rc=rc, lines=buf.getvalue().strip().splitlines())


def _sizes(run: Run) -> Dict[str, Any]:
    dry, quick = run.mode == "dry", run.mode == "quick"
    return dict(images=2 if dry else 8, kd_iters=2 if dry else (8 if quick else 16), repeats=1 if dry else 3,
                hw=(160, 256) if dry else (640, 1024), objects=50 if dry else 500, timed_iters=1 if dry else
                (3 if quick else 5))


# ============================================================================ stages

def stage_env(run: Run) -> Dict[str, Any]:
    import torch

    out = dict(python=platform.python_version(), executable=sys.executable, platform=platform.platform(),
               cpus=os.cpu_count(), torch=torch.__version__, torch_cuda=torch.version.cuda,
               cuda_available=torch.cuda.is_available(), dependencies=run.results.get("dependencies"))
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                   multiprocessors=props.multi_processor_count, cudnn=torch.backends.cudnn.version())
    return out


def stage_cuda_tests(run: Run) -> Dict[str, Any]:
    files = sorted(str(f.relative_to(REPO)) for f in (REPO / "tests").glob("test_*.py") if "mark.cuda" in f.read_text())
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", *files]
    r = run.child(cmd, "cuda tests", run.left() - 5, env=dict(YOLC_KD_TEST_DEVICE="cuda"))
    return dict(passed=r["returncode"] == 0, **r)


def _data(run: Run) -> Path:
    from yolc_kd.data.synth import make_synthetic_dataset

    root = run.work / "data"
    if not (root / "annotations.json").is_file():
        make_synthetic_dataset(root, _sizes(run)["images"], seed=0, size=(384, 256), num_classes=4)
    return root


def _precompute(run: Run, out: Path, device: str, *extra: str) -> Dict[str, Any]:
    data = _data(run)
    t = time.perf_counter()
    r = cli("precompute", "--config", REPO / TINY_STUDENT_CFG, "--ckpt", TINY_TEACHER_CKPT, "--ann",
            data / "annotations.json", "--images", data, "--out", out, "--variants", "auto", "--train-iters",
            _sizes(run)["kd_iters"], "--batch-size", 2, "--workers", 0, "--no-progress", "--device", device, *extra)
    if r["rc"] != 0:
        raise RuntimeError(f"precompute on {device} failed: {r['lines'][-1:]}")
    return dict(seconds=round(time.perf_counter() - t, 2), last_line=r["lines"][-1])


def compare_caches(a: Path, b: Path) -> Dict[str, Any]:
    """How far two caches of the same views differ: maps in quantisation steps, crops per sample."""
    import numpy as np
    import zarr

    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    out: Dict[str, Any] = {}
    va, vb = ga["patch_valid"][:].astype(bool), gb["patch_valid"][:].astype(bool)
    same_crops = (va == vb).all(axis=1) & (np.where(va[..., None], ga["patch_boxes"][:] == gb["patch_boxes"][:],
                                                    True).all(axis=(1, 2)))
    out["samples"] = int(len(va))
    out["samples_with_the_same_crops"] = int(same_crops.sum())
    for name in ("heatmap", "coarse", "refine"):
        x, y = ga[name][:].astype(np.int32), gb[name][:].astype(np.int32)
        if name == "refine":  # where both chose the same crops
            x, y = x[same_crops], y[same_crops]
        d = np.abs(x - y)
        out[name] = dict(bit_identical=bool((d == 0).all()), max_steps=int(d.max(initial=0)),
                         values_differing=float((d > 0).mean()) if d.size else 0.0)
    out["bit_identical"] = all(out[n]["bit_identical"] for n in ("heatmap", "coarse", "refine")) and \
        out["samples_with_the_same_crops"] == out["samples"]
    return out


def stage_caches(run: Run) -> Dict[str, Any]:
    caches = run.work / "caches"
    out: Dict[str, Any] = dict(made={}, compared={})
    out["made"]["cpu"] = _precompute(run, caches / "cpu", "cpu")
    if not run.cuda:
        out["note"] = "no CUDA device: only the CPU cache and its recompute on the CPU (a dry run)"
        device = "cpu"
    else:
        device = "cuda"
        out["made"]["cuda"] = _precompute(run, caches / "cuda", "cuda")
        for k in (1, 2):
            out["made"][f"cuda_det{k}"] = _precompute(run, caches / f"cuda_det{k}", "cuda", "--deterministic")
        out["compared"]["cpu_vs_cuda"] = compare_caches(caches / "cpu", caches / "cuda")
        out["compared"]["cuda_vs_cuda_deterministic"] = compare_caches(caches / "cuda", caches / "cuda_det1")
        out["compared"]["cuda_deterministic_twice"] = compare_caches(caches / "cuda_det1", caches / "cuda_det2")
    r = cli("verify", caches / "cpu", "--recompute", 4, "--config", REPO / TINY_STUDENT_CFG, "--ckpt",
            TINY_TEACHER_CKPT, "--device", device, "--no-progress")
    out["verify_recompute_cpu_cache_on_" + device] = dict(rc=r["rc"], lines=r["lines"][-6:])
    return out


def _weights_equal(a: Path, b: Path) -> Dict[str, Any]:
    import torch

    x, y = (torch.load(p / "latest.pth", map_location="cpu", weights_only=True)["state_dict"] for p in (a, b))
    diffs = [float((x[k].double() - y[k].double()).abs().max()) for k in x if x[k].numel()]
    return dict(bit_identical=all(torch.equal(x[k], y[k]) for k in x), max_abs_difference=max(diffs, default=0.0))


def stage_kd_equivalence(run: Run) -> Dict[str, Any]:
    import torch

    data = _data(run)
    n = _sizes(run)["kd_iters"]
    out: Dict[str, Any] = {}
    variants = [("deterministic", True), ("default", False)] if run.cuda else [("cpu_one_thread", False)]
    for label, det in variants:
        cache = run.work / "caches" / ("cuda_det1" if det else ("cuda" if run.cuda else "cpu"))
        if not (cache / "zarr.json").is_file():
            _precompute(run, cache, run.device, *(["--deterministic"] if det else []))
        common = ["--config", REPO / TINY_STUDENT_CFG, "--ann", data / "annotations.json", "--images", data,
                  "--max-iters", n, "--batch-size", 2, "--log-interval", 1, "--no-progress", "--device", run.device,
                  "--workers", 0, "--seed", 0, *(["--deterministic"] if det else [])]
        threads = torch.get_num_threads()
        if not run.cuda:
            torch.set_num_threads(1)  # the CPU cache's thread count (precompute --threads 1)
        try:
            work = run.work / f"kd_{label}"
            off = cli("train", *common, "--cache", cache, "--work-dir", work / "offline")
            on = cli("train", *common, "--online", "--teacher-ckpt", TINY_TEACHER_CKPT, "--work-dir", work / "online")
        finally:
            torch.set_num_threads(threads)
        if off["rc"] or on["rc"]:
            raise RuntimeError(f"{label}: train failed: {off['lines'][-1:]} / {on['lines'][-1:]}")

        def losses(run_dir: Path) -> List[Dict[str, float]]:
            records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
            return [{k: v for k, v in r.items() if k.startswith("loss")} for r in records if "loss" in r]

        lo, ln = losses(work / "offline"), losses(work / "online")
        diffs = [abs(a[k] - b[k]) for a, b in zip(lo, ln) for k in a if k in b]
        out[label] = dict(iterations=n, losses_identical=lo == ln, max_loss_difference=max(diffs, default=0.0),
                          last_loss_offline=lo[-1].get("loss") if lo else None,
                          last_loss_online=ln[-1].get("loss") if ln else None,
                          weights=_weights_equal(work / "offline", work / "online"))
    return out


def stage_host_syncs(run: Run) -> Dict[str, Any]:
    import torch

    import bench_host_syncs as b

    s = _sizes(run)
    device = torch.device(run.device)
    return dict(targets=b.bench_targets(device, s["hw"], s["objects"], 4, s["repeats"]),
                kd_patch_plan=b.bench_patch_plan(device, s["hw"], 4, s["repeats"]),
                quantise=b.bench_quantise(device, s["hw"], 2 if run.mode == "dry" else 4, s["repeats"]))


def stage_teacher(run: Run) -> Dict[str, Any]:
    import numpy as np
    import torch

    from yolc_kd.config import load_config
    from yolc_kd.models import build_detector
    from yolc_kd.teacher import teacher_targets

    dry = run.mode == "dry"
    student, teacher_cfg = (TINY_STUDENT_CFG, TINY_TEACHER_CFG) if dry else (STUDENT_CFG, TEACHER_CFG)
    (h, w), batch, iters = ((256, 384), 2, 1) if dry else ((640, 1024), 4, _sizes(run)["timed_iters"])
    dcfg = load_config(REPO / student, with_defaults=True)["distill"]
    teacher = build_detector(load_config(REPO / teacher_cfg)["model"]).to(run.device).eval()
    img = torch.randn(batch, 3, h, w, device=run.device)
    metas = [dict(batch_input_shape=(h, w), pad_shape=(h, w, 3), img_shape=(h, w, 3),
                  scale_factor=np.ones(4, np.float32), border=np.zeros(4, np.float32)) for _ in range(batch)]
    out: Dict[str, Any] = dict(teacher=teacher_cfg, input_hw=[h, w], batch=batch, iters=iters, amp=run.cuda)

    def sync():
        if run.cuda:
            torch.cuda.synchronize()

    for name, fn in (("forward_only", lambda: teacher.bbox_head(teacher.extract_feat(img))),
                     ("kd_targets", lambda: teacher_targets(teacher, img, metas, dcfg)),
                     ("fused_inference", lambda: teacher.simple_test(img, metas, fusion="nms"))):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=run.cuda):
            fn()
            sync()
            t = time.perf_counter()
            for _ in range(iters):
                fn()
            sync()
        out[f"{name}_images_per_s"] = batch * iters / (time.perf_counter() - t)
    out["kd_targets_over_forward"] = out["kd_targets_images_per_s"] / out["forward_only_images_per_s"]
    return out


def stage_train_step(run: Run) -> Dict[str, Any]:
    from bench_train_step import measure

    if run.mode == "dry":
        return measure(TINY_STUDENT_CFG, TINY_TEACHER_CFG, (256, 384), 2, 1, "cpu", False)
    return measure(STUDENT_CFG, TEACHER_CFG, (640, 1024), 4, _sizes(run)["timed_iters"], "cuda", True)


def stage_real_scale(run: Run) -> Dict[str, Any]:
    result = run.out / "real_scale.json"
    size = ["--quick", "--batch", "2", "--no-breakdown"] if run.mode == "quick" else \
        ["--batch", "4", "--steps", "5", "--infer-images", "10", "--precompute-workers", "4"]
    cmd = [sys.executable, str(HERE / "bench_real_scale.py"), "--device", "cuda", "--amp", *size,
           "--workdir", str(run.work / "real_scale"), "--out", str(result)]
    r = run.child(cmd, "bench_real_scale", run.left() - 5)
    if r["returncode"] != 0 or not result.is_file():
        raise RuntimeError(f"bench_real_scale exited {r['returncode']}: {r['last_line']}")
    return json.loads(result.read_text())


# name, function, CUDA only, seconds it needs on the GPU (quick, full): a stage starts only if that much is left
STAGES: List[tuple] = [
    ("env", stage_env, False, (1, 1)),
    ("cuda_tests", stage_cuda_tests, True, (120, 120)),
    ("caches", stage_caches, False, (30, 40)),
    ("kd_equivalence", stage_kd_equivalence, False, (30, 50)),
    ("host_syncs", stage_host_syncs, False, (20, 30)),
    ("teacher", stage_teacher, False, (30, 45)),
    ("train_step", stage_train_step, False, (40, 60)),
    ("real_scale", stage_real_scale, True, (90, 200)),
]


def run_stages(run: Run, names: Optional[List[str]]) -> None:
    for name, fn, cuda_only, need in STAGES:
        if names and name not in names:
            continue
        entry: Dict[str, Any]
        seconds = need[1] if run.mode == "full" else need[0]
        if cuda_only and not run.cuda:
            entry = dict(status="skipped", note="no CUDA device (or --dry-run): a GPU-only stage")
        elif run.cuda and run.left() < seconds:
            entry = dict(status="skipped", note=f"{run.left():.0f} s of the {run.budget:.0f} s budget left, the "
                                                f"stage needs about {seconds} s")
        else:
            run.log(f"stage {name} ...")
            t = time.perf_counter()
            try:
                entry = dict(status="ok", result=fn(run))
            except Exception as exc:  # a failed stage is recorded and the next one runs
                entry = dict(status="failed", error=f"{type(exc).__name__}: {exc}",
                             traceback=traceback.format_exc().strip().splitlines()[-8:])
            entry["seconds"] = round(time.perf_counter() - t, 1)
        run.results["stages"][name] = entry
        run.save()
        run.log(f"stage {name}: {entry['status']}" + (f" ({entry['seconds']} s)" if "seconds" in entry else "")
                + (f": {entry.get('note') or entry.get('error')}" if entry["status"] != "ok" else ""))


def main() -> None:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer and smaller runs, about 5 minutes on a GPU")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU even where CUDA is present")
    parser.add_argument("--out", default=None, help="results folder (default $OUT, else benchmarks/gpu_results)")
    parser.add_argument("--stages", default=None, help="comma-separated subset of: " + ", ".join(s[0] for s in STAGES))
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for all stages, start-up included (default 300 with --quick, 540 without)")
    args = parser.parse_args()
    print(f"run_gpu: Python {platform.python_version()} at {sys.executable}", file=sys.stderr, flush=True)
    deps = ensure_dependencies()
    import torch

    names = [s for s in (args.stages or "").split(",") if s]
    unknown = sorted(set(names) - {s[0] for s in STAGES})
    if unknown:
        raise SystemExit(f"run_gpu: unknown stage(s) {', '.join(unknown)}")
    cuda = torch.cuda.is_available() and not args.dry_run
    mode = "dry" if not cuda else ("quick" if args.quick else "full")
    out = Path(args.out or os.environ.get("OUT") or HERE / "gpu_results")
    budget = args.budget if args.budget is not None else (300.0 if args.quick or not cuda else 540.0)
    run = Run(out, mode, "cuda" if cuda else "cpu", budget, started)
    run.results["dependencies"] = deps
    run.log(f"mode {mode} on {run.device}, results in {out}")
    run.save()
    try:
        run_stages(run, names)
    finally:
        shutil.rmtree(run.work, ignore_errors=True)
    failed = [n for n, e in run.results["stages"].items() if e["status"] == "failed"]
    run.log(f"done in {run.elapsed():.0f} s" + (f"; failed: {', '.join(failed)}" if failed else ""))


if __name__ == "__main__":
    main()
