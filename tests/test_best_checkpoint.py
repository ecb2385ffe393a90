"""evaluation.save_best (mmdet 2.x's EvalHook argument) on real training runs: best.pth holds the weights of the
iteration whose evaluation scored highest, --resume remembers that score, and `train --val-ann` keeps it by the
COCO AP of the trainer's own evaluation."""
import json

import torch

from conftest import train_cli as _train, write_config
from yolc_kd.train.loop import TrainOptions
from yolc_kd.train.recipe import run_training

# 6 images at batch 2: 3 iterations per epoch; a checkpoint and an evaluation after every epoch
BEST = ("runner = dict(type='EpochBasedRunner', max_epochs=3)\ncheckpoint_config = dict(interval=1)\n"
        "evaluation = dict(interval=1, metric='bbox', save_best='bbox_mAP')\n")


def _scripted(scores):
    """An evaluation that returns the given AP at each iteration."""
    def evaluate(model, it):
        return dict(AP=scores[it], AP50=0.0)
    return evaluate


def _weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _run(cfg, data, work, scores, max_iters, resume=False):
    opts = TrainOptions(work_dir=work, max_iters=max_iters, resume=resume, progress=False, workers=0,
                        eval_fn=_scripted(scores))
    return run_training(cfg, data[0], data[1], opts)


def test_best_pth_is_the_best_iterations_weights_and_survives_resume(tmp_path, tiny_data, capsys):
    cfg = write_config(tmp_path / "cfg.py", BEST)
    work = tmp_path / "w"
    _run(cfg, tiny_data, work, {3: 0.1, 6: 0.3}, max_iters=6)
    _run(cfg, tiny_data, work, {9: 0.2}, max_iters=9, resume=True)  # worse than the remembered 0.3
    best = torch.load(work / "best.pth", weights_only=True)
    assert best["meta"]["iter"] == 6 and best["meta"]["hook_msgs"]["best_score"] == 0.3
    assert _same(best["state_dict"], _weights(work / "iter_6.pth"))
    assert not _same(best["state_dict"], _weights(work / "iter_9.pth"))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("best:")]
    assert lines == [f"best: bbox_mAP (COCO AP@[.5:.95]) 0.1000 at iter 3; weights in {work / 'best.pth'}",
                     f"best: bbox_mAP (COCO AP@[.5:.95]) 0.3000 at iter 6 (was 0.1000 at iter 3); weights in "
                     f"{work / 'best.pth'}"]
    _run(cfg, tiny_data, work, {3: 0.05}, max_iters=3)  # a fresh run: its own best, however low
    assert _same(_weights(work / "best.pth"), _weights(work / "iter_3.pth"))
    assert len(list(work.glob("best.*.pth"))) == 1  # the earlier run's, set aside


def test_train_with_val_keeps_the_best_by_coco_ap(tmp_path, tiny_data, capsys):
    ann, images = tiny_data
    cfg = write_config(tmp_path / "cfg.py", BEST)
    work = tmp_path / "w"
    assert _train(cfg, ann, images, work, "--max-iters", "3", "--val-ann", ann, "--val-images", images) == 0
    evals = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert [e["iter"] for e in evals] == [3]
    ap = evals[0]["eval"]["AP"]
    best = torch.load(work / "best.pth", weights_only=True)
    assert best["meta"]["iter"] == 3 and best["meta"]["hook_msgs"]["best_score"] == ap
    assert _same(best["state_dict"], _weights(work / "iter_3.pth"))
    assert f"best: bbox_mAP (COCO AP@[.5:.95]) {ap:.4f} at iter 3" in capsys.readouterr().out
