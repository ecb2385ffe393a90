"""HRNet backbone with mmdet 2.x module names, so mmdet/YOLC checkpoints load strictly."""
from __future__ import annotations

from typing import List, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from yolc_kd.errors import ModelConfigError


def _bn(ch: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(ch)  # mmdet norm_cfg=dict(type='BN'): eps 1e-5, momentum 0.1


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 conv + BN, a residual connection, ReLU.

    Args:
        inplanes: input channels.
        planes: output channels (expansion 1).
        stride: stride of the first conv.
        downsample: module matching the identity to the output's shape, or None.
    """
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = _bn(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = _bn(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet's bottleneck block ('pytorch' style): 1x1, 3x3 (strided), 1x1 conv + BN, residual, ReLU.

    Args:
        inplanes: input channels.
        planes: inner channels; the output has planes * expansion (4).
        stride: stride of the 3x3 conv.
        downsample: module matching the identity to the output's shape, or None.
    """
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = _bn(planes)
        self.conv2 = _conv3x3(planes, planes, stride)  # 'pytorch' style: stride on the 3x3
        self.bn2 = _bn(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = _bn(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


BLOCKS = {"BASIC": BasicBlock, "BOTTLENECK": Bottleneck}


def _make_blocks(block, inplanes: int, planes: int, num_blocks: int, stride: int = 1) -> nn.Sequential:
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes * block.expansion, 1, stride=stride, bias=False),
            _bn(planes * block.expansion))
    layers = [block(inplanes, planes, stride, downsample)]
    for _ in range(1, num_blocks):
        layers.append(block(planes * block.expansion, planes))
    return nn.Sequential(*layers)


class HRModule(nn.Module):
    """Parallel branches followed by all-to-all fusion (mmdet's HRModule).

    Args:
        num_branches: parallel resolutions.
        block: the block class of every branch (BasicBlock or Bottleneck).
        num_blocks: blocks per branch.
        in_channels: input channels per branch.
        num_channels: block channels per branch (the output has num_channels * block.expansion).
        multiscale_output: fuse into every branch's resolution (True) or only the highest one.
    """

    def __init__(self, num_branches: int, block, num_blocks: Sequence[int], in_channels: List[int],
                 num_channels: Sequence[int], multiscale_output: bool = True):
        super().__init__()
        if not (num_branches == len(num_blocks) == len(num_channels) == len(in_channels)):
            raise ModelConfigError(f"HRModule: num_branches={num_branches} but num_blocks={list(num_blocks)}, "
                             f"num_channels={list(num_channels)}, in_channels={in_channels}")
        self.num_branches = num_branches
        self.branches = nn.ModuleList(
            _make_blocks(block, in_channels[i], num_channels[i], num_blocks[i]) for i in range(num_branches))
        self.in_channels = [c * block.expansion for c in num_channels]
        self.fuse_layers = self._make_fuse_layers(multiscale_output)
        self.relu = nn.ReLU(inplace=False)

    def _make_fuse_layers(self, multiscale_output: bool) -> Optional[nn.ModuleList]:
        if self.num_branches == 1:
            return None
        ch = self.in_channels
        fuse_layers = nn.ModuleList()
        for i in range(self.num_branches if multiscale_output else 1):
            row: List[Optional[nn.Module]] = []
            for j in range(self.num_branches):
                if j > i:
                    row.append(nn.Sequential(nn.Conv2d(ch[j], ch[i], 1, bias=False), _bn(ch[i]),
                                             nn.Upsample(scale_factor=2 ** (j - i), mode="nearest")))
                elif j == i:
                    row.append(None)
                else:
                    downs = []
                    for k in range(i - j):
                        if k == i - j - 1:
                            downs.append(nn.Sequential(_conv3x3(ch[j], ch[i], 2), _bn(ch[i])))
                        else:
                            downs.append(nn.Sequential(_conv3x3(ch[j], ch[j], 2), _bn(ch[j]), nn.ReLU(inplace=False)))
                    row.append(nn.Sequential(*downs))
            fuse_layers.append(nn.ModuleList(row))
        return fuse_layers

    def forward(self, x: List[torch.Tensor]) -> List[torch.Tensor]:
        if self.num_branches == 1:
            return [self.branches[0](x[0])]
        x = [branch(xi) for branch, xi in zip(self.branches, x)]
        out = []
        for i, row in enumerate(self.fuse_layers):
            y = 0
            for j in range(self.num_branches):
                y = y + (x[j] if i == j else row[j](x[j]))
            out.append(self.relu(y))
        return out


class HRNet(nn.Module):
    """mmdet's HRNet: stem (two stride-2 convs), layer1, then stages 2-4 with transitions.

    Args:
        extra: the stages' config (stage1 .. stage4: num_modules, num_branches, block, num_blocks,
            num_channels), as mmdet's `extra`.
        in_channels: image channels.
        conv_cfg: must be None or {}.
        norm_cfg: None or dict(type='BN') (BatchNorm is the only norm).
        norm_eval: keep the BatchNorm layers in eval mode while training.
        with_cp: must be False (no activation checkpointing).
        zero_init_residual: must be False.
        multiscale_output: the last stage returns every branch (True) or only the highest resolution.
        pretrained: accepted for mmdet config compatibility and not read (load a checkpoint instead).
        init_cfg: accepted for mmdet config compatibility and not read.
    """

    def __init__(self, extra: Mapping, in_channels: int = 3, conv_cfg: Optional[Mapping] = None,
                 norm_cfg: Optional[Mapping] = None, norm_eval: bool = True, with_cp: bool = False,
                 zero_init_residual: bool = False, multiscale_output: bool = True,
                 pretrained: Optional[str] = None, init_cfg=None):
        super().__init__()
        if conv_cfg not in (None, {}) or (norm_cfg and dict(norm_cfg).get("type", "BN") != "BN"):
            raise ModelConfigError("HRNet: only conv_cfg=None and norm_cfg=dict(type='BN') are supported")
        if with_cp or zero_init_residual:
            raise ModelConfigError("HRNet: with_cp=True (activation checkpointing) and zero_init_residual=True are "
                                   "not supported; remove them from the backbone config")
        # pretrained/init_cfg name ImageNet weights that cannot be downloaded here: load a checkpoint instead
        for name in ("stage1", "stage2", "stage3", "stage4"):
            if name not in extra:
                raise ModelConfigError(f"HRNet extra is missing '{name}'")
            cfg = extra[name]
            if not (len(cfg["num_blocks"]) == cfg["num_branches"] == len(cfg["num_channels"])):
                raise ModelConfigError(f"HRNet {name}: num_branches must equal len(num_blocks) and len(num_channels)")
        self.extra = extra
        self.norm_eval = norm_eval
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=2, padding=1, bias=False)
        self.bn1 = _bn(64)
        self.conv2 = nn.Conv2d(64, 64, 3, stride=2, padding=1, bias=False)
        self.bn2 = _bn(64)
        self.relu = nn.ReLU(inplace=True)

        s1 = extra["stage1"]
        block1 = BLOCKS[s1["block"]]
        self.layer1 = _make_blocks(block1, 64, s1["num_channels"][0], s1["num_blocks"][0])
        pre = [s1["num_channels"][0] * block1.expansion]
        self.num_branches = []
        for idx in (2, 3, 4):
            cfg = extra[f"stage{idx}"]
            block = BLOCKS[cfg["block"]]
            cur = [c * block.expansion for c in cfg["num_channels"]]
            setattr(self, f"transition{idx - 1}", self._make_transition(pre, cur))
            modules = []
            for m in range(cfg["num_modules"]):
                last_single = idx == 4 and not multiscale_output and m == cfg["num_modules"] - 1
                module = HRModule(cfg["num_branches"], block, cfg["num_blocks"], list(cur),
                                  cfg["num_channels"], multiscale_output=not last_single)
                cur = module.in_channels
                modules.append(module)
            setattr(self, f"stage{idx}", nn.Sequential(*modules))
            self.num_branches.append(cfg["num_branches"])
            pre = cur
        self.out_channels = pre

    @staticmethod
    def _make_transition(pre: Sequence[int], cur: Sequence[int]) -> nn.ModuleList:
        layers: List[Optional[nn.Module]] = []
        for i in range(len(cur)):
            if i < len(pre):
                layers.append(None if cur[i] == pre[i] else nn.Sequential(
                    _conv3x3(pre[i], cur[i]), _bn(cur[i]), nn.ReLU(inplace=True)))
            else:
                downs = []
                for j in range(i + 1 - len(pre)):
                    cin = pre[-1]
                    cout = cur[i] if j == i - len(pre) else cin
                    downs.append(nn.Sequential(_conv3x3(cin, cout, 2), _bn(cout), nn.ReLU(inplace=True)))
                layers.append(nn.Sequential(*downs))
        return nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        y_list = [self.layer1(x)]
        for idx, nb in zip((2, 3, 4), self.num_branches):
            transition = getattr(self, f"transition{idx - 1}")
            x_list = []
            for i in range(nb):
                if transition[i] is None:
                    x_list.append(y_list[i])
                else:  # new branches grow from the lowest-resolution output, as in mmdet
                    x_list.append(transition[i](y_list[-1] if i >= len(y_list) else y_list[i]))
            y_list = getattr(self, f"stage{idx}")(x_list)
        return y_list

    def train(self, mode: bool = True) -> "HRNet":
        super().train(mode)
        if mode and self.norm_eval:  # mmdet default norm_eval=True: backbone BN keeps running stats
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self
