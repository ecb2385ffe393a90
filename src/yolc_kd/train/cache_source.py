"""The soft-label cache as the trainer's TargetSource: checks the cache against the training config once, then
serves per sample the stored KDTargets of the cached view (view kind) or, for an image-level cache, the targets
moved into the sample's fresh view (train/image_source.py). Picklable for DataLoader workers."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Tuple, Union

import numpy as np
import torch

from yolc_kd.cache.arrays import STATUS_OK, dequantize_targets, target_specs
from yolc_kd.cache.manifest import IMAGE_TRAIN_FIELDS, TRAIN_FIELDS, diff_fields, sha256_file
from yolc_kd.cache.reader import CacheError, CacheReader
from yolc_kd.data.augment import AugmentConfig, AugmentedSample
from yolc_kd.data.coco import CocoDetection
from yolc_kd.errors import UserError
from yolc_kd.kd import KDTargets
from yolc_kd.teacher import expected_target_identity
from yolc_kd.train.image_source import ImageCacheSource

_TARGETS = target_specs()  # the table's KD target arrays, and what read() takes of a sample
_READ = [t.name for t in _TARGETS] + ["fingerprint", "status", "aug_params"]

class CacheTargetSource:
    """TargetSource over a finished cache: read() serves one sample's stored targets in the DataLoader workers
    (raises CacheError, a UserError, for a damaged or skipped sample); targets() dequantises the batch.

    Args:
        reader: the opened per-view cache.
    """
    reads_samples = True

    def __init__(self, reader: CacheReader):
        self.reader = reader
        self.num_variants = reader.num_variants

    def to(self, device: torch.device) -> "CacheTargetSource":
        return self

    def targets(self, batch: Mapping[str, Any]) -> KDTargets:
        """The batch's stored targets (already on the device), as float32."""
        return dequantize_targets(batch["kd_targets"])

    def sample_targets(self, image_id: int, variant: int, image: np.ndarray, sample: AugmentedSample) -> KDTargets:
        """The stored targets of the view `sample` (batch 1), after checking that the replayed view is the one
        the teacher saw."""
        fingerprint, targets = self.read(image_id, variant)
        if fingerprint != sample.fingerprint:
            raise UserError(f"cache sample (image id {image_id}, variant {variant}) was made from a different view "
                            f"(fingerprint {fingerprint} != replayed {sample.fingerprint}): the augmentation, image "
                            f"file or package version changed")
        return targets

    def read(self, image_id: int, variant: int) -> Tuple[str, KDTargets]:
        try:
            index = self.reader.index_of(image_id, variant)
        except (KeyError, IndexError) as exc:
            raise CacheError(str(exc.args[0] if exc.args else exc)) from None
        s = self.reader.read_sample(index, _READ)
        if int(s["status"]) != STATUS_OK:
            raise CacheError(f"cache sample (image id {image_id}, variant {variant}) was skipped at precompute: "
                             f"{str(s['aug_params'])}")
        # stored dtypes travel through the DataLoader (4x fewer bytes to collate); dequantize_targets() after
        t = KDTargets(**{a.name: torch.from_numpy(np.asarray(s[a.name], a.dtype))[None] for a in _TARGETS})
        return self.reader.fingerprint(s), t


def open_cache_source(path: Any, cfg: Mapping, aug_cfg: AugmentConfig,
                      coco: CocoDetection) -> Union[CacheTargetSource, ImageCacheSource]:
    """Open a finished cache (either kind) for training with cfg; one UserError lists every way it does not fit."""
    reader = CacheReader(path)
    m = reader.manifest
    if not reader.complete:
        raise UserError(f"cache {path} is incomplete (its precompute run did not finish): rerun the same "
                        f"`yolc-kd precompute` command to complete it")
    image_kind = reader.layout.kind == "image"
    fields = IMAGE_TRAIN_FIELDS if image_kind else TRAIN_FIELDS
    problems = diff_fields(m, expected_target_identity(cfg, aug_cfg, coco.classes), fields, now="config")
    ckpt = cfg["distill"].teacher_ckpt
    if ckpt and Path(ckpt).is_file():  # the config names a teacher file: the cache must come from it
        cached_sha = (m.get("teacher") or {}).get("ckpt_sha256")
        if cached_sha != sha256_file(ckpt):
            problems.append(f"teacher.ckpt_sha256 (cache {str(cached_sha)[:12]}, config's {ckpt} "
                            f"{sha256_file(ckpt)[:12]})")
    ids = [coco.image_info(i)["id"] for i in range(len(coco))]
    missing = [x for x in ids if not reader.has_image(x)]
    if missing:
        problems.append(f"{len(missing)} training image id(s) not in the cache (first: {missing[:5]})")
    if problems:
        shown = "; ".join(problems[:10]) + (f"; +{len(problems) - 10} more" if len(problems) > 10 else "")
        raise UserError(f"cache {path} does not match the training config: {shown}")
    if image_kind:
        return ImageCacheSource(reader, cfg["distill"].max_patches_per_img, cfg["distill"].min_patch_size)
    return CacheTargetSource(reader)
