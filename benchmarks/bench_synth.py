"""Synthetic data generation speed (moved out of the tests: timing belongs in a benchmark).

    python benchmarks/bench_synth.py [--images 20] [--out synth.json]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import emit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from yolc_kd.data.synth import make_synthetic_dataset
    from yolc_kd.demo import CLASSES, SIZE

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        make_synthetic_dataset(Path(tmp) / "d", args.images, seed=0, size=SIZE, num_classes=CLASSES, progress=False)
        sec = time.perf_counter() - start
    emit(dict(images=args.images, size=list(SIZE), sec_per_image=round(sec / args.images, 4)), args.out)


if __name__ == "__main__":
    main()
