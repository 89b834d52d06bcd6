"""Process-group set-up for ``torchrun`` (DDP) and the few collectives the engine needs.

Launched by ``torchrun --nproc_per_node N -m dmmi.cli train ...``, each process reads RANK,
WORLD_SIZE and LOCAL_RANK from the environment and joins a process group (NCCL on CUDA,
gloo on CPU). Without those variables the run is a single process and every helper here is
a no-op, so the engine calls them unconditionally.

Decisions the ranks must share (skip a batch, stop at a budget, the budget schedule's clock)
are taken on host numbers through :func:`agree_max` and :func:`gather_objects`. They travel on
a gloo group beside NCCL's, so agreeing never waits for the GPU (an NCCL all-reduce of a host
flag would need a device round trip and a host sync every step).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dmmi.errors import DmmiError


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``device`` is the one it must use."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, *, option: str = "train.device", fix: str = "--set train.device=cpu") -> torch.device:
    """'auto' -> cuda if available else cpu; 'cpu'; 'cuda' / 'cuda:N' (checked to exist).

    ``option`` names the setting in error messages and ``fix`` is the hint to run on CPU
    (``dmmi predict`` / ``serve``: ``option="--device", fix="--device cpu"``).
    """
    name = str(name).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DmmiError(f"{option}: unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise DmmiError(f"{option}: unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise DmmiError(f"CUDA was requested ({option}={name}) but no CUDA device is available; use {fix}")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise DmmiError(f"{option}={name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def _env_int(key: str, default: int) -> int:
    value = os.environ.get(key)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise DmmiError(f"environment variable {key}={value!r} is not an integer (set by torchrun)") from None


def init_distributed(device: str = "auto", *, option: str = "train.device", fix: str = "--set train.device=cpu"
                     ) -> DistInfo:
    """Join the torchrun process group if the environment describes one.

    ``device`` is ``train.device``. Under torchrun with CUDA, each process takes
    ``cuda:LOCAL_RANK`` (an explicit index in ``device`` is then ignored). Calling it again
    when the group already exists returns the same information.
    """
    dev = resolve_device(device, option=option, fix=fix)  # option / fix: how the caller's user names it
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size <= 1 and not dist.is_initialized():
        return DistInfo(rank=0, world_size=1, local_rank=0, device=dev, is_main=True)
    if not 0 <= rank < world_size:
        raise DmmiError(f"environment: RANK={rank} is outside WORLD_SIZE={world_size}")
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise DmmiError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) are visible; "
                f"start at most that many processes per node"
            )
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise DmmiError(f"environment: WORLD_SIZE={world_size} but {key} is not set; launch with torchrun")
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
    global _HOST_GROUP
    if dist.get_backend() != "gloo" and _HOST_GROUP is None:
        _HOST_GROUP = dist.new_group(backend="gloo")  # collective: every rank creates it here
    rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, is_main=rank == 0)


_HOST_GROUP = None  # gloo group for host-side agreement when the default group is NCCL (None: the default)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if _active() else 0


def get_world_size() -> int:
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    """True on rank 0, and in a single-process run."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if not _active():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks, in place, and return it (unchanged without a group).

    Under NCCL a CPU tensor is moved to the current CUDA device for the reduction and the
    result copied back.
    """
    if not _active() or dist.get_world_size() == 1:
        return tensor
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        work = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        tensor.copy_(work)
    else:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def agree_max(values: list[float]) -> list[float]:
    """Element-wise maximum over ranks of a few host numbers (float64), on the host group: no
    device sync. Every rank must call it at the same point. Unchanged without a group."""
    if not _active() or dist.get_world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_HOST_GROUP)
    return t.tolist()


def gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (picklable host objects, host group);
    ``[obj]`` without a group."""
    if not _active() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=_HOST_GROUP)
    return out


def cleanup() -> None:
    """Leave the process group (no-op without one)."""
    global _HOST_GROUP
    if _active():
        dist.destroy_process_group()
    _HOST_GROUP = None
