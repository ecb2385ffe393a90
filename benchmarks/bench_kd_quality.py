"""KD quality: held-out AP of the teacher, the tiny student without KD, with offline KD (from the cache) and with
online KD (live teacher), all trained for the same iterations on the demo's synthetic data.

    python benchmarks/bench_kd_quality.py [--out results.json] [--workdir DIR] [--iters 120]

The first three rows are `yolc-kd demo` (reused when --workdir already holds a finished demo); the online
student is trained here with `yolc-kd train --online`.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import emit  # benchmarks/ is on sys.path when a script runs


def main() -> None:
    from yolc_kd.demo import ASSET_TEACHER, CONFIGS, evaluate_checkpoint, format_table, run_demo, run_step

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=None)
    p.add_argument("--workdir", default=None, help="demo folder (default: a temp dir)")
    p.add_argument("--iters", type=int, default=120)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        t0 = time.perf_counter()
        table = run_demo(work, iters=args.iters)
        demo_s = time.perf_counter() - t0
        student, online = CONFIGS / "tiny_student_synth.py", work / "student_online"
        train = work / "data" / "train"
        t0 = time.perf_counter()
        if not (online / f"iter_{args.iters}.pth").exists():
            run_step(["train", "--config", str(student), "--ann", str(train / "annotations.json"), "--images",
                      str(train), "--work-dir", str(online), "--max-iters", str(args.iters), "--online",
                      "--teacher-ckpt", str(ASSET_TEACHER), "--log-interval", "10"])
        online_s = time.perf_counter() - t0
        table["student (online KD)"] = evaluate_checkpoint("student_online", student, online / f"iter_{args.iters}.pth",
                                                           work / "data" / "val", work)
        print(format_table(table))
        emit(dict(iters=args.iters, table=table, demo_wall_s=demo_s, online_train_and_eval_s=online_s), args.out)


if __name__ == "__main__":
    main()
