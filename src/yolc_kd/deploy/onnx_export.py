"""The YOLC network (backbone, neck, head: what `YOLC.forward_dummy` returns at inference) exported to ONNX with
torch's dynamo exporter, then checked against PyTorch with onnxruntime before the file takes its name.

The deformable refine convolution is written either as `grid_sample` (models/deform.py's sampled formulation,
the weights applied before the sampling: ONNX Conv + GridSample, runs on every runtime) or as torchvision's op
(ONNX DeformConv, opset >= 19, translated by onnxscript >= 0.7.1; only runtimes with a DeformConv kernel run it).
The choice is made here for every DeformConv2d of the model, whatever device it would pick at run time."""
from __future__ import annotations

import contextlib
import copy
import io
import os
import re
import time
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import DeformConv2d as TorchvisionDeformConv2d
from torchvision.ops import deform_conv2d

from yolc_kd.data.augment import TestTransform
from yolc_kd.data.images import display_path
from yolc_kd.deploy.onnx_runtime import INPUT_NAME, OUTPUT_NAMES, OnnxNetwork, has_kernel, require_module
from yolc_kd.diskio import atomic_path
from yolc_kd.errors import UserError
from yolc_kd.models.deform import sampling_grid

PathLike = Union[str, "os.PathLike[str]"]
DCN_MODES = ("grid_sample", "deform_conv")
DEFAULT_DCN = "grid_sample"
DEFAULT_OPSET = 20
# the lowest opset torch's dynamo exporter writes, and the one that brings ONNX DeformConv
MIN_OPSET = 18
DEFORM_CONV_OPSET = 19
# onnxscript translates torchvision::deform_conv2d to ONNX DeformConv from this version on
DEFORM_CONV_ONNXSCRIPT = (0, 7, 1)
# the check's bound on |onnxruntime - PyTorch| per output map, relative to max(1, the map's largest |value|)
DEFAULT_TOLERANCE = 1e-4
CHECK_SEED = 0


class YOLCNetwork(nn.Module):
    """The exported part of a YOLC model: image batch (B, 3, H, W) -> heatmap probabilities (B, C, H/4, W/4),
    coarse and refine maps (B, 4, H/4, W/4) of the first (YOLC's only) feature level, as simple_test reads them.

    Args:
        model: a built YOLC detector (its PyTorch network is always the one traced, never a stand-in runtime).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        heat, coarse, refine = self.model.bbox_head(self.model.extract_feat(image))
        return heat[0], coarse[0], refine[0]


def deform_conv2d_weights_first(x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor,
                                bias: Optional[torch.Tensor] = None, stride: int = 1, padding: int = 1,
                                dilation: int = 1) -> torch.Tensor:
    """models/deform.py's sampled deformable conv (one group, one offset group, no mask) with the taps' weights
    applied before the sampling: a 1x1 conv to kh*kw*Cout channels, then each tap's Cout channels bilinearly
    sampled at its points and the taps summed. Sampling is linear (zero outside the image), so the values are the
    same up to float rounding."""
    # own formulation: onnxruntime's GridSample recomputes the sampling coordinates for every channel, so sampling
    # Cout (4) channels per tap instead of Cin (16-64) makes the refine layer ~13x faster there (BENCHMARKS.md)
    b, cin, h, w = x.shape
    cout, _, kh, kw = weight.shape
    ho, wo = offset.shape[2:]
    k = kh * kw
    grid = sampling_grid(offset, h, w, kh, kw, stride, padding, dilation).view(b * k, ho, wo, 2)
    taps = F.conv2d(x, weight.permute(2, 3, 0, 1).reshape(k * cout, cin, 1, 1)).view(b * k, cout, h, w)
    sampled = F.grid_sample(taps, grid.to(x.dtype), mode="bilinear", padding_mode="zeros", align_corners=True)
    out = sampled.view(b, k, cout, ho, wo).sum(1)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def _sampled_forward(self: TorchvisionDeformConv2d, input: torch.Tensor, offset: torch.Tensor,
                     mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    kh, kw = self.weight.shape[2:]
    if (mask is not None or self.groups != 1 or offset.shape[1] != 2 * kh * kw
            or len(set(self.stride)) != 1 or len(set(self.padding)) != 1 or len(set(self.dilation)) != 1):
        raise UserError("--dcn grid_sample writes deformable convolutions with one group, one offset group, no mask "
                        "and square stride/padding/dilation; this model has another: export with --dcn deform_conv")
    return deform_conv2d_weights_first(input, offset, self.weight, self.bias, self.stride[0], self.padding[0],
                                       self.dilation[0])


def _torchvision_forward(self: TorchvisionDeformConv2d, input: torch.Tensor, offset: torch.Tensor,
                         mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    return deform_conv2d(input, offset, self.weight, self.bias, stride=self.stride, padding=self.padding,
                         dilation=self.dilation, mask=mask)


_DCN_FORWARDS = dict(grid_sample=_sampled_forward, deform_conv=_torchvision_forward)


@contextlib.contextmanager
def dcn_path(model: nn.Module, mode: str) -> Iterator[int]:
    """Inside the block every deformable convolution of `model` computes as `mode` says ('grid_sample': the
    sampled formulation, 'deform_conv': torchvision's op), on any device. Yields how many there are."""
    if mode not in DCN_MODES:
        raise UserError(f"--dcn must be one of {', '.join(DCN_MODES)}, got {mode!r}")
    layers = [m for m in model.modules() if isinstance(m, TorchvisionDeformConv2d)]
    try:
        for layer in layers:
            layer.forward = types.MethodType(_DCN_FORWARDS[mode], layer)  # an instance attribute shadows the class's
        yield len(layers)
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)


@dataclass
class ExportReport:
    """What export_onnx wrote and measured: `checks` holds, per checked input shape (B, 3, H, W), the largest
    |onnxruntime - PyTorch| of each output map (empty when the check was skipped).

    Args:
        path: the ONNX file.
        seconds: wall time of the export and its checks.
        size_bytes: the file's size.
        opset: the ONNX opset.
        dcn: how the deformable convolution is exported (DCN_MODES).
        dynamic: batch and image size dynamic (True) or fixed at the sample's.
        checks: (input shape, output name -> largest difference) per checked shape.
    """

    path: Path
    seconds: float
    size_bytes: int
    opset: int
    dcn: str
    dynamic: bool
    checks: List[Tuple[Tuple[int, ...], Dict[str, float]]] = field(default_factory=list)

    @property
    def max_diff(self) -> float:
        return max((d for _, diffs in self.checks for d in diffs.values()), default=float("nan"))


def check_sizes(transform: TestTransform) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """(input_hw, check_hw) of a dynamic export: the test input of the config's nominal image size (its Resize
    img_scale) and that of a second image shape (3/4 the height, 5/4 the width)."""
    w, h = transform.cfg.img_scale
    return transform.target_hw(h, w), transform.target_hw(max(1, round(h * 0.75)), round(w * 1.25))


def _version(text: str) -> Tuple[int, ...]:
    # the leading numeric release parts of a version string ('0.7.2.dev1' -> (0, 7, 2)); enough for one bound
    return tuple(int(p) for p in re.findall(r"\d+", text.split("+")[0])[:3])


def _root_line(exc: BaseException) -> str:
    """The first line of the innermost cause: torch's exporter wraps the real reason in generic errors."""
    seen = set()
    while (exc.__cause__ or exc.__context__) is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    text = str(exc).strip()
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def check_requirements(opset: int, dcn: str, check: bool) -> None:
    """One UserError line for an export that cannot work here: a missing package of the deploy extra, an opset
    too low for the DCN form, an onnxscript without the DeformConv translation, or (when checking) an onnxruntime
    without a DeformConv kernel."""
    if dcn not in DCN_MODES:
        raise UserError(f"--dcn must be one of {', '.join(DCN_MODES)}, got {dcn!r}")
    onnx = require_module("onnx", "exporting to ONNX")
    onnxscript = require_module("onnxscript", "exporting to ONNX")
    newest = int(onnx.defs.onnx_opset_version())
    if not MIN_OPSET <= opset <= newest:
        raise UserError(f"--opset must be between {MIN_OPSET} and {newest} (the installed onnx {onnx.__version__}), "
                        f"got {opset}")
    if dcn == "deform_conv":
        if opset < DEFORM_CONV_OPSET:
            raise UserError(f"--dcn deform_conv needs --opset {DEFORM_CONV_OPSET} or later (ONNX DeformConv), "
                            f"got {opset}")
        if _version(onnxscript.__version__) < DEFORM_CONV_ONNXSCRIPT:
            raise UserError(f"--dcn deform_conv needs onnxscript >= {'.'.join(map(str, DEFORM_CONV_ONNXSCRIPT))} "
                            f"(installed {onnxscript.__version__}): pip install -U onnxscript, or use --dcn "
                            "grid_sample")
    if check:
        ort = require_module("onnxruntime", "checking the exported model (--no-check skips it)")
        if dcn == "deform_conv" and not has_kernel("DeformConv", opset):
            raise UserError(f"onnxruntime {ort.__version__} has no CPU DeformConv kernel for opset {opset}, so the "
                            "export cannot be checked here: use --dcn grid_sample (runs everywhere), or pass "
                            "--no-check to keep the unchecked file for a runtime that has DeformConv")


def check_onnx(path: PathLike, network: nn.Module, shapes: Sequence[Tuple[int, int, int, int]],
               tolerance: float = DEFAULT_TOLERANCE) -> List[Tuple[Tuple[int, ...], Dict[str, float]]]:
    """Run the ONNX graph at `path` and the PyTorch `network` (a YOLCNetwork) on the same seeded random batch of
    each shape; per shape the largest |difference| of each output. A difference above tolerance x max(1, the
    map's largest |value|) is a UserError."""
    runner = OnnxNetwork(path)
    gen = torch.Generator().manual_seed(CHECK_SEED)
    checks = []
    for shape in shapes:
        image = torch.randn(tuple(int(s) for s in shape), generator=gen)
        with torch.no_grad():
            expected = [t.float().numpy() for t in network(image)]
        got = runner.run(image.numpy())
        diffs: Dict[str, float] = {}
        for name, ref, out in zip(OUTPUT_NAMES, expected, got):
            if out.shape != ref.shape:
                raise UserError(f"the exported {name} map has shape {list(out.shape)} at input {list(shape)}, "
                                f"PyTorch's {list(ref.shape)}")
            diff = float(np.abs(out.astype(np.float64) - ref).max()) if ref.size else 0.0
            if not np.isfinite(diff) or diff > tolerance * max(1.0, float(np.abs(ref).max(initial=0.0))):
                raise UserError(f"the exported model does not match PyTorch: {name} differs by up to {diff:.3g} at "
                                f"input {'x'.join(map(str, shape))} (tolerance {tolerance:g} x max(1, |{name}|))")
            diffs[name] = diff
        checks.append((tuple(int(s) for s in shape), diffs))
    return checks


def export_graph(network: nn.Module, path: PathLike, sample: torch.Tensor, opset: int, dynamic: bool,
                 metadata: Optional[Dict[str, str]] = None) -> None:
    """torch.onnx's dynamo export of `network` (one input, the three output maps) to `path`; batch, height and
    width dynamic or all fixed at the sample's. An export torch cannot do is one UserError line with its reason."""
    spec = {INPUT_NAME: {0: torch.export.Dim.DYNAMIC, 2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}}
    try:
        # the exporter prints its progress steps and warns about its internals: only its result is wanted here
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(network, (sample,), dynamo=True, opset_version=opset,
                                        input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                                        dynamic_shapes=spec if dynamic else None, optimize=True, verbose=False)
    except UserError:
        raise
    except Exception as exc:  # torch.export / onnxscript raise their own error types, the reason innermost
        raise UserError(f"torch cannot export this model to ONNX: {_root_line(exc)}") from None
    for key, value in (metadata or {}).items():
        program.model.metadata_props[key] = str(value)
    with contextlib.redirect_stdout(io.StringIO()):
        program.save(str(path), external_data=False)


def export_onnx(model: nn.Module, out: PathLike, input_hw: Tuple[int, int], *, dynamic: bool = True,
                check_hw: Optional[Tuple[int, int]] = None, opset: int = DEFAULT_OPSET, dcn: str = DEFAULT_DCN,
                check: bool = True, tolerance: float = DEFAULT_TOLERANCE,
                metadata: Optional[Dict[str, str]] = None) -> ExportReport:
    """Export `model`'s network to `out` and check it against PyTorch with onnxruntime: at 1 x input_hw, and
    when dynamic also at 2 x check_hw (a second batch and size). The file is written under a temporary name
    and renamed to `out` only after the check passed (or with check=False); on any failure no file is left.
    The model is traced on the CPU in eval mode (a copy when it lives elsewhere)."""
    check_requirements(opset, dcn, check)
    if dynamic and check and check_hw is None:
        raise ValueError("a dynamic export is checked at a second size: pass check_hw")
    if any(p.device.type != "cpu" for p in model.parameters()):
        model = copy.deepcopy(model).cpu()
    model.eval()
    network = YOLCNetwork(model).eval()
    h, w = (int(v) for v in input_hw)
    sample = torch.randn((2 if dynamic else 1, 3, h, w), generator=torch.Generator().manual_seed(CHECK_SEED))
    shapes: List[Tuple[int, int, int, int]] = [(1, 3, h, w)]
    if dynamic and check_hw is not None:
        shapes.append((2, 3, int(check_hw[0]), int(check_hw[1])))
    meta = dict(metadata or {}, **{"yolc_kd.dcn": dcn, "yolc_kd.dynamic": str(dynamic)})
    start = time.perf_counter()
    out = Path(out)
    checks: List[Tuple[Tuple[int, ...], Dict[str, float]]] = []
    with atomic_path(out) as tmp:
        with dcn_path(model, dcn) as layers, torch.no_grad():
            if dcn == "deform_conv" and layers == 0:
                raise UserError("--dcn deform_conv: this model has no deformable convolution")
            export_graph(network, tmp, sample, opset, dynamic, meta)
        if check:
            checks = check_onnx(tmp, network, shapes, tolerance)
        size = tmp.stat().st_size
    return ExportReport(out, time.perf_counter() - start, size, opset, dcn, dynamic, checks)


def describe(report: ExportReport) -> str:
    """One line for the user: file, size, form, time and the check's largest differences."""
    form = "dynamic batch and size" if report.dynamic else "fixed size"
    head = (f"{display_path(report.path)} ({report.size_bytes / 2**20:.1f} MiB, opset {report.opset}, {form}, "
            f"{report.dcn} DCN) in {report.seconds:.0f} s")
    if not report.checks:
        return f"{head}; not checked (--no-check)"
    parts = []
    for shape, diffs in report.checks:
        values = ", ".join(f"{k} {v:.2g}" for k, v in diffs.items())
        parts.append(f"{'x'.join(map(str, shape))}: {values}")
    return f"{head}; onnxruntime vs PyTorch max |diff| at {'; at '.join(parts)}"
