"""Training samples: (image, variant) -> replayed YOLC augmentation (+ KD targets from a source)."""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Mapping, Optional, Protocol, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from yolc_kd.cache.image_view import ImageViewTargets
from yolc_kd.data.augment import AugmentedSample, TrainAugment
from yolc_kd.data.coco import CocoDetection
from yolc_kd.data.loading import OneLineLoader, worker_error
from yolc_kd.errors import UserError
from yolc_kd.kd import KDTargets
from yolc_kd.train.reaugment import flip_sample


class TargetSource(Protocol):
    """Where the trainer's KD targets come from: the soft-label cache of either kind (train/cache_source.py,
    train/image_source.py) or a live teacher (train/teacher_source.py). The trainer only calls to() and
    targets(); a source that stores per-sample targets (reads_samples) also serves sample_targets() to the
    dataset in the DataLoader workers.

    Args:
        num_variants: the cached views per image (None: a fresh view every pass).
        reads_samples: whether the dataset calls sample_targets() per sample.
    """
    num_variants: Optional[int]
    reads_samples: bool

    def to(self, device: torch.device) -> "TargetSource":
        """Move what the source computes with to the training device."""

    def targets(self, batch: Mapping[str, Any]) -> KDTargets:
        """KDTargets of a batch already on the device."""

    def sample_targets(self, image_id: int, variant: int, image: np.ndarray,
                       sample: AugmentedSample) -> Union[KDTargets, ImageViewTargets]:
        """The targets of one training sample (batch size 1), `sample` the view of `image` (as loaded) drawn with
        key (seed, image_id, variant); a UserError when the cache was made from something else."""


class TrainSamples(Dataset):
    """Item (k, v): the k-th used image (all of coco, or `indices`, e.g. without the missing files) augmented
    with key (seed, image_id, v); with a source, its cached targets, after checking that the replayed view is
    the one the teacher saw. A bad sample gives dict(bad=message) with skip_bad; else its UserError is raised,
    or in a DataLoader worker returned as dict(error=message) for OneLineLoader to raise as one line.

    Args:
        coco: the dataset.
        augment: the training augmentation.
        seed: the run's seed (a view's draw depends on seed, image id and variant).
        source: where per-sample KD targets come from, or None.
        skip_bad: a bad sample gives dict(bad=message) instead of raising.
        indices: the image positions to use (None: all of coco).
    """

    def __init__(self, coco: CocoDetection, augment: TrainAugment, seed: int,
                 source: Optional[TargetSource] = None, skip_bad: bool = False,
                 indices: Optional[Sequence[int]] = None):
        self.coco, self.augment, self.seed, self.source, self.skip_bad = coco, augment, seed, source, skip_bad
        self.indices = list(range(len(coco))) if indices is None else [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: Tuple[int, ...]) -> Optional[Dict[str, Any]]:
        k, variant = item[:2]
        i = self.indices[k]
        mirrored = len(item) > 2 and bool(item[2])  # the sampler asks for the mirrored cached view
        info = self.coco.image_info(i)
        try:
            image = self.coco.load_image(i)
            boxes, labels = self.coco.annotations(i)
            sample = self.augment(image, boxes, labels, (self.seed, int(info["id"]), int(variant)))
            out = dict(img=sample.img, meta=sample.meta, boxes=torch.from_numpy(np.asarray(sample.boxes, np.float32)),
                       labels=torch.from_numpy(np.asarray(sample.labels, np.int64)), image_id=int(info["id"]),
                       variant=int(variant), fingerprint=sample.fingerprint)
            if self.source is not None and self.source.reads_samples:
                got = self.source.sample_targets(int(info["id"]), int(variant), image, sample)
                if isinstance(got, ImageViewTargets):  # the heatmap moves into the view on the device
                    out["kd_targets"], out["kd_heatmap"] = got.targets, (got.heatmap_window, got.heatmap_move)
                else:
                    out["kd_targets"] = got
            return flip_sample(out) if mirrored else out
        except UserError as exc:
            if self.skip_bad:
                return dict(bad=f"image id {info['id']} variant {variant}: {exc}")
            return worker_error(exc)


def collate_train(items: List[Dict[str, Any]]) -> Dict[str, Any]:
    errors = [it["error"] for it in items if "error" in it]
    if errors:  # from a worker: OneLineLoader raises it in the main process
        return dict(error=errors[0], bad=[], size=0)
    bad = [it["bad"] for it in items if "bad" in it]
    items = [it for it in items if "bad" not in it]
    batch: Dict[str, Any] = dict(bad=bad, size=len(items))
    if not items:
        return batch
    batch.update(img=torch.stack([it["img"] for it in items]), img_metas=[it["meta"] for it in items],
                 gt_bboxes=[it["boxes"] for it in items], gt_labels=[it["labels"] for it in items],
                 keys=[(it["image_id"], it["variant"]) for it in items])
    if "kd_targets" in items[0]:
        batch["kd_targets"] = KDTargets.stack([it["kd_targets"] for it in items])
    if "kd_heatmap" in items[0]:
        batch["kd_heatmaps"] = [it["kd_heatmap"] for it in items]
    return batch


class TrainLoader(OneLineLoader):
    """The trainer's DataLoader: a worker's UserError as one line (OneLineLoader), and a whole epoch whose every
    sample was skipped (skip_bad) a UserError instead of an endless run of empty epochs."""

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        usable, bad = 0, []
        for batch in super().__iter__():
            usable += int(batch.get("size", 0))
            bad += batch.get("bad", [])
            yield batch
        whole_epoch = getattr(self.sampler, "skip", 0) == 0  # not the tail of an epoch after --resume
        if not usable and bad and whole_epoch:
            raise UserError(f"all {len(bad)} samples of an epoch were skipped as damaged, nothing to train on "
                            f"(first: {bad[0]})")


class VariantSampler(Sampler):
    """DistributedSampler over the epoch's items, each an image position with the variant of its pass.

    Args:
        n: images in the dataset.
        seed: shuffle seed.
        num_variants: cached views per image (K), or None for a fresh augmentation every pass.
        rank, world: this process and the process count (torchrun).
        shuffle: shuffle each epoch (mmdet's sampler does).
        flip: with a cache only, passes K..2K-1 read the mirrored cached views, so 2K passes see distinct views.
        repeats: passes over every image in one epoch (mmdet's RepeatDataset `times`): an epoch holds
            n * repeats items, shuffled together as mmdet shuffles a RepeatDataset; item j is image j % n in
            pass epoch * repeats + j // n.

    A pass p reads variant p % K of a cache, or variant p (fresh) without one. `skip` drops the first items of
    the epoch (resuming mid-epoch)."""

    def __init__(self, n: int, seed: int, num_variants: Optional[int] = None, rank: int = 0, world: int = 1,
                 shuffle: bool = True, flip: bool = False, repeats: int = 1):
        self.n, self.repeats = int(n), max(1, int(repeats))
        self.base = DistributedSampler(range(self.n * self.repeats), num_replicas=world, rank=rank, shuffle=shuffle,
                                       seed=seed)
        self.num_variants = num_variants
        self.flip = bool(flip and num_variants)
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip
        self.base.set_epoch(epoch)

    def variant(self, pass_index: int) -> int:
        """The view a pass reads: pass % K of a cache, the pass itself for fresh augmentation."""
        return pass_index % self.num_variants if self.num_variants else pass_index

    def mirrored(self, pass_index: int) -> bool:
        return self.flip and (pass_index // self.num_variants) % 2 == 1

    def __iter__(self) -> Iterator[Tuple[int, ...]]:
        items = []
        for j in list(self.base)[self.skip:]:
            image, p = j % self.n, self.epoch * self.repeats + j // self.n
            items.append((image, self.variant(p), 1) if self.mirrored(p) else (image, self.variant(p)))
        return iter(items)

    def __len__(self) -> int:
        return len(self.base) - self.skip
