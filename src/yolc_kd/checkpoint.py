"""Checkpoints in mmdet's layout ({'meta', 'state_dict', 'optimizer'}), loaded with weights_only."""
from __future__ import annotations

import pickle
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from yolc_kd.diskio import atomic_write
from yolc_kd.errors import UserError

PathLike = Union[str, Path]


def read_checkpoint(path: PathLike, trust: bool = False) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any], Dict[str, Any]]:
    """-> (state_dict, meta, whole object). Accepts mmdet checkpoints and plain state dicts."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as exc:
        if not trust and ("global" in str(exc).lower() or "GLOBAL" in str(exc)):
            raise UserError(f"checkpoint {path} needs arbitrary pickle code to load; if you trust its source, "
                            f"pass --trust-checkpoint") from None
        raise UserError(f"checkpoint {path} is not a readable torch checkpoint (corrupt or another format)") from None
    except Exception as exc:  # torch raises many types on garbage input (IndexError, RuntimeError, EOFError...)
        raise UserError(f"checkpoint {path} is not a readable torch checkpoint ({type(exc).__name__})") from None
    if not isinstance(obj, Mapping):
        raise UserError(f"checkpoint {path}: expected a dict, got {type(obj).__name__}")
    inner = obj.get("state_dict")
    sd = inner if isinstance(inner, Mapping) else obj
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"checkpoint {path}: no state_dict of tensors found")
    sd = OrderedDict((k[7:] if k.startswith("module.") else k, v) for k, v in sd.items())
    meta = obj.get("meta") if isinstance(obj.get("meta"), Mapping) else {}
    return sd, dict(meta), dict(obj)


@dataclass
class Mismatch:
    """How a state dict fails to fit a model.

    Args:
        missing: the model's keys the state dict lacks.
        unexpected: the state dict's keys the model lacks.
        shapes: "key (ckpt shape) vs (model shape)" per key whose shapes differ.
        classes: (checkpoint's, model's) class count when they differ, else None.
    """
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    shapes: List[str] = field(default_factory=list)
    classes: Optional[Tuple[int, int]] = None

    @property
    def blocks_loading(self) -> bool:
        """Shapes that differ block even a non-strict load (missing / unexpected keys block a strict one)."""
        return bool(self.shapes or self.classes)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.shapes or self.classes)

    def describe(self, limit: int = 3) -> str:
        parts = [f"checkpoint has {self.classes[0]} classes, the config {self.classes[1]}"] if self.classes else []
        for name, items in (("missing", self.missing), ("unexpected", self.unexpected), ("shape mismatch", self.shapes)):
            if items:
                more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
                parts.append(f"{len(items)} {name}: {', '.join(items[:limit])}{more}")
        return "; ".join(parts)


def _class_layer_key(model: nn.Module) -> Optional[str]:
    """State-dict key of the heatmap's per-class output weight (a YOLC head's last local_head layer)."""
    head = getattr(getattr(model, "bbox_head", None), "local_head", None)
    if head is None:
        return None
    last = head[-1]
    return next((f"{name}.weight" for name, m in model.named_modules() if m is last), None)


def find_mismatch(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> Mismatch:
    """Missing / unexpected / shape-mismatched keys of sd against the model, and a class-count difference."""
    own = model.state_dict()
    out = Mismatch(missing=[k for k in own if k not in sd], unexpected=[k for k in sd if k not in own],
                   shapes=[f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
                           if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)])
    cls_key = _class_layer_key(model)
    if cls_key and cls_key in sd and cls_key in own and sd[cls_key].shape[0] != own[cls_key].shape[0]:
        out.classes = (int(sd[cls_key].shape[0]), int(own[cls_key].shape[0]))
    return out


def load_checkpoint(model: nn.Module, path: PathLike, strict: bool = True, trust: bool = False) -> Dict[str, Any]:
    """Load weights into model; on mismatch raise a UserError with a short summary. Returns the meta."""
    sd, meta, _ = read_checkpoint(path, trust)
    load_weights(model, sd, path, strict)
    return meta


def load_weights(model: nn.Module, sd: Mapping[str, torch.Tensor], path: PathLike, strict: bool = True) -> None:
    """Load a state dict read from checkpoint `path` into model; on mismatch a UserError with a short summary."""
    problem = find_mismatch(model, sd)
    if problem and (strict or problem.blocks_loading):
        raise UserError(f"checkpoint {path} does not fit the model: {problem.describe()}")
    model.load_state_dict(sd, strict=strict)


def save_checkpoint(path: PathLike, model: nn.Module, meta: Optional[Mapping] = None,
                    optimizer: Optional[torch.optim.Optimizer] = None, extra: Optional[Mapping] = None) -> Path:
    """Atomically write an mmdet-layout checkpoint (weights on CPU, JSON-able meta); a failed write (a full
    disk) is one UserError and leaves no file."""
    path = Path(path)
    module = model.module if hasattr(model, "module") else model
    obj: Dict[str, Any] = {
        "meta": dict(meta or {}),
        "state_dict": OrderedDict((k, v.detach().cpu()) for k, v in module.state_dict().items()),
    }
    if optimizer is not None:
        obj["optimizer"] = optimizer.state_dict()
    if extra:
        obj.update(extra)
    # through a Python file: a failed write then carries its OSError (errno) inside torch's RuntimeError
    with atomic_write(path) as fh:
        torch.save(obj, fh)
    return path
