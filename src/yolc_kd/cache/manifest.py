"""The cache manifest (root group attribute `yolc_kd_cache`): what made the targets, and field-by-field
comparison of a manifest with what a rerun or a training run expects."""
from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np

from yolc_kd.cache.schema import MANIFEST_KEY, SCHEMA_VERSION

# fields that decide what the targets are: a training config must agree on all of them
TRAIN_FIELDS = ("schema_version", "teacher.model", "augment", "input_size", "classes", "distill", "crop",
                "patch_canvas", "seed")
# an image-level cache serves any view augmentation and sample order (the views are drawn at training time); the
# teacher's input was normalised with the config's mean, std and channel order
IMAGE_TRAIN_FIELDS = tuple(f for f in TRAIN_FIELDS if f not in ("augment", "seed")) + (
    "augment.mean", "augment.std", "augment.to_rgb")
# a rerun on an existing cache must also agree on how the cache was laid out and made
RESUME_FIELDS = TRAIN_FIELDS + ("package_version", "teacher.ckpt_sha256", "kind", "variants", "scales", "shard_size",
                                "annotations.sha256", "annotations.num_images", "amp", "layout")
DISTILL_FIELDS = ("max_patches_per_img", "min_patch_size", "use_teacher_crop")


def sha256_file(path: Any, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


def jsonable(obj: Any) -> Any:
    """Tuples -> lists, numpy scalars/arrays -> Python, Paths -> str, recursively (what the JSON stores)."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


# test_cfg.crop keys that no KD plan reads: not part of what a cache is made with (older caches stay valid)
INFERENCE_ONLY_CROP_KEYS = ("patch_budget",)


def target_identity(*, teacher_model: Mapping, augment: Mapping, input_size: Sequence[int], classes: Sequence[str],
                    distill: Mapping, crop: Mapping, patch_canvas: Sequence[int], seed: int) -> Dict[str, Any]:
    """The TRAIN_FIELDS part of a manifest, from the values a config implies."""
    teacher_model = copy.deepcopy(dict(teacher_model))
    crop_cfg = (teacher_model.get("test_cfg") or {}).get("crop")
    for key in INFERENCE_ONLY_CROP_KEYS if isinstance(crop_cfg, dict) else ():
        crop_cfg.pop(key, None)
    return jsonable(dict(
        schema_version=SCHEMA_VERSION, teacher=dict(model=teacher_model), augment=augment,
        input_size=list(input_size), classes=list(classes), distill={k: distill[k] for k in DISTILL_FIELDS},
        crop=dict(enlarge=float(crop["enlarge"]), upscale=float(crop["upscale"])),
        patch_canvas=list(patch_canvas), seed=int(seed)))


def get_field(manifest: Mapping, dotted: str) -> Any:
    cur: Any = manifest
    for part in dotted.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return _ABSENT
        cur = cur[part]
    return cur


class _Absent:
    def __repr__(self) -> str:
        return "<absent>"


_ABSENT = _Absent()


def _short(v: Any, width: int = 60) -> str:
    text = repr(v)
    return text if len(text) <= width else text[:width - 3] + "..."


def _leaf_diffs(path: str, a: Any, b: Any, now: str, out: List[str]) -> None:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for k in sorted(set(a) | set(b), key=str):
            _leaf_diffs(f"{path}.{k}", a.get(k, _ABSENT), b.get(k, _ABSENT), now, out)
    elif a != b:
        out.append(f"{path} (cache {_short(a)}, {now} {_short(b)})")


def diff_fields(cached: Mapping, expected: Mapping, fields: Iterable[str], now: str = "now") -> List[str]:
    """One line per differing leaf of the given dotted fields: 'augment.ratios (cache [1.0], now [0.9])'."""
    out: List[str] = []
    for f in fields:
        _leaf_diffs(f, get_field(cached, f), get_field(expected, f), now, out)
    return out


def read_manifest(attrs: Mapping) -> Optional[Dict[str, Any]]:
    """The manifest of a cache's root attributes, or None. A cache written before there were two kinds says
    nothing of its kind: it is a per-view cache (kind "view", no scales), and reads as one written now."""
    m = attrs.get(MANIFEST_KEY)
    return with_kind(m) if isinstance(m, Mapping) else None


LATER_FIELDS = {"kind": "view", "scales": [], "mirrored": False}  # their value in a manifest written before them


def with_kind(manifest: Mapping) -> Dict[str, Any]:
    """The manifest with the fields added since the first format said (LATER_FIELDS: a per-view cache's values
    when absent), top level and layout."""
    m = {**LATER_FIELDS, **dict(manifest)}
    if isinstance(m.get("layout"), Mapping):
        m["layout"] = {**LATER_FIELDS, **dict(m["layout"])}
    return m
