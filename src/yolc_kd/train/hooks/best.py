"""Keep the best checkpoint by COCO AP: mmdet 2.x's `evaluation = dict(interval=1, metric='bbox',
save_best='bbox_mAP')` (EvalHook's save_best) keeps WORK_DIR/best.pth."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Dict, Optional

from tqdm import tqdm

from yolc_kd.checkpoint import read_checkpoint
from yolc_kd.errors import UserError
from yolc_kd.schedule_settings import SAVE_BEST_KEYS
from yolc_kd.train.hooks.base import HookBase
from yolc_kd.train.metrics_log import set_aside

if TYPE_CHECKING:
    from yolc_kd.train.loop import Trainer

BEST_NAME = "best.pth"
SAVE_BEST_MEANING = dict(bbox_mAP="COCO AP@[.5:.95]", bbox_mAP_50="COCO AP@.5", bbox_mAP_75="COCO AP@.75",
                         bbox_mAP_s="COCO AP@[.5:.95] of small objects")


class BestCheckpointHook(HookBase):
    """After each evaluation (rank 0), when the metric beats every earlier evaluation of the run (strictly, as
    mmdet's 'greater' rule), writes WORK_DIR/best.pth atomically and says so in one `best: ...` line.

    The metric is COCO bbox AP of the trainer's evaluation: fused inference on the whole validation images
    (--val-ann), the weights a checkpoint hands to inference (the EMA average when the config has one).
    'bbox_mAP' is AP@[.5:.95] over all areas at 500 detections per image (`yolc-kd eval`'s largest maxDets);
    'bbox_mAP_50' / '_75' / '_s' are AP50 / AP75 / AP_small. best.pth holds those weights as `state_dict`, the
    checkpoint meta and mmdet's `hook_msgs = {best_score, best_ckpt}`; no optimizer (it is for inference;
    --resume reads iter_N.pth). Precise BN, which runs after the last evaluation, leaves best.pth as evaluated.
    --resume remembers the best score from best.pth; a fresh run sets an earlier run's best.pth aside.

    Args:
        metric: the mmdet key (ScheduleSettings.save_best): 'bbox_mAP', 'bbox_mAP_50', 'bbox_mAP_75' or
            'bbox_mAP_s'.
    """

    def __init__(self, metric: str = "bbox_mAP"):
        self.metric, self.key = metric, SAVE_BEST_KEYS[metric]
        self.best_score: Optional[float] = None
        self.best_iter: Optional[int] = None

    def before_train(self, trainer: "Trainer") -> None:
        if trainer.rank != 0:
            return
        path = trainer.work_dir / BEST_NAME
        if trainer.opts.eval_fn is None:
            tqdm.write(f"note: evaluation.save_best={self.metric!r} keeps {BEST_NAME} by the evaluation after "
                       f"epochs, and this run evaluates nothing (pass --val-ann and --val-images)")
        if not path.exists():
            return
        if not trainer.opts.resume:
            tqdm.write(f"note: {trainer.work_dir} held an earlier run's {BEST_NAME}; it is now "
                       f"{set_aside(path).name}")
            return
        _, meta, _ = read_checkpoint(path, trainer.opts.trust)
        score = (meta.get("hook_msgs") or {}).get("best_score")
        if meta.get("save_best") == self.metric and isinstance(score, (int, float)):
            self.best_score, self.best_iter = float(score), meta.get("iter")
        else:
            tqdm.write(f"note: {path} was kept by {meta.get('save_best')!r}; this run keeps the best by "
                       f"{self.metric!r} from its next evaluation on")

    def after_eval(self, trainer: "Trainer", result: Dict[str, Any]) -> None:
        if self.key not in result:
            raise UserError(f"evaluation.save_best={self.metric!r}: the evaluation returned no {self.key} "
                            f"(it returned {', '.join(result) or 'nothing'})")
        score, it = float(result[self.key]), trainer.iter
        if not math.isfinite(score) or (self.best_score is not None and score <= self.best_score):
            return
        path = trainer.work_dir / BEST_NAME
        trainer.checkpointer.write(path, it, resumable=False, meta=dict(
            save_best=self.metric, hook_msgs=dict(best_score=score, best_ckpt=str(path))))
        was = "" if self.best_score is None else f" (was {self.best_score:.4f} at iter {self.best_iter})"
        tqdm.write(f"best: {self.metric} ({SAVE_BEST_MEANING[self.metric]}) {score:.4f} at iter {it}{was}; "
                   f"weights in {path}")
        self.best_score, self.best_iter = score, it
