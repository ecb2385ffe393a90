"""The trainer's hooks one at a time, each on a stand-in trainer (a small torch model, no data, no training run):
what each does at its points, and when; and the core loop's order of calls on a real 4-iteration run."""
import io
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from conftest import train_cli as _train, write_config
from yolc_kd.errors import UserError
from yolc_kd.schedule_settings import ScheduleSettings
from yolc_kd.train.ema import WeightAverage
from yolc_kd.train.hooks import (BestCheckpointHook, CheckpointHook, Checkpointer, EMAHook, EvalHook, HookBase,
                                 LoggerHook, LSMHook, PreciseBNHook, ProgressHook)
from yolc_kd.train.metrics_log import MetricsLog, set_aside


class TinyDetector(nn.Module):
    """Just what precise BN calls: extract_feat and bbox_head (a BN layer that trains)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bbox_head = nn.BatchNorm2d(4, momentum=0.01)

    def extract_feat(self, img):
        return self.conv(img)


class StandIn:
    """The trainer state hooks read, without data or a loop: iter is set by hand."""

    def __init__(self, work: Path, ema_cfg=None, resume=False, eval_fn=None, total_iters=6, iters_per_epoch=2,
                 rank=0):
        torch.manual_seed(0)
        self.model = TinyDetector()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        self.ema = WeightAverage(self.model, ema_cfg) if ema_cfg else None
        self.cfg = dict(classes=("a",), seed=0, model=dict(type="Tiny"))
        self.source, self.work_dir, self.rank = None, Path(work), rank
        self.opts = SimpleNamespace(resume=resume, trust=False, eval_fn=eval_fn)
        self.iter = self.start_iter = self.epoch = 0
        self.total_iters, self.iters_per_epoch = total_iters, iters_per_epoch
        self.last = dict(lr=0.1, loss=1.5)
        self.records, self.waits, self.hooks = [], [], []
        self.dist = SimpleNamespace(wait_for_rank0=lambda: self.waits.append(self.iter))
        self.checkpointer = Checkpointer(self)
        self.metrics = SimpleNamespace(path=self.work_dir / "metrics.jsonl")

    @property
    def eval_model(self):
        return self.ema.module if self.ema is not None else self.model

    def to_device(self, batch):
        return batch

    def log(self, record):
        self.records.append(record)

    def call_hooks(self, event, *args):
        for hook in self.hooks:
            getattr(hook, event)(self, *args)

    def train_a_step(self):
        """A real optimizer step, so weights, optimizer state and the average all move."""
        loss = self.model.extract_feat(torch.randn(2, 3, 4, 4)).square().mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.iter += 1


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- the base and the core loop
def test_hook_base_does_nothing_at_every_point(tmp_path):
    t, hook = StandIn(tmp_path), HookBase()
    before = _state(t.model)
    for event, args in (("before_train", ()), ("before_step", ()), ("after_step", ()), ("after_eval", ({},)),
                        ("after_train", ())):
        assert getattr(hook, event)(t, *args) is None
    assert _equal(before, _state(t.model)) and t.records == [] and list(tmp_path.iterdir()) == []


class Recorder(HookBase):
    def __init__(self):
        self.calls = []

    def before_train(self, trainer):
        self.calls.append(("before_train", trainer.iter))

    def before_step(self, trainer):
        self.calls.append(("before_step", trainer.iter))

    def after_step(self, trainer):
        self.calls.append(("after_step", trainer.iter, trainer.batch is not None))

    def after_train(self, trainer):
        self.calls.append(("after_train", trainer.iter))


def test_core_loop_calls_every_hook_at_its_point_and_resumes(tmp_path, tiny_data, monkeypatch):
    """2 iterations, then --resume to 4: before_train sees the resumed iteration, before_step the index of the
    coming step, after_step the count with it (and the step's batch), after_train the last count."""
    import yolc_kd.train.loop as loop

    recorders = []

    def with_recorder(trainer):
        hooks = build(trainer)
        assert [type(h).__name__ for h in hooks] == ["LoggerHook", "ProgressHook", "CheckpointHook"]
        recorders.append(Recorder())
        return hooks + [recorders[-1]]

    build = loop.build_hooks
    monkeypatch.setattr(loop, "build_hooks", with_recorder)
    ann, images = tiny_data
    cfg = write_config(tmp_path / "cfg.py")
    assert _train(cfg, ann, images, tmp_path / "w", "--max-iters", "2") == 0
    assert _train(cfg, ann, images, tmp_path / "w", "--resume") == 0
    steps = [[c for i in range(start, 4 if start else 2) for c in (("before_step", i), ("after_step", i + 1, True))]
             for start in (0, 2)]
    assert recorders[0].calls == [("before_train", 0)] + steps[0] + [("after_train", 2)]
    assert recorders[1].calls == [("before_train", 2)] + steps[1] + [("after_train", 4)]


# ---------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("by_epoch,due", [(True, [4]), (False, [2, 4, 6])])
def test_checkpoint_hook_saves_when_due_and_after_the_last_iteration(tmp_path, by_epoch, due):
    t = StandIn(tmp_path, total_iters=7, iters_per_epoch=2)
    hook = CheckpointHook(interval=2, by_epoch=by_epoch)
    for _ in range(7):
        t.train_a_step()
        hook.after_step(t)
    saved = sorted(int(p.stem.split("_")[1]) for p in tmp_path.glob("iter_*.pth"))
    assert saved == due + [7]
    assert os.readlink(tmp_path / "latest.pth") == "iter_7.pth"
    ckpt = torch.load(tmp_path / "latest.pth", weights_only=True)
    assert ckpt["meta"]["iter"] == 7 and ckpt["meta"]["epoch"] == 3 and "optimizer" in ckpt
    assert _equal(ckpt["state_dict"], _state(t.model))


def test_checkpoint_hook_saves_on_rank_0_only(tmp_path):
    t = StandIn(tmp_path, rank=1)
    t.iter = 2
    CheckpointHook(1, by_epoch=False).after_step(t)
    assert list(tmp_path.iterdir()) == []


def test_checkpointer_resume_restores_weights_optimizer_average_and_iteration(tmp_path):
    ema = dict(type="ExpMomentumEMAHook", momentum=0.2, total_iter=4)
    a = StandIn(tmp_path, ema_cfg=ema)
    for _ in range(3):
        a.train_a_step()
        EMAHook(a.ema).after_step(a)
    a.checkpointer.save(3)
    ckpt = torch.load(tmp_path / "iter_3.pth", weights_only=True)
    assert _equal(ckpt["state_dict"], _state(a.ema.module)) and _equal(ckpt["train_state_dict"], _state(a.model))
    assert ckpt["meta"]["ema"] == "ExpMomentumEMAHook"
    b = StandIn(tmp_path, ema_cfg=ema, resume=True)
    b.checkpointer.resume()
    assert b.start_iter == 3 and _equal(_state(b.model), _state(a.model)) and _equal(_state(b.ema.module),
                                                                                    _state(a.ema.module))
    assert int(b.ema.averaged.n_averaged) == int(a.ema.averaged.n_averaged)
    assert b.optimizer.state_dict()["state"].keys() == a.optimizer.state_dict()["state"].keys()
    for k, v in a.optimizer.state_dict()["state"][0].items():
        assert torch.equal(b.optimizer.state_dict()["state"][0][k], v)


def test_checkpointer_resume_without_latest_takes_the_last_complete_file(tmp_path):
    a = StandIn(tmp_path)
    a.train_a_step()
    a.checkpointer.write(tmp_path / "iter_1.pth", 1)
    a.train_a_step()
    a.checkpointer.write(tmp_path / "iter_10.pth", 10)  # killed before latest.pth was switched to it
    b = StandIn(tmp_path)
    b.checkpointer.resume()
    assert b.start_iter == 10 and _equal(_state(b.model), _state(a.model))
    empty = StandIn(tmp_path / "empty")
    with pytest.raises(UserError, match="no checkpoint to resume from"):
        empty.checkpointer.resume()


# ---------------------------------------------------------------- the weight average
def test_ema_hook_updates_the_average_with_the_index_of_the_step_just_taken(tmp_path):
    cfg = dict(type="LinearMomentumEMAHook", momentum=0.3, warm_up=2, interval=2)
    t = StandIn(tmp_path, ema_cfg=cfg)
    torch.manual_seed(0)
    by_hand = WeightAverage(TinyDetector(), cfg)
    hook = EMAHook(t.ema)
    for i in range(4):
        t.train_a_step()
        hook.after_step(t)
        by_hand.update(t.model, i)
        assert _equal(_state(t.ema.module), _state(by_hand.module)), i


# ---------------------------------------------------------------- evaluation
class AfterEval(HookBase):
    def __init__(self):
        self.seen = []

    def after_eval(self, trainer, result):
        self.seen.append((trainer.iter, result))


def test_eval_hook_evaluates_every_interval_epochs_and_at_the_end(tmp_path, capsys):
    calls = []

    def eval_fn(model, it):
        calls.append((it, model.training))
        return dict(AP=it / 100, AP50=0.5, note="text")

    t = StandIn(tmp_path, ema_cfg=dict(type="ExpMomentumEMAHook"), total_iters=7, iters_per_epoch=2)
    listener = AfterEval()
    t.hooks = [EvalHook(interval=2, eval_fn=eval_fn), listener]
    for _ in range(7):
        t.iter += 1
        t.hooks[0].after_step(t)
    assert calls == [(4, False), (7, False)]  # epochs 2 and the last iteration; the model in eval mode
    assert t.ema.module.training  # and back in training mode after
    assert t.records == [dict(iter=4, eval=dict(AP=0.04, AP50=0.5, note="text")),
                         dict(iter=7, eval=dict(AP=0.07, AP50=0.5, note="text"))]
    assert listener.seen == [(4, t.records[0]["eval"]), (7, t.records[1]["eval"])]
    assert t.waits == [4, 7]
    assert capsys.readouterr().out.splitlines() == ["eval @ iter 4: AP 0.0400, AP50 0.5000",
                                                    "eval @ iter 7: AP 0.0700, AP50 0.5000"]


def test_eval_hook_on_other_ranks_only_waits(tmp_path):
    t = StandIn(tmp_path, rank=1, total_iters=2)
    t.iter = 2
    EvalHook(1, lambda model, it: pytest.fail("rank 1 evaluated")).after_step(t)
    assert t.waits == [2] and t.records == []


# ---------------------------------------------------------------- metrics, log lines, progress
def test_logger_hook_sets_an_earlier_log_aside_says_the_plan_and_logs_every_interval(tmp_path, capsys):
    t = StandIn(tmp_path, total_iters=5)
    t.plan_line = lambda: "no KD; 5 iteration(s)"
    t.metrics.path.write_text('{"iter": 1}\n')
    hook = LoggerHook(interval=2)
    hook.before_train(t)
    kept = list(tmp_path.glob("metrics.*.jsonl"))
    assert not t.metrics.path.exists() and len(kept) == 1 and kept[0].read_text() == '{"iter": 1}\n'
    assert capsys.readouterr().out.splitlines() == [
        f"note: {tmp_path} held an earlier run's metrics.jsonl; it is now {kept[0].name}",
        "train: no KD; 5 iteration(s)"]
    for it in range(1, 6):
        t.iter, t.epoch = it, (it - 1) // 2
        hook.after_step(t)
    assert [(r["iter"], r["epoch"]) for r in t.records] == [(2, 0), (4, 1), (5, 2)]
    assert all(set(r) == {"iter", "epoch", "sec", "lr", "loss"} and r["sec"] >= 0 for r in t.records)


def test_logger_hook_keeps_the_log_on_resume_and_notes_repeating_views(tmp_path, capsys):
    t = StandIn(tmp_path, resume=True, total_iters=6)
    t.plan_line = lambda: "plan"
    t.source, t.sampler, t.passes = SimpleNamespace(num_variants=2), SimpleNamespace(flip=True), 5
    t.metrics.path.write_text('{"iter": 1}\n')
    LoggerHook(1).before_train(t)
    assert t.metrics.path.read_text() == '{"iter": 1}\n'
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "train: plan" and out[1].startswith("note: the cache holds 2 view(s) per image (4 with their "
                                                         "mirrors) and this run makes 5 passes")


def test_metrics_log_writes_json_lines_on_rank_0_only(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", tmp_path / "tb", rank=0)
    log.write(dict(iter=1, loss=0.5))
    log.write(dict(iter=2, eval=dict(AP=0.1)))
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        dict(iter=1, loss=0.5), dict(iter=2, eval=dict(AP=0.1))]
    MetricsLog(tmp_path / "other.jsonl", tmp_path / "tb1", rank=1).write(dict(iter=1))
    assert not (tmp_path / "other.jsonl").exists() and not (tmp_path / "tb1").exists()


def test_set_aside_never_overwrites_an_earlier_copy(tmp_path):
    first = tmp_path / "best.pth"
    names = []
    for _ in range(3):
        first.write_text("x")
        os.utime(first, (0, 0))
        names.append(set_aside(first).name)
    assert not first.exists() and len(set(names)) == 3
    assert names[0].startswith("best.19") and names[0].endswith(".pth") and names[1] == names[0][:-4] + "-2.pth"


def test_progress_hook_counts_from_the_resumed_iteration(tmp_path, monkeypatch):
    import yolc_kd.train.hooks.progress as progress

    bars = []
    real = progress.progress_bar
    monkeypatch.setattr(progress, "progress_bar", lambda **kw: bars.append(real(**kw, file=io.StringIO())) or bars[-1])
    t = StandIn(tmp_path, total_iters=6)
    t.iter = 2
    hook = ProgressHook(enabled=True)
    hook.before_train(t)
    assert bars[0].n == 2 and bars[0].total == 6 and not bars[0].disable
    hook.after_step(t)
    assert bars[0].n == 3 and bars[0].postfix == "loss=1.5"
    hook.after_train(t)
    assert bars[0].disable  # closed
    ProgressHook(enabled=True).before_train(StandIn(tmp_path, rank=1))
    ProgressHook(enabled=False).before_train(t)
    assert bars[1].disable and bars[2].disable


# ---------------------------------------------------------------- LSM pictures, precise BN
def test_lsm_hook_draws_each_steps_targets(tmp_path):
    drawn = []
    t = StandIn(tmp_path)
    hook = LSMHook(lambda it, batch, targets: drawn.append((it, batch, targets)))
    t.iter, t.batch, t.kd_targets = 1, {"keys": [(0, 0)]}, "targets"
    hook.after_step(t)
    t.iter, t.batch, t.kd_targets = 2, {"keys": [(1, 0)]}, "more targets"
    hook.after_step(t)
    assert drawn == [(0, {"keys": [(0, 0)]}, "targets"), (1, {"keys": [(1, 0)]}, "more targets")]


def test_precise_bn_hook_recomputes_saves_and_logs_after_a_finished_run_only(tmp_path):
    t = StandIn(tmp_path, total_iters=4, iters_per_epoch=2)
    epochs = []
    t.sampler = SimpleNamespace(set_epoch=epochs.append)
    t.loader = [dict(size=2, img=torch.randn(2, 3, 4, 4) * 3 + 1) for _ in range(3)]
    with torch.no_grad():
        feats = [t.model.extract_feat(b["img"]) for b in t.loader[:2]]
    expected = torch.stack([f.var(dim=(0, 2, 3), unbiased=True) for f in feats]).mean(0)
    hook = PreciseBNHook(num_batches=2)
    t.iter = 3  # stopped early (an error would not reach after_train; a shorter --max-iters does)
    hook.after_train(t)
    assert t.records == [] and list(tmp_path.iterdir()) == []
    t.iter = 4
    hook.after_train(t)
    assert epochs == [1] and t.records == [dict(iter=4, precise_bn_batches=2)]
    bn = t.model.bbox_head
    assert bn.momentum == 0.01  # restored after the cumulative average of the first two batches' statistics
    torch.testing.assert_close(bn.running_var, expected)
    saved = torch.load(tmp_path / "latest.pth", weights_only=True)["state_dict"]
    assert torch.equal(saved["bbox_head.running_var"], bn.running_var)
    resumed_at_end = StandIn(tmp_path / "r", total_iters=4)
    resumed_at_end.iter = resumed_at_end.start_iter = 4  # --resume of a finished run: nothing trained
    hook.after_train(resumed_at_end)
    assert resumed_at_end.records == []


# ---------------------------------------------------------------- the best checkpoint
@pytest.mark.parametrize("cfg,metric", [
    (dict(), None), (dict(evaluation=dict(interval=1, metric="bbox")), None),
    (dict(evaluation=dict(save_best="bbox_mAP")), "bbox_mAP"), (dict(evaluation=dict(save_best="auto")), "bbox_mAP"),
    (dict(evaluation=dict(save_best="bbox_mAP_s", rule="greater")), "bbox_mAP_s")])
def test_save_best_setting(cfg, metric):
    assert ScheduleSettings.from_config(cfg).save_best == metric


@pytest.mark.parametrize("cfg,needle", [
    (dict(evaluation=dict(save_best="segm_mAP")), "'bbox_mAP_50'"),
    (dict(evaluation=dict(save_best="bbox_mAP", rule="less")), "greater is better"),
    (dict(checkpoint_config=dict(interval=1, save_best="bbox_mAP")), "evaluation = dict(")])
def test_bad_save_best_settings_are_one_line(cfg, needle):
    with pytest.raises(UserError) as exc:
        ScheduleSettings.from_config(cfg)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def _evaluate(t, hook, score):
    t.train_a_step()
    hook.after_eval(t, dict(AP=score, AP50=1 - score))
    return _state(t.model)


def test_best_hook_keeps_the_weights_of_the_best_evaluation(tmp_path, capsys):
    t = StandIn(tmp_path, eval_fn=lambda m, it: {})
    hook = BestCheckpointHook("bbox_mAP")
    hook.before_train(t)
    first = _evaluate(t, hook, 0.2)
    best = _evaluate(t, hook, 0.3)
    _evaluate(t, hook, 0.3)  # a tie keeps the earlier (mmdet's 'greater' rule)
    _evaluate(t, hook, float("nan"))
    ckpt = torch.load(tmp_path / "best.pth", weights_only=True)
    assert _equal(ckpt["state_dict"], best) and not _equal(ckpt["state_dict"], first)
    assert ckpt["meta"]["iter"] == 2 and ckpt["meta"]["save_best"] == "bbox_mAP" and "optimizer" not in ckpt
    assert ckpt["meta"]["hook_msgs"] == dict(best_score=0.3, best_ckpt=str(tmp_path / "best.pth"))
    assert capsys.readouterr().out.splitlines() == [
        f"best: bbox_mAP (COCO AP@[.5:.95]) 0.2000 at iter 1; weights in {tmp_path / 'best.pth'}",
        f"best: bbox_mAP (COCO AP@[.5:.95]) 0.3000 at iter 2 (was 0.2000 at iter 1); weights in "
        f"{tmp_path / 'best.pth'}"]
    with pytest.raises(UserError, match="returned no AP_small"):
        BestCheckpointHook("bbox_mAP_s").after_eval(t, dict(AP=0.1))


def test_best_hook_remembers_on_resume_and_starts_over_on_a_fresh_run(tmp_path, capsys):
    a = StandIn(tmp_path, eval_fn=lambda m, it: {})
    hook = BestCheckpointHook("bbox_mAP_50")
    _evaluate(a, hook, 0.2)  # AP50 0.8
    written = (tmp_path / "best.pth").read_bytes()
    resumed = StandIn(tmp_path, resume=True, eval_fn=lambda m, it: {})
    again = BestCheckpointHook("bbox_mAP_50")
    again.before_train(resumed)
    assert again.best_score == pytest.approx(0.8) and again.best_iter == 1
    _evaluate(resumed, again, 0.3)  # AP50 0.7: not better than the remembered 0.8
    assert (tmp_path / "best.pth").read_bytes() == written
    _evaluate(resumed, again, 0.1)  # AP50 0.9
    assert torch.load(tmp_path / "best.pth", weights_only=True)["meta"]["iter"] == 2
    other_metric = BestCheckpointHook("bbox_mAP")
    other_metric.before_train(resumed)
    assert other_metric.best_score is None
    capsys.readouterr()
    fresh = BestCheckpointHook("bbox_mAP_50")
    fresh.before_train(StandIn(tmp_path))  # not --resume, and no evaluation
    kept = list(tmp_path.glob("best.*.pth"))
    assert fresh.best_score is None and not (tmp_path / "best.pth").exists() and len(kept) == 1
    out = capsys.readouterr().out.splitlines()
    assert "this run evaluates nothing" in out[0] and out[1].endswith(f"it is now {kept[0].name}")
