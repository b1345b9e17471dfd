"""The full training state of an FSDP run, saved and loaded with ``torch.distributed.checkpoint``.

A state is a directory ``output_dir/gs{N}.state/``: each rank writes its own shards of the
step's parameters (student and projections) and of the optimizer state, its own random number
generators, and rank 0 the state every rank shares (LR scheduler, counters, data passes, early
stopping). Saving is atomic: everything goes to a temporary directory that rank 0 renames into
place once every rank has written and ``purekd.json`` (format, world size, step) is on disk —
a crash leaves either the previous states or the new one, never half of one.

Resuming reads the small parts first (the world size from ``purekd.json``, then what the ranks
share and each rank's own), so the runner can check the run's fingerprint before any weight is
loaded; then every shard goes back where it was, and the run continues bit for bit — but only at
the world size the state was saved with: the data each rank draws and its generators belong to
that layout. Another size raises a ``ValueError`` naming both before anything is loaded.
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


_PATTERN = re.compile(r"gs(\d+)" + re.escape(SHARDED_SUFFIX) + "$")
_TEMPORARY = re.compile(r"^\.gs\d+" + re.escape(SHARDED_SUFFIX) + r"\.(tmp|old)$")


def sharded_states(directory: str | os.PathLike[str],
                   run_id: str | None = None) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete sharded state in ``directory`` (of the run
    ``run_id`` when given), by step."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _PATTERN.match(path.name)
        if match is None or not (path / MARKER).is_file():
            continue
        if run_id is not None and _marker_or_none(path).get("run_id") != run_id:
            continue
        found.append((int(match.group(1)), path))
    return sorted(found)


def _marker_or_none(path: Path) -> dict[str, Any]:
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def remove_temporary_directories(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary state directories a save killed half-way left; returns them."""
    root = Path(directory)
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if _TEMPORARY.match(p.name) and p.is_dir()]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def prune_sharded(directory: Path, run_id: str, keep: int) -> list[Path]:
    """Delete this run's sharded states but the ``keep`` latest; returns what was deleted."""
    mine = sharded_states(directory, run_id)
    doomed = [path for _, path in mine[:-keep]] if len(mine) > keep else []
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def latest_sharded_state(path: str | os.PathLike[str], run_id: str | None = None) -> Path:
    """``path`` itself if it is a sharded state, else the latest complete one in it (of the
    run ``run_id`` when given)."""
    candidate = Path(path)
    if (candidate / MARKER).is_file():
        return candidate
    if not candidate.is_dir():
        raise FileNotFoundError(f"resume_from={str(path)!r}: no such directory")
    found = sharded_states(candidate, run_id)
    if not found and run_id is not None and sharded_states(candidate):
        raise FileNotFoundError(
            f"resume_from={str(path)!r}: its sharded states belong to another run than the one "
            f"in run.json (id {run_id}); name a gs<step>{SHARDED_SUFFIX} directory explicitly, "
            "or start afresh (resume_from=None)")
    if not found:
        single = " (it holds single-process gs<step>.state.pt files: resume those without fsdp)"
        raise FileNotFoundError(
            f"resume_from={str(path)!r}: no gs<step>{SHARDED_SUFFIX}/ directory with a {MARKER} "
            "in it; sharded states are written when training with fsdp and save_state=True"
            + (single if any(candidate.glob("gs*.state.pt")) else ""))
    return found[-1][1]


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
                       shared: dict[str, Any], own: dict[str, Any], run_id: str) -> Path:
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
                       "global_step": shared.get("counters", {}).get("global_step"),
                       "run_id": run_id}, file)
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


def load_sharded_extras(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(shared, own)`` of the sharded state at ``path``, for this rank; the world size is
    checked first. No weights are read."""
    marker = read_marker(path)
    rank = dist.get_rank()
    check_world_size(path, int(marker["world_size"]), dist.get_world_size())
    state: dict[str, Any] = {"shared": b"", f"rank{rank}": b""}
    dcp.load(state, checkpoint_id=path, planner=_WeightsOnlyLoadPlanner())
    return _from_bytes(state["shared"]), _from_bytes(state[f"rank{rank}"])


def load_sharded_weights(path: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load this rank's shards of ``module`` (the sharded step) and ``optimizer`` from
    ``path``, in place."""
    model_state, optimizer_state = get_state_dict(module, optimizer)
    state: dict[str, Any] = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=path, planner=_WeightsOnlyLoadPlanner())
    set_state_dict(module, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])


__all__ = ["MARKER", "SHARDED_SUFFIX", "check_world_size", "latest_sharded_state",
           "load_sharded_extras", "load_sharded_weights", "prune_sharded", "read_marker",
           "remove_temporary_directories", "save_sharded_state", "sharded_state_path",
           "sharded_states"]
