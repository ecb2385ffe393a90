"""benchmarks/run_gpu.py as a dry run on the CPU: each stage's entry lands in run_gpu.json as the stages go, the
CUDA-only stages are skipped with a note, and a stage that fails is recorded while the next one runs."""
import json
import subprocess
import sys
import time

from conftest import REPO, subprocess_env


def test_dry_run_writes_each_stage(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "benchmarks" / "run_gpu.py"), "--dry-run", "--out", str(out),
           "--stages", "env,cuda_tests,host_syncs,real_scale"]
    proc = subprocess.run(cmd, env=dict(subprocess_env(), OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.startswith("run_gpu: Python ")  # the GPU machine's Python comes first
    r = json.loads((out / "run_gpu.json").read_text())
    assert r["mode"] == "dry" and r["device"] == "cpu" and r["dependencies"]["missing"] == []
    stages = r["stages"]
    assert list(stages) == ["env", "cuda_tests", "host_syncs", "real_scale"]
    assert stages["env"]["status"] == "ok" and stages["env"]["result"]["python"]
    for gpu_only in ("cuda_tests", "real_scale"):
        assert stages[gpu_only]["status"] == "skipped" and "no CUDA device" in stages[gpu_only]["note"]
    syncs = stages["host_syncs"]["result"]
    assert syncs["targets"]["waiting_calls"] <= 2 and syncs["quantise"]["bit_identical"]
    log = (out / "run_gpu.log").read_text()
    assert log.count("stage host_syncs") == 2 and "done in" in log


def test_a_failing_stage_is_recorded_and_the_next_runs(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import run_gpu
    finally:
        sys.path.remove(str(REPO / "benchmarks"))

    def broken(run):
        raise RuntimeError("no such thing")

    monkeypatch.setattr(run_gpu, "STAGES", [("first", broken, False, (1, 1)), ("env", run_gpu.stage_env, False, (1, 1))])
    run = run_gpu.Run(tmp_path, "dry", "cpu", 60.0, time.perf_counter())
    run_gpu.run_stages(run, None)
    saved = json.loads((tmp_path / "run_gpu.json").read_text())["stages"]
    assert saved["first"]["status"] == "failed" and saved["first"]["error"] == "RuntimeError: no such thing"
    assert saved["env"]["status"] == "ok"
