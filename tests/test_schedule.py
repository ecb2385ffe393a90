"""The lr schedule: mmcv's step and cosine-annealing policies with linear warmup; a bad lr_config is one line."""
import json
import math

import pytest

from conftest import write_config
from yolc_kd.cli import main
from yolc_kd.errors import UserError
from yolc_kd.schedule_settings import ScheduleSettings
from yolc_kd.train.schedule import lr_at


def sched(lr: float, **lr_config) -> ScheduleSettings:
    """The settings of a config with this lr and lr_config (warmup off unless lr_config sets it)."""
    return ScheduleSettings.from_config(dict(optimizer=dict(lr=lr), lr_config=dict(dict(warmup=None), **lr_config)))


def test_step_policy_with_warmup():
    cfg = sched(1.0, policy="step", warmup="linear", warmup_iters=10, warmup_ratio=0.1, step=[20, 30])
    assert lr_at(0, cfg, [20, 30], 40) == pytest.approx(0.1)
    assert lr_at(5, cfg, [20, 30], 40) == pytest.approx(0.55)
    assert [lr_at(i, cfg, [20, 30], 40) for i in (10, 19, 20, 29, 30)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])


def test_cosine_annealing_follows_mmcv_and_the_run_length():
    cfg = dict(policy="CosineAnnealing", min_lr_ratio=0.01)
    lrs = [lr_at(i, sched(2.0, **cfg), [], 100) for i in range(101)]
    assert lrs[0] == pytest.approx(2.0) and lrs[100] == pytest.approx(0.02)
    assert lrs[50] == pytest.approx(0.02 + 0.5 * 1.98)  # halfway: the mean of start and end
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    # the same schedule over a shorter run (--max-iters): anneals fully by its own end
    assert lr_at(40, sched(2.0, **cfg), [], 40) == pytest.approx(0.02)
    assert lr_at(7, sched(2.0, policy="CosineAnnealing", min_lr=0.5), [], 14) == pytest.approx(0.5 + 0.75)
    # warmup scales the cosine lr as mmcv does: regular lr x (1 - (1 - it / warmup_iters) x (1 - ratio))
    warm = dict(cfg, warmup="linear", warmup_iters=10, warmup_ratio=0.1)
    regular = 0.02 + 0.5 * 1.98 * (1 + math.cos(math.pi * 4 / 100))
    assert lr_at(4, sched(2.0, **warm), [], 100) == pytest.approx(regular * (1 - 0.6 * 0.9))


@pytest.mark.parametrize("bad, words", [(dict(policy="poly"), "policy"),
                                        (dict(policy="CosineAnnealing"), "min_lr"),
                                        (dict(policy="CosineAnnealing", min_lr=0.0, min_lr_ratio=0.1), "min_lr")])
def test_bad_lr_config_is_a_user_error(bad, words):
    with pytest.raises(UserError, match=words):
        sched(1.0, **bad)


def test_train_with_cosine_logs_the_annealed_lr_and_refuses_a_bad_policy(tmp_path, capsys):
    from yolc_kd.data.synth import make_synthetic_dataset

    root = make_synthetic_dataset(tmp_path / "d", 4, seed=3, size=(128, 96), num_classes=3)
    args = ["--ann", str(root / "annotations.json"), "--images", str(root), "--no-progress", "--max-iters", "4",
            "--log-interval", "1"]
    cfg = write_config(tmp_path / "cos.py", "lr_config = dict(policy='CosineAnnealing', min_lr_ratio=0.1, warmup=None)\n")
    assert main(["train", "--config", cfg, "--work-dir", str(tmp_path / "w"), *args]) == 0
    lrs = [json.loads(l)["lr"] for l in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines() if "lr" in l]
    assert len(lrs) == 4 and all(a > b for a, b in zip(lrs, lrs[1:]))
    bad = write_config(tmp_path / "bad.py", "lr_config = dict(policy='Poly')\n")
    assert main(["train", "--config", bad, "--work-dir", str(tmp_path / "b"), *args]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Poly" in err
    assert not (tmp_path / "b" / "metrics.jsonl").exists()
