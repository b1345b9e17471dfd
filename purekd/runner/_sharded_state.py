"""The full training state of an FSDP run, saved and loaded with ``torch.distributed.checkpoint``.

A state is a directory ``output_dir/gs{N}.state/``: each rank writes its own shards of the
step's parameters (student and projections) and of the optimizer state, its own random number
generators, and rank 0 the state every rank shares (LR scheduler, counters, data passes, early
stopping). Saving is atomic: everything goes to a temporary directory that rank 0 renames into
place once every rank has written and ``purekd.json`` (format, world size, step) is on disk —
a crash leaves either the previous states or the new one, never half of one.

``purekd.json`` also holds the size and SHA-256 of every file of the state (each rank hashes a
share of the files after they are written). Resuming verifies them first — every rank a share,
the findings gathered so that all ranks decide alike — and a state with a missing, truncated or
damaged file is a :class:`~purekd.runner.StateError` naming the file; resuming from a directory
falls back past such states to the latest good one, with a warning naming them, as for
one-process state files.

Resuming then reads the small parts (what the ranks share and each rank's own), so the runner
can check the run's fingerprint before any weight is loaded; then ``torch.distributed.checkpoint``
loads the shards of every parameter and optimizer tensor, *resharded* for the world size that
resumes: a state written by ``N`` processes resumes on ``M``. At the same world size the run
continues bit for bit. At another, it continues with the same global batches (the runner's
fingerprint holds the global batch size, per-process batch times processes, so a resume that
would change it is refused) and the weights, optimizer, scheduler, counters and data position
of the state; rank ``r`` takes the random generators of saved rank ``r mod N``, and sums over
the ranks run in another order (float rounding).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import warnings
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
VERSION = 2  # 2: the files' sizes and SHA-256 in purekd.json; 1: none (still read)


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


def _digest(path: Path) -> list[Any]:
    """``[size, sha256 hex]`` of the file at ``path``."""
    sha = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 22):
            sha.update(chunk)
    return [path.stat().st_size, sha.hexdigest()]


def _my_share(names: list[str]) -> list[str]:
    """The files this rank hashes: every ``world``-th of ``names`` (sorted), from its rank."""
    rank, world = dist.get_rank(), dist.get_world_size()
    return sorted(names)[rank::world]


def _gathered(mine: dict[str, Any]) -> dict[str, Any]:
    """Every rank's ``mine`` merged, on every rank (a collective)."""
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    return {key: value for part in parts for key, value in part.items()}


def checksums(path: Path) -> dict[str, list[Any]]:
    """``{file name: [size, sha256]}`` of every file in the state directory ``path`` (its
    marker aside), each rank hashing a share; every rank gets all of them (a collective)."""
    names = sorted(p.name for p in path.iterdir() if p.is_file() and p.name != MARKER)
    return _gathered({name: _digest(path / name) for name in _my_share(names)})


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
    files = checksums(tmp)
    if rank == 0:
        marker = tmp / MARKER
        with open(marker, "w", encoding="utf-8") as file:
            json.dump({"format": FORMAT, "version": VERSION, "world_size": world,
                       "global_step": shared.get("counters", {}).get("global_step"),
                       "run_id": run_id, "files": files}, file)
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
    from ._state import StateError

    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise StateError(f"{path / MARKER}: not a purekd sharded state marker ({error})") from None
    if not isinstance(marker, dict) or marker.get("format") != FORMAT or marker.get(
            "version") not in (1, VERSION) or not isinstance(marker.get("world_size"), int):
        raise StateError(f"{path / MARKER}: not the marker of a purekd sharded state of version "
                         f"{VERSION} (it says {marker})")
    if marker["version"] >= 2 and not isinstance(marker.get("files"), dict):
        raise StateError(f"{path / MARKER}: the file list ('files') is missing or garbled")
    return dict(marker)


def verify(path: Path) -> dict[str, Any]:
    """Check every file of the sharded state at ``path`` against the sizes and SHA-256 in its
    ``purekd.json`` (each rank a share of the files; the findings are gathered, so every rank
    decides alike — a collective). Returns the marker; raises
    :class:`~purekd.runner.StateError` naming the first missing, truncated or damaged file."""
    from ._state import StateError

    marker = read_marker(path)
    if marker["version"] < 2:
        warnings.warn(f"{path}: a sharded state without checksums (written by an older purekd); "
                      "its files cannot be verified", RuntimeWarning, stacklevel=4)
        return marker
    expected: dict[str, Any] = marker["files"]
    problems: dict[str, str] = {}
    for name in _my_share(list(expected)):
        file = path / name
        if Path(name).name != name or not file.is_file():
            problems[name] = "is missing"
            continue
        size, digest = _digest(file)
        if size != expected[name][0]:
            problems[name] = f"has {size} bytes, {expected[name][0]} were written"
        elif digest != expected[name][1]:
            problems[name] = "is damaged (its SHA-256 does not match the one written with it)"
    found = _gathered(problems)
    if found:
        name = sorted(found)[0]
        more = f" (and {len(found) - 1} more file(s))" if len(found) > 1 else ""
        raise StateError(f"{path / name}: this file of the sharded state {found[name]}{more}")
    return marker


def choose_state(root: Path, run_id: str | None) -> tuple[Path, dict[str, Any]]:
    """The sharded state to resume from and its marker, verified: ``root`` itself when it is a
    state (a damaged one raises), else the latest of the run ``run_id`` in ``root`` whose files
    verify, skipping damaged ones with a warning that names them (every rank must call it)."""
    from ._state import StateError

    if (root / MARKER).is_file():
        return root, verify(root)
    latest_sharded_state(root, run_id)  # raises, naming why, when there is none
    damaged: list[str] = []
    for _, path in reversed(sharded_states(root, run_id)):
        try:
            marker = verify(path)
        except StateError as error:
            damaged.append(str(error))
            continue
        if damaged:
            warnings.warn(f"resume_from={str(root)!r}: skipped damaged sharded state(s): "
                          + "; ".join(damaged) + f". Resuming from the previous good state, "
                          f"{path.name}.", RuntimeWarning, stacklevel=4)
        return path, marker
    raise StateError(f"resume_from={str(root)!r}: no usable sharded state of this run; damaged: "
                     + "; ".join(damaged) + ". Start afresh (resume_from=None), or name a "
                     "state directory explicitly.")


def load_sharded_extras(path: Path, marker: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(shared, own)`` of the sharded state at ``path`` (``marker``: its verified
    ``purekd.json``), for this rank: under another world size than the state's ``N``, rank
    ``r`` takes saved rank ``r mod N``'s own part (its random generators). No weights are read."""
    source = dist.get_rank() % int(marker["world_size"])
    state: dict[str, Any] = {"shared": b"", f"rank{source}": b""}
    dcp.load(state, checkpoint_id=path, planner=_WeightsOnlyLoadPlanner())
    return _from_bytes(state["shared"]), _from_bytes(state[f"rank{source}"])


def load_sharded_weights(path: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load this rank's shards of ``module`` (the sharded step) and ``optimizer`` from
    ``path``, in place."""
    model_state, optimizer_state = get_state_dict(module, optimizer)
    state: dict[str, Any] = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=path, planner=_WeightsOnlyLoadPlanner())
    set_state_dict(module, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])


__all__ = ["MARKER", "SHARDED_SUFFIX", "checksums", "choose_state", "latest_sharded_state",
           "load_sharded_extras", "load_sharded_weights", "prune_sharded", "read_marker",
           "remove_temporary_directories", "save_sharded_state", "sharded_state_path",
           "sharded_states", "verify"]
