"""The cache's value codecs: how the teacher's float maps are stored (quantised) and read back. Each codec has a
numpy and a torch back-end side by side (the type of the input picks one) that give the same codes and values bit
for bit: numpy in the cache writer, verify and recompute; torch on the training device (a live teacher's maps
with distill_cfg.online_targets "cached", a GPU teacher's maps before they cross to the host, the cache source's
decode after batching). torch is never imported here: verify runs with numpy + zarr only, and a tensor can only
exist once torch is loaded. The manifest's `quantization` text is written from `describe()`."""
from __future__ import annotations

import math
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np


def _torch_of(x: Any) -> Any:
    """The torch module when x is a torch tensor, else None (without importing torch)."""
    torch = sys.modules.get("torch")
    return torch if torch is not None and isinstance(x, torch.Tensor) else None


def _dtype_name(x: Any) -> str:
    """'uint8', 'int16', 'float32', ... of a numpy array or a torch tensor."""
    return str(x.dtype).removeprefix("torch.")


def cast(x: Any, dtype: str) -> Any:
    """x (numpy or torch) as dtype (a numpy dtype name that torch also has: 'float32', 'bool', ...)."""
    torch = _torch_of(x)
    return x.to(getattr(torch, dtype)) if torch is not None else np.asarray(x).astype(dtype, copy=False)


class ValueCodec(ABC):
    """A value codec: float values <-> codes of dtype `stored` (a numpy dtype name), with a numpy and a torch
    back-end each; `step` is the value of one code step (the recompute tolerance across numerics adds one).

    Args:
        stored: the codes' numpy dtype name (a subclass's field).
        step: the value of one code step (a subclass's field or property).
    """
    stored: str
    step: float

    @abstractmethod
    def encode(self, x: Any) -> Any:
        """Float values (numpy or torch) -> codes of the same type."""

    @abstractmethod
    def decode(self, q: Any) -> Any:
        """Codes (numpy or torch) -> float32 values of the same type."""

    @abstractmethod
    def tolerance(self, x: np.ndarray) -> np.ndarray:
        """Worst-case |x - decode(encode(x))| for each value x."""

    @abstractmethod
    def describe(self) -> Dict[str, Any]:
        """The codec in words and numbers, as the manifest's `quantization` holds it."""

    def encoded(self, x: Any) -> bool:
        """Whether x (numpy or torch) holds this codec's codes (its stored dtype) rather than floats."""
        return _dtype_name(x) == self.stored


@dataclass(frozen=True)
class HeatmapCodec(ValueCodec):
    """Probabilities in [0, 1] as uint8: q = floor(levels p + 1/2) clipped to 0..levels, and 0 where p < 1/levels
    (the sparse background compresses to nothing); NaN -> 0. Decode p = q / levels.

    Args:
        name: what it stores, the key of its entries in the manifest's `quantization`.
        levels: the code of p = 1 (255: every uint8 value is used).
        stored: the codes' dtype.
    """
    name: str = "heatmap"
    levels: int = 255
    stored: str = "uint8"

    @property
    def zero_below(self) -> float:
        return 1.0 / self.levels

    @property
    def max_error(self) -> float:
        """|p - decode(encode(p))| for p >= 1/levels (below: p itself, stored as 0)."""
        return 1.0 / (2 * self.levels)

    @property
    def step(self) -> float:
        return 1.0 / self.levels

    def encode(self, p: Any) -> Any:
        """Probabilities (numpy or torch, any float dtype: float32 first) -> uint8 codes of the same type."""
        torch = _torch_of(p)
        if torch is not None:
            p = torch.nan_to_num(p.float(), nan=0.0)
            q = torch.floor(p.double() * self.levels + 0.5).clamp(0, self.levels).to(torch.uint8)
            return q.masked_fill(p < self.zero_below, 0)
        p = np.nan_to_num(np.asarray(p, dtype=np.float32), nan=0.0)
        q = np.clip(np.floor(p.astype(np.float64) * self.levels + 0.5), 0, self.levels).astype(np.uint8)
        q[p < self.zero_below] = 0
        return q

    def decode(self, q: Any, out: Optional[Any] = None) -> Any:
        """uint8 codes -> float32 probabilities q / levels (numpy or torch). torch: into `out` (a float32 tensor
        of q's shape) when given, in place: the same values without a temporary."""
        torch = _torch_of(q)
        if torch is not None:
            if out is not None:
                return out.copy_(q).div_(float(self.levels))
            return q.float() / float(self.levels)
        return np.asarray(q, dtype=np.float32) / np.float32(self.levels)

    def tolerance(self, p: np.ndarray) -> np.ndarray:
        """Worst-case |p - decode(encode(p))| for each p (max_error, or p itself where it is zeroed), + 1e-7."""
        p = np.asarray(p, dtype=np.float64)
        return np.where(p < self.zero_below, np.maximum(p, 0.0), self.max_error) + 1e-7

    def describe(self) -> Dict[str, Any]:
        """The codec in words and numbers, as the manifest's `quantization` holds it (keys start with name)."""
        n = self.levels
        return {self.name: f"q = 0 if p < 1/{n} else floor({n} p + 0.5); p = q / {n}",
                f"{self.name}_max_error": self.max_error, f"{self.name}_max_error_below_1_{n}": "p (zeroed)"}


@dataclass(frozen=True)
class FixedPointCodec(ValueCodec):
    """Raw box maps (regression-grid cells) as int16 fixed point: q = round(x / step) (half to even), clipped to
    +-q_max; NaN -> 0, +-inf -> the clip. Decode x = q * step (exact in float32). Fixed point compresses 2.6x better
    than float16 on a teacher's maps (the low float16 bits are noise, data_schema.md).

    Args:
        name: what it stores, the key of its entries in the manifest's `quantization`.
        step: cells per code (2^-6: 1/16 input pixel at stride 4).
        q_max: the largest |q| (|x| up to q_max * step = 511.98 cells, 2047 input pixels at stride 4).
        stored: the codes' dtype.
    """
    name: str = "maps"
    step: float = 2.0 ** -6
    q_max: int = 32767
    stored: str = "int16"

    @property
    def max_value(self) -> float:
        return self.q_max * self.step

    @property
    def max_error(self) -> float:
        """|x - decode(encode(x))| inside +-max_value (outside, x is clipped to it)."""
        return self.step / 2

    def encode(self, x: Any) -> Any:
        """Box maps (numpy or torch, any float dtype: float32 first) -> int16 codes of the same type."""
        big = self.max_value
        torch = _torch_of(x)
        if torch is not None:
            x = torch.nan_to_num(x.float(), nan=0.0, posinf=big, neginf=-big)
            return torch.round(x.double() / self.step).clamp(-self.q_max, self.q_max).to(torch.int16)
        x = np.nan_to_num(np.asarray(x, dtype=np.float32), nan=0.0, posinf=big, neginf=-big)
        return np.clip(np.rint(x.astype(np.float64) / self.step), -self.q_max, self.q_max).astype(np.int16)

    def decode(self, q: Any) -> Any:
        """int16 codes -> float32 cells q * step (numpy or torch)."""
        torch = _torch_of(q)
        if torch is not None:
            return q.float() * self.step
        return np.asarray(q, dtype=np.float32) * np.float32(self.step)

    def unit(self, x: Any) -> float:
        """Cells per stored unit of a box map: step for codes (int16), 1 for float maps."""
        return self.step if self.encoded(x) else 1.0

    def tolerance(self, x: np.ndarray) -> np.ndarray:
        """Worst-case |x - decode(encode(x))| for each x (half a step; more where x is clipped), + 1e-7."""
        a = np.abs(np.asarray(x, dtype=np.float64))
        return np.where(a <= self.max_value, self.max_error, a - self.max_value + self.max_error) + 1e-7

    def describe(self) -> Dict[str, Any]:
        """The codec in words and numbers, as the manifest's `quantization` holds it (keys start with name)."""
        e = int(round(-math.log2(self.step)))
        return {self.name: f"q = round(x / 2^-{e}) as {self.stored}, clipped to +-{self.q_max}; x = q * 2^-{e} "
                           f"grid cells", f"{self.name}_max_error": self.max_error}


HEATMAP = HeatmapCodec()        # the heatmap
BOXES = FixedPointCodec()       # the coarse and refine box maps
