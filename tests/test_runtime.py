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
