"""Image loading that accepts any common PIL mode and turns bad files into UserErrors.

16-bit data (modes I;16*, I) is mapped to 8 bit by a right shift (>> 8), i.e. the full
0..65535 range maps linearly onto 0..255; values outside 0..65535 are clipped first.
Float images (mode F) are taken as 0..1 when their maximum is <= 1, else as 0..255.
Alpha is dropped (not composited). EXIF orientation is ignored: pixels are kept raw,
so boxes stay in the stored pixel frame.
"""
from __future__ import annotations

import os
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from yolc_kd.errors import UserError

PathLike = Union[str, "os.PathLike[str]"]

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, Image.DecompressionBombError)


def display_path(path: PathLike) -> str:
    """Printable form of a path, also for names that are not valid UTF-8."""
    text = os.fsdecode(path)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _open(path: PathLike) -> Image.Image:
    shown = display_path(path)
    if not os.path.exists(path):
        raise UserError(f"image not found: {shown}")
    if os.path.isdir(path):
        raise UserError(f"expected an image file, got a directory: {shown}")
    try:
        return Image.open(path)
    except UnidentifiedImageError:
        raise UserError(f"not a readable image file: {shown}") from None
    except _DECODE_ERRORS as exc:
        raise UserError(f"cannot open image {shown}: {exc}") from None


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        data = np.asarray(img.convert("I") if mode != "I" else img).astype(np.int64)
        gray = (np.clip(data, 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        data = np.asarray(img, dtype=np.float64)
        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
        scale = 255.0 if data.size and data.max() <= 1.0 else 1.0
        gray = np.clip(np.rint(data * scale), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode in ("P", "PA"):
        img = img.convert("RGBA")  # palette transparency needs RGBA to convert without warnings
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8).copy()


def load_image_rgb(path: PathLike) -> np.ndarray:
    """Decode `path` fully and return an (H, W, 3) uint8 RGB array."""
    shown = display_path(path)
    with _open(path) as img:
        try:
            img.load()
        except _DECODE_ERRORS as exc:
            raise UserError(f"corrupt or truncated image {shown}: {exc}") from None
        try:
            arr = _to_rgb_array(img)
        except (ValueError, OSError) as exc:
            raise UserError(f"cannot convert image {shown} (mode {img.mode}) to RGB: {exc}") from None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise UserError(f"image {shown} has an unusable shape {arr.shape}")
    return arr


def read_image_size(path: PathLike) -> tuple[int, int]:
    """(width, height) of an image from its header, without decoding the pixels."""
    with _open(path) as img:
        w, h = img.size
    if w <= 0 or h <= 0:
        raise UserError(f"image {display_path(path)} has an empty size {w}x{h}")
    return int(w), int(h)
