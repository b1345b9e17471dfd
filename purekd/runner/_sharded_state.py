"""The full training state of an FSDP run, saved and loaded with ``torch.distributed.checkpoint``.

A state is a directory ``output_dir/gs{N}.state/``: each rank writes its own shards of the
step's parameters (student and projections) and of the optimizer state, its own random number
generators, and rank 0 the state every rank shares (LR scheduler, counters, data passes, early
stopping). Saving is atomic: everything goes to a temporary directory that rank 0 renames into
place once every rank has written and ``purekd.json`` (format, world size, step) is on disk —
a crash leaves either the previous states or the new one, never half of one.

Resuming restores every shard where it was, so it continues bit for bit, but only at the world
size the state was saved with: the data each rank draws and its generators belong to that
layout. Another size raises a ``ValueError`` naming both before anything is loaded.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

SHARDED_SUFFIX = ".state"
MARKER = "purekd.json"
FORMAT = "purekd-fsdp-state"
VERSION = 1


def sharded_state_path(output_dir: str | os.PathLike[str], global_step: int) -> Path:
    """``output_dir/gs{global_step}.state`` — a directory, one per checkpoint."""
    return Path(output_dir) / f"gs{global_step}{SHARDED_SUFFIX}"


def latest_sharded_state(path: str | os.PathLike[str]) -> Path:
    """``path`` itself if it is a sharded state, else the one with the highest step in it."""
    candidate = Path(path)
    if (candidate / MARKER).is_file():
        return candidate
    if not candidate.is_dir():
        raise FileNotFoundError(f"resume_from={str(path)!r}: no such directory")
    pattern = re.compile(r"gs(\d+)" + re.escape(SHARDED_SUFFIX) + "$")
    found = [(int(m.group(1)), p) for p in candidate.iterdir()
             if (m := pattern.match(p.name)) and (p / MARKER).is_file()]
    if not found:
        single = " (it holds single-process gs<step>.state.pt files: resume those without fsdp)"
        raise FileNotFoundError(
            f"resume_from={str(path)!r}: no gs<step>{SHARDED_SUFFIX}/ directory with a {MARKER} "
            "in it; sharded states are written when training with fsdp and save_state=True"
            + (single if any(candidate.glob("gs*.state.pt")) else ""))
    return max(found)[1]


def _to_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _from_bytes(blob: bytes) -> Any:
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


class _WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, unpickling the non-tensor entries with ``weights_only=True``
    (the default planner unpickles anything a checkpoint holds)."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def _barrier() -> None:
    dist.barrier()


def save_sharded_state(path: Path, module: nn.Module, optimizer: torch.optim.Optimizer,
                       shared: dict[str, Any], own: dict[str, Any]) -> Path:
    """Write the state of ``module`` (the sharded step) and ``optimizer``, ``shared`` (rank
    0's copy is kept) and ``own`` (each rank's) to ``path``. Every rank must call it."""
    rank, world = dist.get_rank(), dist.get_world_size()
    tmp = path.with_name(f".{path.name}.tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_state, optimizer_state = get_state_dict(module, optimizer)
    state: dict[str, Any] = {"model": model_state, "optimizer": optimizer_state,
                             f"rank{rank}": _to_bytes(own)}
    if rank == 0:  # given by one rank only: DCP would keep the copy of whichever rank it chose
        state["shared"] = _to_bytes(shared)
    dcp.save(state, checkpoint_id=tmp)
    _barrier()
    if rank == 0:
        marker = tmp / MARKER
        with open(marker, "w", encoding="utf-8") as file:
            json.dump({"format": FORMAT, "version": VERSION, "world_size": world,
                       "global_step": shared.get("counters", {}).get("global_step")}, file)
            file.flush()
            os.fsync(file.fileno())
        old = path.with_name(f".{path.name}.old")
        if path.exists():  # a state of this step from a run that was resumed before it
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return path


def read_marker(path: Path) -> dict[str, Any]:
    """The ``purekd.json`` of a sharded state, checked."""
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"resume_from={str(path)!r}: not a purekd sharded state ({error})") from None
    if marker.get("format") != FORMAT or marker.get("version") != VERSION:
        raise ValueError(f"resume_from={str(path)!r}: not a purekd sharded state of version "
                         f"{VERSION} ({MARKER} says {marker})")
    return dict(marker)


def check_world_size(path: Path, saved: int, current: int) -> None:
    """Raise unless the state at ``path`` was saved by as many processes as run now."""
    if saved != current:
        raise ValueError(
            f"resume_from={str(path)!r}: this sharded state was saved by {saved} processes and "
            f"this run has {current}; exact resume needs the same world size (each rank's data "
            f"position and random generators belong to it). Relaunch with torchrun "
            f"--nproc-per-node {saved} (over all nodes: {saved} processes), or start a new run "
            "from the gathered weights gs<step>.pkl")


def load_sharded_state(path: Path, module: nn.Module,
                       optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load what :func:`save_sharded_state` wrote into ``module`` and ``optimizer``; returns
    ``(shared, own)``. The world size is checked before anything is read."""
    marker = read_marker(path)
    rank = dist.get_rank()
    check_world_size(path, int(marker["world_size"]), dist.get_world_size())
    model_state, optimizer_state = get_state_dict(module, optimizer)
    state: dict[str, Any] = {"model": model_state, "optimizer": optimizer_state,
                             "shared": b"", f"rank{rank}": b""}
    dcp.load(state, checkpoint_id=path, planner=_WeightsOnlyLoadPlanner())
    set_state_dict(module, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])
    return _from_bytes(state["shared"]), _from_bytes(state[f"rank{rank}"])


__all__ = ["MARKER", "SHARDED_SUFFIX", "check_world_size", "latest_sharded_state",
           "load_sharded_state", "read_marker", "save_sharded_state", "sharded_state_path"]
