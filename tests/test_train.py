"""`yolc-kd train`: supervised training runs, logs, checkpoints in mmdet layout and resumes exactly."""
import json

import pytest
import torch

from conftest import train_cli as _train, write_config
from yolc_kd.cli import main


def test_train_logs_checkpoints_and_resumes_exactly(tmp_path, tiny_data):
    ann, images = tiny_data
    cfg = write_config(tmp_path / "cfg.py")
    assert _train(cfg, ann, images, tmp_path / "full") == 0
    lines = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [l["iter"] for l in lines] == [1, 2, 3, 4]
    assert {"loss", "lr", "loss_center_heatmap", "loss_xywh_refine_l1"} <= set(lines[0])
    ckpt = torch.load(tmp_path / "full" / "latest.pth", weights_only=True)
    assert set(ckpt) >= {"state_dict", "meta", "optimizer"} and ckpt["meta"]["iter"] == 4
    assert (tmp_path / "full" / "iter_2.pth").exists()
    # interrupted after 2 iterations, then resumed: same weights as the uninterrupted run
    assert _train(cfg, ann, images, tmp_path / "part", "--max-iters", "2") == 0
    assert _train(cfg, ann, images, tmp_path / "part", "--resume") == 0
    resumed = torch.load(tmp_path / "part" / "latest.pth", weights_only=True)["state_dict"]
    for key, value in ckpt["state_dict"].items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_train_user_errors(tmp_path, tiny_data, capsys):
    ann, images = tiny_data
    cfg = write_config(tmp_path / "cfg.py")
    assert _train(cfg, ann, images, tmp_path / "w", "--resume") == 1
    assert "latest.pth" in capsys.readouterr().err
    assert _train(cfg, ann, images, tmp_path / "w", "--cache", "x", "--online") == 1
    assert "exclude" in capsys.readouterr().err
    assert main(["train", "--config", cfg, "--work-dir", str(tmp_path / "w"), "--no-progress"]) == 1
    assert "--ann" in capsys.readouterr().err
    bad = write_config(tmp_path / "bad.py", "classes = ('a', 'b', 'c')\n")
    assert _train(bad, ann, images, tmp_path / "w") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'a'" in err


def test_train_help_lists_yolc_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "momentum" in out and "warmup" in out and "max_norm" in out


def test_train_evaluates_on_val_with_fused_inference(tmp_path, tiny_data):
    ann, images = tiny_data
    cfg = write_config(tmp_path / "cfg.py")
    assert _train(cfg, ann, images, tmp_path / "w", "--max-iters", "2", "--val-ann", ann, "--val-images", images) == 0
    records = [json.loads(l) for l in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval" in r]
    assert evals and evals[-1]["iter"] == 2 and {"AP", "AP50"} <= set(evals[-1]["eval"])


def test_precise_bn_recomputes_head_statistics(tmp_path, tiny_data):
    ann, images = tiny_data
    cfg = write_config(tmp_path / "cfg.py", "precise_bn = dict(num_batches=2)\n")
    assert _train(cfg, ann, images, tmp_path / "w", "--max-iters", "2") == 0
    records = [json.loads(l) for l in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1] == {"iter": 2, "precise_bn_batches": 2}
    sd = torch.load(tmp_path / "w" / "latest.pth", weights_only=True)["state_dict"]
    var = sd["bbox_head.local_head.1.running_var"]
    assert float(var.max()) < 0.5  # batch statistics, no longer dominated by the initial value 1
    assert float(sd["backbone.bn1.running_var"].mean()) == 1.0  # frozen backbone BN (norm_eval) untouched


def test_seed_option_changes_init_and_order_but_not_the_augmentation(tmp_path, tiny_data):
    ann, images = tiny_data
    cfg = write_config(tmp_path / "cfg.py", "seed = 5\n")

    def first_loss(name, *extra):
        assert _train(cfg, ann, images, tmp_path / name, "--max-iters", "1", *extra) == 0
        return json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])["loss"]

    assert first_loss("config_seed") == first_loss("seed_5", "--seed", "5")  # default: the config's seed
    assert first_loss("seed_6", "--seed", "6") != first_loss("config_seed")


def test_fresh_run_keeps_an_earlier_runs_metrics_apart(tmp_path, tiny_data, capsys):
    ann, images = tiny_data
    cfg = write_config(tmp_path / "cfg.py")
    assert _train(cfg, ann, images, tmp_path / "w", "--max-iters", "2") == 0
    assert _train(cfg, ann, images, tmp_path / "w", "--max-iters", "1") == 0  # not --resume: starts over
    lines = [json.loads(l) for l in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert [l["iter"] for l in lines] == [1]
    kept = list((tmp_path / "w").glob("metrics.*.jsonl"))
    assert len(kept) == 1 and [json.loads(l)["iter"] for l in kept[0].read_text().splitlines()] == [1, 2]
    out = capsys.readouterr()
    assert kept[0].name in out.out + out.err
