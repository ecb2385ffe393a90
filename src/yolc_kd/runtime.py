"""Where and how the work runs: the device (one resolver for every command), the numerics settings (CPU thread
pinning, cuDNN autotuning or --deterministic) and the torch.distributed process group under torchrun."""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Iterator, Optional, Union

import torch
import torch.distributed as dist

from yolc_kd.errors import UserError

DEVICE_ENV = "YOLC_KD_DEVICE"  # what --device auto means when set (the test suite pins it to cpu)
DEVICE_HELP = (f"auto (${DEVICE_ENV} when set, else CUDA when available, else CPU), cpu, cuda or cuda:N; under "
               f"torchrun cuda is cuda:LOCAL_RANK")
# how long the other ranks wait while rank 0 evaluates or recomputes BN statistics (a gloo barrier of its own;
# the training process group keeps its default timeout, so a hung collective in a step still fails in minutes)
RANK0_WAIT = timedelta(hours=24)
CUBLAS_WORKSPACE = ":4096:8"  # what CUDA's docs ask for deterministic cuBLAS
DETERMINISTIC_HELP = ("repeatable numerics on CUDA: deterministic algorithms where PyTorch has them, cuDNN without "
                      "autotuning, no TF32 (slower); the default lets cuDNN pick the fastest algorithms. Even so, "
                      "training backward is not bit-repeatable on CUDA (atomic adds in upsample and deformable "
                      "convolution backward), nor are results across GPU models")


def _torchrun_local_rank() -> Optional[int]:
    """LOCAL_RANK when torchrun started several processes (WORLD_SIZE > 1), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    return None


def resolve_device(name: Union[str, torch.device] = "auto") -> torch.device:
    """'auto' -> $YOLC_KD_DEVICE when set, else cuda when available, else cpu. Under torchrun with several
    processes, 'cuda' is cuda:LOCAL_RANK and an explicit cuda:N must be it. A CUDA device is made current.
    A device that cannot be used is one UserError."""
    if isinstance(name, torch.device):
        name = str(name)
    name = str(name).strip().lower()
    given = name
    if name == "auto":
        name = os.environ.get(DEVICE_ENV, "").strip().lower() or ("cuda" if torch.cuda.is_available() else "cpu")
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        given = name if name == given else f"auto (${DEVICE_ENV}={name})"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {given!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {given!r}")
    if dev.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"--device {given}: CUDA is not available here (use --device cpu or auto)")
    count = torch.cuda.device_count()
    local = _torchrun_local_rank()
    if local is None and dev.index is None and "LOCAL_RANK" in os.environ:  # torchrun with one process
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if local is not None:
        if dev.index is None:
            if local >= count:
                raise UserError(f"torchrun process with LOCAL_RANK {local} needs cuda:{local}, but {count} CUDA "
                                f"device(s) are visible: start at most {count} process(es) per node "
                                f"(--nproc_per_node) or use --device cpu")
            dev = torch.device("cuda", local)
        elif dev.index != local:
            raise UserError(f"--device {dev} contradicts torchrun's LOCAL_RANK {local}: every process trains on "
                            f"cuda:LOCAL_RANK, so pass --device cuda (or auto)")
    if dev.index is not None:
        if dev.index >= count:
            raise UserError(f"--device {dev}: only {count} CUDA device(s) visible")
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
def numerics(device: Union[str, torch.device], threads: Optional[int] = None,
             deterministic: bool = False) -> Iterator[None]:
    """The numerics of a run, restored afterwards.

    threads: on the CPU, the intra-op thread count is pinned to it (float results depend on it, so a resumed,
        single or torchrun run agree); None leaves it as it is.
    deterministic: what PyTorch offers for repeatable results: torch.use_deterministic_algorithms (warn_only:
        ops without a deterministic CUDA kernel, e.g. the bilinear upsample backward, warn and still run), cuDNN
        deterministic without autotuning, TF32 off, CUBLAS_WORKSPACE_CONFIG set. Without it, cuDNN picks the
        fastest algorithms (cudnn.benchmark) on CUDA; on the CPU results are repeatable either way."""
    on_cuda = torch.device(device).type == "cuda"
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    prev = (torch.get_num_threads(), cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32,
            torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    if threads is not None and not on_cuda:
        torch.set_num_threads(max(1, int(threads)))
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)  # read when cuBLAS allocates
        torch.use_deterministic_algorithms(True, warn_only=True)
        cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32 = False, True, False, False
    else:
        cudnn.benchmark = on_cuda
    try:
        yield
    finally:
        torch.set_num_threads(prev[0])
        cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32 = prev[1:5]
        torch.use_deterministic_algorithms(prev[5], warn_only=prev[6])
        if prev[7] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def device_name(device: Union[str, torch.device]) -> str:
    """What a result depends on beyond the device type: the GPU model on CUDA, 'cpu' on the CPU."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return "cpu"
    return torch.cuda.get_device_name(dev.index if dev.index is not None else torch.cuda.current_device())


def backend_for(device: Union[str, torch.device, None]) -> str:
    """The process group backend of a device: nccl for CUDA, gloo for the CPU."""
    return "nccl" if device is not None and torch.device(device).type == "cuda" else "gloo"


@dataclass
class DistEnv:
    """This process's place under torchrun.

    Args:
        rank, world: the process and the process count (1: no process group).
        initialised_here: this DistEnv created the default process group (close() destroys it).
        device: where the default group's collectives run (the CUDA device for nccl, the CPU for gloo).
        slow_group: a gloo group with the RANK0_WAIT timeout, for waiting on rank-0-only work.
    """
    rank: int = 0
    world: int = 1
    initialised_here: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    slow_group: Any = None

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def wait_for_rank0(self) -> None:
        """Every rank waits here while rank 0 does work of its own (evaluation, BN statistics, checkpoint):
        a gloo barrier with the RANK0_WAIT timeout, so a long evaluation cannot time the job out."""
        if self.world > 1:
            dist.barrier(group=self.slow_group)

    def all_true(self, flag: Union[bool, torch.Tensor]) -> bool:
        """Whether the flag holds on every rank (one all_reduce; each rank gets the same answer). A tensor flag
        stays on its device until the all_reduce (one host sync)."""
        if self.world == 1:
            return bool(flag)
        t = torch.as_tensor(flag).reshape(()).to(device=self.device, dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def close(self) -> None:
        """Destroy the process group if this DistEnv created it."""
        if self.initialised_here and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device: Union[str, torch.device, None] = None, *, backend: Optional[str] = None,
                     timeout: Optional[timedelta] = None) -> DistEnv:
    """Rank and world size from torchrun's environment; initialises the process group when world > 1.
    backend: None -> the device's (nccl on CUDA, gloo on the CPU). Precompute asks for gloo with a long timeout
    (barriers only, ranks may finish far apart); training uses the device's backend and its default timeout
    (gradients all-reduce on the device) and waits for rank-0 work on the slow gloo group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world <= 1:
        return DistEnv(rank, world, False)
    backend = backend or backend_for(device)
    here = not dist.is_initialized()
    if here:
        kwargs = {"timeout": timeout} if timeout is not None else {}
        dist.init_process_group(backend, **kwargs)
    comm = torch.device(device) if dist.get_backend() == "nccl" else torch.device("cpu")
    slow = dist.new_group(backend="gloo", timeout=RANK0_WAIT)
    return DistEnv(rank, world, here, comm, slow)
