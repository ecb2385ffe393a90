"""The image-level cache as the trainer's TargetSource: every pass draws a fresh view (as training without KD
does) and the view's targets come from the cached rows of its image through the view's transform
(cache/image_view.py). The DataLoader workers read the parts of the row the view shows and move the box maps and
crops; the trainer moves the heatmap on the training device. Picklable for DataLoader workers."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Dict, Mapping, Optional, Set, Tuple

import numpy as np
import torch

from yolc_kd.cache import image_view
from yolc_kd.cache.arrays import STATUS_OK, dequantize_targets
from yolc_kd.cache.reader import CacheError, CacheReader
from yolc_kd.data.view_steps import scaled_hw
from yolc_kd.data.augment import AugmentedSample, fingerprint_image
from yolc_kd.errors import UserError
from yolc_kd.kd import KDTargets
from yolc_kd.stride import BOX_STRIDE

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
        self._shards: Dict[int, Tuple[int, Dict[str, np.ndarray]]] = {}  # per process: shard -> (first row, arrays)
        self._same_image: Set[int] = set()  # per process: image positions whose file matched the cache's fingerprint

    def to(self, device: torch.device) -> "ImageCacheSource":
        self.device = torch.device(device)
        return self

    def _small(self, index: int) -> Dict[str, Any]:
        """The small arrays of row `index` (status, params, fingerprint, crops): read a whole shard's at once (one
        chunk each) and kept, so later passes over the image read only its maps."""
        j = index // self.layout.shard_size
        shard = self._shards.get(j)
        if shard is None:
            if not self.reader.shard_done(j):
                raise CacheError(f"row {index} of {self.reader.path} is in shard {j}, which is not written yet "
                                 f"(rerun yolc-kd precompute)")
            a, b = self.layout.shard_range(j)
            values = self.reader.read_requests([(name, (slice(a, b),)) for name in _SMALL])
            shard = self._shards[j] = (a, dict(zip(_SMALL, values)))
        a, arrays = shard
        return {name: arr[index - a] for name, arr in arrays.items()}

    def sample_targets(self, image_id: int, variant: int, image: np.ndarray,
                       sample: AugmentedSample) -> image_view.ImageViewTargets:
        """The targets of one view (sample.view) of the image `image` (as loaded), read and moved in the worker."""
        v = self.layout.row_variant(image_view.nearest_scale(sample.view, self.layout.scales),
                                    image_view.view_mirrored(sample.view))
        try:
            index = self.reader.index_of(image_id, v)
        except (KeyError, IndexError) as exc:
            raise CacheError(str(exc.args[0] if exc.args else exc)) from None
        row = self._small(index)
        if int(row["status"]) != STATUS_OK:
            raise CacheError(f"cache row (image id {image_id}, scale {self.layout.row_scale(v):g}) was skipped at "
                             f"precompute: {str(row['aug_params'])}")
        if index // self.layout.variants not in self._same_image:  # hashed once per image and process
            if self.reader.fingerprint(row) != fingerprint_image(image):
                raise UserError(f"cache row (image id {image_id}) was made from a different image (fingerprint "
                                f"mismatch): the image file changed since precompute")
            self._same_image.add(index // self.layout.variants)
        image_hw = tuple(image.shape[:2])
        row_hw = scaled_hw(image_hw, self.layout.row_scale(v))
        move = image_view.row_to_view(image_hw, self.layout.row_scale(v), self.layout.row_mirrored(v), sample.view)
        x0, y0, x1, y1 = window = image_view.source_window(move, row_hw)
        chosen = image_view.crops_in_view(row, move, self.min_patch_size, self.max_patches)
        s = BOX_STRIDE
        maps = self.reader.read_requests(
            [("heatmap", (index, slice(None), slice(y0, y1), slice(x0, x1))),
             ("coarse", (index, slice(None), slice(y0 // s, -(-y1 // s)), slice(x0 // s, -(-x1 // s))))]
            + [("refine", (index, k)) for k, _ in chosen])
        row = dict(row, heatmap=maps[0], coarse=maps[1])
        refine = {k: m for (k, _), m in zip(chosen, maps[2:])}
        return image_view.move_row(row, refine, self.layout, image_hw, sample.view, window, chosen,
                                   self.max_patches)

    def targets(self, batch: Mapping[str, Any]) -> KDTargets:
        """The batch's targets as float32 on the device: the heatmaps moved into their views here."""
        t = batch["kd_targets"]
        heat, valid = image_view.move_heatmaps(batch["kd_heatmaps"], batch["img"].shape[-2:], self.device)
        return dequantize_targets(replace(t, heatmap=heat, heatmap_valid=valid))
