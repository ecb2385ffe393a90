"""HRFPN neck (mmdet names: reduction_conv.conv, fpn_convs.N.conv)."""
from __future__ import annotations

from typing import List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from yolc_kd.errors import ModelConfigError


class ConvModule(nn.Module):
    """mmcv ConvModule without norm/activation: just a biased conv stored as `.conv`.

    Args:
        cin: input channels.
        cout: output channels.
        kernel_size: the conv's kernel size.
        padding: the conv's padding.
        stride: the conv's stride.
    """

    def __init__(self, cin: int, cout: int, kernel_size: int, padding: int = 0, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class HRFPN(nn.Module):
    """mmdet's HRFPN neck: every HRNet branch upsampled to the first one's resolution and concatenated, a 1x1
    reduction conv, then num_outs pooled levels (strides 1, 2, 4, ...) each through a 3x3 conv.

    Args:
        in_channels: channels of each backbone branch, highest resolution first.
        out_channels: channels of every output level.
        num_outs: output levels (YOLC uses 1).
        pooling_type: "MAX" for max pooling between levels, anything else for average pooling (mmdet's "AVG").
        conv_cfg: must be None (YOLC uses none).
        norm_cfg: must be None (YOLC uses none).
        with_cp: accepted for mmdet config compatibility and not read.
        stride: stride of the output convs.
        init_cfg: accepted for mmdet config compatibility and not read.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int, num_outs: int = 5,
                 pooling_type: str = "AVG", conv_cfg: Optional[Mapping] = None, norm_cfg: Optional[Mapping] = None,
                 with_cp: bool = False, stride: int = 1, init_cfg=None):
        super().__init__()
        if conv_cfg or norm_cfg:
            raise ModelConfigError("HRFPN: conv_cfg and norm_cfg are not supported (YOLC uses neither)")
        self.in_channels = list(in_channels)
        self.num_outs = num_outs
        self.reduction_conv = ConvModule(sum(in_channels), out_channels, 1)
        self.fpn_convs = nn.ModuleList(
            ConvModule(out_channels, out_channels, 3, padding=1, stride=stride) for _ in range(num_outs))
        self.pooling = F.max_pool2d if pooling_type == "MAX" else F.avg_pool2d

    def forward(self, inputs: List[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.in_channels):
            raise ValueError(f"HRFPN expects {len(self.in_channels)} inputs, got {len(inputs)}")
        outs = [inputs[0]] + [F.interpolate(x, scale_factor=2 ** i, mode="bilinear")
                              for i, x in enumerate(inputs) if i > 0]
        out = self.reduction_conv(torch.cat(outs, dim=1))
        pyramid = [out] + [self.pooling(out, kernel_size=2 ** i, stride=2 ** i) for i in range(1, self.num_outs)]
        return tuple(conv(p) for conv, p in zip(self.fpn_convs, pyramid))
