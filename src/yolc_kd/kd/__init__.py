"""Knowledge distillation beside the model: KDTargets (targets.py, from a live teacher or the cache), the loss
formulas (losses.py) and KDLoss with student_losses (loss.py), which compare a student's outputs with them."""
from yolc_kd.kd.loss import KDLoss, student_losses
from yolc_kd.kd.losses import (box_distance, cell_weights, heatmap_kd, kd_losses, masked_mean, patch_cell_weights,
                               soft_focal_heatmap_kd, teacher_peak_count, weighted_box_kd)
from yolc_kd.kd.targets import KDTargets

__all__ = ["KDLoss", "KDTargets", "box_distance", "cell_weights", "heatmap_kd", "kd_losses", "masked_mean",
           "patch_cell_weights", "soft_focal_heatmap_kd", "student_losses", "teacher_peak_count", "weighted_box_kd"]
