"""VisDrone-DET txt annotations -> COCO json with YOLC's ten categories."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from yolc_kd import diskio
from yolc_kd.data.images import PathLike, display_path, read_image_size
from yolc_kd.errors import UserError
from yolc_kd.progress import progress_bar

VISDRONE_CLASSES = (
    "pedestrian", "people", "bicycle", "car", "van",
    "truck", "tricycle", "awning-tricycle", "bus", "motor",
)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
_IGNORED_CATEGORIES = (0, 11)  # 0: ignored regions, 11: others


def visdrone_categories() -> list[dict[str, Any]]:
    return [{"id": i + 1, "name": name, "supercategory": "object"} for i, name in enumerate(VISDRONE_CLASSES)]


def _parse_line(line: str, shown: str, lineno: int) -> tuple[list[int], int]:
    fields = [f.strip() for f in line.split(",")]
    if len(fields) == 9 and fields[-1] == "":
        fields = fields[:-1]  # some VisDrone files end lines with a comma
    if len(fields) != 8:
        raise UserError(f"{shown} line {lineno}: expected 8 comma-separated values "
                        f"(x,y,w,h,score,category,truncation,occlusion), got {len(fields)}")
    try:
        values = [int(f) for f in fields]
    except ValueError:
        raise UserError(f"{shown} line {lineno}: non-integer value in {line.strip()!r}") from None
    category = values[5]
    if not 0 <= category <= 11:
        raise UserError(f"{shown} line {lineno}: category {category} is outside 0..11")
    return values[:4], category


def read_visdrone_txt(path: PathLike, width: int, height: int, stats: dict[str, int]) -> list[dict[str, Any]]:
    """Annotations of one image as COCO dicts without ids (bbox clipped to the image)."""
    shown = display_path(path)
    try:
        with open(path, "r", encoding="utf-8-sig") as fh:
            lines = fh.readlines()
    except UnicodeDecodeError:
        raise UserError(f"{shown} is not a text file") from None
    except OSError as exc:
        raise UserError(f"cannot read {shown}: {exc.strerror}") from None
    out = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        (x, y, w, h), category = _parse_line(line, shown, lineno)
        if category in _IGNORED_CATEGORIES:
            stats["dropped_ignored_or_others"] = stats.get("dropped_ignored_or_others", 0) + 1
            continue
        x1, y1, x2, y2 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
        if w <= 0 or h <= 0 or x2 <= x1 or y2 <= y1:
            stats["dropped_empty_box"] = stats.get("dropped_empty_box", 0) + 1
            continue
        if (x1, y1, x2, y2) != (x, y, x + w, y + h):
            stats["clipped"] = stats.get("clipped", 0) + 1
        bw, bh = x2 - x1, y2 - y1
        out.append({"bbox": [x1, y1, bw, bh], "area": bw * bh, "category_id": category, "iscrowd": 0})
    return out


def _list_images(images_dir: Path) -> list[str]:
    if not images_dir.is_dir():
        raise UserError(f"image directory not found: {display_path(images_dir)}")
    names = sorted(n for n in os.listdir(images_dir)
                   if n.lower().endswith(IMAGE_EXTENSIONS) and (images_dir / n).is_file())
    if not names:
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {display_path(images_dir)}")
    return names


def convert_visdrone(images_dir: PathLike, annotations_dir: PathLike, out_file: Optional[PathLike] = None,
                     progress: bool = True) -> tuple[dict[str, Any], dict[str, int]]:
    """Build the COCO dict (image ids 1..N in sorted file-name order); write it when out_file is given."""
    images_dir, annotations_dir = Path(images_dir), Path(annotations_dir)
    if not annotations_dir.is_dir():
        raise UserError(f"annotation directory not found: {display_path(annotations_dir)}")
    names = _list_images(images_dir)
    stats: dict[str, int] = {"images": len(names), "images_without_txt": 0}
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    bar = progress_bar(names, desc="convert-visdrone", unit="img", disable=not progress)
    for image_id, name in enumerate(bar, start=1):
        width, height = read_image_size(images_dir / name)
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        txt = annotations_dir / (os.path.splitext(name)[0] + ".txt")
        if not txt.is_file():
            stats["images_without_txt"] += 1
            continue
        for ann in read_visdrone_txt(txt, width, height, stats):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
    stats["annotations"] = len(annotations)
    coco = {"images": images, "annotations": annotations, "categories": visdrone_categories()}
    if out_file is not None:
        write_json(coco, out_file)
    return coco, stats


def write_json(data: dict[str, Any], out_file: PathLike) -> None:
    """Write `data` as deterministic JSON (sorted keys) atomically, creating parent directories; a failed write
    (a full disk) is one UserError and leaves no file."""
    diskio.write_json(out_file, data, sort_keys=True, separators=(",", ":"))
