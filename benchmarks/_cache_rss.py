"""Part 4 of bench_cache.py: peak RSS of `yolc-kd precompute` at two dataset sizes (memory stays bounded)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

from _common import log

REPO = Path(__file__).resolve().parents[1]
TINY_STUDENT = REPO / "configs" / "tiny_student_synth.py"
TINY_TEACHER = REPO / "configs" / "tiny_teacher_synth.py"
GOAL_RSS_GROWTH = 0.10


RSS_CONFIG = """# bench_cache.py: tiny student (4 classes) at a {w}x{h} input, for the peak-RSS runs
_base_ = {base!r}
train_pipeline = [
    dict(type='LoadImageFromFile', to_float32=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PhotoMetricDistortion', brightness_delta=32, contrast_range=(0.5, 1.5),
         saturation_range=(0.5, 1.5), hue_delta=18),
    dict(type='RandomCenterCropPad', crop_size=({w}, {h}), ratios=(0.8, 0.9, 1.0, 1.1, 1.2),
         mean=[0, 0, 0], std=[1, 1, 1], to_rgb=True, test_pad_mode=None),
    dict(type='Resize', img_scale=({w}, {h}), keep_ratio=True),
    dict(type='RandomFlip', flip_ratio=0.5),
    dict(type='Normalize', mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True),
]
distill_cfg = dict(teacher_config={teacher!r}, min_patch_size=16)
"""


# A small intermediate process starts the measured command and reports RUSAGE_CHILDREN. Measuring our own direct
# child would be wrong: Linux starts a child's peak RSS at its parent's (fork/vfork + exec keeps the old mm's
# high-water mark), and this benchmark process is large after parts 1-3.
_MEASURE = ("import json, resource, subprocess, sys\n"
            "with open(sys.argv[2], 'wb') as fh:\n"
            "    rc = subprocess.run(sys.argv[3:], stdout=fh, stderr=subprocess.STDOUT).returncode\n"
            "open(sys.argv[1], 'w').write(json.dumps([rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))\n")


def run_measured(cmd: List[str], log_path: Path) -> Tuple[int, int, float]:
    """(exit code, peak RSS in KiB of the command or any of its children, wall s)."""
    res = log_path.with_suffix(".rusage.json")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", _MEASURE, str(res), str(log_path), *cmd], cwd=str(REPO), check=True)
    wall = time.perf_counter() - t0
    rc, rss = json.loads(res.read_text())
    return int(rc), int(rss), wall


def bench_rss(tmp: Path, ckpt: Path, args) -> Dict[str, Any]:
    from yolc_kd.data.synth import make_synthetic_dataset

    w, h = args.rss_size
    config = tmp / "rss_student.py"
    config.write_text(RSS_CONFIG.format(w=w, h=h, base=str(TINY_STUDENT), teacher=str(TINY_TEACHER)))
    rc, base_rss, _ = run_measured([sys.executable, "-c", "import yolc_kd.precompute.run, yolc_kd.cli"],
                                   tmp / "rss_import.log")
    runs = []
    for count in args.rss_images:
        data = make_synthetic_dataset(tmp / f"synth_rss_{count}", count, seed=0, size=(w, h), num_classes=4)
        out = tmp / f"rss_cache_{count}"
        cmd = [sys.executable, "-m", "yolc_kd", "precompute", "--config", str(config), "--ckpt", str(ckpt),
               "--ann", str(data / "annotations.json"), "--images", str(data), "--out", str(out),
               "--variants", str(args.rss_variants), "--batch-size", str(args.rss_batch),
               "--shard-size", str(args.rss_shard), "--workers", str(args.rss_workers), "--threads", str(args.threads),
               "--no-progress"]
        log_path = tmp / f"rss_{count}.log"
        rc, rss, wall = run_measured(cmd, log_path)
        text = log_path.read_text(errors="replace").strip().splitlines()
        runs.append(dict(images=count, views=count * args.rss_variants, exit_code=rc, peak_rss_mib=rss / 1024,
                         wall_s=wall, last_line=text[-1] if text else ""))
        if rc != 0:
            log(f"precompute with {count} images failed: {' | '.join(text[-5:])}")
        shutil.rmtree(out, ignore_errors=True)
    ok = [r["peak_rss_mib"] for r in runs if r["exit_code"] == 0]
    growth = max(ok) / min(ok) - 1 if len(ok) >= 2 else None
    above = [r - base_rss / 1024 for r in ok]  # what precompute adds to the imported libraries (more sensitive)
    for r in runs:
        r["peak_rss_above_import_mib"] = r["peak_rss_mib"] - base_rss / 1024
    growth_above = max(above) / min(above) - 1 if len(above) >= 2 and min(above) > 0 else None
    last_over_first = ok[-1] / ok[0] if len(ok) >= 2 else None
    return dict(input_wh=[w, h], variants=args.rss_variants, batch_size=args.rss_batch, shard_size=args.rss_shard,
                workers=args.rss_workers, threads=args.threads, measured="ru_maxrss via RUSAGE_CHILDREN of a small launcher "
                "process: the max over the CLI process and its DataLoader workers", import_only_peak_rss_mib=base_rss / 1024,
                runs=runs, rss_last_over_first=last_over_first, rss_growth_max_over_min=growth,
                rss_above_import_growth_max_over_min=growth_above, goal_growth=GOAL_RSS_GROWTH,
                goal_met=bool(growth is not None and growth <= GOAL_RSS_GROWTH))
