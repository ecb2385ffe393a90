"""Deformable convolution: torchvision's op, with a bilinear-sampling formulation on CPU.

Own code because torchvision's CPU backward is about 11x slower than F.grid_sample + matmul for YOLC's refine
layer (it dominated a CPU training step); both compute the same mmcv-style sampling (zero outside the image)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torchvision.ops import DeformConv2d as _TorchvisionDeformConv2d
from torchvision.ops import deform_conv2d


def sampling_grid(offset: torch.Tensor, h: int, w: int, kh: int, kw: int, stride: int = 1, padding: int = 1,
                  dilation: int = 1) -> torch.Tensor:
    """(B, kh*kw, Ho, Wo, 2) grid_sample coordinates (x, y in [-1, 1], align_corners=True) of every tap of a
    deformable conv over an (h, w) input; offset (B, 2*kh*kw, Ho, Wo) as (dy, dx) pairs."""
    b, _, ho, wo = offset.shape
    k = kh * kw
    dt, dev = offset.dtype, offset.device
    ky = (torch.arange(kh, dtype=dt, device=dev) * dilation).repeat_interleave(kw)
    kx = (torch.arange(kw, dtype=dt, device=dev) * dilation).repeat(kh)
    off = offset.view(b, k, 2, ho, wo)
    rows = torch.arange(ho, dtype=dt, device=dev).view(1, 1, ho, 1) * stride - padding
    cols = torch.arange(wo, dtype=dt, device=dev).view(1, 1, 1, wo) * stride - padding
    ys = rows + ky.view(1, k, 1, 1) + off[:, :, 0]
    xs = cols + kx.view(1, k, 1, 1) + off[:, :, 1]
    return torch.stack([xs * (2.0 / (w - 1)) - 1, ys * (2.0 / (h - 1)) - 1], dim=-1)


def deform_conv2d_sampled(x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor,
                          bias: Optional[torch.Tensor] = None, stride: int = 1, padding: int = 1,
                          dilation: int = 1) -> torch.Tensor:
    """Deformable conv (one group, one offset group, no mask); offset (B, 2*kh*kw, Ho, Wo) as (dy, dx) pairs."""
    b, cin, h, w = x.shape
    cout, _, kh, kw = weight.shape
    ho, wo = offset.shape[2:]
    k = kh * kw
    grid = sampling_grid(offset, h, w, kh, kw, stride, padding, dilation).view(b, k * ho, wo, 2)
    sampled = F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="zeros", align_corners=True)
    out = torch.matmul(weight.reshape(cout, cin * k), sampled.view(b, cin * k, ho * wo)).view(b, cout, ho, wo)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


class DeformConv2d(_TorchvisionDeformConv2d):
    """torchvision.ops.DeformConv2d (same parameters and state-dict names); CPU tensors take the sampled path.
    Under autocast, or with offsets of another dtype than the input, it samples and convolves in float32 and
    returns float32 (torchvision's CUDA autocast kernel also computes in float32; at W/4 = 256 grid_sample's
    coordinates in float16 are off by up to 0.03 cells, in bfloat16 by 0.25; its CPU kernel has no bfloat16)."""

    def forward(self, input: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if torch.is_autocast_enabled(input.device.type) or offset.dtype != input.dtype:
            with torch.autocast(input.device.type, enabled=False):
                return self._deform(input.float(), offset.float(), None if mask is None else mask.float(),
                                    self.weight.float(), None if self.bias is None else self.bias.float())
        return self._deform(input, offset, mask, self.weight, self.bias)

    def _deform(self, input: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor], weight: torch.Tensor,
                bias: Optional[torch.Tensor]) -> torch.Tensor:
        kh, kw = weight.shape[2:]
        simple = (mask is None and self.groups == 1 and offset.shape[1] == 2 * kh * kw
                  and len(set(self.stride)) == len(set(self.padding)) == len(set(self.dilation)) == 1)
        if input.device.type != "cpu" or not simple or min(input.shape[2:]) < 2:
            return deform_conv2d(input, offset, weight, bias, stride=self.stride, padding=self.padding,
                                 dilation=self.dilation, mask=mask)  # what torchvision's forward calls
        return deform_conv2d_sampled(input, offset, weight, bias, self.stride[0], self.padding[0], self.dilation[0])
