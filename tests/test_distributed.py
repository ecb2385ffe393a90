"""torchrun on a GPU host (CUDA visible to every process): `--device cpu` trains over gloo, a batch that one rank
has to skip is skipped by every rank, a non-finite loss on one rank stops every rank with one line, and rank 0's
evaluation does not time the others out (they wait on the slow gloo group)."""
import json
import subprocess
import sys

from conftest import REPO, subprocess_env, write_config

# torchrun starts each process with this file: torch as on a GPU host, then the CLI. RANK 1 gets an empty first
# batch (skip) or a NaN loss at its second step (nan), as a damaged sample or a diverging batch would give it.
WRAPPER = '''
import os, sys
import torch
torch.cuda.is_available = lambda: True
torch.accelerator.current_accelerator = lambda *a, **k: None  # the optimizers' CUDA-graph check: no driver here
mode, rank = os.environ["YOLC_KD_TEST_FAULT"], int(os.environ["RANK"])
if mode == "skip" and rank == 1:
    from yolc_kd.train import data
    calls, getitem = [], data.TrainSamples.__getitem__
    def first_bad(self, item):
        calls.append(item)
        return dict(bad="image id ? (test): damaged") if len(calls) == 1 else getitem(self, item)
    data.TrainSamples.__getitem__ = first_bad
if mode == "nan" and rank == 1:
    from yolc_kd.models import detector
    steps, forward_train = [], detector.YOLC.forward_train
    def nan_at_second(self, *a, **k):
        losses, outputs = forward_train(self, *a, **k)
        steps.append(1)
        if len(steps) == 2:
            losses = {n: v * float("nan") for n, v in losses.items()}
        return losses, outputs
    detector.YOLC.forward_train = nan_at_second
from yolc_kd.cli import main
sys.exit(main(sys.argv[1:]))
'''


def _torchrun(tmp_path, tiny_data, fault, *extra):
    wrapper = tmp_path / "gpu_host.py"
    wrapper.write_text(WRAPPER)
    ann, images = tiny_data
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(wrapper),
           "train", "--config", write_config(tmp_path / "cfg.py"), "--ann", ann, "--images", images,
           "--device", "cpu", "--batch-size", "1", "--log-interval", "1", "--no-progress", "--workers", "0", *extra]
    env = dict(subprocess_env(), OMP_NUM_THREADS="1", YOLC_KD_TEST_FAULT=fault)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=str(REPO))
    return proc, proc.stdout + proc.stderr


def test_torchrun_on_a_gpu_host_with_device_cpu_skips_together_and_evaluates(tmp_path, tiny_data):
    work = tmp_path / "w"
    ann, images = tiny_data
    proc, out = _torchrun(tmp_path, tiny_data, "skip", "--work-dir", str(work), "--max-iters", "4",
                             "--val-ann", ann, "--val-images", images)
    assert proc.returncode == 0, out[-3000:]
    assert "x 2 process(es)" in out  # one process group of two ranks, over gloo although CUDA is visible
    assert "warning: skipped damaged sample image id ? (test): damaged" in out  # rank 1
    assert "skipped: another rank's batch had no usable sample" in out  # rank 0 skipped the same step
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["iter"] for r in steps] == [1, 2, 3, 4]  # 3 batches per epoch per rank, the first one skipped
    evals = [r for r in records if "eval" in r]
    # rank 0 evaluates after each epoch (3 iterations) and at the end; rank 1 waits for it each time
    assert [r["iter"] for r in evals] == [3, 4] and all("AP" in r["eval"] for r in evals)
    assert (work / "latest.pth").exists()


def test_torchrun_a_non_finite_loss_on_one_rank_stops_every_rank(tmp_path, tiny_data):
    # a rank left in DDP's all-reduce would hang until the subprocess timeout fails the test
    proc, out = _torchrun(tmp_path, tiny_data, "nan", "--work-dir", str(tmp_path / "w"), "--max-iters", "4")
    assert proc.returncode != 0
    assert "error: loss became nan at iteration 1" in out, out[-3000:]  # rank 1, its second step
    assert "error: loss became non-finite on another rank" in out and "at iteration 1" in out  # rank 0
