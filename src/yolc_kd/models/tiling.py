"""The full-image pass in overlapping tiles, so its memory stays bounded however large the image is.

A tile is a window of one image; it keeps only its core, the part at least `overlap` pixels from every cut edge
of the window (edges on the input's border are not cuts: the untiled pass sees the same border). Cores tile
the input exactly and start on multiples of 32, the network's coarsest stride, so every stride-s output cell of
a tile is the untiled cell at the same place (centre-crop stitching). With the overlap past the distance where a
cut edge still changes the outputs, the stitched maps are the untiled ones up to float noise (tests/test_tiling.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from yolc_kd.errors import UserError

ALIGN = 32  # HRNet's coarsest stride: tile windows and cores start on this grid
MEMINFO = Path("/proc/meminfo")


@dataclass(frozen=True)
class Tile:
    """One forward of a tiled pass.

    Args:
        b: the image's index in the batch.
        y0, y1, x0, x1: the window [y0:y1, x0:x1] of the input that runs through the network.
        cy0, cy1, cx0, cx1: the core, inside the window, that this tile writes into the stitched maps.
    """

    b: int
    y0: int
    y1: int
    x0: int
    x1: int
    cy0: int
    cy1: int
    cx0: int
    cx1: int

    @property
    def pixels(self) -> int:
        return (self.y1 - self.y0) * (self.x1 - self.x0)


def _axis(n: int, parts: int, overlap: int) -> List[Tuple[int, int, int, int]]:
    """[0, n) cut into `parts` cores on the ALIGN grid, each with its window: (w0, w1, c0, c1)."""
    cells = -(-n // ALIGN)
    cuts = [min(n, round(i * cells / parts) * ALIGN) for i in range(parts)] + [n]
    return [(max(0, c0 - overlap), min(n, c1 + overlap), c0, c1) for c0, c1 in zip(cuts[:-1], cuts[1:])]


Span = Tuple[int, int, int, int, int, int, int, int]  # y0, y1, x0, x1 (window), cy0, cy1, cx0, cx1 (core)


def _extent(spans: Sequence[Tuple[int, int, int, int]]) -> Tuple[int, int]:
    """(largest, summed) window length of an axis's spans."""
    return max(w1 - w0 for w0, w1, _, _ in spans), sum(w1 - w0 for w0, w1, _, _ in spans)


def plan_tiles(height: int, width: int, max_pixels: int, overlap: int) -> List[Span]:
    """Tiles of one (height, width) input whose windows have at most max_pixels pixels each:
    [(y0, y1, x0, x1, cy0, cy1, cx0, cx1)], the grid with the fewest pixels computed in all (then the fewest tiles).
    One tile (the whole input) when it fits. A budget below the smallest tile is a UserError."""
    if height % ALIGN or width % ALIGN:
        raise ValueError(f"tiling needs an input whose sides are multiples of {ALIGN} (YOLC's test padding), "
                         f"got {height}x{width}")
    if height * width <= max_pixels:
        return [(0, height, 0, width, 0, height, 0, width)]
    rows = {n: _axis(height, n, overlap) for n in range(1, height // ALIGN + 1)}
    cols = {n: _axis(width, n, overlap) for n in range(1, width // ALIGN + 1)}
    row_ext = {n: _extent(s) for n, s in rows.items()}
    col_ext = {n: _extent(s) for n, s in cols.items()}
    best = None
    for ny, (hmax, hsum) in row_ext.items():
        for nx, (wmax, wsum) in col_ext.items():
            if hmax * wmax <= max_pixels:
                key = (hsum * wsum, ny * nx)  # the windows form a grid: total pixels = sum of heights x sum of widths
                if best is None or key < best[0]:
                    best = (key, ny, nx)
    if best is None:
        smallest = row_ext[len(rows)][0] * col_ext[len(cols)][0]
        raise UserError(f"max_pixels {max_pixels:,} is below the smallest tile of a {width}x{height} input with a "
                        f"{overlap}-pixel overlap ({smallest:,} pixels): raise --max-pixels (or test_cfg.max_pixels)")
    _, ny, nx = best
    return [(y0, y1, x0, x1, cy0, cy1, cx0, cx1) for y0, y1, cy0, cy1 in rows[ny] for x0, x1, cx0, cx1 in cols[nx]]


def batch_tiles(batch: int, height: int, width: int, max_pixels: int, overlap: int) -> Optional[List[Tile]]:
    """None when the whole (batch, height, width) input fits max_pixels (0: no limit) in one forward; else the
    tiles of every image, one image per forward."""
    if max_pixels <= 0 or batch * height * width <= max_pixels:
        return None
    return [Tile(b, *t) for b in range(batch) for t in plan_tiles(height, width, max_pixels, overlap)]


def run_tiled(img: torch.Tensor, tiles: Sequence[Tile],
              forward: Callable[[torch.Tensor], Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Stitch the maps of `forward` (window (1,3,h,w) -> {name: (1,c,h/s,w/s)}, any stride s dividing 32) over
    the tiles into {name: (B,c,H/s,W/s)}: each tile writes its core."""
    batch, _, height, width = img.shape
    out: Dict[str, torch.Tensor] = {}
    for t in tiles:
        maps = forward(img[t.b:t.b + 1, :, t.y0:t.y1, t.x0:t.x1])
        for name, m in maps.items():
            s = (t.y1 - t.y0) // m.shape[2]
            if name not in out:
                out[name] = m.new_empty((batch, m.shape[1], height // s, width // s))
            out[name][t.b, :, t.cy0 // s:t.cy1 // s, t.cx0 // s:t.cx1 // s] = \
                m[0, :, (t.cy0 - t.y0) // s:(t.cy1 - t.y0) // s, (t.cx0 - t.x0) // s:(t.cx1 - t.x0) // s]
        del maps
    return out


# ----------------------------------------------------------------------------- memory estimate

FORWARD_FIXED_BYTES = 256 * 2 ** 20  # per forward, independent of its size (measured intercept: ~250 MB, tiny model)


def forward_bytes_per_pixel(num_classes: int, head_in: int, neck_in: Sequence[int], neck_out: int) -> int:
    """Peak bytes per input pixel of one YOLC forward (float32). The largest live set is the heatmap branch's
    stride-1 transposed convolution (its column buffer: 32 x num_classes floats per pixel) beside the stride-4
    neck and head features. An upper estimate: measured peaks are 0.6-0.85x of it (BENCHMARKS.md)."""
    return 4 * (32 * num_classes + -(-(sum(neck_in) + neck_out + head_in) // 16))


def pass_bytes(batch: int, height: int, width: int, num_classes: int, per_pixel: int, max_pixels: int,
               overlap: int, keep_heatmap: bool) -> Tuple[int, str]:
    """Estimated peak bytes of the full-image pass over a (batch, height, width) input, and what it is made of.

    Besides the forward(s): the input (float32 RGB, plus the decoded uint8 image and the next one read ahead),
    LSM's float/int64 copies of one max-over-classes map, and the full-size maps: untiled the heatmap, its blurred
    copy and two transient copies of the blur and peak search; tiled only the stitched peaks and the LSM map
    (and the raw heatmap when it is kept for pictures)."""
    pixels = batch * height * width
    tiles = batch_tiles(batch, height, width, max_pixels, overlap)
    shared = pixels * (12 + 6 + 28 + 1)  # input, image + read-ahead, LSM copies, refine map (stride 4)
    if tiles is None:
        maps = pixels * 4 * num_classes * (4 + (1 if keep_heatmap else 0))
        forward = pixels * per_pixel
        how = f"one untiled pass over {pixels / 1e6:.1f} MP"
    else:
        maps = pixels * 4 * (num_classes + 1 + (num_classes if keep_heatmap else 0))
        largest = max(t.pixels for t in tiles)
        forward = largest * per_pixel
        how = f"{len(tiles)} tiles of <= {largest / 1e6:.1f} MP"
    return forward + FORWARD_FIXED_BYTES + maps + shared, how


def mem_available() -> Optional[int]:
    """MemAvailable from /proc/meminfo in bytes; None where there is no such file (not Linux)."""
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def gib(n: float) -> str:
    """Bytes for a message: GiB from 1 GiB up, else MiB."""
    return f"{n / 2 ** 30:.1f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.0f} MiB"
