"""COCO bbox evaluation (pycocotools) with metrics at an arbitrary largest maxDets.

pycocotools' ``summarize()`` hard-codes ``maxDets[2]`` for AP, so with the aerial-detection
setting ``maxDets=(1, 10, 100, 500)`` it would report AP@100. Here every AP is read from
``cocoEval.eval['precision']`` at the LARGEST maxDets instead.

Metrics that are undefined (no ground truth in that area range / class) are -1.0, the
pycocotools convention; ``format_table`` shows them as ``-``. With no predictions at all
every defined metric is 0.0.

Predictions are converted to a COCO result set here rather than through ``COCO.loadRes``
(which crashes on an empty list and asserts on unknown image ids).
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence, Tuple, Union

import numpy as np

from yolc_kd.errors import UserError

PathLike = Union[str, "os.PathLike[str]"]
DEFAULT_MAX_DETS: Tuple[int, ...] = (1, 10, 100, 500)
AREAS = ("all", "small", "medium", "large")  # pycocotools' areaRngLbl order


@contextlib.contextmanager
def _maybe_quiet(quiet: bool) -> Iterator[None]:
    if quiet:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    else:
        yield


def _load_json(path: PathLike, what: str) -> Any:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} file not found: {p}")
    if p.is_dir():
        raise UserError(f"expected a {what} json file, got a directory: {p}")
    try:
        with open(p, "r", encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{what} file is not valid JSON: {p} ({exc})") from None
    except OSError as exc:
        raise UserError(f"cannot read {what} file {p}: {exc.strerror or exc}") from None


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _load_gt(ann_file: PathLike) -> Dict[str, Any]:
    data = _load_json(ann_file, "annotation")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("categories"), list):
        raise UserError(f"not a COCO annotation file (needs 'images' and 'categories' lists): {ann_file}")
    anns = data.get("annotations") or []
    if not isinstance(anns, list):
        raise UserError(f"'annotations' must be a list in {ann_file}")
    fixed: List[Dict[str, Any]] = []
    used_ids = {a.get("id") for a in anns if isinstance(a, dict)}
    next_id = max([i for i in used_ids if isinstance(i, int)] + [0]) + 1
    seen: set = set()
    for i, ann in enumerate(anns):
        if not isinstance(ann, dict) or "image_id" not in ann or "category_id" not in ann:
            raise UserError(f"annotation #{i} in {ann_file} lacks image_id/category_id")
        bbox = ann.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            raise UserError(f"annotation #{i} in {ann_file} has no valid [x,y,w,h] bbox")
        a = dict(ann)
        a.setdefault("iscrowd", 0)
        a.setdefault("area", float(bbox[2]) * float(bbox[3]))
        if a.get("id") is None or a["id"] in seen:
            a["id"] = next_id
            next_id += 1
        seen.add(a["id"])
        fixed.append(a)
    out = dict(data)
    out["annotations"] = fixed
    return out


def _load_preds(preds: Union[PathLike, Sequence[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    if isinstance(preds, (str, os.PathLike)):
        data = _load_json(preds, "predictions")
        where = str(preds)
    else:
        data = list(preds)
        where = "predictions"
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        data = data["annotations"]  # tolerate {"annotations": [...]} wrappers
    if not isinstance(data, list):
        raise UserError(f"predictions must be a JSON list of detections: {where}")
    return data


def _member(x: Any, ids: set) -> bool:
    try:
        return x in ids
    except TypeError:  # unhashable (list, dict)
        return False


def _to_results(preds: List[Any], img_ids: set, cat_ids: set) -> List[Dict[str, Any]]:
    """Validate predictions and convert them to COCO result annotations."""
    out: List[Dict[str, Any]] = []
    for i, d in enumerate(preds):
        if not isinstance(d, dict):
            raise UserError(f"prediction #{i} is not an object")
        missing = [k for k in ("image_id", "category_id", "bbox", "score") if k not in d]
        if missing:
            raise UserError(f"prediction #{i} lacks {', '.join(missing)}")
        if not _member(d["image_id"], img_ids):
            raise UserError(f"prediction #{i} refers to image id {d['image_id']!r} not in the annotation file")
        if not _member(d["category_id"], cat_ids):
            raise UserError(f"prediction #{i} refers to unknown category id {d['category_id']!r}")
        bbox = d["bbox"]
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_is_number(v) for v in bbox) \
                or not all(math.isfinite(float(v)) for v in bbox):
            raise UserError(f"prediction #{i} has no valid [x,y,w,h] bbox")
        if not _is_number(d["score"]) or not math.isfinite(float(d["score"])):
            raise UserError(f"prediction #{i} has a non-numeric score")
        x, y, w, h = (float(v) for v in bbox)
        out.append({"id": i + 1, "image_id": d["image_id"], "category_id": d["category_id"],
                    "bbox": [x, y, w, h], "score": float(d["score"]), "area": w * h, "iscrowd": 0})
    return out


def _mean_valid(a: np.ndarray) -> float:
    valid = a[a > -1]
    return float(np.mean(valid)) if valid.size else -1.0


def _check_max_dets(max_dets: Sequence[int]) -> List[int]:
    try:
        vals = sorted({int(m) for m in max_dets})
    except (TypeError, ValueError):
        raise UserError(f"max_dets must be positive integers, got {max_dets!r}") from None
    if not vals or vals[0] < 1:
        raise UserError(f"max_dets must be positive integers, got {list(max_dets)!r}")
    return vals


def evaluate_coco(ann_file: PathLike, preds: Union[PathLike, List[Dict[str, Any]]],
                  max_dets: Sequence[int] = DEFAULT_MAX_DETS, quiet: bool = True) -> Dict[str, Any]:
    """COCO bbox metrics; AP* at max(max_dets), ``AR@m`` for each m, per-class AP by name."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    dets = _check_max_dets(max_dets)
    gt_data = _load_gt(ann_file)
    img_ids = {im["id"] for im in gt_data["images"] if isinstance(im, dict) and "id" in im}
    cats = [c for c in gt_data["categories"] if isinstance(c, dict) and "id" in c]
    cat_ids = {c["id"] for c in cats}
    results = _to_results(_load_preds(preds), img_ids, cat_ids)

    with _maybe_quiet(quiet):
        coco_gt = COCO()
        coco_gt.dataset = gt_data
        coco_gt.createIndex()
        coco_dt = COCO()
        coco_dt.dataset = {"images": copy.deepcopy(gt_data["images"]),
                           "categories": copy.deepcopy(gt_data["categories"]), "annotations": results}
        coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.maxDets = dets
        ev.evaluate()
        ev.accumulate()
        if not quiet:
            print("(pycocotools summarize() below uses maxDets[2]; the table uses the largest maxDets)")
            ev.summarize()

    precision = ev.eval["precision"]  # [T, R, K, A, M]
    recall = ev.eval["recall"]  # [T, K, A, M]
    iou_thrs = ev.params.iouThrs
    t50 = int(np.argmin(np.abs(iou_thrs - 0.5)))
    t75 = int(np.argmin(np.abs(iou_thrs - 0.75)))
    m = len(dets) - 1

    res: Dict[str, Any] = {
        "AP": _mean_valid(precision[:, :, :, 0, m]),
        "AP50": _mean_valid(precision[t50, :, :, 0, m]),
        "AP75": _mean_valid(precision[t75, :, :, 0, m]),
    }
    for a, area in enumerate(AREAS[1:], start=1):
        res[f"AP_{area}"] = _mean_valid(precision[:, :, :, a, m])
    for j, md in enumerate(dets):
        res[f"AR@{md}"] = _mean_valid(recall[:, :, 0, j])
    per_class: Dict[str, float] = {}
    names = [str(c.get("name", c["id"])) for c in cats]
    by_id = {c["id"]: n for c, n in zip(cats, names)}
    for k, cid in enumerate(ev.params.catIds):
        name = by_id.get(cid, str(cid))
        if names.count(name) > 1 or name in per_class:
            name = f"{name}#{cid}"
        per_class[name] = _mean_valid(precision[:, :, k, 0, m])
    res["per_class"] = per_class
    res["max_dets"] = dets
    res["num_images"] = len(img_ids)
    res["num_preds"] = len(results)
    return res


def _fmt(v: float) -> str:
    return "    -" if v is None or v < 0 else f"{v:.3f}"


def format_table(result: Dict[str, Any]) -> str:
    """Fixed-width text table of an ``evaluate_coco`` result."""
    dets = result.get("max_dets") or sorted(int(k[3:]) for k in result if k.startswith("AR@"))
    top = dets[-1] if dets else "?"
    rows: List[Tuple[str, float]] = [
        (f"AP    @[.50:.95] maxDets={top}", result["AP"]),
        (f"AP50  @0.50      maxDets={top}", result["AP50"]),
        (f"AP75  @0.75      maxDets={top}", result["AP75"]),
        (f"APs   small      maxDets={top}", result["AP_small"]),
        (f"APm   medium     maxDets={top}", result["AP_medium"]),
        (f"APl   large      maxDets={top}", result["AP_large"]),
    ]
    rows += [(f"AR    @[.50:.95] maxDets={md}", result[f"AR@{md}"]) for md in dets]
    width = max(len(r[0]) for r in rows)
    lines = [f"images: {result.get('num_images', '?')}   predictions: {result.get('num_preds', '?')}",
             f"{'metric'.ljust(width)}  value", "-" * (width + 7)]
    lines += [f"{name.ljust(width)}  {_fmt(v)}" for name, v in rows]
    per_class = result.get("per_class") or {}
    if per_class:
        cw = max(max(len(n) for n in per_class), len("class"))
        head = f"{'class'.ljust(cw)}  AP (maxDets={top})"
        lines += ["", head, "-" * len(head)]
        lines += [f"{n.ljust(cw)}  {_fmt(v)}" for n, v in per_class.items()]
    return "\n".join(lines)
