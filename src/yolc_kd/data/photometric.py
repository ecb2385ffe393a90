"""Photometric distortion (mmdet ``PhotoMetricDistortion`` semantics) in numpy.

The colour maths follows OpenCV's float32 ``BGR2HSV`` / ``HSV2BGR``
(hue in degrees, ``[0, 360)``; saturation and value unscaled), written out
elementwise in float32 so that the result is bit-reproducible: only IEEE
elementwise operations (add, multiply, divide, floor, fmod, comparisons) are
used, never reductions or transcendental functions whose SIMD implementations
could differ between machines.

Our images are RGB while mmdet works on BGR.  Every colour operation here is
defined on the *colours* (R, G, B), so the results are the same as mmdet's on
the same picture; the only place where channel order leaks into mmdet's
semantics is the random channel swap, whose BGR permutation is translated to
the equivalent RGB one (see :func:`bgr_perm_to_rgb`).

Random draws are made by :func:`draw_photometric` in exactly mmdet's order
(brightness flag/delta, contrast-position mode, contrast flag/alpha when
contrast comes first, saturation, hue, contrast when last, channel swap);
applying them (:func:`apply_photometric`) is a pure function of the image and
the drawn parameters.
"""
from __future__ import annotations

from typing import Any

import numpy as np

_EPS = np.float32(np.finfo(np.float32).eps)  # cv2 uses FLT_EPSILON
_F60 = np.float64(60.0)
_HUE_TO_SECTOR = np.float32(6.0 / 360.0)


def rgb_to_hsv(img: np.ndarray) -> np.ndarray:
    """float32 (..., 3) RGB -> float32 (..., 3) HSV like cv2's float BGR2HSV.

    H in degrees [0, 360), S = (max-min)/(|max|+eps), V = max.  Values outside
    [0, 255] (which mmdet's unclipped distortion produces) are handled exactly
    as cv2 does.
    """
    img = np.asarray(img, dtype=np.float32)
    r = img[..., 0]
    g = img[..., 1]
    b = img[..., 2]
    v = np.maximum(np.maximum(r, g), b)
    vmin = np.minimum(np.minimum(r, g), b)
    diff = v - vmin
    s = diff / (np.abs(v) + _EPS)
    # cv2: diff = (float)(60. / (diff + FLT_EPSILON)) -- the division is in double
    k = (_F60 / (diff + _EPS).astype(np.float64)).astype(np.float32)
    h_r = (g - b) * k
    h_g = (b - r) * k + np.float32(120.0)
    h_b = (r - g) * k + np.float32(240.0)
    h = np.where(v == r, h_r, np.where(v == g, h_g, h_b))
    h = np.where(h < 0, h + np.float32(360.0), h)
    out = np.empty(img.shape, dtype=np.float32)
    out[..., 0] = h
    out[..., 1] = s
    out[..., 2] = v
    return out


# cv2's sector table gives (b, g, r) indices into tab = [v, p, q, t]; in RGB order:
_SECTOR_RGB = np.array(
    [[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]], dtype=np.intp
)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """float32 (..., 3) HSV (H in degrees) -> float32 (..., 3) RGB like cv2's float HSV2BGR."""
    hsv = np.asarray(hsv, dtype=np.float32)
    h = hsv[..., 0] * _HUE_TO_SECTOR
    s = hsv[..., 1]
    v = hsv[..., 2]
    h = np.fmod(h, np.float32(6.0))
    sector_f = np.floor(h)
    frac = h - sector_f
    sector = sector_f.astype(np.int64)
    bad = (sector < 0) | (sector >= 6)
    sector = np.where(bad, 0, sector)
    frac = np.where(bad, np.float32(0.0), frac)
    one = np.float32(1.0)
    tab = np.stack(
        [v, v * (one - s), v * (one - s * frac), v * (one - s * (one - frac))], axis=-1
    )
    idx = _SECTOR_RGB[sector]  # (..., 3)
    rgb = np.take_along_axis(tab, idx, axis=-1)
    gray = (s == 0)[..., None]
    return np.where(gray, v[..., None], rgb).astype(np.float32, copy=False)


def bgr_perm_to_rgb(perm_bgr) -> list[int]:
    """Translate mmdet's channel permutation (applied to BGR) to our RGB arrays.

    mmdet: ``new_bgr[..., i] = old_bgr[..., p[i]]``.  With ``rgb[j] = bgr[2 - j]``
    that is ``new_rgb[..., j] = old_rgb[..., 2 - p[2 - j]]``.
    """
    p = [int(x) for x in perm_bgr]
    return [2 - p[2 - j] for j in range(3)]


def draw_photometric(
    rng: np.random.Generator,
    brightness_delta: float,
    contrast_range: tuple[float, float],
    saturation_range: tuple[float, float],
    hue_delta: float,
) -> dict[str, Any]:
    """Draw every random value of mmdet's PhotoMetricDistortion, in its order.

    Returns a JSON-able dict; ``None`` means the step was skipped.
    ``contrast_first`` is mmdet's ``mode == 1`` (contrast before the HSV part).
    """
    p: dict[str, Any] = {}
    if int(rng.integers(2)):
        p["brightness_delta"] = float(rng.uniform(-brightness_delta, brightness_delta))
    else:
        p["brightness_delta"] = None
    mode = int(rng.integers(2))
    p["contrast_first"] = mode == 1
    p["contrast_alpha"] = None
    if mode == 1 and int(rng.integers(2)):
        p["contrast_alpha"] = float(rng.uniform(contrast_range[0], contrast_range[1]))
    if int(rng.integers(2)):
        p["saturation"] = float(rng.uniform(saturation_range[0], saturation_range[1]))
    else:
        p["saturation"] = None
    if int(rng.integers(2)):
        p["hue_delta"] = float(rng.uniform(-hue_delta, hue_delta))
    else:
        p["hue_delta"] = None
    if mode == 0 and int(rng.integers(2)):
        p["contrast_alpha"] = float(rng.uniform(contrast_range[0], contrast_range[1]))
    if int(rng.integers(2)):
        perm = [int(x) for x in rng.permutation(3)]
        p["channel_perm_bgr"] = perm
        p["channel_perm_rgb"] = bgr_perm_to_rgb(perm)
    else:
        p["channel_perm_bgr"] = None
        p["channel_perm_rgb"] = None
    return p


def apply_photometric(img: np.ndarray, p: dict[str, Any]) -> np.ndarray:
    """Apply drawn parameters to an RGB image; returns float32, NOT clipped (as mmdet)."""
    out = np.array(img, dtype=np.float32, copy=True)
    if p.get("brightness_delta") is not None:
        out += np.float32(p["brightness_delta"])
    alpha = p.get("contrast_alpha")
    if p.get("contrast_first") and alpha is not None:
        out *= np.float32(alpha)
    hsv = rgb_to_hsv(out)
    if p.get("saturation") is not None:
        hsv[..., 1] *= np.float32(p["saturation"])
    if p.get("hue_delta") is not None:
        hue = hsv[..., 0] + np.float32(p["hue_delta"])
        hue = np.where(hue > 360, hue - np.float32(360.0), hue)
        hue = np.where(hue < 0, hue + np.float32(360.0), hue)
        hsv[..., 0] = hue
    out = hsv_to_rgb(hsv)
    if not p.get("contrast_first") and alpha is not None:
        out *= np.float32(alpha)
    perm = p.get("channel_perm_rgb")
    if perm is not None:
        out = np.ascontiguousarray(out[..., list(perm)])
    return out
