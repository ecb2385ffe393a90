"""Checkpoints in mmdet's layout ({'meta', 'state_dict', 'optimizer'}), loaded with weights_only."""
from __future__ import annotations

import os
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

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


def describe_mismatch(model: nn.Module, sd: Mapping[str, torch.Tensor], limit: int = 3) -> str:
    """Short summary of missing / unexpected / shape-mismatched keys ('' when they fit)."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    parts = []
    for name, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{len(items)} {name}: {', '.join(items[:limit])}{more}")
    cls_key = "bbox_head.local_head.6.weight"
    if cls_key in sd and cls_key in own and sd[cls_key].shape[0] != own[cls_key].shape[0]:
        parts.insert(0, f"checkpoint has {sd[cls_key].shape[0]} classes, the config {own[cls_key].shape[0]}")
    return "; ".join(parts)


def load_checkpoint(model: nn.Module, path: PathLike, strict: bool = True, trust: bool = False) -> Dict[str, Any]:
    """Load weights into model; on mismatch raise a UserError with a short summary. Returns the meta."""
    sd, meta, _ = read_checkpoint(path, trust)
    problem = describe_mismatch(model, sd)
    if problem and (strict or "shape mismatch" in problem or "classes" in problem):
        raise UserError(f"checkpoint {path} does not fit the model: {problem}")
    model.load_state_dict(sd, strict=strict)
    return meta


def save_checkpoint(path: PathLike, model: nn.Module, meta: Optional[Mapping] = None,
                    optimizer: Optional[torch.optim.Optimizer] = None, extra: Optional[Mapping] = None) -> Path:
    """Atomically write an mmdet-layout checkpoint (weights on CPU, JSON-able meta)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = model.module if hasattr(model, "module") else model
    obj: Dict[str, Any] = {
        "meta": dict(meta or {}),
        "state_dict": OrderedDict((k, v.detach().cpu()) for k, v in module.state_dict().items()),
    }
    if optimizer is not None:
        obj["optimizer"] = optimizer.state_dict()
    if extra:
        obj.update(extra)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path
