"""The augmented views the teacher labels: one item per batch job (consecutive samples of one shard),
replayed exactly as the student trainer will (TrainAugment key = (seed, image_id, variant))."""
from __future__ import annotations

import json
from typing import Any, Dict, List, Sequence

import torch
from torch.utils.data import Dataset

from yolc_kd.cache.manifest import jsonable
from yolc_kd.cache.arrays import STATUS_OK, STATUS_SKIPPED
from yolc_kd.data.augment import TrainAugment
from yolc_kd.data.coco import CocoDetection
from yolc_kd.errors import UserError


def plan_jobs(shards: Sequence[int], shard_range, batch_size: int) -> List[List[int]]:
    """Split each shard's sample range into batches. Batches never cross shards and start at the shard's first
    sample, so a batch's contents (and the teacher's numerics) do not depend on where a run resumed."""
    jobs = []
    for j in shards:
        a, b = shard_range(j)
        jobs += [list(range(k, min(k + batch_size, b))) for k in range(a, b, batch_size)]
    return jobs


def image_ids_of(coco: CocoDetection) -> List[int]:
    ids = []
    for i in range(len(coco)):
        raw = coco.image_info(i)["id"]
        try:
            ids.append(int(raw))
        except (TypeError, ValueError):
            raise UserError(f"{coco.ann_file}: image id {raw!r} is not an integer (the cache keys views by "
                            f"integer image id)") from None
    return ids


class ViewJobs(Dataset):
    """Item k -> dict(records, img (n_ok,3,H,W) or None, metas): a record per sample of job k with
    index, image_id, variant, status and params/fingerprint (ok) or reason (skipped). Never raises for a bad image.

    Args:
        coco: the dataset.
        augment: the training augmentation that draws each view.
        seed: the run's seed (a view's draw depends on seed, image id and variant).
        variants: views per image.
        image_ids: the cache's image ids, by image position.
        jobs: per job, the sample indices (image position * variants + variant) it makes.
    """

    def __init__(self, coco: CocoDetection, augment: TrainAugment, seed: int, variants: int,
                 image_ids: Sequence[int], jobs: List[List[int]]):
        self.coco, self.augment, self.seed, self.variants = coco, augment, seed, variants
        self.image_ids, self.jobs = list(image_ids), jobs

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, k: int) -> Dict[str, Any]:
        records, imgs, metas = [], [], []
        loaded: Dict[int, Any] = {}  # the K variants of an image are adjacent: decode it once per job
        for index in self.jobs[k]:
            i, v = divmod(index, self.variants)
            rec: Dict[str, Any] = dict(index=index, image_id=self.image_ids[i], variant=v)
            try:
                if i not in loaded:
                    loaded.clear()
                    loaded[i] = self.coco.load_image(i)
                boxes, labels = self.coco.annotations(i)
                s = self.augment(loaded[i], boxes, labels, (self.seed, self.image_ids[i], v))
            except (UserError, OSError, ValueError) as exc:
                rec.update(status=STATUS_SKIPPED, reason=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                records.append(rec)
                continue
            rec.update(status=STATUS_OK, fingerprint=s.fingerprint,
                       params=json.dumps(jsonable(s.params), sort_keys=True, separators=(",", ":")))
            records.append(rec)
            imgs.append(s.img)
            metas.append(s.meta)
        return dict(records=records, img=torch.stack(imgs) if imgs else None, metas=metas)


def passthrough(item: Any) -> Any:
    """DataLoader collate for already-batched items (module level: picklable for worker processes)."""
    return item
