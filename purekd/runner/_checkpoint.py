"""Checkpoint files, written atomically: a temporary file in the same folder, then
``os.replace`` — a crash leaves either the old file or the new one, never a truncated one.
Also what an output directory holds: state files by step, the temporary files a killed write
left, and the files of an earlier run."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from purekd._atomic import atomic_write

STATE_SUFFIX = ".state.pt"
_STATE = re.compile(r"gs(\d+)" + re.escape(STATE_SUFFIX) + "$")
# What atomic_save (".{name}.XXXX.tmp") and the other writers leave when killed mid-write.
_TEMPORARY = re.compile(r"^\.(gs\d+\.pkl|gs\d+\.state\.pt|best\.pkl|run\.json|metrics\.jsonl)(\..*)?\.tmp$"
                        r"|^metrics\.jsonl\.tmp$")
_RUN_FILES = re.compile(r"^(gs\d+\.pkl|gs\d+\.state\.pt|gs\d+\.state|best\.pkl|metrics\.jsonl"
                        r"|run\.json)$")  # gs<step>.state: an FSDP run's sharded state directory


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj, path)`` via a temporary file and ``os.replace``; returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(target, lambda file: torch.save(obj, file))


def weights_path(output_dir: str | os.PathLike[str], global_step: int) -> Path:
    """TextBrewer's checkpoint name: ``output_dir/gs{global_step}.pkl``."""
    return Path(output_dir) / f"gs{global_step}.pkl"


def state_path(output_dir: str | os.PathLike[str], global_step: int) -> Path:
    """The full training state saved beside the weights: ``output_dir/gs{global_step}.state.pt``."""
    return Path(output_dir) / f"gs{global_step}{STATE_SUFFIX}"


def state_files(directory: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``gs<step>.state.pt`` in ``directory``, by step."""
    root = Path(directory)
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STATE.match(p.name)))


def states_in(directory: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """:func:`state_files` of ``directory`` (a ``resume_from`` that is not a file), raising
    ``FileNotFoundError`` when it is not a directory or holds no state file."""
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"resume_from={str(directory)!r}: no such file or directory")
    found = state_files(root)
    if not found:
        raise FileNotFoundError(
            f"resume_from={str(directory)!r}: no gs<step>{STATE_SUFFIX} file in this directory; "
            "full-state checkpoints are written when training with save_state=True"
        )
    return found


def latest_state(path: str | os.PathLike[str]) -> Path:
    """``path`` itself if it is a state file, else the state file with the highest step in it."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    return states_in(candidate)[-1][1]


def remove_temporary_files(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files a write killed half-way left in ``directory``; returns them."""
    root = Path(directory)
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if _TEMPORARY.match(p.name) and p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def run_files(directory: str | os.PathLike[str]) -> list[Path]:
    """The files a training run writes (``gs*.pkl``, states — files, or directories under
    FSDP — ``best.pkl``, ``metrics.jsonl``, ``run.json``) found in ``directory``, by name."""
    root = Path(directory)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _RUN_FILES.match(p.name)), key=lambda p: p.name)


__all__ = ["STATE_SUFFIX", "atomic_save", "latest_state", "remove_temporary_files", "run_files",
           "state_files", "state_path", "weights_path"]
