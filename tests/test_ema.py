"""EMA of the weights (mmdet 2.x's ExpMomentumEMAHook / LinearMomentumEMAHook in custom_hooks): the formulas,
the config checks, and the trainer: checkpoints hand the average to inference, training itself is unchanged,
and --resume continues the average exactly."""
import json
import math

import pytest
import torch
import torch.nn as nn

from conftest import train_cli as _train, write_config
from yolc_kd.cli import main
from yolc_kd.errors import UserError
from yolc_kd.train.ema import WeightAverage, ema_hook, momentum_fun

EXP = dict(type="ExpMomentumEMAHook", momentum=0.1, total_iter=5)


def test_momentum_formulas_are_mmdets():
    exp = momentum_fun(EXP)
    assert exp(0) == pytest.approx(0.9 * math.exp(-1 / 5) + 0.1)
    assert exp(10 ** 6) == pytest.approx(0.1)
    lin = momentum_fun(dict(type="LinearMomentumEMAHook", momentum=0.2, warm_up=10))
    assert lin(0) == pytest.approx(1 / 10) and lin(100) == pytest.approx(0.2)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_average_follows_the_formula_and_buffers():
    net = _net()
    ema = WeightAverage(net, EXP)
    expect = {k: v.clone() for k, v in net.state_dict().items()}
    fun = momentum_fun(EXP)
    for it in range(3):
        net.train()(torch.randn(8, 3))  # moves the BN running statistics
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ema.update(net, it)
        m = fun(it)
        for k, v in net.state_dict().items():
            expect[k] = v.clone() if not v.is_floating_point() else (1 - m) * expect[k] + m * v
    got = ema.module.state_dict()
    for k, v in expect.items():
        torch.testing.assert_close(got[k], v, msg=k)
    assert int(got["1.num_batches_tracked"]) == 3  # integer buffers follow the model


def test_skip_buffers_keeps_the_models_statistics():
    net = _net()
    ema = WeightAverage(net, dict(EXP, skip_buffers=True))
    net.train()(torch.randn(8, 3))
    ema.update(net, 0)
    torch.testing.assert_close(ema.module.state_dict()["1.running_mean"], net.state_dict()["1.running_mean"])


def test_interval_updates_every_nth_step():
    net = _net()
    ema = WeightAverage(net, dict(EXP, interval=2))
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        net[0].weight.add_(1.0)
    ema.update(net, 1)  # odd iteration: no update
    torch.testing.assert_close(ema.module[0].weight, before["0.weight"])
    ema.update(net, 2)
    assert not torch.equal(ema.module[0].weight, before["0.weight"])


@pytest.mark.parametrize("hooks, needle", [
    ([dict(type="ExpMomentumEMAHook", momentum=1.5)], "momentum must be in (0, 1)"),
    ([dict(type="ExpMomentumEMAHook", momentun=0.1)], "unknown key(s) momentun"),
    ([dict(type="ExpMomentumEMAHook"), dict(type="LinearMomentumEMAHook")], "at most one"),
    ([dict(type="LinearMomentumEMAHook", warm_up=0)], "warm_up must be a positive number"),
    ([dict(type="ExpMomentumEMAHook", resume_from="x.pth")], "--resume"),
    ("ExpMomentumEMAHook", "list of dicts"),
])
def test_bad_hook_configs_are_one_line(hooks, needle):
    with pytest.raises(UserError) as exc:
        ema_hook(dict(custom_hooks=hooks))
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_other_hooks_mean_nothing():
    assert ema_hook(dict(custom_hooks=[dict(type="NumClassCheckHook")])) is None
    assert ema_hook(dict(custom_hooks=[dict(type="NumClassCheckHook"), EXP]))["type"] == "ExpMomentumEMAHook"


# ---------------------------------------------------------------- the trainer
HOOK = "custom_hooks = [dict(type='ExpMomentumEMAHook', momentum=0.2, total_iter=2)]\n"


def _losses(work):
    return [json.loads(l)["loss"] for l in (work / "metrics.jsonl").read_text().splitlines() if "loss" in l]


def test_trainer_saves_the_average_and_trains_as_without(tmp_path, tiny_data):
    ann, images = tiny_data
    plain, averaged = write_config(tmp_path / "plain.py"), write_config(tmp_path / "ema.py", HOOK)
    assert _train(plain, ann, images, tmp_path / "plain") == 0
    assert _train(averaged, ann, images, tmp_path / "ema") == 0
    assert _losses(tmp_path / "ema") == _losses(tmp_path / "plain")  # the average never feeds back
    ckpt = torch.load(tmp_path / "ema" / "latest.pth", weights_only=True)
    raw = torch.load(tmp_path / "plain" / "latest.pth", weights_only=True)["state_dict"]
    assert ckpt["meta"]["ema"] == "ExpMomentumEMAHook"
    key = "bbox_head.local_head.0.weight"
    torch.testing.assert_close(ckpt["train_state_dict"][key], raw[key])
    assert not torch.allclose(ckpt["state_dict"][key], raw[key])
    # infer loads the average (state_dict) into a plain model, strictly
    assert main(["infer", "--config", plain, "--ckpt", str(tmp_path / "ema" / "latest.pth"), "--ann", ann,
                 "--images", images, "--out", str(tmp_path / "preds.json")]) == 0


def test_resume_continues_the_average_exactly(tmp_path, tiny_data):
    ann, images = tiny_data
    cfg = write_config(tmp_path / "ema.py", HOOK)
    assert _train(cfg, ann, images, tmp_path / "full") == 0
    assert _train(cfg, ann, images, tmp_path / "part", "--max-iters", "2") == 0
    assert _train(cfg, ann, images, tmp_path / "part", "--resume") == 0
    full = torch.load(tmp_path / "full" / "latest.pth", weights_only=True)
    part = torch.load(tmp_path / "part" / "latest.pth", weights_only=True)
    for group in ("state_dict", "train_state_dict"):
        for key, value in full[group].items():
            torch.testing.assert_close(part[group][key], value, rtol=1e-5, atol=1e-6, msg=f"{group} {key}")


def test_bad_hook_in_a_config_is_one_line_from_train(tmp_path, tiny_data, capsys):
    ann, images = tiny_data
    cfg = write_config(tmp_path / "bad.py", "custom_hooks = [dict(type='ExpMomentumEMAHook', momentum=2)]\n")
    assert _train(cfg, ann, images, tmp_path / "w") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "momentum" in err


def test_shipped_configs_hooks():
    from yolc_kd.config import load_config
    from yolc_kd.demo import CONFIGS

    assert ema_hook(load_config(CONFIGS / "tiny_student_synth.py"))["momentum"] == 0.05
    for name in ("yolc_hrnet_w18_visdrone_kd.py", "yolc_hrnet_w48_visdrone.py", "tiny_teacher_synth.py"):
        assert ema_hook(load_config(CONFIGS / name, with_defaults=True)) is None  # YOLC's recipe
