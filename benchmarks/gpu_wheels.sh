#!/usr/bin/env bash
# Wheels of what the lent GPU machine lacks (its image has torch, torchvision, numpy, pillow, tqdm, pyyaml,
# packaging and typing_extensions, and no package index), for CPython 3.11-3.13 on linux x86_64, into
# <repo>/.gpu_wheels (git-ignored). benchmarks/run_gpu.py installs the ones matching its Python from there.
# The device tool's call carries the folder: run(..., carry=[".gpu_wheels"]).
#
#     bash benchmarks/gpu_wheels.sh [PYTHON_VERSION ...]      # default: 3.11 3.12 3.13
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.gpu_wheels
PINS=(zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 pycocotools==2.0.11)
VERSIONS=("${@:-3.11 3.12 3.13}")
mkdir -p "$DEST"
for py in ${VERSIONS[@]}; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${PINS[@]}"
done
ls -1 "$DEST"
du -sh "$DEST"
