"""COCO-format detection dataset: contiguous labels, xyxy boxes, and lenient cleaning of bad annotations."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path, PurePosixPath
from typing import Any, Optional, Sequence

import numpy as np

from yolc_kd.data.images import PathLike, display_path, load_image_rgb, read_image_size
from yolc_kd.errors import UserError

# counters in CocoDetection.stats, with the wording used in CocoDetection.warnings
_DROP_REASONS = {
    "dropped_malformed": "malformed bbox (not 4 finite numbers)",
    "dropped_orphan": "an image_id that is not in 'images'",
    "dropped_crowd": "iscrowd=1",
    "dropped_unknown_category": "a category id outside the selected classes",
    "dropped_degenerate": "zero/negative width or height",
    "dropped_outside": "the box entirely outside its image",
}


def _load_json(path: Path) -> dict[str, Any]:
    shown = display_path(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise UserError(f"annotation file not found: {shown}") from None
    except IsADirectoryError:
        raise UserError(f"annotation file is a directory: {shown}") from None
    except OSError as exc:
        raise UserError(f"cannot read annotation file {shown}: {exc.strerror}") from None
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise UserError(f"annotation file {shown} is not UTF-8 encoded JSON") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"malformed JSON in {shown}: line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UserError(f"{shown} is not a COCO detection file (no 'images' list)")
    return data


def _safe_relpath(file_name: Any, ann_shown: str, image_id: Any) -> str:
    if not isinstance(file_name, str) or not file_name:
        raise UserError(f"{ann_shown}: image id {image_id} has no usable 'file_name'")
    if "\x00" in file_name:
        raise UserError(f"{ann_shown}: image id {image_id} has a NUL byte in its file_name")
    posix = PurePosixPath(file_name)
    if posix.is_absolute() or os.path.isabs(file_name) or ".." in posix.parts:
        raise UserError(
            f"{ann_shown}: file_name {display_path(file_name)!r} of image id {image_id} escapes the image root"
        )
    return file_name


def _parents(root: Path) -> list[Path]:
    """Up to 3 folders above root, as the user wrote it where possible (data/images -> data)."""
    parents = list(root.parents) or list(root.absolute().parents)
    return parents[:3]


def _subfolders(root: Path, limit: int = 64) -> list[Path]:
    try:
        return sorted(p for p in root.iterdir() if p.is_dir())[:limit]
    except OSError:
        return []


def root_hint(root: Path, file_name: str, flag: str = "--images") -> str:
    """Where the images probably are when `file_name` (relative, from the json) is not under `root`: a phrase
    naming the `flag` (--images) to try, or '' when no folder near root fits. Only stats, no decoding."""
    rel = PurePosixPath(file_name)
    for folder in _parents(root) + _subfolders(root):
        if (folder / rel).is_file():
            return f"file_name is relative to the image root, try {flag} {display_path(folder)}"
    if len(rel.parts) > 1 and (root / rel.name).is_file():
        return (f"{display_path(root / rel.name)} exists, but file_name {display_path(file_name)!r} starts with "
                f"the folder {display_path(str(rel.parent))!r}, which {display_path(root)} lacks")
    if len(rel.parts) > 1 and root.name == rel.parts[0]:
        return (f"the image root already ends with {rel.parts[0]!r}, the first folder of file_name "
                f"{display_path(file_name)!r}: try {flag} {display_path(root.parent)}")
    if not root.exists():
        return f"the image root {display_path(root)} does not exist"
    return ""


def _positive_int(value: Any) -> Optional[int]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return int(value) if value > 0 else None


class CocoDetection:
    """A COCO json plus an image root. Images keep the order of the json's 'images' list.

    Args:
        ann_file: the COCO annotation file.
        img_root: the folder the images' file_name is relative to.
        classes: class names in label order, each matched to a category by name (None: every category, in
            category id order).
    """

    def __init__(self, ann_file: PathLike, img_root: PathLike, classes: Optional[Sequence[str]] = None) -> None:
        self.ann_file = Path(ann_file)
        self.img_root = Path(img_root)
        self.warnings: list[str] = []
        self.stats: dict[str, int] = {}
        shown = display_path(self.ann_file)
        data = _load_json(self.ann_file)
        cat_to_label = self._build_categories(data.get("categories"), classes, shown)
        self._images: list[dict[str, Any]] = []
        self._index: dict[Any, int] = {}
        for pos, entry in enumerate(data["images"]):
            if not isinstance(entry, dict) or "id" not in entry:
                raise UserError(f"{shown}: images[{pos}] has no 'id'")
            image_id = entry["id"]
            if isinstance(image_id, (list, dict)):
                raise UserError(f"{shown}: images[{pos}] has an unusable id {image_id!r}")
            if image_id in self._index:
                raise UserError(f"{shown}: duplicate image id {image_id!r}")
            rel = _safe_relpath(entry.get("file_name"), shown, image_id)
            path = self.img_root / rel
            width, height = _positive_int(entry.get("width")), _positive_int(entry.get("height"))
            if width is None or height is None:
                if not os.path.isfile(path):  # the size must come from the file: say where the images may be
                    hint = root_hint(self.img_root, rel)
                    raise UserError(f"{shown}: image id {image_id} has no width/height and its file "
                                    f"{display_path(rel)!r} is not under {display_path(self.img_root)}"
                                    + (f"; {hint}" if hint else ""))
                width, height = read_image_size(path)
                self._count("sizes_read_from_file")
            self._index[image_id] = len(self._images)
            self._images.append(dict(id=image_id, file_name=rel, width=width, height=height, path=path))
        self._boxes, self._labels = self._parse_annotations(data.get("annotations") or [], cat_to_label, shown)
        self._summarise(shown)

    def _count(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n

    def _build_categories(self, cats: Any, classes: Optional[Sequence[str]], shown: str) -> dict[Any, int]:
        if not isinstance(cats, list) or not cats:
            raise UserError(f"{shown} has no 'categories' list")
        by_id: dict[Any, str] = {}
        for pos, cat in enumerate(cats):
            if not isinstance(cat, dict) or "id" not in cat or not isinstance(cat.get("name"), str):
                raise UserError(f"{shown}: categories[{pos}] needs an 'id' and a string 'name'")
            if cat["id"] in by_id:
                raise UserError(f"{shown}: duplicate category id {cat['id']!r}")
            by_id[cat["id"]] = cat["name"]
        ordered = sorted(by_id, key=lambda c: (str(type(c)), c))
        if classes is None:
            self.classes = tuple(by_id[c] for c in ordered)
            self.label_to_cat_id = list(ordered)
            return {c: i for i, c in enumerate(ordered)}
        self.classes = tuple(classes)
        if len(set(self.classes)) != len(self.classes):
            raise UserError(f"class names given for {shown} contain duplicates: {list(self.classes)}")
        cat_to_label: dict[Any, int] = {}
        self.label_to_cat_id = []
        for label, name in enumerate(self.classes):
            ids = [c for c in ordered if by_id[c] == name]
            if not ids:
                raise UserError(f"class {name!r} is not a category name in {shown} (has {sorted(set(by_id.values()))})")
            self.label_to_cat_id.append(ids[0])
            cat_to_label.update({c: label for c in ids})
        return cat_to_label

    def _parse_annotations(
        self, anns: Any, cat_to_label: dict[Any, int], shown: str
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        if not isinstance(anns, list):
            raise UserError(f"{shown}: 'annotations' is not a list")
        boxes: list[list[list[float]]] = [[] for _ in self._images]
        labels: list[list[int]] = [[] for _ in self._images]
        for ann in anns:
            reason = self._check_annotation(ann, cat_to_label)
            if reason:
                self._count(reason)
                continue
            i = self._index[ann["image_id"]]
            info = self._images[i]
            x, y, w, h = (float(v) for v in ann["bbox"])
            x1, y1 = max(x, 0.0), max(y, 0.0)
            x2, y2 = min(x + w, float(info["width"])), min(y + h, float(info["height"]))
            if x2 <= x1 or y2 <= y1:
                self._count("dropped_outside")
                continue
            if (x1, y1, x2, y2) != (x, y, x + w, y + h):
                self._count("clipped")
            boxes[i].append([x1, y1, x2, y2])
            labels[i].append(cat_to_label[ann["category_id"]])
            self._count("annotations")
        self.stats.setdefault("annotations", 0)
        self.stats["images"] = len(self._images)
        self.stats["images_without_annotations"] = sum(1 for b in boxes if not b)
        out_boxes = [np.asarray(b, dtype=np.float32).reshape(-1, 4) for b in boxes]
        out_labels = [np.asarray(lab, dtype=np.int64).reshape(-1) for lab in labels]
        return out_boxes, out_labels

    def _check_annotation(self, ann: Any, cat_to_label: dict[Any, int]) -> Optional[str]:
        if not isinstance(ann, dict):
            return "dropped_malformed"
        bbox = ann.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            return "dropped_malformed"
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox):
            return "dropped_malformed"
        image_id = ann.get("image_id")
        if isinstance(image_id, (list, dict)) or image_id not in self._index:
            return "dropped_orphan"
        if ann.get("iscrowd", 0):
            return "dropped_crowd"
        category = ann.get("category_id")
        if isinstance(category, (list, dict)) or category not in cat_to_label:
            return "dropped_unknown_category"
        if bbox[2] <= 0 or bbox[3] <= 0:
            return "dropped_degenerate"
        return None

    def _summarise(self, shown: str) -> None:
        for key, why in _DROP_REASONS.items():
            if self.stats.get(key):
                self.warnings.append(f"{shown}: dropped {self.stats[key]} annotation(s) with {why}")
        if self.stats.get("clipped"):
            self.warnings.append(f"{shown}: clipped {self.stats['clipped']} box(es) partly outside their image")
        if self.stats.get("sizes_read_from_file"):
            n = self.stats["sizes_read_from_file"]
            self.warnings.append(f"{shown}: {n} image(s) had no width/height; read from the image files")

    def __len__(self) -> int:
        return len(self._images)

    def image_info(self, i: int) -> dict[str, Any]:
        """dict(id, file_name, width, height, path) of the i-th image (a copy)."""
        return dict(self._images[i])

    def annotations(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(boxes (N, 4) float32 xyxy in pixels, labels (N,) int64) of the i-th image (copies)."""
        return self._boxes[i].copy(), self._labels[i].copy()

    def missing_images(self) -> list[int]:
        """Positions of the images whose file is not a file under the image root (one stat each)."""
        return [i for i, entry in enumerate(self._images) if not os.path.isfile(entry["path"])]

    def load_image(self, i: int) -> np.ndarray:
        """The i-th image as (H, W, 3) uint8 RGB."""
        return load_image_rgb(self._images[i]["path"])

    @property
    def num_classes(self) -> int:
        return len(self.classes)
