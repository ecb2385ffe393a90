"""Train-step time: supervised-only vs offline KD (targets as the cache gives them) vs online KD (live
teacher), measured in one run as ratios. Tiny pair on CPU; HRNet-w48 -> w18 at 1024x640 with AMP on CUDA.

    python benchmarks/bench_train_step.py [--out results.json] [--iters N] [--real-scale]
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch
from _common import emit  # benchmarks/ is on sys.path when a script runs

REPO = Path(__file__).resolve().parents[1]


def _metas(b, h, w):
    return [dict(batch_input_shape=(h, w), pad_shape=(h, w, 3), img_shape=(h, w, 3),
                 scale_factor=np.ones(4, np.float32), border=np.zeros(4, np.float32)) for _ in range(b)]


def _boxes(b, h, w, n, num_classes, gen):
    out_b, out_l = [], []
    for _ in range(b):
        xy = torch.rand(n, 2, generator=gen) * torch.tensor([w - 40.0, h - 40.0])
        wh = 4 + torch.rand(n, 2, generator=gen) * 28
        out_b.append(torch.cat([xy, xy + wh], 1))
        out_l.append(torch.randint(0, num_classes, (n,), generator=gen))
    return out_b, out_l


def measure(student_cfg: str, teacher_cfg: str, size, batch: int, iters: int, device: str, amp: bool) -> dict:
    from yolc_kd.config import load_config
    from yolc_kd.kd import KDLoss, student_losses
    from yolc_kd.models import build_detector
    from yolc_kd.teacher import freeze, teacher_targets
    from yolc_kd.train.teacher_source import LiveTeacherSource

    s_cfg = load_config(REPO / student_cfg, with_defaults=True)
    t_cfg = load_config(REPO / teacher_cfg)
    dcfg = s_cfg["distill"]
    teacher = freeze(build_detector(t_cfg["model"]).to(device))
    h, w = size
    nc = s_cfg["model"]["bbox_head"]["num_classes"]
    gen = torch.Generator().manual_seed(0)
    img = torch.randn(batch, 3, h, w, generator=gen).to(device)
    metas = _metas(batch, h, w)
    gt_b, gt_l = _boxes(batch, h, w, 30, nc, gen)
    gt_b, gt_l = [b.to(device) for b in gt_b], [l.to(device) for l in gt_l]
    with torch.no_grad(), torch.autocast(device.split(":")[0], enabled=amp):
        cached = teacher_targets(teacher, img, metas, dcfg)  # what the cache source hands the trainer

    def step_fn(mode):
        torch.manual_seed(0)
        model = build_detector(s_cfg["model"]).to(device).train()
        live = LiveTeacherSource(teacher, dcfg)
        batch = dict(img=img, img_metas=metas)
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        scaler = torch.amp.GradScaler("cuda", enabled=amp)

        def step():
            with torch.autocast(device.split(":")[0], enabled=amp):
                targets = dict(supervised=None, offline=cached)[mode] if mode != "online" else live.targets(batch)
                losses = student_losses(model, img, metas, gt_b, gt_l, targets, KDLoss(dcfg))
            opt.zero_grad()
            scaler.scale(sum(losses.values())).backward()
            scaler.step(opt)
            scaler.update()
        return step

    steps = {m: step_fn(m) for m in ("supervised", "offline", "online")}
    for fn in steps.values():  # warm-up
        fn()
    times = {m: [] for m in steps}
    for _ in range(iters):  # interleaved so that machine noise hits all modes alike
        for m, fn in steps.items():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times[m].append(time.perf_counter() - t)
    med = {m: float(np.median(v)) for m, v in times.items()}
    return dict(student=student_cfg, teacher=teacher_cfg, input_hw=list(size), batch=batch, iters=iters,
                device=device, amp=amp, sec_per_step=med,
                offline_over_supervised=med["offline"] / med["supervised"],
                online_over_offline=med["online"] / med["offline"],
                patches_in_batch=int(cached.patch_valid.sum()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--real-scale", action="store_true", help="w48 -> w18 at 1024x640 (needs CUDA)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = dict(machine=platform.processor() or platform.machine(), threads=torch.get_num_threads(), runs=[])
    results["runs"].append(measure("configs/tiny_student_synth.py", "configs/tiny_teacher_synth.py", (256, 384), 8,
                                   args.iters, "cpu", False))
    if args.real_scale and torch.cuda.is_available():
        results["gpu"] = torch.cuda.get_device_name(0)
        results["runs"].append(measure("configs/yolc_hrnet_w18_visdrone_kd.py", "configs/yolc_hrnet_w48_visdrone.py",
                                       (640, 1024), 4, args.iters, "cuda", True))
    emit(results, args.out)


if __name__ == "__main__":
    main()
