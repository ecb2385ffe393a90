"""The image-level cache as the trainer's TargetSource: every pass draws a fresh view (as training without KD
does) and the view's targets come from the cached rows of its image through the view's transform
(cache/image_view.py). The DataLoader workers read the parts of the row the view shows and move the box maps and
crops; the trainer moves the heatmap on the training device. Picklable for DataLoader workers."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping, Optional

import numpy as np
import torch

from yolc_kd.cache import image_view
from yolc_kd.cache.reader import CacheError, CacheReader
from yolc_kd.cache.schema import STATUS_OK
from yolc_kd.data.augment import AugmentedSample, fingerprint_image
from yolc_kd.errors import UserError
from yolc_kd.kd import KDTargets
from yolc_kd.train.target_codec import dequantize_targets

_SMALL = ("status", "aug_params", "fingerprint", "variant", "patch_boxes", "patch_scales", "patch_valid")


class ImageCacheSource:
    """TargetSource over a finished image-level cache.

    Args:
        reader: the cache.
        max_patches: the view's crop slots (distill_cfg.max_patches_per_img).
        min_patch_size: the smallest crop side in the view (distill_cfg.min_patch_size).
    """
    reads_samples = True
    num_variants: Optional[int] = None  # a fresh view every pass

    def __init__(self, reader: CacheReader, max_patches: int, min_patch_size: int):
        self.reader, self.layout = reader, reader.layout
        self.max_patches, self.min_patch_size = int(max_patches), int(min_patch_size)
        self.device = torch.device("cpu")

    def to(self, device: torch.device) -> "ImageCacheSource":
        self.device = torch.device(device)
        return self

    def sample_targets(self, image_id: int, variant: int, image: np.ndarray,
                       sample: AugmentedSample) -> image_view.ImageViewTargets:
        """The targets of one view (sample.view) of the image `image` (as loaded), read and moved in the worker."""
        v = image_view.nearest_scale(sample.view, self.layout.scales)
        try:
            index = self.reader.index_of(image_id, v)
        except (KeyError, IndexError) as exc:
            raise CacheError(str(exc.args[0] if exc.args else exc)) from None
        image_hw = tuple(image.shape[:2])
        row_hw = image_view.scaled_hw(image_hw, self.layout.scales[v])
        move = image_view.row_to_view(image_hw, row_hw, sample.view)
        x0, y0, x1, y1 = window = image_view.source_window(move, row_hw)
        s = image_view.STRIDE
        parts = {name: () for name in _SMALL}
        parts["heatmap"] = (slice(None), slice(y0, y1), slice(x0, x1))
        parts["coarse"] = (slice(None), slice(y0 // s, -(-y1 // s)), slice(x0 // s, -(-x1 // s)))
        row = self.reader.read_parts(index, parts)
        if int(row["status"]) != STATUS_OK:
            raise CacheError(f"cache row (image id {image_id}, scale {self.layout.scales[v]:g}) was skipped at "
                             f"precompute: {str(row['aug_params'])}")
        if self.reader.fingerprint(row) != fingerprint_image(image):
            raise UserError(f"cache row (image id {image_id}) was made from a different image (fingerprint "
                            f"mismatch): the image file changed since precompute")
        chosen = image_view.crops_in_view(row, move, self.min_patch_size, self.max_patches)
        slots = [k for k, _ in chosen]
        refine = dict(zip(slots, self.reader.read_selections(index, "refine", [(k,) for k in slots])))
        return image_view.move_row(row, refine, self.layout, image_hw, sample.view, window, chosen,
                                   self.max_patches)

    def targets(self, batch: Mapping[str, Any]) -> KDTargets:
        """The batch's targets as float32 on the device: the heatmaps moved into their views here."""
        t = batch["kd_targets"]
        heat, valid = image_view.move_heatmaps(batch["kd_heatmaps"], batch["img"].shape[-2:], self.device)
        return dequantize_targets(replace(t, heatmap=heat, heatmap_valid=valid))
