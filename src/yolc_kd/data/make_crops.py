"""YOLC's crop training set (its gen_crop.py): every image plus the LSM crops of its ground-truth heatmap,
cut at full resolution, upscaled 1.5x and padded (black, centred) to at least 1024x640, in one COCO json.

Output: OUT/images/<file_name> (the originals, hard-linked or copied byte for byte), OUT/images/<folder of
file_name>/<stem>_part<k>.jpg (the crops) and OUT/annotations.json, which `yolc-kd train --ann
OUT/annotations.json --images OUT/images` reads. Image and annotation ids are fresh (1..N); categories are
copied unchanged. Images that are missing or cannot be decoded are skipped with a counted warning.
"""
from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from yolc_kd.crop_settings import LSMSettings
from yolc_kd.crops import find_clusters, select_regions
from yolc_kd.data.coco import CocoDetection, _load_json
from yolc_kd.data.images import PathLike, display_path, load_image_rgb
from yolc_kd.data.visdrone import write_json
from yolc_kd.diskio import atomic_path, atomic_write, write_errors
from yolc_kd.errors import UserError
from yolc_kd.models.targets import draw_gaussians, gaussian_radius

MARKER = ".yolc-kd-make-crops"  # written first, so a re-run (also after a crash) may reuse the folder
ANN_NAME = "annotations.json"
JPEG_QUALITY = 95  # cv2.imwrite's default, which gen_crop.py uses
LSM = LSMSettings()  # YOLC's LSM constants, as gen_crop.py uses them


@dataclass
class CropSummary:
    """What make_crop_dataset wrote.

    Args:
        ann_file: the annotation file written.
        image_root: the folder the images were written to.
        images: source images written.
        crops: crop images written.
        annotations: annotations of the source images.
        crop_annotations: annotations of the crops.
        skipped_images: source images that could not be read.
        dropped_annotations: unusable annotations left out.
        warnings: one line per thing the user should know.
    """
    ann_file: Path
    image_root: Path
    images: int = 0
    crops: int = 0
    annotations: int = 0
    crop_annotations: int = 0
    skipped_images: int = 0
    dropped_annotations: int = 0
    warnings: list[str] = field(default_factory=list)


def gt_heatmap(boxes: np.ndarray, img_hw: Sequence[int]) -> np.ndarray:
    """(1,1,H,W) float32 max-over-classes heatmap of (N,4) xyxy boxes at full image resolution: one gaussian
    per box at its truncated centre, YOLC's radius rule (min_overlap 0.3), sigma = diameter / 6."""
    h, w = int(img_hw[0]), int(img_hw[1])
    heat = torch.zeros(1, h, w)
    b = torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4))
    if len(b):
        x1, y1, x2, y2 = b.unbind(1)
        cx, cy = ((x1 + x2) / 2).trunc().long(), ((y1 + y2) / 2).trunc().long()
        radius = gaussian_radius([y2 - y1, x2 - x1], min_overlap=0.3).trunc().clamp(min=0).long()
        # one channel: LSM takes the max over classes, and max-pasting all boxes into one map equals that
        draw_gaussians(heat, torch.zeros(len(b), dtype=torch.long), cx, cy, radius)
    return heat.numpy()[None]


def largest_regions(coords: np.ndarray, max_regions: int, min_size: int) -> np.ndarray:
    """gen_crop.py's pick among LSM regions [x, y, w, h]: the max_regions largest by area, then the ones
    with an area under min_size**2 dropped (an area test, so a 200x50 region passes min_size 96)."""
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 4)
    area = coords[:, 2] * coords[:, 3]
    top = coords[np.argsort(-area, kind="stable")[:max_regions]]  # stable: ties keep LSM's scan order
    top_area = top[:, 2] * top[:, 3]
    return top[(top_area >= min_size * min_size) & (top_area > 0)]


def crop_regions(boxes: np.ndarray, img_hw: Sequence[int], crops_per_image: int = 1, min_size: int = 96,
                 enlarge: float = 1.2) -> np.ndarray:
    """(K,4) int64 crop regions [x, y, w, h] of one image from its xyxy ground truth: heatmap, LSM, the
    largest regions, enlarged around their centre and clamped to the image."""
    h, w = int(img_hw[0]), int(img_hw[1])
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    # gen_crop.py fails on an image without boxes; here it simply gets no crop (LSM needs >= 1 cell pixel too)
    if not len(boxes) or w < LSM.grid[0] or h < LSM.grid[1]:
        return np.zeros((0, 4), dtype=np.int64)
    _, coords = find_clusters(gt_heatmap(boxes, (h, w)), grid=LSM.grid, topk_cells=LSM.topk_cells)
    top = largest_regions(coords, crops_per_image, min_size)
    # clamped to [0, W] and rounded (gen_crop.py clamps to W-1 and truncates, losing the last row/column)
    regions = select_regions(top, (h, w), max_patches=len(top), min_size=0, enlarge=enlarge)
    return regions[(regions[:, 2] >= 1) & (regions[:, 3] >= 1)]


def cut_crop(image: np.ndarray, region: Sequence[int], upscale: float = 1.5,
             min_canvas: Sequence[int] = (1024, 640)) -> tuple[Image.Image, int, int]:
    """Cut region [x, y, w, h] from an (H,W,3) image, resize it by `upscale` (size truncated, as cv2.resize
    is called in gen_crop.py), pad black to at least min_canvas (w, h) with the content centred.
    Returns the crop and the (left, top) offset of the content."""
    x, y, rw, rh = (int(v) for v in region)
    patch = Image.fromarray(np.ascontiguousarray(image[y:y + rh, x:x + rw]))
    size = (max(1, int(rw * upscale)), max(1, int(rh * upscale)))
    if size != patch.size:
        patch = patch.resize(size, Image.BILINEAR)
    cw, ch = max(int(min_canvas[0]), size[0]), max(int(min_canvas[1]), size[1])
    left, top = (cw - size[0]) // 2, (ch - size[1]) // 2
    canvas = Image.new("RGB", (cw, ch), (0, 0, 0))
    canvas.paste(patch, (left, top))
    return canvas, left, top


def _clip_xywh(bbox: Sequence[float], w: float, h: float) -> Optional[tuple[float, float, float, float]]:
    x, y, bw, bh = (float(v) for v in bbox)
    x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + bw, w), min(y + bh, h)
    return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None


def crop_annotation(ann: dict[str, Any], region: Sequence[int], img_wh: Sequence[int], upscale: float,
                    offset: Sequence[int], canvas_wh: Sequence[int]) -> Optional[dict[str, Any]]:
    """The annotation in the crop frame when its box (clipped to the image) lies wholly inside region,
    else None: shifted to the region, scaled by `upscale`, shifted by the pad offset; area recomputed."""
    box = _clip_xywh(ann["bbox"], float(img_wh[0]), float(img_wh[1]))
    rx, ry, rw, rh = (int(v) for v in region)
    if box is None or not (rx <= box[0] and ry <= box[1] and box[2] <= rx + rw and box[3] <= ry + rh):
        return None
    left, top = offset
    # exact floats: gen_crop.py truncates x, y, w and h to int separately after scaling (up to 1 px off)
    x1, y1 = (box[0] - rx) * upscale + left, (box[1] - ry) * upscale + top
    x2, y2 = (box[2] - rx) * upscale + left, (box[3] - ry) * upscale + top
    # the resized content may be up to half a pixel short of region*upscale; boxes stay on the canvas
    x2, y2 = min(x2, float(canvas_wh[0])), min(y2, float(canvas_wh[1]))
    out = {k: v for k, v in ann.items() if k not in ("id", "image_id", "bbox", "area", "segmentation")}
    # YOLC keeps the source-scale area and the (empty) segmentation; the area is recomputed, polygons dropped
    out.update(bbox=[x1, y1, x2 - x1, y2 - y1], area=(x2 - x1) * (y2 - y1))
    return out


def _check_args(crops_per_image: Any, min_size: Any, enlarge: Any, upscale: Any, min_canvas: Any) -> None:
    def is_int(v: Any) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    if not is_int(crops_per_image) or crops_per_image < 1:
        raise UserError(f"crops per image (--crops) must be a whole number >= 1, got {crops_per_image!r}")
    if not is_int(min_size) or min_size < 0:
        raise UserError(f"minimum crop size (--min-size) must be a whole number >= 0, got {min_size!r}")
    for name, v in (("enlarge", enlarge), ("upscale", upscale)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise UserError(f"{name} must be a positive number, got {v!r}")
    if (not isinstance(min_canvas, (tuple, list)) or len(min_canvas) != 2
            or not all(is_int(v) and v >= 1 for v in min_canvas)):
        raise UserError(f"min_canvas must be (width, height) in whole pixels >= 1, got {min_canvas!r}")


def _guess_root(root: Path, rels: list[str], max_dirs: int = 2000) -> Optional[Path]:
    """A folder near `root` (two levels up, or three down) under which some of the file_names exist."""
    probe = rels[:20]

    def holds(d: Path) -> bool:
        return any((d / rel).is_file() for rel in probe)

    for up in list(root.resolve().parents)[:2]:
        if holds(up):
            return up
    seen = 0
    for dirpath, dirnames, _ in os.walk(root):
        depth = len(Path(dirpath).relative_to(root).parts)
        if depth >= 3:
            dirnames[:] = []
        if depth and holds(Path(dirpath)):
            return Path(dirpath)
        seen += 1
        if seen >= max_dirs:
            break
    return None


def _check_root(root: Path, raw: dict[str, Any], ann_shown: str) -> None:
    if not root.is_dir():
        raise UserError(f"image root not found: {display_path(root)}")
    rels = [e["file_name"] for e in raw["images"] if isinstance(e, dict) and isinstance(e.get("file_name"), str)
            and e["file_name"] and not os.path.isabs(e["file_name"]) and "\x00" not in e["file_name"]]
    if not rels or any((root / rel).is_file() for rel in rels):
        return
    guess = _guess_root(root, rels)
    hint = f"they seem to be under {display_path(guess)}: pass --images {display_path(guess)}" if guess \
        else "check --images"
    raise UserError(f"none of the {len(rels)} images in {ann_shown} are under {display_path(root)} "
                    f"(0 found, e.g. no {display_path(root / rels[0])}); {hint}")


def _check_out(out_dir: Path, root: Path, ann_file: Path) -> None:
    out_res, root_res = out_dir.resolve(), root.resolve()
    shown = display_path(out_dir)
    if root_res == out_res or out_res in root_res.parents:
        raise UserError(f"--out {shown} is (or contains) the image root {display_path(root)}: "
                        f"choose a separate folder")
    if ann_file.resolve() == out_res / ANN_NAME:
        raise UserError(f"--out {shown} would overwrite the input annotation file {display_path(ann_file)}")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {shown} is a file, not a folder")
    if out_dir.is_dir() and not (out_dir / MARKER).is_file():
        entries = sorted(os.listdir(out_dir))
        if entries:
            raise UserError(f"--out {shown} already holds files that are not a make-crops output "
                            f"(e.g. {entries[0]!r}): choose a new or empty folder")


def _crop_name(rel: str, k: int) -> str:
    p = PurePosixPath(rel)
    return str(p.with_name(f"{p.stem}_part{k}.jpg"))


def _check_names(rels: list[str], crops_per_image: int) -> None:
    """Crop names must not hit an original or another image's crop (a.jpg and a.png share a_part1.jpg)."""
    taken = {str(PurePosixPath(r)): r for r in rels}
    for rel in rels:
        for k in range(1, crops_per_image + 1):
            name = _crop_name(rel, k)
            other = taken.get(name)
            if other is not None:
                raise UserError(f"the crop of {display_path(rel)} would be named {display_path(name)}, "
                                f"which {display_path(other)} already uses; rename one of the images")
            taken[name] = rel


def _usable(ann: Any, image_ids: dict[Any, int], cat_ids: set) -> bool:
    """What CocoDetection would read (crowd boxes included: they are kept, flagged, as in the source)."""
    if not isinstance(ann, dict) or isinstance(ann.get("image_id"), (list, dict)):
        return False
    bbox, cat = ann.get("bbox"), ann.get("category_id")
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or isinstance(cat, (list, dict)):
        return False
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox):
        return False
    return ann.get("image_id") in image_ids and cat in cat_ids and bbox[2] > 0 and bbox[3] > 0


def _place_original(src: Path, dst: Path) -> None:
    """Hard-link the original into the output (gen_crop.py re-encodes it with cv2); copy across devices."""
    with write_errors(dst):
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists() or dst.is_symlink():
            if dst.exists() and os.path.samefile(src, dst):
                return
            dst.unlink()
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    with atomic_path(dst) as tmp:  # a copy cut short by a full disk leaves no file
        shutil.copy2(src, tmp)


def _save_jpeg(img: Image.Image, path: Path) -> None:
    with atomic_write(path) as fh:
        img.save(fh, format="JPEG", quality=JPEG_QUALITY)


def _remove_stale(image_root: Path, written: set[str]) -> int:
    """Delete files an earlier run into this output left behind (fewer crops now, an image gone), so the folder
    holds exactly what annotations.json lists; empty sub-folders go too. Returns how many files went."""
    removed = 0
    if not image_root.is_dir():
        return removed
    for path in sorted(image_root.rglob("*"), reverse=True):  # children before their folders
        rel = path.relative_to(image_root).as_posix()
        try:
            if path.is_dir() and not path.is_symlink():
                if not any(path.iterdir()):
                    path.rmdir()
            elif rel not in written:
                path.unlink()
                removed += 1
        except OSError as exc:
            raise UserError(f"cannot remove the stale {display_path(path)}: {exc.strerror or exc}") from None
    return removed


def make_crop_dataset(ann_file: PathLike, image_root: PathLike, out_dir: PathLike, crops_per_image: int = 1,
                      min_size: int = 96, enlarge: float = 1.2, upscale: float = 1.5,
                      min_canvas: Sequence[int] = (1024, 640), progress: bool = True) -> CropSummary:
    """Write OUT/images (originals + crops) and OUT/annotations.json; see the module docstring."""
    _check_args(crops_per_image, min_size, enlarge, upscale, min_canvas)
    ann_file, root, out_dir = Path(ann_file), Path(image_root), Path(out_dir)
    ann_shown = display_path(ann_file)
    raw = _load_json(ann_file)
    _check_root(root, raw, ann_shown)
    _check_out(out_dir, root, ann_file)
    coco = CocoDetection(ann_file, root)
    if not len(coco):
        raise UserError(f"{ann_shown} lists no images")
    rels = [coco.image_info(i)["file_name"] for i in range(len(coco))]
    _check_names(rels, min(crops_per_image, LSM.topk_cells))  # LSM yields at most one region per cell

    anns = raw.get("annotations") or []
    image_ids = {coco.image_info(i)["id"]: i for i in range(len(coco))}
    cat_ids = {c["id"] for c in raw["categories"]}
    per_image: list[list[dict[str, Any]]] = [[] for _ in range(len(coco))]
    summary = CropSummary(ann_file=out_dir / ANN_NAME, image_root=out_dir / "images")
    for ann in anns:
        if _usable(ann, image_ids, cat_ids):
            per_image[image_ids[ann["image_id"]]].append(ann)
        else:
            summary.dropped_annotations += 1

    with write_errors(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / MARKER).touch()
    images: list[dict[str, Any]] = []
    out_anns: list[dict[str, Any]] = []
    skipped: list[str] = []
    raw_by_id = {e["id"]: e for e in raw["images"]}
    for i in tqdm(range(len(coco)), desc="make-crops", unit="img", disable=None if progress else True):
        info = coco.image_info(i)
        try:
            arr = load_image_rgb(info["path"])
        except UserError as exc:
            skipped.append(str(exc))
            continue
        h, w = arr.shape[:2]
        _place_original(info["path"], summary.image_root / info["file_name"])
        src_id = len(images) + 1
        images.append({**raw_by_id[info["id"]], "id": src_id, "width": info["width"], "height": info["height"]})
        for ann in per_image[i]:
            out_anns.append({**ann, "id": len(out_anns) + 1, "image_id": src_id})
        summary.annotations += len(per_image[i])
        boxes, _ = coco.annotations(i)
        for k, region in enumerate(crop_regions(boxes, (h, w), crops_per_image, min_size, enlarge), start=1):
            crop, left, top = cut_crop(arr, region, upscale, min_canvas)
            name = _crop_name(info["file_name"], k)
            _save_jpeg(crop, summary.image_root / name)
            crop_id = len(images) + 1
            images.append({"id": crop_id, "file_name": name, "width": crop.width, "height": crop.height,
                           "crop": {"source_image_id": src_id, "region": [int(v) for v in region],
                                    "scale": float(upscale), "offset": [left, top]}})
            summary.crops += 1
            for ann in per_image[i]:
                moved = crop_annotation(ann, region, (w, h), upscale, (left, top), crop.size)
                if moved is not None:
                    out_anns.append({**moved, "id": len(out_anns) + 1, "image_id": crop_id})
                    summary.crop_annotations += 1
    summary.images = len(images) - summary.crops
    summary.skipped_images = len(skipped)
    if not summary.images:
        raise UserError(f"none of the {len(coco)} images of {ann_shown} could be read (first: {skipped[0]})")
    stale = _remove_stale(summary.image_root, {str(PurePosixPath(im["file_name"])) for im in images})
    extra = {k: v for k, v in raw.items() if k not in ("images", "annotations")}
    write_json({**extra, "images": images, "annotations": out_anns}, summary.ann_file)
    # CocoDetection's own warnings are left out: they describe its training view (crowd boxes dropped), not this output
    if summary.dropped_annotations:
        summary.warnings.append(f"{ann_shown}: left out {summary.dropped_annotations} unusable annotation(s) "
                                f"(malformed bbox, unknown image or category, or an empty box)")
    if stale:
        summary.warnings.append(f"removed {stale} file(s) an earlier make-crops run had left in "
                                f"{display_path(summary.image_root)} (no longer in its annotations)")
    if skipped:
        summary.warnings.append(f"skipped {len(skipped)} of {len(coco)} image(s) that could not be read "
                                f"(first: {skipped[0]})")
    return summary
