"""Data parallelism through torch.distributed (launch with `torchrun`).

Under `torchrun --nproc-per-node N`, every process loads the model, takes a
disjoint shard of the data and adds its sufficient statistics (exact sums and
counts, see record.py) into everyone's with `all_reduce`; rank 0 writes the
files. Recording and evaluation shard *whole batches* (batch b goes to rank
b mod N), so every batch is the one a single process would see and the results
are bit-identical to one process whatever N. Prompt tuning splits each global
batch over the ranks and averages the prompt's gradient with
DistributedDataParallel: the same global batch as one process, equal up to
float reduction order.

Backends: gloo on CPU, nccl on CUDA (each process on `cuda:LOCAL_RANK`).
Without torchrun (WORLD_SIZE unset or 1) every helper here is a no-op, and
the library behaves exactly as in a single process. Inside a process group,
`evaluate`, `record_run`/`find_skill_neurons` and `tune` shard by themselves
and join collectives: call them on every rank, never on rank 0 alone.
"""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from tl_skill.errors import DistributedError

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    """Where this process stands in the process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: str | None = None  # the device this process must use; None: the caller's choice
    created: bool = False  # this call created the process group

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def current() -> Dist:
    """The `Dist` of the process group already initialised (a single process if none)."""
    if not is_distributed():
        return Dist()
    backend = dist.get_backend()
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    device = f"cuda:{torch.cuda.current_device()}" if backend == "nccl" else "cpu"
    return Dist(dist.get_rank(), dist.get_world_size(), local, backend, device)


def _device_type(device) -> str:
    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def init_distributed(device: str | torch.device | None = None, timeout_s: float | None = None) -> Dist:
    """Join the process group that `torchrun` set up (a no-op without torchrun).

    Reads RANK, WORLD_SIZE and LOCAL_RANK. With WORLD_SIZE unset or 1 nothing
    happens and `Dist().enabled` is False. Otherwise the backend is gloo for
    `device="cpu"` and nccl for CUDA, where each process takes
    `cuda:LOCAL_RANK` (a `cuda:N` given here is overridden). Calling it again
    returns the group already there.

    Args:
        device: cpu, cuda, cuda:N; None picks CUDA when available. mps has no
            torch.distributed backend and is refused.
        timeout_s: collective timeout (torch's default when None).

    Returns:
        The `Dist` of this process; `Dist.device` is the device it must load the model on.
    """
    if dist.is_available() and dist.is_initialized():
        return current()
    world = int(os.environ.get("WORLD_SIZE") or 1)
    if world <= 1:
        return Dist(device=None if device is None else str(device))
    if not dist.is_available():
        raise DistributedError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise DistributedError(f"WORLD_SIZE={world} but {', '.join(missing)} unset: launch with torchrun")
    rank_ = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank_))
    kind = _device_type(device)
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DistributedError(f"device {device!r} asked for, but torch sees no CUDA device")
        n_gpus = torch.cuda.device_count()
        if local >= n_gpus:
            raise DistributedError(
                f"LOCAL_RANK={local} but only {n_gpus} CUDA device(s) are visible; "
                "use --nproc-per-node <= the number of GPUs"
            )
        if device is not None and torch.device(device).index not in (None, local):
            log.warning("ignoring device %s: under torchrun each process uses cuda:LOCAL_RANK (cuda:%d)", device, local)
        torch.cuda.set_device(local)
        backend, dev = "nccl", f"cuda:{local}"
    elif kind == "cpu":
        if not dist.is_gloo_available():
            raise DistributedError("this torch build has no gloo backend for CPU processes")
        backend, dev = "gloo", "cpu"
    else:
        raise DistributedError(
            f"torch.distributed has no backend for device {device!r}; run one process, or use cpu or cuda"
        )
    if timeout_s is None:
        dist.init_process_group(backend=backend, rank=rank_, world_size=world)
    else:
        dist.init_process_group(backend=backend, rank=rank_, world_size=world, timeout=timedelta(seconds=timeout_s))
    atexit.register(shutdown)  # leave the group at exit, after whatever else ran in it
    log.info("process %d of %d (%s on %s)", rank_, world, backend, dev)
    return Dist(rank_, world, local, backend, dev, created=True)


def shutdown() -> None:
    """Leave the process group (a no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def shard(items: Sequence[T], rank_: int | None = None, world: int | None = None) -> Sequence[T]:
    """This process's share of `items`: every world-th item from position rank.

    Strided, so the shards are disjoint, cover `items` and differ in size by
    at most one; the whole of `items` in a single process.
    """
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    if not 0 <= r < w:
        raise DistributedError(f"rank {r} out of range for world size {w}")
    return items[r::w]


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(x: Any) -> Any:
    """Sum of `x` (a tensor or numpy array) over all processes; `x` itself in a single process.

    The input is left unchanged; the sum comes back with its type, dtype and device.
    """
    if not is_distributed():
        return x
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x)).to(_collective_device(), copy=True)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu().numpy().astype(x.dtype, copy=False)
    t = x.detach().to(_collective_device(), copy=True)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.to(x.device)


def reduce_stats(stats) -> None:
    """Combine a statistics object of record.py (`MomentStats`, `ThresholdStats`) over all processes."""
    if is_distributed():
        stats.all_reduce()
