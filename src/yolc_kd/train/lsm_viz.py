"""distill_cfg.lsm_visualize: PNGs of the crops local KD used in the first training batches — the LSM binary
map of the teacher's heatmap with the teacher's crop boxes outlined (slow, so off by default)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from yolc_kd import crops
from yolc_kd.kd import KDTargets

LSM_VIZ_BATCHES = 2  # the first batches of a run are drawn


class LSMVisualizer:
    """Writes, for the first `batches` batches with KD targets, each view's LSM binary map of the teacher's
    heatmap with the KD crops the batch used outlined (iter<it>_img<id>_v<variant>.png).

    Args:
        out_dir: the folder of the PNGs.
        batches: how many batches to draw.
    """

    def __init__(self, out_dir: Path, batches: int = LSM_VIZ_BATCHES):
        self.out_dir, self.left = Path(out_dir), int(batches)

    def __call__(self, it: int, batch: Mapping[str, Any], targets: KDTargets) -> None:
        if self.left <= 0 or targets is None:
            return
        self.left -= 1
        heat = targets.heatmap.detach().float().max(dim=1, keepdim=True)[0].cpu().numpy()
        boxes = targets.patch_boxes.detach().cpu().numpy()
        valid = targets.patch_valid.detach().cpu().numpy().astype(bool)
        for b, (image_id, variant) in enumerate(batch["keys"]):
            binary, _ = crops.find_clusters(heat[b:b + 1])
            used = np.round(boxes[b][valid[b]]).astype(np.int64)  # the crops local KD used (view frame)
            crops.save_cluster_png(binary, used, self.out_dir / f"iter{it:06d}_img{image_id}_v{variant}.png")
