"""The full training state: what it holds, which run it belongs to, how it is written, read,
verified, validated against the run, fallen back from, and put back.

A state file ``gs{step}.state.pt`` holds everything a run needs to continue bit for bit: the
step's weights (student and projections), the optimizer, the LR scheduler, the gradient scaler,
every random generator (now and at the start of training), the counters, the random state of
each running pass over a loader, early stopping's memory, and the run it belongs to (its id and
its *fingerprint*: the configs, the parameters' shapes, the data, the optimizer's kind and
groups, the scheduler). It loads with ``torch.load(weights_only=True)``: no code in a state
file is ever executed.

``output_dir/run.json`` names the run that last started in the directory (written when a run
saves states). Resuming from a directory takes the latest state *of that run* that passes its
zip CRC checks, falling back (with a warning) past damaged ones; a state whose fingerprint
differs from the resuming run's is refused with the differences named, before anything is
loaded.

This module is the one place that knows the state's layout: :func:`capture` builds it,
:func:`write` / :func:`read` move it to and from disk, :func:`validate` checks it against the
run, :func:`restore` loads it into the run's objects.

Under FSDP the same state is a directory ``gs{step}.state/`` written through
``torch.distributed.checkpoint`` (:mod:`._sharded_state`): :func:`write_sharded` splits it into
the sharded part (the step and the optimizer, each rank its shards), what every rank shares and
each rank's own (its random generators). :func:`read_sharded` verifies the files' checksums,
checks the run's fingerprint and the optimizer and scheduler, and only then loads the shards in
place (resharded when the world size differs); it returns the rest in :func:`capture`'s layout
for :func:`restore`.
"""

from __future__ import annotations

import json
import os
import time
import uuid
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from ._checkpoint import atomic_save, state_files, state_path, states_in
from ._early_stopping import EarlyStoppingState
from ._precision import Precision
from ._rng import rng_state
from ._sources import PassLog

STATE_VERSION = 2
RUN_FILE = "run.json"

# Scheduler state that moves as training goes; the rest are its settings.
_SCHEDULER_PROGRESS = {"last_epoch", "verbose"}
# Optimizer group entries that are not options. (The learning rates are compared: the
# fingerprint is always taken from the freshly built optimizer and scheduler at the start.)
_GROUP_PROGRESS = {"params"}


class StateError(ValueError):
    """A state file cannot be used to resume this run; the message names the file and why."""


# -- the run's identity ------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """``value`` as JSON values (what is not JSON by its ``repr``), so fingerprints compare
    equal after a round trip through a state file or ``run.json``."""
    return json.loads(json.dumps(value, sort_keys=True, default=repr))


def fingerprint(*, step: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                plan: Any, training: Mapping[str, Any],
                extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What makes a state belong to a run, by part: ``training`` (the training options that
    change the result), ``plan`` (kind and length), ``parameters`` (name → dtype and shape of
    the step's weights and buffers), ``optimizer`` (kind, each group's parameters and options,
    learning rate included), ``scheduler`` (kind and settings) and whatever ``extra``
    adds (the distillation config, the data)."""
    names = {id(p): n for n, p in step.named_parameters()}
    groups = [{"params": [names.get(id(p), "?") + str(list(p.shape)) for p in group["params"]],
               **{k: v for k, v in group.items() if k not in _GROUP_PROGRESS}}
              for group in optimizer.param_groups]
    sched = None
    if scheduler is not None:
        settings = {k: v for k, v in scheduler.state_dict().items()
                    if not k.startswith("_") and k not in _SCHEDULER_PROGRESS}
        sched = {"kind": type(scheduler).__qualname__, "settings": settings}
    parts = {
        "training": dict(training),
        "plan": {"kind": type(plan).__name__, **plan._asdict()},
        "parameters": {k: f"{v.dtype} {list(v.shape)}" for k, v in step.state_dict().items()},
        "optimizer": {"kind": type(optimizer).__qualname__, "groups": groups},
        "scheduler": sched,
        **dict(extra or {}),
    }
    return {k: _plain(v) for k, v in parts.items()}


def differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """One line per fingerprint part that differs: the part, the saved and the current value."""
    lines = []
    for part in sorted(set(saved) | set(current)):
        old, new = saved.get(part), current.get(part)
        if old != new:
            lines.append(f"{part}: {_describe(old, new)}")
    return lines


def _describe(old: Any, new: Any) -> str:
    """The leaves that differ, by path (``groups[0].lr: 0.1 -> 0.2``), the first four shown."""
    leaves = _leaf_differences(old, new, "")
    shown = ", ".join(f"{path + ': ' if path else ''}{_short(a)} -> {_short(b)}"
                      for path, a, b in leaves[:4])
    return shown + (f" (and {len(leaves) - 4} more)" if len(leaves) > 4 else "")


def _leaf_differences(old: Any, new: Any, path: str) -> list[tuple[str, Any, Any]]:
    """``(path, old, new)`` of every differing leaf: dicts are compared key by key, lists of one
    length item by item, anything else whole (``'<absent>'`` for a missing key)."""
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new)):
            inner = f"{path}.{key}" if path else str(key)
            found += _leaf_differences(old.get(key, "<absent>"), new.get(key, "<absent>"), inner)
        return found
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [leaf for index, (a, b) in enumerate(zip(old, new, strict=True))
                for leaf in _leaf_differences(a, b, f"{path}[{index}]")]
    return [] if old == new else [(path, old, new)]


def _short(value: Any, width: int = 120) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= width else text[: width - 3] + "..."


@attrs.frozen
class RunIdentity:
    """A run: a random id drawn when it starts fresh, its start time and its fingerprint."""

    id: str
    started: float
    fingerprint: dict[str, Any]

    @classmethod
    def new(cls, fingerprint_: dict[str, Any]) -> RunIdentity:
        return cls(uuid.uuid4().hex, time.time(), fingerprint_)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "started": self.started, "fingerprint": self.fingerprint}


def write_run_file(output_dir: Path, run: RunIdentity) -> None:
    """``output_dir/run.json``: the run that owns this directory's states from now on."""
    tmp = output_dir / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps(run.as_dict(), sort_keys=True), encoding="utf-8")
    os.replace(tmp, output_dir / RUN_FILE)


def read_run_file(output_dir: Path) -> dict[str, Any] | None:
    """What ``run.json`` says, or ``None`` when there is none; a :class:`StateError` naming the
    file when it is unreadable or holds no run id (resuming would otherwise take any run's
    latest state — another run's, left in the same directory)."""
    path = output_dir / RUN_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        problem = f"unreadable ({type(error).__name__}: {error})"
    else:
        if isinstance(data, dict) and isinstance(data.get("id"), str) and data["id"]:
            return data
        problem = "not a run record (no 'id')"
    raise StateError(
        f"{path}: {problem}. It names the run whose states resuming from {str(output_dir)!r} "
        "takes; without it a state of another run in the directory could be resumed. Name "
        "the state file to resume in resume_from, or delete the file to resume the latest "
        "state of any run in the directory.")


# -- capture and write -------------------------------------------------------------------------


def capture(step: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
            precision: Precision, start_rng: dict[str, Any], counters: Any,
            pass_log: PassLog, stopping: EarlyStoppingState, run: RunIdentity, *,
            sharded: bool = False) -> dict[str, Any]:
    """The full state of a run, as tensors and plain Python values (with ``sharded``, without
    the step and the optimizer: :func:`write_sharded` takes those from the modules)."""
    weights = {} if sharded else {"step": step.state_dict(), "optimizer": optimizer.state_dict()}
    return {
        "version": STATE_VERSION,
        "run": run.as_dict(),
        "optimizer_kind": type(optimizer).__qualname__,
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

    The one place a full state reaches the disk (a sharded, distributed writer goes here).
    ``torch.save`` writes a zip archive with a CRC-32 of every record, which :func:`load_verified`
    checks."""
    step = state["counters"]["global_step"]
    return atomic_save(state, state_path(output_dir, step))


_OWN = ("rng", "start_rng")  # what differs between the ranks of one run
_SHARDED = ("step", "optimizer")  # what torch.distributed.checkpoint saves shard by shard


def write_sharded(state: dict[str, Any], step: nn.Module, optimizer: torch.optim.Optimizer,
                  output_dir: str | os.PathLike[str]) -> Path:
    """Save a :func:`capture` (``sharded=True``) of an FSDP run as
    ``output_dir/gs{global_step}.state/``: the sharded ``step`` and ``optimizer`` as they are
    on each rank, the rest split into what every rank shares and each rank's own. Every rank
    must call it."""
    from . import _sharded_state as sharded  # torch.distributed.checkpoint: seconds to import

    own = {key: state[key] for key in _OWN}
    shared = {key: value for key, value in state.items() if key not in (*_OWN, *_SHARDED)}
    path = sharded.sharded_state_path(output_dir, state["counters"]["global_step"])
    return sharded.save_sharded_state(path, step, optimizer, shared, own, state["run"]["id"])


def read_sharded(resume_from: str | os.PathLike[str], current: Mapping[str, Any],
                 step: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Any, *, extend: bool = False) -> tuple[dict[str, Any], Path]:
    """Resume an FSDP run: the sharded state at ``resume_from`` (a ``gs{step}.state``
    directory, or the latest one of the run in ``run.json`` whose files verify) is checked —
    checksums, fingerprint against ``current``, optimizer and scheduler — and then its shards
    are loaded into ``step`` and ``optimizer`` in place (resharded when the world size
    differs). Returns the rest in :func:`capture`'s layout
    (without ``step`` and ``optimizer``) and the path. Every rank must call it."""
    from . import _sharded_state as sharded

    root = Path(resume_from)
    owner = read_run_file(root) if root.is_dir() else None
    path, marker = sharded.choose_state(root, owner["id"] if owner is not None else None)
    shared, own = sharded.load_sharded_extras(path, marker)
    saved = {**shared, **own}
    if saved.get("version") != STATE_VERSION:
        raise StateError(f"{path}: not a purekd state of version {STATE_VERSION}")
    check_fingerprint(saved, current, path, extend=extend)
    validate(saved, path, step, optimizer, scheduler)
    sharded.load_sharded_weights(path, step, optimizer)
    return saved, path


def prune(output_dir: Path, run_id: str, keep: int) -> list[Path]:
    """Delete this run's state files but the ``keep`` latest; returns what was deleted. States
    of other runs and unreadable files are left alone."""
    mine = [(step, path) for step, path in state_files(output_dir) if _run_id_of(path) == run_id]
    doomed = [path for _, path in sorted(mine)[:-keep]] if len(mine) > keep else []
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def _run_id_of(path: Path) -> str | None:
    """The run id in a state file, read without loading its tensors (``mmap``)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        run = saved.get("run") if isinstance(saved, dict) else None
    except Exception:  # unreadable: not ours to delete
        return None
    return run.get("id") if isinstance(run, dict) else None


# -- read, verify, choose ----------------------------------------------------------------------


def load_verified(path: Path) -> dict[str, Any]:
    """The state in ``path`` after checking every zip record's CRC-32; a :class:`StateError`
    naming the file when it is empty, truncated, damaged or not a purekd state."""
    try:
        size = path.stat().st_size
        if size == 0:
            raise StateError(f"{path}: the state file is empty (0 bytes)")
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        if bad is not None:
            raise StateError(f"{path}: the state file is damaged (the CRC-32 of record {bad!r} "
                             "does not match its data)")
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except StateError:
        raise
    except (zipfile.BadZipFile, EOFError, RuntimeError, OSError, ValueError,
            _pickle_error()) as error:
        raise StateError(f"{path}: the state file is truncated or damaged "
                         f"({type(error).__name__}: {error})") from None
    if not isinstance(saved, dict) or saved.get("version") not in (1, STATE_VERSION):
        raise StateError(f"{path}: not a purekd state file (version "
                         f"{saved.get('version') if isinstance(saved, dict) else None!r})")
    return saved


def _pickle_error() -> type[Exception]:
    import pickle

    return pickle.UnpicklingError


def read(resume_from: str | os.PathLike[str], current: Mapping[str, Any], *,
         extend: bool = False) -> tuple[dict[str, Any], Path]:
    """The state to resume from, and its path.

    ``resume_from`` a file: that state, verified (a damaged one raises). A directory: the
    latest state of the run named in its ``run.json`` (any run when there is none) that passes
    verification; damaged ones are skipped with a warning naming them. Either way the state's
    fingerprint must equal ``current`` (the resuming run's; with ``extend``, but for a longer
    plan: :func:`check_fingerprint`), else :class:`StateError` lists what differs. A
    ``run.json`` that cannot be read is a :class:`StateError` naming it."""
    root = Path(resume_from)
    if root.is_file():
        saved = load_verified(root)
        check_fingerprint(saved, current, root, extend=extend)
        return saved, root
    found = states_in(resume_from)
    owner = read_run_file(root)
    damaged: list[str] = []
    others: list[str] = []
    for _, path in sorted(found, reverse=True):
        try:
            saved = load_verified(path)
        except StateError as error:
            damaged.append(str(error))
            continue
        run = saved.get("run")
        if owner is not None and (run.get("id") if isinstance(run, dict) else None) != owner["id"]:
            others.append(path.name)
            continue
        if damaged:
            warnings.warn(f"resume_from={str(resume_from)!r}: skipped damaged state file(s): "
                          + "; ".join(damaged) + f". Resuming from the previous good state, "
                          f"{path.name}.", RuntimeWarning, stacklevel=5)
        check_fingerprint(saved, current, path, extend=extend)
        return saved, path
    problems = []
    if damaged:
        problems.append("damaged: " + "; ".join(damaged))
    if others:
        problems.append(f"of another run than the one in {RUN_FILE} (id {owner and owner['id']}): "
                        + ", ".join(sorted(others)))
    raise StateError(f"resume_from={str(resume_from)!r}: no usable state of this run; "
                     + "; ".join(problems)
                     + ". Start afresh (resume_from=None), or name a state file explicitly.")


_LENGTHS = {"StepPlan": "num_steps", "EpochPlan": "num_epochs"}


def check_fingerprint(saved: Mapping[str, Any], current: Mapping[str, Any], path: Path, *,
                      extend: bool = False) -> None:
    """Raise :class:`StateError` listing each part where the state's run differs from this one.

    ``extend``: the run continues for a longer plan — its length (``num_steps`` of a step plan,
    ``num_epochs`` of an epoch plan) may grow, never shrink; every other part must still be
    equal. What continues then: the weights, the optimizer, the data position and the random
    generators bit for bit; the LR scheduler from its saved state *with its saved settings*
    (a schedule that had ended, e.g. ``LinearLR`` after ``total_iters``, stays at its last
    learning rate; ``StepLR`` or ``ExponentialLR`` go on as they would have); the training
    progress passed to the step (weight and temperature schedules) becomes
    ``global_step / new length``, so a schedule over progress is stretched over the new length
    from where it stands.
    """
    run = saved.get("run")
    if not isinstance(run, dict):  # a version-1 state: no fingerprint; validate() still checks
        warnings.warn(f"{path}: a state file without a run fingerprint (written by an older "
                      "purekd); only its shapes and optimizer are checked", RuntimeWarning,
                      stacklevel=6)
        return
    old = dict(run.get("fingerprint", {}))
    if extend:
        old = _extended(old, current, path)
    diff = differences(old, current)
    if diff:
        hint = ("" if extend or not any(line.startswith("plan:") for line in diff) else
                " To continue this run for more steps or epochs, pass extend_run=True.")
        raise StateError(
            f"{path}: the state belongs to a different run; what differs (saved -> now):\n  "
            + "\n  ".join(diff)
            + "\nResume with the same configs, models, data, optimizer, scheduler and length, "
            "or start afresh (resume_from=None)." + hint
        )


def _extended(old: dict[str, Any], current: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """The saved fingerprint with the plan's length taken from ``current`` when it grew."""
    plan, now = old.get("plan"), current.get("plan")
    if not (isinstance(plan, dict) and isinstance(now, dict) and plan.get("kind") == now.get("kind")
            and plan.get("kind") in _LENGTHS):
        return old
    length = _LENGTHS[plan["kind"]]
    if now[length] < plan[length]:
        raise StateError(f"{path}: extend_run=True continues a run for longer, but {length}="
                         f"{now[length]} is less than the saved run's {plan[length]}; pass "
                         f"{length} >= {plan[length]}")
    return {**old, "plan": {**plan, length: now[length]}}


# -- validate and restore ----------------------------------------------------------------------


def validate(saved: Mapping[str, Any], path: Path, step: nn.Module,
             optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    """Check, before loading anything, that ``saved`` fits the run's objects: the step's keys
    and shapes, the optimizer's kind, its groups and their sizes, the scheduler's presence."""
    problems = []
    # a sharded state holds no "step" or "optimizer" here: the fingerprint has their shapes and
    # groups, and torch.distributed.checkpoint checks every shard it loads
    weights = saved.get("step", {})
    own = step.state_dict() if "step" in saved else {}
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    if missing or unexpected:
        problems.append(f"weights: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key in sorted(set(own) & set(weights)):
        if tuple(own[key].shape) != tuple(weights[key].shape):
            problems.append(f"weight {key!r}: saved shape {list(weights[key].shape)}, "
                            f"the model has {list(own[key].shape)}")
    kind = saved.get("optimizer_kind")
    if kind is not None and kind != type(optimizer).__qualname__:
        problems.append(f"optimizer: saved {kind}, the run has {type(optimizer).__qualname__}")
    saved_groups = saved.get("optimizer", {}).get("param_groups", [])
    sizes = [len(g["params"]) for g in saved_groups]
    own_sizes = [len(g["params"]) for g in optimizer.param_groups]
    if "optimizer" in saved and sizes != own_sizes:
        problems.append(f"optimizer parameter groups: saved sizes {sizes}, the run has {own_sizes}")
    if (saved.get("scheduler") is None) != (scheduler is None):
        problems.append("scheduler: " + ("saved none, the run has "
                                         f"{type(scheduler).__qualname__}" if scheduler is not None
                                         else "saved one, the run has none"))
    if problems:
        raise StateError(f"{path}: the state does not fit this run (nothing was loaded):\n  "
                         + "\n  ".join(problems))


def restore(saved: dict[str, Any], step: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: Any, precision: Precision) -> EarlyStoppingState:
    """Load ``saved`` into the step, the optimizer, the scheduler and the scaler; returns early
    stopping's memory. The random generators and the counters are restored by the runner, at
    the points of the data replay where they belong. Call :func:`validate` first. A
    :func:`read_sharded` state has no ``step`` and ``optimizer``: they are already in place."""
    if "step" in saved:
        step.load_state_dict(saved["step"])
    if "optimizer" in saved:
        optimizer.load_state_dict(saved["optimizer"])
    if scheduler is not None and saved["scheduler"] is not None:
        scheduler.load_state_dict(saved["scheduler"])
    precision.load_state_dict(saved["scaler"])
    return EarlyStoppingState(**saved["early_stopping"])


__all__ = ["RUN_FILE", "STATE_VERSION", "RunIdentity", "StateError", "capture", "check_fingerprint",
           "differences", "fingerprint", "load_verified", "prune", "read", "read_run_file",
           "read_sharded", "restore", "validate", "write", "write_run_file", "write_sharded"]
