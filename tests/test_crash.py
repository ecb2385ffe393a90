"""Crash safety of training: kill -9 after the first checkpoint, then `--resume`, ends with the weights of an
uninterrupted run, and a reader polling latest.pth during the resumed run never sees a torn file; a crash inside
a checkpoint write leaves latest.pth on the previous complete file.

kill -9 during `precompute` (and the bit-identical rerun) is covered by
tests/test_precompute.py::test_kill_9_then_rerun_is_bit_identical and is not repeated here."""
import io
import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from conftest import subprocess_env
from conftest import write_config
from yolc_kd.cli import main
from yolc_kd.data.synth import make_synthetic_dataset

MAX_ITERS = 6  # 6 images at batch 2: 3 iterations per epoch, so iteration 2 is mid-epoch; checkpoints every 2


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    data = make_synthetic_dataset(root / "data", 6, seed=3, size=(128, 96), num_classes=3)
    return SimpleNamespace(root=root, ann=data / "annotations.json", images=data,
                           config=write_config(root / "cfg.py"))  # checkpoint_config interval 2, Adam


def train_argv(job, work, *extra):
    return ["train", "--config", str(job.config), "--ann", str(job.ann), "--images", str(job.images),
            "--work-dir", str(work), "--max-iters", str(MAX_ITERS), "--no-progress", "--workers", "0", *extra]


def one_thread_env():
    return dict(subprocess_env(), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def in_process(argv):
    """Run the CLI in this process with one CPU thread (as the subprocesses: same numerics)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(argv)
    finally:
        torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def reference(job):
    work = job.root / "uninterrupted"
    assert in_process(train_argv(job, work)) == 0
    ckpt = torch.load(work / "latest.pth", weights_only=True)
    assert ckpt["meta"]["iter"] == MAX_ITERS
    return ckpt["state_dict"]


def assert_same_weights(state_dict, reference):
    assert state_dict.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(state_dict[key], value, rtol=1e-5, atol=1e-6, msg=key)


def load_latest(work):
    """latest.pth must always be a link to a complete checkpoint: torch.load reads it whole."""
    latest = work / "latest.pth"
    assert latest.is_symlink() and latest.resolve().name.startswith("iter_")
    return torch.load(latest, weights_only=True)


def test_kill_9_after_first_checkpoint_then_resume_equals_uninterrupted(job, reference, tmp_path):
    work = tmp_path / "killed"
    cmd = [sys.executable, "-m", "yolc_kd", *train_argv(job, work)]
    log = tmp_path / "killed.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, env=one_thread_env(), stdout=fh, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 240
            # iter_2.pth is renamed into place complete, then latest.pth is switched to it: wait for both
            while not (work / "latest.pth").exists() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.005)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"finished before the kill: {log.read_text()[-1500:]}"
    killed_at = load_latest(work)["meta"]["iter"]
    assert killed_at in (2, 4), killed_at  # a checkpoint iteration, never the last
    assert not (work / f"iter_{MAX_ITERS}.pth").exists()

    # the resumed run, with a reader polling latest.pth meanwhile: it must never load a torn file
    seen, reads = set(), 0
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd + ["--resume"], env=one_thread_env(), stdout=fh, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 240
            while proc.poll() is None and time.time() < deadline:
                seen.add(load_latest(work)["meta"]["iter"])  # raises on a torn or half-written file
                reads += 1
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert proc.returncode == 0, log.read_text()[-2000:]
    assert f"trained to iteration {MAX_ITERS}" in log.read_text()
    assert reads > 0 and seen <= {2, 4, 6}, (reads, seen)
    final = load_latest(work)
    assert final["meta"]["iter"] == MAX_ITERS
    assert_same_weights(final["state_dict"], reference)
    iters = [json.loads(line)["iter"] for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert iters[-(MAX_ITERS - killed_at):] == list(range(killed_at + 1, MAX_ITERS + 1))


def test_crash_inside_a_checkpoint_write_keeps_the_previous_checkpoint(job, reference, tmp_path, monkeypatch):
    """torch.save dies half-way through iter_4's file: latest.pth still names the complete iter_2.pth, the torn
    bytes went only to a temporary file, which is removed, and --resume from there ends with the uninterrupted
    weights."""
    work = tmp_path / "torn"
    real_save = torch.save
    calls, torn = [], []

    def dying_save(obj, f, *args, **kwargs):
        calls.append(f.name)  # save_checkpoint hands torch its open temporary file
        if len(calls) == 2:  # the iteration-4 checkpoint
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            torn.append(os.path.getsize(f.name))
            raise RuntimeError("simulated crash while writing a checkpoint")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(RuntimeError, match="simulated crash"):
        in_process(train_argv(job, work))
    monkeypatch.setattr(torch, "save", real_save)
    assert ".tmp" in os.path.basename(calls[1]) and not (work / "iter_4.pth").exists()
    assert torn[0] > 0 and not os.path.exists(calls[1])  # the torn temporary file was written, then removed
    ckpt = load_latest(work)
    assert ckpt["meta"]["iter"] == 2 and (work / "latest.pth").resolve().name == "iter_2.pth"

    assert in_process(train_argv(job, work, "--resume")) == 0
    final = load_latest(work)
    assert final["meta"]["iter"] == MAX_ITERS
    assert_same_weights(final["state_dict"], reference)

