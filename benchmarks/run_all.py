"""Run every benchmark once and collect their JSON into one file (numbers for BENCHMARKS.md).

    python benchmarks/run_all.py [--out benchmarks/results.json] [--quick] [--no-kd]

KD quality (the demo plus an online-KD student) takes about 14 minutes on 2 CPU cores; --no-kd leaves it out.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _run(script: str, *args: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        out = fh.name
    print(f"running {script} {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, str(HERE / script), *args, "--out", out], check=True)
    return json.loads(Path(out).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(HERE / "results.json"))
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--no-kd", action="store_true", help="skip the KD-quality runs (students trained)")
    args = parser.parse_args()
    from yolc_kd.data.synth import make_synthetic_dataset
    from yolc_kd.demo import CLASSES, SIZE, VAL

    results = dict(machine=dict(platform=platform.platform(), processor=platform.processor(),
                                python=platform.python_version()))
    with tempfile.TemporaryDirectory() as tmp:
        val = make_synthetic_dataset(Path(tmp) / "val", VAL["num_images"], VAL["seed"], size=SIZE,
                                     num_classes=CLASSES)
        results["infer"] = _run("bench_infer.py", "--val", str(val))
    results["train_step"] = _run("bench_train_step.py", "--iters", "3" if args.quick else "5")
    results["cache"] = _run("bench_cache.py")
    results["synth"] = _run("bench_synth.py")
    if not args.no_kd:
        results["kd_quality"] = _run("bench_kd_quality.py")
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
