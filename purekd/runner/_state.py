"""The full training state: what it holds, how it is written and read, and how it is put back.

A state file ``gs{step}.state.pt`` holds everything a run needs to continue bit for bit: the
step's weights (student and projections), the optimizer, the LR scheduler, the gradient scaler,
every random generator (now and at the start of training), the counters, the random state of
each running pass over a loader and early stopping's memory. It loads with
``torch.load(weights_only=True)``: no code in a state file is ever executed.

This module is the one place that knows the state's layout: :func:`capture` builds it,
:func:`write` / :func:`read` move it to and from disk, :func:`restore` loads it into the
run's objects. Under FSDP the same state is a directory ``gs{step}.state/`` written through
``torch.distributed.checkpoint`` (:mod:`._sharded_state`): :func:`write_sharded` splits it into
the sharded part (step and optimizer), what every rank shares and what is each rank's own (its
random generators); :func:`read_sharded` loads the sharded part in place and returns the rest
in :func:`capture`'s layout, for :func:`restore`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from ._checkpoint import atomic_save, latest_state, state_path
from ._early_stopping import EarlyStoppingState
from ._precision import Precision
from ._rng import rng_state
from ._sources import PassLog

STATE_VERSION = 1


def capture(step: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
            precision: Precision, start_rng: dict[str, Any], counters: Any,
            pass_log: PassLog, stopping: EarlyStoppingState, *,
            sharded: bool = False) -> dict[str, Any]:
    """The full state of a run, as tensors and plain Python values (with ``sharded``, without
    the step and the optimizer: :func:`write_sharded` takes those from the modules)."""
    weights = {} if sharded else {"step": step.state_dict(), "optimizer": optimizer.state_dict()}
    return {
        "version": STATE_VERSION,
        **weights,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": precision.state_dict(),
        "rng": rng_state(),
        "start_rng": start_rng,
        "counters": attrs.asdict(counters),
        "passes": dict(pass_log.latest),
        "early_stopping": attrs.asdict(stopping),
    }


def write(state: dict[str, Any], output_dir: str | os.PathLike[str]) -> Path:
    """Save ``state`` atomically as ``output_dir/gs{global_step}.state.pt``; returns the path.

    The one place a full state reaches the disk (a sharded, distributed writer goes here)."""
    step = state["counters"]["global_step"]
    return atomic_save(state, state_path(output_dir, step))


def read(resume_from: str | os.PathLike[str]) -> dict[str, Any]:
    """The state at ``resume_from`` (a state file, or the latest one in a directory)."""
    saved = torch.load(latest_state(resume_from), map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or saved.get("version") != STATE_VERSION:
        raise ValueError(f"resume_from={str(resume_from)!r}: not a purekd state file")
    return saved


_OWN = ("rng", "start_rng")  # what differs between the ranks of one run
_SHARDED = ("step", "optimizer")  # what torch.distributed.checkpoint saves shard by shard


def write_sharded(state: dict[str, Any], step: nn.Module, optimizer: torch.optim.Optimizer,
                  output_dir: str | os.PathLike[str]) -> Path:
    """Save a :func:`capture` (``sharded=True``) of an FSDP run as ``output_dir/gs{global_step}.state/``: the
    sharded ``step`` and ``optimizer`` as they are on each rank, the rest split into what
    every rank shares and each rank's own. Every rank must call it."""
    from . import _sharded_state as sharded  # torch.distributed.checkpoint: seconds to import

    own = {key: state[key] for key in _OWN}
    shared = {key: value for key, value in state.items() if key not in (*_OWN, *_SHARDED)}
    path = sharded.sharded_state_path(output_dir, state["counters"]["global_step"])
    return sharded.save_sharded_state(path, step, optimizer, shared, own)


def read_sharded(resume_from: str | os.PathLike[str], step: nn.Module,
                 optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load the sharded state at ``resume_from`` (a ``gs{step}.state`` directory, or the
    latest complete one in a directory) into the sharded ``step`` and ``optimizer``; returns
    the rest in :func:`capture`'s layout, without ``step`` and ``optimizer``."""
    from . import _sharded_state as sharded

    shared, own = sharded.load_sharded_state(sharded.latest_sharded_state(resume_from), step,
                                             optimizer)
    saved = {**shared, **own}
    if saved.get("version") != STATE_VERSION:
        raise ValueError(f"resume_from={str(resume_from)!r}: not a purekd state of version "
                         f"{STATE_VERSION}")
    return saved


def restore(saved: dict[str, Any], step: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: Any, precision: Precision) -> EarlyStoppingState:
    """Load ``saved`` into the step, the optimizer, the scheduler and the scaler; returns early
    stopping's memory. The random generators and the counters are restored by the runner, at
    the points of the data replay where they belong. A :func:`read_sharded` state has no
    ``step`` and ``optimizer``: they are already in place."""
    if "step" in saved:
        step.load_state_dict(saved["step"])
    if "optimizer" in saved:
        optimizer.load_state_dict(saved["optimizer"])
    if scheduler is not None and saved["scheduler"] is not None:
        scheduler.load_state_dict(saved["scheduler"])
    precision.load_state_dict(saved["scaler"])
    return EarlyStoppingState(**saved["early_stopping"])


__all__ = ["STATE_VERSION", "capture", "read", "read_sharded", "restore", "write",
           "write_sharded"]
