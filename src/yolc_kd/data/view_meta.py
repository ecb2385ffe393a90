"""An inference meta's view: how the network tensor relates to the image (TestTransform's pad, predict's downscale,
or an mmdet-style meta's border and scale_factor), and the inverse that takes detections and regions back to the
image. The one place where tensor coordinates become image coordinates."""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence, Tuple

import numpy as np

from .view import ViewTransform
from .view_steps import Resize

__all__ = ["meta_view", "meta_content", "meta_to_image", "meta_rescale"]


def meta_view(meta: Mapping[str, Any], tensor_hw: Optional[Sequence[int]] = None) -> ViewTransform:
    """The image -> network tensor view of an inference meta: meta['view'] (TestTransform and predict put it there)
    or, for an mmdet-style meta without one, mmdet's meaning of its fields: the image resized by 'scale_factor'
    (when not 1) to 'img_shape', then padded by 'border' [top, bottom, left, right] (img_shape defaults to
    tensor_hw less the border)."""
    view = meta.get("view")
    if view is not None:
        return view
    top, _, left, _ = (int(round(float(v))) for v in np.asarray(meta.get("border", np.zeros(4))).reshape(-1)[:4])
    if "img_shape" in meta:
        h, w = (int(v) for v in meta["img_shape"][:2])
    elif tensor_hw is not None:
        h, w = int(tensor_hw[0]) - top, int(tensor_hw[1]) - left
    else:
        raise ValueError("an inference meta needs 'view', 'img_shape' or the tensor size")
    pad = meta.get("pad_shape", (top + h, left + w))
    padded = ViewTransform.pad((h, w), (max(int(pad[0]), top + h), max(int(pad[1]), left + w)), (left, top))
    sx, sy = (float(v) for v in (np.asarray(meta.get("scale_factor", 1.0), np.float64) * np.ones(4))[:2])
    if (sx, sy) == (1.0, 1.0):
        return padded
    ori_hw = (max(1, int(round(h / sy))), max(1, int(round(w / sx))))  # mmdet: scale_factor = img_shape / ori_shape
    return ViewTransform.resize(ori_hw, (h, w)).then(padded)


def _split_at_resize(view: ViewTransform) -> Tuple[Optional[ViewTransform], Optional[ViewTransform]]:
    """(the steps up to the last Resize, the steps after it); None for an empty part."""
    resized = [k for k, step in enumerate(view.steps) if isinstance(step, Resize)]
    cut = resized[-1] + 1 if resized else 0
    return (view[:cut] if cut else None), (view[cut:] if cut < len(view) else None)


def meta_to_image(meta: Mapping[str, Any], tensor_hw: Sequence[int], rescale: bool = True) -> ViewTransform:
    """Network tensor -> image frame of an inference meta (meta_view inverted): the one place where detections
    and regions leave the tensor. rescale=False stops at the image as the network took it (mmdet's
    rescale=False: the padding undone, a resize not)."""
    view = meta_view(meta, tensor_hw)
    resize, rest = _split_at_resize(view)
    if rest is None:  # the tensor is the resized image
        rest = ViewTransform.crop(view.out_hw, (0, 0, view.out_hw[1], view.out_hw[0]))
    back = rest.inverse()
    return back.then(resize.inverse()) if rescale and resize is not None else back


def meta_rescale(meta: Mapping[str, Any], tensor_hw: Sequence[int]) -> Optional[ViewTransform]:
    """The image as the network took it -> the image (the view's resize undone), None when it was not resized:
    what turns meta_to_image(..., rescale=False) coordinates into meta_to_image(...) ones."""
    resize, _ = _split_at_resize(meta_view(meta, tensor_hw))
    return None if resize is None else resize.inverse()


def meta_content(meta: Mapping[str, Any], tensor_hw: Optional[Sequence[int]] = None) -> Tuple[int, int, int, int]:
    """(x0, y0, h, w): where an inference meta's image lies in its network tensor (meta_view's content, whole
    pixels for YOLC's test pad): tensor coordinates minus (x0, y0) are the image's."""
    x0, y0, x1, y1 = meta_view(meta, tensor_hw).content_rect()
    return math.floor(x0), math.floor(y0), math.ceil(y1) - math.floor(y0), math.ceil(x1) - math.floor(x0)
