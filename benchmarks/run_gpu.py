"""Real-scale GPU check (HRNet-w48 teacher -> HRNet-w18 student, 1024x640, AMP) in a few minutes:
train-step ratios (supervised / offline KD / online KD), teacher forward + kd_targets throughput and fused
inference time, then bench_real_scale.py at full scale on CUDA with AMP (precompute per view, step time and
torch.cuda.max_memory_allocated per mode, the online / offline peak-memory ratio, the memory breakdown, full vs
fused inference). Exits 0 with a message when no CUDA device is present.

    python benchmarks/run_gpu.py [--out gpu_results.json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _common import emit  # benchmarks/ is on sys.path when a script runs

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def teacher_throughput(batch: int = 4, iters: int = 5) -> dict:
    from yolc_kd.config import load_config
    from yolc_kd.models import build_detector
    from yolc_kd.teacher import teacher_targets

    cfg = load_config(REPO / "configs" / "yolc_hrnet_w18_visdrone_kd.py", with_defaults=True)
    teacher = build_detector(load_config(REPO / "configs" / "yolc_hrnet_w48_visdrone.py")["model"]).cuda().eval()
    img = torch.randn(batch, 3, 640, 1024, device="cuda")
    metas = [dict(batch_input_shape=(640, 1024), pad_shape=(640, 1024, 3), img_shape=(640, 1024, 3),
                  scale_factor=np.ones(4, np.float32), border=np.zeros(4, np.float32)) for _ in range(batch)]
    out = {}
    for name, fn in (("forward_only", lambda: teacher.bbox_head(teacher.extract_feat(img))),
                     ("kd_targets", lambda: teacher_targets(teacher, img, metas, cfg["distill_cfg"])),
                     ("fused_inference", lambda: teacher.simple_test(img, metas, fusion="nms"))):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
            fn()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(iters):
                fn()
            torch.cuda.synchronize()
        out[f"{name}_images_per_s"] = batch * iters / (time.perf_counter() - t)
    out["kd_targets_over_forward"] = out["kd_targets_images_per_s"] / out["forward_only_images_per_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: GPU benchmarks skipped")
        return
    results = dict(gpu=torch.cuda.get_device_name(0), teacher=teacher_throughput())
    step_json = HERE / "gpu_train_step.json"
    subprocess.run([sys.executable, str(HERE / "bench_train_step.py"), "--real-scale", "--iters", "5",
                    "--out", str(step_json)], check=True)
    results["train_step"] = json.loads(step_json.read_text())
    real_json = HERE / "gpu_real_scale.json"
    subprocess.run([sys.executable, str(HERE / "bench_real_scale.py"), "--device", "cuda", "--amp", "--batch", "4",
                    "--steps", "5", "--infer-images", "10", "--precompute-workers", "4", "--out", str(real_json)],
                   check=True)
    results["real_scale"] = json.loads(real_json.read_text())
    emit(results, args.out)


if __name__ == "__main__":
    main()
