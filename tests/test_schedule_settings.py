"""Typed schedule settings: the optimizer, lr_config, runner, checkpoint, evaluation, log and precise_bn sections
are resolved once into ScheduleSettings with mmdet's meaning and YOLC's defaults in one place; the trainer reads
that object; every key is used or refused in one line naming the key and the file."""
import ast
from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_model_cfg, train_cli, write_config
from yolc_kd.config import DEFAULTS, load_config
from yolc_kd.errors import UserError
from yolc_kd.schedule_settings import DEFAULT_SECTIONS, ScheduleSettings
from yolc_kd.train.schedule import build_optimizer, schedule_iters

PKG = Path(__file__).resolve().parents[1] / "src" / "yolc_kd"


def _config(tmp_path, text: str) -> Path:
    path = tmp_path / "c.py"
    path.write_text(f"model = {tiny_model_cfg(3)!r}\n{text}")
    return path


def test_defaults_are_yolcs_recipe_and_live_in_the_settings(tmp_path):
    assert load_config(_config(tmp_path, ""))["schedule"] == ScheduleSettings()
    # YOLC's own config states its recipe: it resolves to the defaults
    assert load_config(REPO / "configs" / "yolc_hrnet_w48_visdrone.py")["schedule"] == ScheduleSettings()
    d = ScheduleSettings()
    assert (d.optimizer, d.lr, d.optimizer_args, d.grad_clip, d.grad_clip_norm_type) == \
        ("SGD", 0.0025, dict(momentum=0.9, weight_decay=0.0001), 35, 2)
    assert (d.lr_policy, d.warmup, d.warmup_iters, d.warmup_ratio, d.step, d.gamma) == \
        ("step", "linear", 1000, 0.001, (18, 24), 0.1)
    assert (d.runner, d.by_epoch, d.max_epochs, d.checkpoint_interval, d.eval_interval, d.log_interval) == \
        ("EpochBasedRunner", True, 48, 1, 1, 50)
    assert (d.save_best, d.precise_bn_batches) == (None, 0)
    for key, section in DEFAULT_SECTIONS.items():  # config.DEFAULTS' sections are made from the fields
        assert DEFAULTS[key] == section
    assert ScheduleSettings.from_config(DEFAULT_SECTIONS) == d


def test_sections_keep_mmdets_merge_over_the_defaults(tmp_path):
    adam = load_config(_config(tmp_path, "optimizer = dict(type='Adam', lr=0.01)\n"))["schedule"]
    assert (adam.optimizer, adam.lr, adam.optimizer_args) == ("Adam", 0.01, {})  # another type: no SGD momentum
    sgd = load_config(_config(tmp_path, "optimizer = dict(lr=0.01)\n"))["schedule"]
    assert (sgd.optimizer, sgd.lr, sgd.optimizer_args) == ("SGD", 0.01, dict(momentum=0.9, weight_decay=0.0001))
    iters = load_config(_config(tmp_path, "runner = dict(type='IterBasedRunner')\n"))["schedule"]
    assert (iters.by_epoch, iters.max_iters) == (False, 1000)
    assert schedule_iters(iters, 7, None) == (1000, [18, 24])  # IterBasedRunner: steps are iterations
    assert schedule_iters(ScheduleSettings(), 7, None) == (48 * 7, [18 * 7, 24 * 7])
    assert schedule_iters(ScheduleSettings(), 7, 5)[0] == 5  # --max-iters
    clip = load_config(_config(tmp_path, "optimizer_config = dict(grad_clip=dict(max_norm=10))\n"))["schedule"]
    assert (clip.grad_clip, clip.grad_clip_norm_type) == (10, 2)
    off = load_config(_config(tmp_path, "optimizer_config = dict(grad_clip=None)\n"))["schedule"]
    assert off.grad_clip is None
    cos = load_config(_config(tmp_path, "lr_config = dict(policy='CosineAnnealing', min_lr=0.0)\n"))["schedule"]
    assert (cos.lr_policy, cos.min_lr, cos.warmup, cos.warmup_iters) == ("CosineAnnealing", 0.0, "linear", 1000)
    logs = "log_config = dict(interval=5, hooks=[dict(type='TextLoggerHook'), dict(type='TensorboardLoggerHook')])\n"
    assert load_config(_config(tmp_path, logs))["schedule"].log_interval == 5
    best = load_config(_config(tmp_path, "evaluation = dict(interval=2, save_best='auto', rule='greater')\n"))
    assert (best["schedule"].eval_interval, best["schedule"].save_best) == (2, "bbox_mAP")
    assert load_config(_config(tmp_path, "precise_bn = dict(num_batches=3)\n"))["schedule"].precise_bn_batches == 3


def test_the_optimizer_gets_the_schedules_arguments():
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2), requires_grad=False)]
    opt = build_optimizer(params, ScheduleSettings(lr=0.1, optimizer_args=dict(momentum=0.5, nesterov=True)))
    assert isinstance(opt, torch.optim.SGD) and len(opt.param_groups[0]["params"]) == 1
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.1, 0.5, True, 0)
    adamw = build_optimizer(params, ScheduleSettings(optimizer="AdamW", optimizer_args=dict(betas=(0.8, 0.9))))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["betas"] == (0.8, 0.9)


BAD = [
    ("optimizer = dict(type='RMSprop')", "'optimizer.type' must be one of 'SGD', 'Adam', 'AdamW', got 'RMSprop'"),
    ("optimizer = dict(type='Adam', momentum=0.9)", "'optimizer.momentum' is not an argument of torch.optim.Adam"),
    ("optimizer = dict(lr='0.01')", "'optimizer.lr' must be int/float, got str '0.01'"),
    ("optimizer = dict(lr=0)", "'optimizer.lr' must be > 0, got 0"),
    ("optimizer = dict(paramwise_cfg=dict(norm_decay_mult=0))", "'optimizer.paramwise_cfg' is not supported"),
    ("optimizer_config = dict(grad_clip=dict(max_norm=0))", "'optimizer_config.grad_clip.max_norm' must be > 0"),
    ("optimizer_config = dict(grad_clip=35)", "'optimizer_config.grad_clip' must be None or dict("),
    ("optimizer_config = dict(grad_clip=dict(_delete_=True, norm_type=2))", "'optimizer_config.grad_clip' must be"),
    ("optimizer_config = dict(type='Fp16OptimizerHook')", "unknown key 'optimizer_config.type'"),
    ("lr_config = dict(policy='poly')", "'lr_config.policy' must be one of 'step', 'CosineAnnealing', got 'poly'"),
    ("lr_config = dict(warmup='exp')", "'lr_config.warmup' must be one of 'linear', None, got 'exp'"),
    ("lr_config = dict(warmup_ratio=0)", "'lr_config.warmup_ratio' must be in (0, 1], got 0"),
    ("lr_config = dict(warmup_iters=-1)", "'lr_config.warmup_iters' must be at least 0, got -1"),
    ("lr_config = dict(step=8)", "'lr_config.step' must be list/tuple, got int 8"),
    ("lr_config = dict(step=[8, 11.5])", "'lr_config.step[]' must be int, got float 11.5"),
    ("lr_config = dict(gamma=0)", "'lr_config.gamma' must be > 0, got 0"),
    ("lr_config = dict(by_epoch=False)", "unknown key 'lr_config.by_epoch'"),
    ("lr_config = dict(policy='CosineAnnealing')", "needs exactly one of min_lr and min_lr_ratio"),
    ("runner = dict(type='DynamicRunner')", "'runner.type' must be one of 'EpochBasedRunner', 'IterBasedRunner'"),
    ("runner = dict(max_epochs=0)", "'runner.max_epochs' must be at least 1, got 0"),
    ("runner = dict(type='IterBasedRunner', max_iters=True)", "'runner.max_iters' must be int, got bool True"),
    ("checkpoint_config = dict(interval=1, max_keep_ckpts=3)", "unknown key 'checkpoint_config.max_keep_ckpts'"),
    ("evaluation = dict(metric='segm')", "'evaluation.metric' must be 'bbox'"),
    ("evaluation = dict(interval=0)", "'evaluation.interval' must be at least 1, got 0"),
    ("log_config = dict(hooks=[dict(type='WandbLoggerHook')])", "'log_config.hooks' may list TextLoggerHook and"),
    ("log_config = dict(interval=1.5)", "'log_config.interval' must be int, got float 1.5"),
    ("precise_bn = dict(num_batches='2')", "'precise_bn.num_batches' must be int, got str '2'"),
    ("precise_bn = dict(batches=2)", "unknown key 'precise_bn.batches'"),
    ("runner = 48", "'runner' must be a dict, got int"),
]


@pytest.mark.parametrize("text, message", BAD, ids=[t.split(" =")[0] + str(i) for i, (t, _) in enumerate(BAD)])
def test_bad_schedule_values_are_one_line_naming_key_and_file(tmp_path, text, message):
    path = _config(tmp_path, text + "\n")
    with pytest.raises(UserError) as exc:
        load_config(path)
    assert str(exc.value).startswith(f"config {path}: ") and message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_settings_built_in_code_are_checked_too():
    with pytest.raises(UserError, match=r"^'runner\.max_iters' must be at least 1, got 0$"):
        ScheduleSettings(max_iters=0)
    with pytest.raises(UserError, match=r"'optimizer\.betas' is not an argument of torch\.optim\.SGD"):
        ScheduleSettings(optimizer_args=dict(betas=(0.9, 0.99)))


def test_the_trainer_reads_no_schedule_section():
    """The train stage takes cfg["schedule"]; the sections' dicts stay in config / schedule_settings."""
    sections = {"optimizer_config", "lr_config", "runner", "checkpoint_config", "evaluation", "log_config",
                "precise_bn"}
    for path in sorted((PKG / "train").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in sections:
                raise AssertionError(f"{path.relative_to(PKG)}:{node.lineno} reads {node.value!r}")


def test_the_trainer_steps_with_the_schedules_optimizer_and_clipping(tmp_path, tiny_data, monkeypatch):
    """A run's optimizer, lr and gradient clipping (max_norm and norm_type) are the config's ScheduleSettings."""
    from yolc_kd.train import loop

    clipped, made = [], []
    real_clip, real_build = loop.nn.utils.clip_grad_norm_, loop.build_optimizer
    monkeypatch.setattr(loop.nn.utils, "clip_grad_norm_", lambda p, m, n: clipped.append((m, n)) or real_clip(p, m, n))
    monkeypatch.setattr(loop, "build_optimizer", lambda p, s: made.append(real_build(p, s)) or made[-1])
    cfg = write_config(tmp_path / "c.py", "optimizer = dict(type='SGD', lr=0.01, momentum=0.5)\n"
                                          "optimizer_config = dict(grad_clip=dict(max_norm=3, norm_type=1))\n")
    assert train_cli(cfg, *tiny_data, tmp_path / "w", "--max-iters", "2") == 0
    assert clipped == [(3.0, 1.0), (3.0, 1.0)]
    group = made[0].param_groups[0]
    assert isinstance(made[0], torch.optim.SGD) and group["momentum"] == 0.5 and group["weight_decay"] == 0.0001
    assert group["lr"] == pytest.approx(0.01 * (1 - (1 - 1 / 2) * (1 - 0.1)))  # the last step's: warmup 2 at 0.1
    off = write_config(tmp_path / "off.py", "optimizer_config = dict(grad_clip=None)\n")
    clipped.clear()
    assert train_cli(off, *tiny_data, tmp_path / "w2", "--max-iters", "1") == 0
    assert clipped == []
