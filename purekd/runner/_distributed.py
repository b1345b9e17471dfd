"""Process-group helpers and DistributedDataParallel set-up for runs launched by torchrun."""

from __future__ import annotations

import atexit
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from purekd._collectives import all_reduce, broadcast, guard_exit


def local_rank_from(config_rank: int) -> int:
    """The local rank: the config's if set, else ``LOCAL_RANK`` from torchrun, else -1."""
    if config_rank != -1:
        return config_rank
    return int(os.environ.get("LOCAL_RANK", "-1"))


def ensure_process_group(device: str | torch.device) -> None:
    """Initialise the default process group from torchrun's environment if nobody has.

    A group opened here is also closed here, when the interpreter exits; a group the user
    opened stays the user's to close. Either way the exit waits for the backend's worker threads
    to let go of the last collective's tensors (:func:`purekd._collectives.guard_exit`): a
    worker thread still holding one when the interpreter finalises aborts the process ("terminate
    called without an active exception", exit code -6) after a run that succeeded."""
    if not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        atexit.register(_close_process_group)
    guard_exit()


def _close_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def wrap(module: nn.Module, device: str | torch.device, local_rank: int) -> Any:
    """``module`` in DistributedDataParallel (device ids only for CUDA)."""
    if torch.device(device).type == "cuda":
        return nn.parallel.DistributedDataParallel(module, device_ids=[local_rank],
                                                   output_device=local_rank,
                                                   find_unused_parameters=True)
    return nn.parallel.DistributedDataParallel(module, find_unused_parameters=True)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """``value`` summed over every process (itself when not distributed); a new tensor."""
    total = value.detach().clone()
    if world_size() > 1:
        all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def is_initialized() -> bool:
    """Whether this process is in a default process group."""
    return dist.is_available() and dist.is_initialized()


def broadcast_flag(flag: bool, device: str | torch.device) -> bool:
    """Rank 0's ``flag``, on every rank (a collective)."""
    value = torch.tensor([int(flag)], device=device)
    broadcast(value, src=0)
    return bool(value.item())


__all__ = ["all_reduce_sum", "barrier", "broadcast_flag", "ensure_process_group",
           "is_initialized", "local_rank_from", "rank", "world_size", "wrap"]
