"""One device resolver for every command: auto picks CUDA when present (the CPU here); bad names are one line."""
import pytest
import torch

from conftest import write_config
from yolc_kd.cli import main
from yolc_kd.errors import UserError
from yolc_kd.runtime import init_distributed, mixed_precision, resolve_device


def test_auto_is_cuda_when_available_else_cpu():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("CPU") == torch.device("cpu")


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "tpu", ""])
def test_unknown_device_is_one_line(name):
    with pytest.raises(UserError, match="--device must be auto, cpu, cuda or cuda:N"):
        resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line():
    with pytest.raises(UserError, match="CUDA is not available"):
        resolve_device("cuda:0")


def test_single_process_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    env = init_distributed()
    assert (env.rank, env.world, env.initialised_here) == (0, 1, False)
    env.barrier()  # a no-op for one process
    env.close()


@pytest.mark.parametrize("command", ["train", "precompute", "infer", "verify"])
def test_every_command_defaults_to_auto(command):
    from yolc_kd.cli import build_parser

    required = dict(train=["--config", "c", "--work-dir", "w"], precompute=["--config", "c", "--out", "o"],
                    infer=["--config", "c", "--ckpt", "k", "--images", "i", "--out", "o"], verify=["cache"])
    args = build_parser().parse_args([command, *required[command]])
    assert args.device == "auto"


def test_train_batch_size_and_bad_counts(tmp_path, capsys):
    from yolc_kd.data.synth import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "d", 3, seed=0, size=(128, 96), num_classes=3)
    cfg = write_config(tmp_path / "cfg.py")
    base = ["train", "--config", cfg, "--ann", str(data / "annotations.json"), "--images", str(data),
            "--no-progress", "--workers", "0"]
    assert main([*base, "--work-dir", str(tmp_path / "w"), "--max-iters", "1", "--batch-size", "3"]) == 0
    assert "trained to iteration 1" in capsys.readouterr().out
    for bad, msg in ((["--max-iters", "-3"], "--max-iters must be at least 1"),
                     (["--batch-size", "0"], "--batch-size must be at least 1"),
                     (["--workers", "-1"], "--workers must be at least 0"),
                     (["--log-interval", "0"], "--log-interval must be at least 1")):
        assert main([*base, "--work-dir", str(tmp_path / "w2"), *bad]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err


def test_amp_is_autocast_float16_on_cuda_bfloat16_on_cpu():
    for device in ("cpu", "cuda"):
        with mixed_precision(device, False):
            assert not torch.is_autocast_enabled("cuda") and not torch.is_autocast_enabled("cpu")
    with mixed_precision("cpu", True):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with mixed_precision("cpu", True, "float16"):
        assert torch.get_autocast_dtype("cpu") == torch.float16
    if torch.cuda.is_available():
        ctx = mixed_precision(torch.device("cuda", 0), True)
        assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.float16 and ctx.device == "cuda"
    else:  # torch would run it with autocast off: one UserError instead
        with pytest.raises(UserError, match="torch cannot autocast"):
            mixed_precision("cuda", True)


# ----------------------------------------------------------------------------- a GPU host, simulated
@pytest.fixture
def gpu_host(monkeypatch):
    """torch as on a host with `n` CUDA devices (set_device records instead of switching); returns a setter.
    The optimizers' CUDA-graph check asks torch.accelerator, which would initialise the driver: it sees none."""
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(torch.device(d)))

    def with_devices(n: int):
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        return current
    with_devices(2)
    return with_devices


def _torchrun(monkeypatch, rank: int, world: int = 2):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))


def test_the_suite_runs_on_the_cpu_even_where_cuda_is_visible(gpu_host, monkeypatch, tmp_path, capsys):
    import os

    from yolc_kd.cli import build_parser
    from yolc_kd.data.synth import make_synthetic_dataset

    assert os.environ["YOLC_KD_DEVICE"] == "cpu"  # conftest's pin, inherited by CLI subprocesses
    args = build_parser().parse_args(["train", "--config", "c", "--work-dir", "w"])
    assert resolve_device(args.device) == torch.device("cpu")
    monkeypatch.delenv("YOLC_KD_DEVICE")
    assert resolve_device("auto") == torch.device("cuda")  # without the pin auto means CUDA here
    monkeypatch.setenv("YOLC_KD_DEVICE", "cpu")
    data = make_synthetic_dataset(tmp_path / "d", 2, seed=0, size=(128, 96), num_classes=3)
    assert main(["train", "--config", write_config(tmp_path / "cfg.py"), "--ann", str(data / "annotations.json"),
                 "--images", str(data), "--work-dir", str(tmp_path / "w"), "--max-iters", "1", "--no-progress"]) == 0
    assert "trained to iteration 1" in capsys.readouterr().out


def test_a_bad_device_in_the_environment_is_one_line(monkeypatch):
    monkeypatch.setenv("YOLC_KD_DEVICE", "tpu")
    with pytest.raises(UserError, match=r"got 'auto \(\$YOLC_KD_DEVICE=tpu\)'"):
        resolve_device("auto")
    assert resolve_device("cpu") == torch.device("cpu")  # an explicit device does not read it


def test_torchrun_ranks_take_their_local_rank_gpu(gpu_host, monkeypatch):
    monkeypatch.delenv("YOLC_KD_DEVICE")
    _torchrun(monkeypatch, 1)
    current = gpu_host(2)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert current[-1] == torch.device("cuda", 1)  # made current for the process
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match=r"--device cuda:0 contradicts torchrun's LOCAL_RANK 1: .* --device cuda"):
        resolve_device("cuda:0")
    gpu_host(1)  # two processes on a one-GPU host
    with pytest.raises(UserError, match=r"LOCAL_RANK 1 needs cuda:1, but 1 CUDA device\(s\) are visible"):
        resolve_device("cuda")
    _torchrun(monkeypatch, 0, world=1)  # torchrun with one process: any visible index is fine
    gpu_host(4)
    assert resolve_device("cuda:3") == torch.device("cuda", 3)
    assert resolve_device("cuda") == torch.device("cuda", 0)


def test_the_process_group_backend_follows_the_device(gpu_host, monkeypatch):
    import torch.distributed as dist

    from yolc_kd.runtime import backend_for

    assert (backend_for("cpu"), backend_for(torch.device("cuda", 1)), backend_for(None)) == ("gloo", "nccl", "gloo")
    made = []
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(made))
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: made.append(backend))
    monkeypatch.setattr(dist, "get_backend", lambda *a: made[-1])
    monkeypatch.setattr(dist, "new_group", lambda **kw: ("slow", kw["backend"], kw["timeout"]))
    _torchrun(monkeypatch, 1)
    env = init_distributed(torch.device("cpu"))  # CUDA is visible, the device is the CPU: gloo
    assert made == ["gloo"] and env.device == torch.device("cpu") and env.slow_group[1] == "gloo"
    assert (env.rank, env.world, env.initialised_here) == (1, 2, True)
    made.clear()
    env = init_distributed(torch.device("cuda", 1))
    assert made == ["nccl"] and env.device == torch.device("cuda", 1)
    assert env.slow_group[2].total_seconds() >= 3600  # rank 0's evaluation cannot time the others out
    made.clear()
    init_distributed(torch.device("cuda", 1), backend="gloo")  # precompute: barriers only
    assert made == ["gloo"]


def test_one_process_agrees_with_itself():
    from yolc_kd.runtime import DistEnv

    env = DistEnv()
    assert env.all_true(True) and not env.all_true(torch.tensor(False)) and env.all_true(torch.isfinite(torch.ones(())))
    env.wait_for_rank0()  # a no-op for one process


def test_numerics_settings_and_their_restoration():
    from yolc_kd.runtime import numerics

    cudnn = torch.backends.cudnn
    before = (torch.get_num_threads(), cudnn.benchmark, cudnn.deterministic, torch.backends.cuda.matmul.allow_tf32,
              torch.are_deterministic_algorithms_enabled())
    with numerics("cpu", 1):
        assert torch.get_num_threads() == 1 and not cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
    with numerics("cuda", 1):  # the fastest cuDNN algorithms; the CPU thread count is not CUDA's business
        assert cudnn.benchmark and torch.get_num_threads() == before[0]
    with numerics("cuda:0", None, deterministic=True):
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert cudnn.deterministic and not cudnn.benchmark and not cudnn.allow_tf32
        assert not torch.backends.cuda.matmul.allow_tf32
        import os
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert (torch.get_num_threads(), cudnn.benchmark, cudnn.deterministic, torch.backends.cuda.matmul.allow_tf32,
            torch.are_deterministic_algorithms_enabled()) == before


def test_train_and_precompute_take_deterministic():
    from yolc_kd.cli import build_parser

    for argv in (["train", "--config", "c", "--work-dir", "w"], ["precompute", "--config", "c", "--out", "o"]):
        parser = build_parser()
        assert not parser.parse_args(argv).deterministic and parser.parse_args(argv + ["--deterministic"]).deterministic


def test_deterministic_on_the_cpu_changes_no_cache_byte(tmp_path):
    """On the CPU results repeat for a fixed thread count anyway: --deterministic gives the same cache, and the
    manifest says how each was made."""
    from conftest import assert_same_arrays, cli_args, make_setup
    from yolc_kd.cache.reader import CacheReader

    s = make_setup(tmp_path, n_images=2)
    assert main(cli_args(s, tmp_path / "plain")) == 0
    assert main(cli_args(s, tmp_path / "det", "--deterministic")) == 0
    assert_same_arrays(tmp_path / "plain", tmp_path / "det")
    runs = [CacheReader(tmp_path / name).manifest["run"] for name in ("plain", "det")]
    assert [r["deterministic"] for r in runs] == [False, True]
    assert runs[0]["device_name"] == "cpu" and runs[0]["torch"] == torch.__version__
