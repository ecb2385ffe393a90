"""The COCO data a command works on: paths from the arguments or the config's data.<split>, the dataset
checked against the model's classes and its image files checked before the first step (check_images), the
config's count settings checked (check_config_counts), and the DataLoader that brings a worker's UserError
back as one line (OneLineLoader)."""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from torch.utils.data import DataLoader, get_worker_info

from yolc_kd.data.coco import CocoDetection, root_hint
from yolc_kd.data.images import display_path
from yolc_kd.errors import UserError


# mmdet 2.x dataset wrappers: only RepeatDataset has a meaning here
WRAPPERS = ("RepeatDataset", "ConcatDataset", "ClassBalancedDataset", "MultiImageMixDataset")


def _unwrap(cfg: Mapping, split: str) -> Tuple[Mapping, int]:
    """(the innermost dataset dict of data.<split>, the product of its RepeatDataset `times`). mmdet's meaning:
    RepeatDataset(times=T) makes one epoch T passes over every image. Other wrappers are one UserError."""
    spec = (cfg.get("data") or {}).get(split) or {}
    times, where = 1, f"data.{split}"
    while isinstance(spec, Mapping) and ("dataset" in spec or "datasets" in spec or spec.get("type") in WRAPPERS):
        kind = spec.get("type")
        if kind != "RepeatDataset":
            raise UserError(f"config {cfg.get('_path', '')}: {where} type {kind!r} is not supported (RepeatDataset "
                            f"is; merge several COCO files into one json for a ConcatDataset)")
        t = spec.get("times", 1)
        if isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise UserError(f"config {cfg.get('_path', '')}: {where}.times must be an integer >= 1, got {t!r}")
        times, where, spec = times * t, where + ".dataset", spec.get("dataset") or {}
    if isinstance(spec, Mapping) and isinstance(spec.get("ann_file"), (list, tuple)):
        raise UserError(f"config {cfg.get('_path', '')}: {where}.ann_file lists several files (mmdet's "
                        f"ConcatDataset); merge them into one COCO json")
    return (spec if isinstance(spec, Mapping) else {}), times


def data_paths(cfg: Mapping, split: str = "train") -> Tuple[Optional[str], Optional[str], Optional[list]]:
    """(ann_file, img_prefix, classes) of data.<split> in an mmdet config, unwrapping RepeatDataset."""
    spec, _ = _unwrap(cfg, split)
    return spec.get("ann_file"), spec.get("img_prefix"), spec.get("classes")


def dataset_repeats(cfg: Mapping, split: str = "train") -> int:
    """Passes over every image in one epoch: data.<split>'s RepeatDataset `times` (nested wrappers multiply),
    1 without one."""
    return _unwrap(cfg, split)[1]


def resolve_data(cfg: Mapping, ann: Optional[str], images: Optional[str], split: str = "train") -> Tuple[str, str]:
    """--ann / --images, else the config's data.<split>.ann_file / img_prefix."""
    c_ann, c_img, _ = data_paths(cfg, split)
    ann, images = ann or c_ann, images or c_img
    if not ann or not images:
        raise UserError(f"no {split} data: pass --ann and --images or set data.{split}.ann_file/img_prefix in the config")
    return ann, images


def load_dataset(cfg: Mapping, ann: str, images: str) -> CocoDetection:
    """The COCO dataset, its classes checked against the model's; warnings printed."""
    from yolc_kd.config import num_classes_of

    coco = CocoDetection(ann, images, classes=cfg.get("classes"))
    if coco.num_classes != num_classes_of(cfg["model"]):
        raise UserError(f"{ann} has {coco.num_classes} classes but the model has {num_classes_of(cfg['model'])}")
    for w in coco.warnings:
        print(f"warning: {w}")
    return coco


def _first_names(coco: CocoDetection, positions: Sequence[int], shown: int = 3) -> str:
    names = ", ".join(display_path(coco.image_info(i)["file_name"]) for i in positions[:shown])
    return names + (f" (+{len(positions) - shown} more)" if len(positions) > shown else "")


def check_images(coco: CocoDetection, skip_bad: bool, skip_hint: str = "pass --skip-bad to skip them",
                 warn: Callable[[str], None] = print, flag: str = "--images") -> List[int]:
    """Before the first step: every image file of `coco` exists under its root (one stat per image, no decode).

    No image found: a UserError naming the likely image root (as the `flag` to pass). Some missing: a UserError
    with the count and the first names, ending with `skip_hint` (how the command skips them), or with skip_bad
    one counted warning through `warn`. Returns the positions of the missing images (to skip)."""
    n = len(coco)
    if n == 0:
        raise UserError(f"{display_path(coco.ann_file)} lists no images")
    missing = coco.missing_images()
    if not missing:
        return []
    root = display_path(coco.img_root)
    if len(missing) == n:
        hint = root_hint(coco.img_root, coco.image_info(0)["file_name"], flag)
        raise UserError(f"0 of {n} images found under {root}" + (f"; {hint}" if hint else ""))
    what = f"{len(missing)} of {n} images not found under {root}: {_first_names(coco, missing)}"
    if not skip_bad:
        raise UserError(f"{what}; {skip_hint}")
    warn(f"warning: skipping {what}")
    return missing


# (section, key, minimum) of the counts in a config that reach the trainer and precompute
# the data section's counts (the schedule's are ScheduleSettings', checked when the config is loaded)
CONFIG_COUNTS: Tuple[Tuple[str, str, int], ...] = (("data", "samples_per_gpu", 1), ("data", "workers_per_gpu", 0))


def check_config_counts(cfg: Mapping) -> None:
    """One UserError line naming the config key when a count setting is below its minimum
    (config.py has already checked the types)."""
    where = cfg.get("_path", "config")
    for section, key, minimum in CONFIG_COUNTS:
        value = (cfg.get(section) or {}).get(key) if isinstance(cfg.get(section), Mapping) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < minimum:
            raise UserError(f"config {where}: '{section}.{key}' must be at least {minimum}, got {value!r}")


# ----------------------------------------------------------------------------- errors from DataLoader workers

def worker_message(exc: UserError) -> Optional[str]:
    """The original message of a UserError torch re-raised from a DataLoader worker ("Caught UserError in
    DataLoader worker process 0. Original Traceback ...": its last line is "<type>: <message>"), else None."""
    text = str(exc)
    if "DataLoader worker process" not in text.split("\n", 1)[0]:
        return None
    lines = [line for line in text.splitlines() if line.strip()]
    _, sep, message = lines[-1].partition(": ")
    return message if sep else lines[-1]


class OneLineLoader(DataLoader):
    """A DataLoader whose workers' UserErrors reach the main process as the same one-line UserError as without
    workers: a dataset returns dict(error=message) from a worker (see worker_error) and collates it through
    (a batch that is a dict with "error"); a UserError raised in a worker anyway is cut back to its message."""

    def __iter__(self) -> Iterator[Any]:
        batches = super().__iter__()
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except UserError as exc:
                message = worker_message(exc)
                if message is None:
                    raise
                raise UserError(message) from None
            if isinstance(batch, Mapping) and batch.get("error"):
                raise UserError(str(batch["error"]))
            yield batch


def worker_error(exc: UserError) -> Dict[str, str]:
    """In a DataLoader worker: the error as data (dict(error=message)) for OneLineLoader to raise in the main
    process. In the main process (num_workers=0): raises exc itself."""
    if get_worker_info() is None:
        raise exc
    return dict(error=str(exc))
