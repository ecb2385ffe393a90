"""Host-side costs of a training step that a GPU turns into waits: target building (models/targets.py), the KD
patch plan (crops.PatchPlan: cut, sizes and the confidence weights of kd.patch_cell_weights), precompute's
quantisation (cache/codec.py's numpy back-end on the host vs its torch back-end on the teacher's device) and
DataLoader workers restarted every epoch vs persistent ones.

Each part reports its median time and, for the tensor code, the number of calls that wait for the device when
the tensors live on a GPU (item, tolist, bool/float/int of a tensor, cpu, numpy, nonzero, unique, boolean-mask
indexing), counted with a TorchFunctionMode on whatever device runs it. On CUDA it also counts the syncs CUDA
itself reports (torch.cuda.set_sync_debug_mode).

    python benchmarks/bench_host_syncs.py [--device cpu|cuda] [--repeats 5] [--out results.json] [--tiny]

--tiny: small sizes, one repeat, no DataLoader part (a smoke run in seconds).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from _common import emit  # benchmarks/ is on sys.path when a script runs

REPO = Path(__file__).resolve().parents[1]
# Tensor methods that return host values or data-dependent shapes: each waits for the device on a GPU
WAITING = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy", "nonzero", "unique",
           "masked_select", "argwhere"}


class SyncCounter(TorchFunctionMode):
    """Counts the tensor calls in WAITING (and boolean-mask indexing) made inside it, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in ("__getitem__", "__setitem__") and len(args) > 1 and _bool_index(args[1]):
            name = f"{name}[bool mask]"
        if name in WAITING or name.endswith("[bool mask]"):
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.calls.values())


def _bool_index(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(torch.is_tensor(i) and i.dtype == torch.bool for i in items)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> Dict[str, Any]:
    """Median seconds of fn over repeats (after one warm-up), and its waiting calls counted on one run."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    with SyncCounter() as counter:
        fn()
    out: Dict[str, Any] = dict(median_s=statistics.median(times), waiting_calls=counter.total,
                               waiting_by_name=dict(sorted(counter.calls.items())))
    if device.type == "cuda":  # what CUDA itself reports as synchronising
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        out["cuda_reported_syncs"] = sum("synchroniz" in str(w.message) for w in caught)
    return out


def _boxes(b: int, n: int, h: int, w: int, classes: int, device: torch.device) -> Tuple[List[torch.Tensor], ...]:
    gen = torch.Generator().manual_seed(0)
    boxes, labels = [], []
    for _ in range(b):
        xy = torch.rand(n, 2, generator=gen) * torch.tensor([w - 40.0, h - 40.0])
        wh = 2 + torch.rand(n, 2, generator=gen) * 30
        boxes.append(torch.cat([xy, xy + wh], 1).to(device))
        labels.append(torch.randint(0, classes, (n,), generator=gen).to(device))
    return boxes, labels


def bench_targets(device: torch.device, hw: Tuple[int, int], objects: int, batch: int, repeats: int) -> Dict:
    from yolc_kd.models.targets import yolc_targets

    h, w = hw
    boxes, labels = _boxes(batch, objects // batch, h, w, 10, device)
    feat = (batch, 4, h // 4, w // 4)
    r = timed(lambda: yolc_targets(boxes, labels, feat, (h, w, 3), 10), device, repeats)
    return dict(objects=objects, batch=batch, input_hw=list(hw), **r)


def bench_patch_plan(device: torch.device, hw: Tuple[int, int], batch: int, repeats: int) -> Dict:
    from yolc_kd import crops
    from yolc_kd.kd import KDTargets, patch_cell_weights

    h, w = hw
    img = torch.randn(batch, 3, h, w, device=device)
    coords = [np.array([[40, 30, 200, 150], [300, 200, 180, 120], [w // 2, h // 2, 150, 150], [10, h - 130, 120, 120]])
              for _ in range(batch)]
    plan = crops.plan_kd_patches(coords, (h, w), 4, 16, 1.2, 1.5)
    boxes, scales, valid = (t.to(device) for t in (plan.boxes, plan.scales, plan.valid))
    canvas = crops.patch_canvas((h, w))
    targets = KDTargets(heatmap=torch.rand(batch, 10, h, w, device=device),
                        coarse=torch.zeros(batch, 4, h // 4, w // 4, device=device), patch_boxes=boxes,
                        patch_scales=scales, patch_valid=valid,
                        refine=torch.zeros(batch, 4, 4, canvas[0] // 4, canvas[1] // 4, device=device))

    def student_side():  # what the student's KD forward and loss do with stored targets
        crops.KDPatchPlan.from_targets(boxes, scales, valid, (h, w)).cut(img)
        patch_cell_weights(targets, (canvas[0] // 4, canvas[1] // 4))

    r = timed(student_side, device, repeats)
    return dict(batch=batch, patches=int(valid.sum()), input_hw=list(hw), **r)


def bench_quantise(device: torch.device, hw: Tuple[int, int], batch: int, repeats: int) -> Dict:
    from yolc_kd.cache.arrays import quantize_targets
    from yolc_kd.cache.codec import BOXES, HEATMAP
    from yolc_kd.kd import KDTargets

    h, w = hw
    gen = torch.Generator().manual_seed(0)
    canvas = (h // 2 // 32 * 32, w // 2 // 32 * 32)
    t = KDTargets(heatmap=torch.rand(batch, 10, h, w, generator=gen).pow(8),
                  coarse=torch.randn(batch, 4, h // 4, w // 4, generator=gen) * 20,
                  patch_boxes=torch.zeros(batch, 4, 4), patch_scales=torch.ones(batch, 4),
                  patch_valid=torch.ones(batch, 4, dtype=torch.bool),
                  refine=torch.randn(batch, 4, 4, canvas[0] // 4, canvas[1] // 4, generator=gen) * 20).to(device)

    def host_numpy():  # precompute before: float32 maps to the host, quantised there
        return (HEATMAP.encode(t.heatmap.float().cpu().numpy()), BOXES.encode(t.coarse.float().cpu().numpy()),
                BOXES.encode(t.refine.float().cpu().numpy()))

    def on_device():  # precompute now: quantised where the teacher ran, uint8 / int16 to the host
        q = quantize_targets(t)
        return q.heatmap.cpu().numpy(), q.coarse.cpu().numpy(), q.refine.cpu().numpy()

    a, b = host_numpy(), on_device()
    same = all(np.array_equal(x, y) for x, y in zip(a, b))
    return dict(batch=batch, input_hw=list(hw), bit_identical=same,
                host_numpy=timed(host_numpy, device, repeats), on_device=timed(on_device, device, repeats))


def bench_workers(epochs: int, workers: int) -> Dict:
    """Seconds to the first batch of each epoch and per epoch, DataLoader workers restarted vs persistent."""
    from torch.utils.data import DataLoader, Dataset

    class Slow(Dataset):  # a dataset whose workers cost something to start (a model-sized attribute)
        def __init__(self):
            self.weights = np.zeros(20_000_000, np.uint8)

        def __len__(self):
            return 16

        def __getitem__(self, i):
            return torch.full((3, 64, 64), float(i))

    out = {}
    for persistent in (False, True):
        loader = DataLoader(Slow(), batch_size=4, num_workers=workers, persistent_workers=persistent)
        first, total = [], []
        for _ in range(epochs):
            t = time.perf_counter()
            for k, _ in enumerate(loader):
                if k == 0:
                    first.append(time.perf_counter() - t)
            total.append(time.perf_counter() - t)
        out["persistent" if persistent else "restarted"] = dict(first_batch_s=first, epoch_s=total)
        del loader
    return dict(workers=workers, epochs=epochs, **out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--objects", type=int, default=500)
    parser.add_argument("--tiny", action="store_true", help="small sizes, one repeat, no DataLoader part")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    hw = (160, 256) if args.tiny else (640, 1024)
    repeats = 1 if args.tiny else args.repeats
    results: Dict[str, Any] = dict(machine=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                                   device=str(device), torch=torch.__version__,
                                   gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    results["targets"] = bench_targets(device, hw, 50 if args.tiny else args.objects, 4, repeats)
    results["kd_patch_plan"] = bench_patch_plan(device, hw, 4, repeats)
    results["quantise"] = bench_quantise(device, hw, 2 if args.tiny else 4, repeats)
    if not args.tiny:
        results["dataloader_workers"] = bench_workers(3, 2)
    emit(results, args.out)


if __name__ == "__main__":
    main()
