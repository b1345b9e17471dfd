"""Checkpoint files, written atomically: a temporary file in the same folder, then
``os.replace`` — a crash leaves either the old file or the new one, never a truncated one."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

STATE_SUFFIX = ".state.pt"


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj, path)`` via a temporary file and ``os.replace``; returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def weights_path(output_dir: str | os.PathLike[str], global_step: int) -> Path:
    """TextBrewer's checkpoint name: ``output_dir/gs{global_step}.pkl``."""
    return Path(output_dir) / f"gs{global_step}.pkl"


def state_path(output_dir: str | os.PathLike[str], global_step: int) -> Path:
    """The full training state saved beside the weights: ``output_dir/gs{global_step}.state.pt``."""
    return Path(output_dir) / f"gs{global_step}{STATE_SUFFIX}"


def latest_state(path: str | os.PathLike[str]) -> Path:
    """``path`` itself if it is a state file, else the state file with the highest step in it."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    if not candidate.is_dir():
        raise FileNotFoundError(f"resume_from={str(path)!r}: no such file or directory")
    pattern = re.compile(r"gs(\d+)" + re.escape(STATE_SUFFIX) + "$")
    found = [(int(m.group(1)), p) for p in candidate.iterdir() if (m := pattern.match(p.name))]
    if not found:
        raise FileNotFoundError(
            f"resume_from={str(path)!r}: no gs<step>{STATE_SUFFIX} file in this directory; "
            "full-state checkpoints are written when training with save_state=True"
        )
    return max(found)[1]


__all__ = ["STATE_SUFFIX", "atomic_save", "latest_state", "state_path", "weights_path"]
