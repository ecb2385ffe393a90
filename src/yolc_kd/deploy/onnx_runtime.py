"""An exported YOLC network run by ONNX Runtime, standing in for the PyTorch forward (backbone + neck + head):
called with an image batch it returns the head's ([heatmap], [coarse], [refine]) lists, so decoding, LSM, the
patch pass, remapping and fusion stay the detector's own (`YOLC.use_network`)."""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from yolc_kd.data.images import display_path
from yolc_kd.errors import UserError
from yolc_kd.models.detector import NetworkOutputs

PathLike = Union[str, "os.PathLike[str]"]
DEPLOY_INSTALL = "pip install 'yolc-kd[deploy]'"
INPUT_NAME = "image"
OUTPUT_NAMES = ("heatmap", "coarse", "refine")
CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"


def require_module(name: str, what: str) -> ModuleType:
    """Import `name` (one of the deploy extra's packages) or say in one line which package `what` needs."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise UserError(f"{what} needs the Python package {name}, which is not installed here: "
                        f"{DEPLOY_INSTALL} (onnx, onnxscript, onnxruntime)") from None


def has_kernel(op_type: str, opset: int, provider: str = CPU_PROVIDER) -> bool:
    """Whether the installed onnxruntime's `provider` has a kernel for the ONNX operator `op_type` at `opset`."""
    require_module("onnxruntime", "checking an ONNX model")
    from onnxruntime.capi import _pybind_state

    # onnxruntime publishes its registered kernels only here; a kernel covers an opset range [start, end]
    for kernel in _pybind_state.get_all_opkernel_def():
        if kernel.op_name == op_type and kernel.domain in ("", "ai.onnx") and kernel.provider == provider:
            start, end = kernel.version_range
            if start <= opset <= end:
                return True
    return False


def onnx_providers(device: Union[str, torch.device]) -> List[str]:
    """onnxruntime providers for a resolved torch device: the CPU provider, or CUDA first (then CPU for the
    operators it lacks) when the installed onnxruntime has it."""
    ort = require_module("onnxruntime", "running an ONNX model")
    device = torch.device(device)
    if device.type == "cpu":
        return [CPU_PROVIDER]
    if device.type == "cuda":
        if CUDA_PROVIDER not in ort.get_available_providers():
            raise UserError(f"onnxruntime {ort.__version__} here has no CUDA provider (it has "
                            f"{', '.join(ort.get_available_providers())}): install onnxruntime-gpu, or run with "
                            "--device cpu")
        return [CUDA_PROVIDER, CPU_PROVIDER]
    raise UserError(f"ONNX Runtime runs on cpu or cuda, not {device}")


def onnx_device(requested: str) -> torch.device:
    """The device an ONNX model runs on for --device: 'auto' is CUDA only where both torch and the installed
    onnxruntime have it, else the CPU; an explicit device is taken as asked (onnx_providers checks it)."""
    from yolc_kd.runtime import resolve_device

    ort = require_module("onnxruntime", "running an ONNX model")
    if str(requested) != "auto":
        return resolve_device(requested)
    device = resolve_device("auto")
    if device.type == "cuda" and CUDA_PROVIDER not in ort.get_available_providers():
        return torch.device("cpu")
    return device


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class OnnxNetwork:
    """An exported YOLC network (`yolc-kd export`) in an onnxruntime session, called like the PyTorch network:
    `net(img)` with a (B, 3, H, W) float batch returns ([heatmap], [coarse], [refine]) on img's device.

    Args:
        path: the .onnx file.
        threads: onnxruntime's intra-op threads (default: torch's current count, so both runtimes compare at the
            same count).
        device: 'cpu' or a CUDA device (CUDAExecutionProvider, which needs onnxruntime-gpu).
        num_classes: when given, a graph whose heatmap has another class count is a UserError.
    """

    def __init__(self, path: PathLike, threads: Optional[int] = None, device: Union[str, torch.device] = "cpu",
                 num_classes: Optional[int] = None) -> None:
        ort = require_module("onnxruntime", "running an ONNX model")
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"ONNX model not found: {display_path(self.path)}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads if threads is not None else torch.get_num_threads())
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: shape-inference warnings of a dynamic graph are noise here
        # no busy-waiting between runs: the pipeline's own work (decoding, LSM, fusion) follows every run on the same
        # cores, and spinning workers slowed fused inference at 2 threads on a shared 2-core CPU (BENCHMARKS.md)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=options,
                                                providers=onnx_providers(device))
        except UserError:
            raise
        except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph / InvalidProtobuf types
            raise UserError(f"onnxruntime cannot load {display_path(self.path)}: {_first_line(exc)}") from None
        inputs = self.session.get_inputs()
        outputs = [o.name for o in self.session.get_outputs()]
        if len(inputs) != 1 or inputs[0].name != INPUT_NAME or outputs != list(OUTPUT_NAMES):
            raise UserError(f"{display_path(self.path)} is not a yolc-kd export: it takes "
                            f"{[i.name for i in inputs]} and returns {outputs} (expected ['{INPUT_NAME}'] -> "
                            f"{list(OUTPUT_NAMES)}; make it with yolc-kd export)")
        self.input_shape: Sequence[Any] = inputs[0].shape  # ints where fixed, names where dynamic
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        heat_classes = self.session.get_outputs()[0].shape[1]
        if num_classes is not None and isinstance(heat_classes, int) and heat_classes != num_classes:
            raise UserError(f"{display_path(self.path)} predicts {heat_classes} classes but the config's model has "
                            f"{num_classes}: export it from this config")

    @property
    def fixed_hw(self) -> Optional[Tuple[int, int]]:
        """(H, W) the graph was exported for, or None when its height and width are dynamic."""
        h, w = self.input_shape[2:4]
        return (h, w) if isinstance(h, int) and isinstance(w, int) else None

    def run(self, image: np.ndarray) -> List[np.ndarray]:
        """The three output maps (heatmap, coarse, refine) for a float32 (B, 3, H, W) array."""
        b, c, h, w = image.shape
        fixed_b, fixed_c = self.input_shape[:2]
        if isinstance(fixed_c, int) and c != fixed_c:
            raise UserError(f"{display_path(self.path)} takes {fixed_c}-channel images, got {c}")
        fixed = self.fixed_hw
        if fixed is not None and fixed != (h, w):
            raise UserError(f"{display_path(self.path)} was exported for {fixed[1]}x{fixed[0]} inputs only; this run "
                            f"feeds {w}x{h} (fused inference also feeds patch canvases of other sizes): export "
                            "it with --dynamic")
        if isinstance(fixed_b, int) and b != fixed_b:
            if fixed_b != 1:
                raise UserError(f"{display_path(self.path)} was exported for batches of {fixed_b}, got {b}")
            parts = [self.run(image[i:i + 1]) for i in range(b)]  # a batch-1 graph: one image at a time
            return [np.concatenate(maps) for maps in zip(*parts)]
        return self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(image, dtype=np.float32)})

    def __call__(self, img: torch.Tensor) -> NetworkOutputs:
        maps = self.run(img.detach().float().cpu().numpy())
        heat, coarse, refine = (torch.from_numpy(m).to(img.device) for m in maps)
        return [heat], [coarse], [refine]
