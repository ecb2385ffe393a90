"""Where and how the work runs: the device (one resolver for every command), CPU thread pinning and the
torch.distributed process group under torchrun."""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Optional, Union

import torch
import torch.distributed as dist

from yolc_kd.errors import UserError

DEVICE_HELP = "auto (CUDA when available, else CPU), cpu, cuda or cuda:N; under torchrun cuda is cuda:LOCAL_RANK"


def resolve_device(name: Union[str, torch.device] = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' under torchrun -> cuda:LOCAL_RANK (made current).
    A device that cannot be used is one UserError."""
    if isinstance(name, torch.device):
        name = str(name)
    name = str(name).strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available here (use --device cpu or auto)")
        if dev.index is None and "LOCAL_RANK" in os.environ:
            dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        if dev.index is not None:
            if dev.index >= torch.cuda.device_count():
                raise UserError(f"--device {dev}: only {torch.cuda.device_count()} CUDA device(s) visible")
            torch.cuda.set_device(dev)
    return dev


AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}  # --amp-dtype's choices


def mixed_precision(device: Union[str, torch.device], amp: bool,
                    dtype: Union[str, torch.dtype, None] = None) -> contextlib.AbstractContextManager:
    """--amp: autocast to `dtype` on the device's type (the student's step, precompute's, the online teacher's
    and inference's forwards); without --amp full precision. dtype None -> float16 on CUDA, bfloat16 on CPU; else
    'float16' / 'bfloat16' or the torch dtype. A dtype torch cannot autocast to on that device is one UserError."""
    if not amp:
        return contextlib.nullcontext()
    kind = torch.device(device).type
    if dtype is None:
        dtype = torch.float16 if kind == "cuda" else torch.bfloat16
    name = str(dtype).lower().removeprefix("torch.")
    if name not in AMP_DTYPES:
        raise UserError(f"--amp-dtype must be one of {', '.join(AMP_DTYPES)}, got {dtype!r}")
    if not torch.amp.is_autocast_available(kind):
        raise UserError(f"--amp on {device}: torch has no autocast for {kind} devices")
    # torch refuses an unsupported combination with a RuntimeError, or with a warning and autocast turned off
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ctx = torch.autocast(kind, dtype=AMP_DTYPES[name])
    except RuntimeError as exc:
        refused = [str(exc)]
    else:
        refused = [str(w.message) for w in caught if "autocast" in str(w.message).lower()]
    if refused:
        why = refused[0].strip().splitlines()[0]
        raise UserError(f"--amp with {name} on {device}: torch cannot autocast to it there ({why})")
    return ctx


def amp_dtype(device: Union[str, torch.device], amp: bool,
              dtype: Union[str, torch.dtype, None] = None) -> Optional[torch.dtype]:
    """The dtype mixed_precision(device, amp, dtype) computes in (None: full precision)."""
    ctx = mixed_precision(device, amp, dtype)
    return ctx.fast_dtype if isinstance(ctx, torch.autocast) else None


@contextlib.contextmanager
def deterministic_numerics(device: Union[str, torch.device], threads: int) -> Iterator[None]:
    """Same inputs -> same bits: a fixed CPU thread count (float results depend on it, so a resumed, single or
    torchrun run agree), no cuDNN autotuning. The previous settings come back afterwards."""
    prev = (torch.get_num_threads(), torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    if not str(device).startswith("cuda"):
        torch.set_num_threads(max(1, int(threads)))
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.set_num_threads(prev[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = prev[1], prev[2]


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    initialised_here: bool = False

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        """Destroy the process group if this DistEnv created it."""
        if self.initialised_here and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(backend: Optional[str] = None, timeout: Optional[timedelta] = None) -> DistEnv:
    """Rank and world size from torchrun's environment; initialises the process group when world > 1.
    backend: None -> nccl on CUDA, gloo on CPU. Precompute asks for gloo with a long timeout (barriers only,
    ranks may finish far apart); training uses the default (gradients all-reduce on the device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        kwargs = {"timeout": timeout} if timeout is not None else {}
        dist.init_process_group(backend, **kwargs)
        return DistEnv(rank, world, True)
    return DistEnv(rank, world, False)
