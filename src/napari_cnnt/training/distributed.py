"""Data-parallel training under ``torchrun``: process group, ranks, reductions.

``torchrun --nproc_per_node N`` starts N copies of the same command with
``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` set. Every process trains the
same model on its share of each batch; DistributedDataParallel averages the
gradients. NCCL connects GPUs, gloo connects CPU processes. Only rank 0
writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in the group (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str | None) -> tuple[Ranks, str | None]:
    """Join the process group ``torchrun`` prepared; returns the ranks and this process's device.

    Without ``torchrun`` (or with one process) nothing happens. With CUDA
    each process takes the GPU of its local rank.
    """
    if not launched_by_torchrun():
        return current(), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith(("cuda", "auto")))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    elif device in (None, "auto"):
        device = "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return current(), device


def current() -> Ranks:
    """The ranks of an initialised process group, or a single process."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return Ranks()


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, ranks: Ranks, device: torch.device) -> nn.Module:
    """``model`` inside DistributedDataParallel when distributed, else unchanged."""
    if not ranks.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else ranks.local_rank] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def sum_across(values: list[float], ranks: Ranks, device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over all processes."""
    if not ranks.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def any_across(flag: bool, ranks: Ranks, device: torch.device) -> bool:
    """True on every process if ``flag`` is true on any of them."""
    return sum_across([float(flag)], ranks, device)[0] > 0


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier()
