"""Batched YOLC inference on image folders or COCO image lists -> COCO result dicts (+ optional overlays).

The model runs ``simple_test(..., rescale=True, return_extras=True)`` on YOLC's test input (the image
centre-padded by :class:`~yolc_kd.data.augment.TestTransform`, batches zero-padded by ``collate_test``).
Boxes come back in original image pixels; they are clipped to the image here and boxes left with no
area (e.g. peaks in the padding) are dropped.
"""
from __future__ import annotations

import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from yolc_kd import crops
from yolc_kd.data.augment import AugmentConfig, TestTransform, collate_test
from yolc_kd.data.view import ViewTransform
from yolc_kd.data.view_meta import meta_rescale, meta_to_image
from yolc_kd.data.coco import CocoDetection
from yolc_kd.data.images import display_path, load_image_rgb, read_image_size
from yolc_kd.data.loading import check_images
from yolc_kd.diskio import write_json
from yolc_kd.errors import UserError
from yolc_kd.infer.viz import save_detections
from yolc_kd.models import tiling
from yolc_kd.progress import progress_bar
from yolc_kd.runtime import mixed_precision, resolve_device

PathLike = Union[str, "os.PathLike[str]"]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
FUSION_MODES = ("nms", "replace", "none")
# an image over the pixel budget: the full-resolution pass in overlapping tiles, or the image downscaled to the budget
LARGE_IMAGE_MODES = ("tile", "downscale")
VIZ_SCORE_THR = 0.3


# ----------------------------------------------------------------------------- image sources

@dataclass
class ImageItem:
    """One image to run on.

    Args:
        image_id: the COCO image id (an image folder's images count from 1 in name order).
        path: the image file.
        file_name: its path relative to the image root.
    """
    image_id: Any
    path: Path
    file_name: str


@dataclass
class ImageSource:
    """What to run on and how labels map to category ids.

    Args:
        items: the images, in run order.
        label_to_cat_id: the COCO category id of each label.
        class_names: the name of each label.
        dataset: the COCO file's dataset, when the source is one (None for an image folder).
    """

    items: List[ImageItem]
    label_to_cat_id: List[Any]
    class_names: Tuple[str, ...]
    dataset: Optional[CocoDetection] = None

    @property
    def categories(self) -> List[Dict[str, Any]]:
        return [dict(id=c, name=n) for c, n in zip(self.label_to_cat_id, self.class_names)]


def list_image_folder(folder: PathLike) -> List[ImageItem]:
    """Image files directly in `folder` (by extension, case-insensitive), sorted by name, ids 1..N."""
    root = Path(folder)
    if not root.exists():
        raise UserError(f"image folder not found: {display_path(root)}")
    if not root.is_dir():
        raise UserError(f"--images must be a folder, got a file: {display_path(root)}")
    try:
        names = sorted(p.name for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir())
    except OSError as exc:
        raise UserError(f"cannot list image folder {display_path(root)}: {exc.strerror or exc}") from None
    if not names:
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {display_path(root)}")
    return [ImageItem(i + 1, root / n, n) for i, n in enumerate(names)]


def folder_source(folder: PathLike, class_names: Sequence[str]) -> ImageSource:
    """A folder without annotations: image ids 1..N in sorted order, category id = label + 1."""
    names = tuple(str(n) for n in class_names)
    return ImageSource(list_image_folder(folder), list(range(1, len(names) + 1)), names)


def coco_source(ann_file: PathLike, img_root: PathLike, classes: Optional[Sequence[str]] = None,
                num_classes: Optional[int] = None, strict: bool = False) -> ImageSource:
    """The images of a COCO json (its order and ids). Label l is the category named classes[l]
    (default: the json's categories by id). num_classes, when given, must equal the category count.
    Every image file is checked up front (a stat each): none there is a UserError naming the likely image
    root; some missing is one with strict, else they stay listed for predict_images to skip and report."""
    ds = CocoDetection(ann_file, img_root)
    shown = display_path(ann_file)
    if len(ds) == 0:
        raise UserError(f"{shown} lists no images")
    check_images(ds, skip_bad=not strict, skip_hint="without --strict they are skipped", warn=lambda line: None)
    if num_classes is not None and len(ds.classes) != num_classes:
        raise UserError(f"{shown} has {len(ds.classes)} categories but the model has {num_classes} classes")
    names, label_to_cat_id = tuple(ds.classes), list(ds.label_to_cat_id)
    if classes is not None:
        names = tuple(str(c) for c in classes)
        if len(set(names)) != len(names):
            raise UserError(f"the config's class names contain duplicates: {list(names)}")
        name_to_id: Dict[str, Any] = {}
        for name, cat in zip(ds.classes, ds.label_to_cat_id):
            name_to_id.setdefault(name, cat)
        missing = [n for n in names if n not in name_to_id]
        if missing:
            raise UserError(f"config class {missing[0]!r} is not a category name in {shown} "
                            f"(has {', '.join(sorted(name_to_id))})")
        label_to_cat_id = [name_to_id[n] for n in names]
    items = []
    for i in range(len(ds)):
        info = ds.image_info(i)
        items.append(ImageItem(info["id"], Path(info["path"]), str(info["file_name"])))
    return ImageSource(items, label_to_cat_id, names, ds)


# ----------------------------------------------------------------------------- predictor

@dataclass
class ImagePrediction:
    """Detections of one image in its pixels.

    Args:
        boxes: (N,4) xyxy.
        scores: (N,).
        labels: (N,).
        heatmap: (C,h,w) over the image content, when kept.
        regions: (K,4) [x,y,w,h] crop regions in the image's pixels, when kept.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    heatmap: Optional[np.ndarray] = None
    regions: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int64))


def build_test_transform(cfg: Dict[str, Any]) -> TestTransform:
    """YOLC's test transform from the config's pipelines (defaults when it has none)."""
    train, test = cfg.get("train_pipeline"), cfg.get("test_pipeline")
    if train is None and test is None:
        return TestTransform(AugmentConfig())
    return TestTransform(AugmentConfig.from_pipeline(train, test))


class Predictor:
    """Runs a YOLC model on lists of (H,W,3) uint8 RGB images.

    Args:
        model: the YOLC detector.
        cfg: its config (the test transform comes from its pipelines).
        device: where it runs (resolve_device).
        fusion, max_patches: override test_cfg.crop's (None: the config's).
        crop_model: another YOLC (e.g. the deployed teacher) whose LSM regions on the same input pick the crops;
            refine and fusion stay with `model`.
        max_pixels: the pixel budget of one forward (None: test_cfg.max_pixels; 0: no limit).
        large_image: what an image over the budget gets: "tile" (full resolution in overlapping tiles) or
            "downscale" (resized so its padded input fits the budget; boxes come back in its own pixels).
        amp, amp_dtype: autocast the forwards (runtime.mixed_precision; dtype None: float16 on CUDA, bfloat16 on CPU).
    """

    def __init__(self, model: torch.nn.Module, cfg: Dict[str, Any], device: Union[str, torch.device] = "auto",
                 fusion: Optional[str] = None, max_patches: Optional[int] = None,
                 crop_model: Optional[torch.nn.Module] = None, max_pixels: Optional[int] = None,
                 large_image: str = "tile", amp: bool = False,
                 amp_dtype: Union[str, torch.dtype, None] = None) -> None:
        if fusion is not None and fusion not in FUSION_MODES:
            raise UserError(f"fusion must be one of {', '.join(FUSION_MODES)}, got {fusion!r}")
        if max_patches is not None and (isinstance(max_patches, bool) or int(max_patches) != max_patches
                                        or max_patches < 0):
            raise UserError(f"max_patches must be a non-negative integer, got {max_patches!r}")
        if max_pixels is not None and (isinstance(max_pixels, bool) or int(max_pixels) != max_pixels
                                       or max_pixels < 0):
            raise UserError(f"max_pixels must be a non-negative integer, got {max_pixels!r}")
        if large_image not in LARGE_IMAGE_MODES:
            raise UserError(f"large_image must be one of {', '.join(LARGE_IMAGE_MODES)}, got {large_image!r}")
        self.device = resolve_device(device)
        self.amp, self.amp_dtype = bool(amp), amp_dtype
        mixed_precision(self.device, self.amp, self.amp_dtype)  # an unusable --amp-dtype is one line, before any work
        self.model = model.to(self.device).eval()
        self.crop_model = crop_model.to(self.device).eval() if crop_model is not None else None
        self.transform = build_test_transform(cfg)
        self.fusion = fusion
        self.max_patches = None if max_patches is None else int(max_patches)
        self.max_pixels = None if max_pixels is None else int(max_pixels)
        self.large_image = large_image

    @property
    def budget(self) -> int:
        """The pixel budget in force: max_pixels, else the model's test_cfg.max_pixels (0: none)."""
        if self.max_pixels is not None:
            return self.max_pixels
        return int(getattr(self.model, "tile_cfg", crops.DEFAULT_TILE_CFG)["max_pixels"])

    def input_hw(self, height: int, width: int) -> Tuple[int, int]:
        """(height, width) an image of that size is run at: downscaled to the budget with large_image='downscale'
        (the padded input then has at most `budget` pixels), else as it is."""
        budget = self.budget
        th, tw = self.transform.target_hw(height, width)
        if self.large_image != "downscale" or not budget or th * tw <= budget:
            return height, width
        scale = math.sqrt(budget / (height * width))
        while True:
            h, w = max(1, int(height * scale)), max(1, int(width * scale))
            th, tw = self.transform.target_hw(h, w)
            if th * tw <= budget or (h == 1 and w == 1):
                return h, w
            scale *= 0.99  # the padding to a multiple of 32 took it over: a little smaller

    def memory_estimate(self, sizes: Sequence[Tuple[int, int]],
                        keep_heatmap: bool = False) -> Optional[Tuple[int, str]]:
        """Estimated peak bytes (and what they are made of) of one call on images of these (height, width);
        None for a model that gives no estimate. The crop model's pass runs before the model's: the larger counts."""
        padded = [self.transform.target_hw(*self.input_hw(h, w)) for h, w in sizes]
        hmax, wmax = max(h for h, _ in padded), max(w for _, w in padded)
        found = []
        for model, heat in ((self.model, keep_heatmap), (self.crop_model, False)):
            if hasattr(model, "memory_estimate"):
                found.append(model.memory_estimate(len(sizes), hmax, wmax, self.max_pixels, heat))
        return max(found, default=None)

    def check_memory(self, sizes: Sequence[Tuple[int, int]], keep_heatmap: bool = False,
                     name: Optional[str] = None) -> None:
        """One UserError, before any work, when the estimate for these images exceeds MemAvailable."""
        estimate, available = self.memory_estimate(sizes, keep_heatmap), tiling.mem_available()
        if estimate is None or available is None or estimate[0] <= available:
            return
        h, w = max(sizes, key=lambda s: s[0] * s[1])
        what = name if name is not None else f"a batch of {len(sizes)} image(s)"
        if self.budget and self.large_image == "tile":
            hint = f"lower --max-pixels (now {self.budget:,}) or use --large-image downscale"
        else:
            hint = "set --max-pixels N to run it in tiles" if not self.budget else "lower --max-pixels"
        raise UserError(f"{what} ({w}x{h}) needs about {tiling.gib(estimate[0])} ({estimate[1]}) but "
                        f"{tiling.gib(available)} of memory is available: {hint}")

    def _prepare(self, img: np.ndarray) -> Tuple[torch.Tensor, dict]:
        """The test transform of one image, downscaled first when input_hw says so (the Resize step at the head
        of its meta's view then maps boxes and regions back to the image's own pixels)."""
        h, w = img.shape[:2]
        nh, nw = self.input_hw(h, w)
        if (nh, nw) == (h, w):
            return self.transform(img)
        tensor, meta = self.transform(np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR)))
        meta["ori_shape"] = (h, w, 3)
        meta["scale_factor"] = np.array([nw / w, nh / h, nw / w, nh / h], dtype=np.float32)  # mmdet's field
        meta["view"] = ViewTransform.resize((h, w), (nh, nw)).then(meta["view"])
        return tensor, meta

    def __call__(self, images: Sequence[np.ndarray], keep_heatmap: bool = False) -> List[ImagePrediction]:
        if not images:
            return []
        self.check_memory([img.shape[:2] for img in images], keep_heatmap)
        batch, metas = collate_test([self._prepare(img) for img in images])
        kw = {} if self.max_pixels is None else dict(max_pixels=self.max_pixels)
        with torch.inference_mode(), mixed_precision(self.device, self.amp, self.amp_dtype):
            self.model.eval()
            batch = batch.to(self.device)
            lent_regions = self.crop_model.lsm_coords(batch, metas, **kw) if self.crop_model is not None else None
            results, extras = self.model.simple_test(batch, metas, rescale=True, fusion=self.fusion,
                                                     max_patches=self.max_patches, return_extras=True,
                                                     crop_coords=lent_regions, keep_heatmap=keep_heatmap, **kw)
        batch_hw = tuple(batch.shape[2:])
        del batch
        heat = extras.get("heatmap") if keep_heatmap else None
        regions = extras.get("regions") or [None] * len(images)
        out = []
        for i, ((dets, labels), meta, img) in enumerate(zip(results, metas, images)):
            h, w = img.shape[:2]
            d = dets.detach().float().cpu().numpy().reshape(-1, 5)
            lab = labels.detach().cpu().numpy().reshape(-1).astype(np.int64)
            boxes = d[:, :4].copy()
            boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & np.isfinite(d[:, 4])
            hm = None
            if heat is not None:  # in the pixels the model saw (viz resizes it onto the image): the pad undone
                hm, _ = meta_to_image(meta, heat.shape[2:], rescale=False).apply_map(heat[i].detach())
                hm = hm.float().cpu().numpy()
            reg = np.zeros((0, 4), np.int64) if regions[i] is None else np.asarray(regions[i]).reshape(-1, 4)
            reg = reg[(reg[:, 2] >= 1) & (reg[:, 3] >= 1)]  # empty regions gave no patch
            back = meta_rescale(meta, batch_hw)
            if back is not None:  # a downscaled image: regions in its own pixels
                reg = np.round(back.apply_crop_boxes(reg.astype(np.float64))).astype(np.int64)
            out.append(ImagePrediction(boxes[keep], d[keep, 4], lab[keep], hm, reg))
        return out


# ----------------------------------------------------------------------------- results

def to_coco_results(image_id: Any, pred: ImagePrediction, label_to_cat_id: Sequence[Any]) -> List[Dict[str, Any]]:
    """COCO result dicts {image_id, category_id, bbox [x,y,w,h] (2 decimals), score (5 decimals)}."""
    out = []
    for (x1, y1, x2, y2), s, lab in zip(pred.boxes.tolist(), pred.scores.tolist(), pred.labels.tolist()):
        x1, y1, x2, y2 = (round(v, 2) for v in (x1, y1, x2, y2))  # corners first: x + w stays <= width
        bbox = [x1, y1, round(x2 - x1, 2), round(y2 - y1, 2)]
        if bbox[2] <= 0 or bbox[3] <= 0:
            continue
        if not 0 <= lab < len(label_to_cat_id):
            raise UserError(f"the model predicted label {lab} but only {len(label_to_cat_id)} classes are known")
        out.append(dict(image_id=image_id, category_id=label_to_cat_id[lab], bbox=bbox, score=round(s, 5)))
    return out


@dataclass
class PredictSummary:
    """What predict ran and found.

    Args:
        results: COCO-style detections (image_id, category_id, bbox xywh, score).
        images: id, file_name, width, height of every processed image.
        skipped: (file_name, reason) of every image that could not be read.
        seconds: wall time of the run.
        viz_files: the pictures written, if any.
    """
    results: List[Dict[str, Any]]
    images: List[Dict[str, Any]]
    skipped: List[Tuple[str, str]]
    seconds: float
    viz_files: List[Path] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / max(1, self.num_images)


def _stderr(msg: str) -> None:
    tqdm.write(msg, file=sys.stderr)


def _viz_name(item: ImageItem, used: set) -> str:
    name = f"{Path(item.file_name).stem}.png"
    if name in used:
        name = f"{Path(item.file_name).stem}_{item.image_id}.png"
    used.add(name)
    return name


def _load(item: ImageItem) -> Union[np.ndarray, UserError]:
    try:
        return load_image_rgb(item.path)
    except UserError as exc:  # handed to the loop, which skips or stops (--strict) in image order
        return exc


def _read_ahead(items: Sequence[ImageItem]) -> Iterator[Tuple[ImageItem, Union[np.ndarray, UserError]]]:
    """(item, image or its UserError) in order, the next image decoded in a thread while the caller works."""
    if not items:
        return
    with ThreadPoolExecutor(1) as pool:
        ahead = pool.submit(_load, items[0])
        for i, item in enumerate(items):
            arr = ahead.result()
            if i + 1 < len(items):
                ahead = pool.submit(_load, items[i + 1])
            yield item, arr


def _check_largest(predictor: Predictor, items: Sequence[ImageItem], batch_size: int, keep_heatmap: bool) -> None:
    """Predictor.check_memory for a batch of the largest image (sizes from the file headers), before any work.
    Files whose header cannot be read are left to the loop, which reports them."""
    if not hasattr(predictor, "check_memory"):
        return
    largest = None
    for item in items:
        try:
            w, h = read_image_size(item.path)
        except Exception:  # noqa: BLE001 - any unreadable file is reported by the loop when it is read
            continue
        if largest is None or h * w > largest[1] * largest[2]:
            largest = (item, h, w)
    if largest is not None:
        item, h, w = largest
        predictor.check_memory([(h, w)] * min(batch_size, len(items)), keep_heatmap, display_path(item.file_name))


def predict_images(predictor: Predictor, source: ImageSource, batch_size: int = 1,
                   viz_dir: Optional[PathLike] = None, strict: bool = False, progress: bool = True,
                   log: Callable[[str], None] = _stderr) -> PredictSummary:
    """Run `predictor` over every image of `source`. Unreadable images are reported through `log`
    and skipped, or raise a UserError with strict=True. Raises if no image could be processed."""
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    viz = Path(viz_dir) if viz_dir is not None else None
    results: List[Dict[str, Any]] = []
    images: List[Dict[str, Any]] = []
    skipped: List[Tuple[str, str]] = []
    viz_files: List[Path] = []
    used_names: set = set()
    pending: List[Tuple[ImageItem, np.ndarray]] = []
    start = time.perf_counter()
    _check_largest(predictor, source.items, batch_size, keep_heatmap=viz is not None)

    def flush() -> None:
        preds = predictor([a for _, a in pending], keep_heatmap=viz is not None)
        for (item, arr), pred in zip(pending, preds):
            results.extend(to_coco_results(item.image_id, pred, source.label_to_cat_id))
            images.append(dict(id=item.image_id, file_name=item.file_name,
                               width=int(arr.shape[1]), height=int(arr.shape[0])))
            if viz is not None:
                viz_files.append(save_detections(viz / _viz_name(item, used_names), arr, pred.boxes, pred.labels,
                                                 pred.scores, source.class_names, pred.regions, pred.heatmap,
                                                 score_thr=VIZ_SCORE_THR))
        pending.clear()

    with progress_bar(total=len(source.items), unit="img", desc="infer", disable=not progress) as bar:
        for item, arr in _read_ahead(source.items):
            if isinstance(arr, UserError):
                exc = arr
                if strict:
                    raise exc
                skipped.append((item.file_name, str(exc)))
                log(f"warning: skipping {exc}")
                bar.update(1)
                continue
            pending.append((item, arr))
            if len(pending) >= batch_size:
                n = len(pending)
                flush()
                bar.update(n)
        if pending:
            n = len(pending)
            flush()
            bar.update(n)
    if not images:
        raise UserError(f"none of the {len(source.items)} image(s) could be read")
    return PredictSummary(results, images, skipped, time.perf_counter() - start, viz_files)


# ----------------------------------------------------------------------------- writing

def write_json_atomic(path: PathLike, obj: Any) -> Path:
    """Write JSON to a temporary file next to `path`, then rename it over `path`; a failed write (a full disk)
    is one UserError naming the path and the free space, and leaves no file."""
    return write_json(path, obj)


def images_side_path(out: PathLike) -> Path:
    """``<out stem>.images.json`` next to the predictions file."""
    out = Path(out)
    return out.with_name(f"{out.stem}.images.json")


def save_predictions(out: PathLike, summary: PredictSummary, source: ImageSource) -> List[Path]:
    """The COCO results list at `out`; for a folder without json also the id -> file name side file."""
    written = [write_json_atomic(out, summary.results)]
    if source.dataset is None:
        written.append(write_json_atomic(images_side_path(out),
                                         dict(images=summary.images, categories=source.categories)))
    return written


def predict_dataset(model: torch.nn.Module, cfg: Dict[str, Any], ann_file: PathLike, img_root: PathLike,
                    device: Union[str, torch.device] = "cpu", fusion: Optional[str] = None,
                    max_patches: Optional[int] = None, batch_size: int = 4, progress: bool = False,
                    viz_dir: Optional[PathLike] = None) -> PredictSummary:
    """COCO results of `model` on a COCO dataset (used by training-time evaluation, the demo, benchmarks)."""
    source = coco_source(ann_file, img_root, cfg.get("classes"), int(cfg["model"]["bbox_head"]["num_classes"]))
    predictor = Predictor(model, cfg, device, fusion, max_patches)
    return predict_images(predictor, source, batch_size=batch_size, viz_dir=viz_dir, progress=progress,
                          log=lambda msg: None)
