"""Collectives that return only once the backend's worker thread has let go of their tensors.

Why this exists (measured on PyTorch 2.13 with gloo, two ranks): a synchronous
``dist.all_reduce(t)`` returns when the work is *done*, but the backend's worker thread drops the
work, and with it its references to ``t``, a moment later — in 2,000 all-reduces about half
returned before the worker had let go, which it then did within 3 ms. Since PyTorch keeps a
tensor's Python object alive while C++ holds the tensor, dropping that last C++ reference takes
the GIL. When the interpreter is already finalising (a script that ends right after the run's
last collective), the worker thread is ended inside ``take_gil`` while unwinding a destructor
and the process aborts with "terminate called without an active exception" (SIGABRT, after a
run that succeeded; seen in CI, the core dump shows ``~AsyncAllreduceWork`` →
``TensorImpl::decref_pyobject`` → ``PyThread_exit_thread``).

:func:`all_reduce` and :func:`broadcast` (through :func:`settled`) wait, releasing the GIL,
until every reference the backend took to their tensor is gone, read with
:func:`sys.getrefcount` (CPython). Collectives whose tensors
are not ours (DDP's buckets, FSDP2's all-gathers, ``all_gather_object``'s buffers, the user's)
get :func:`guard_exit`: an exit handler that gives the worker threads a moment, without the GIL,
before the interpreter finalises."""

from __future__ import annotations

import atexit
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

#: How long to wait for a worker thread to let go of a tensor before going on anyway.
RELEASE_TIMEOUT_S = 10.0
#: What the exit handler grants the worker threads (GIL released) before finalisation.
EXIT_GRACE_S = 0.1
_exit_guarded = False


def settled(collective: Callable[..., Any], tensor: torch.Tensor, **options: Any) -> bool:
    """Run ``collective(tensor, **options)`` (a synchronous ``torch.distributed`` collective),
    then wait, sleeping without the GIL, until the backend holds no reference to ``tensor``:
    its reference count (read before and after in this one frame) is back to what it was.
    Returns True, or False (with a ``RuntimeWarning``) if after :data:`RELEASE_TIMEOUT_S` it is
    not, and goes on. A tensor off the CPU is not waited for (True): NCCL's watchdog thread
    keeps its works until it polls them, and waiting would add that polling to every step."""
    references = sys.getrefcount(tensor)
    collective(tensor, **options)
    if tensor.device.type != "cpu":
        return True
    deadline = time.monotonic() + RELEASE_TIMEOUT_S
    while sys.getrefcount(tensor) > references:
        if time.monotonic() >= deadline:
            warnings.warn(f"{getattr(collective, '__name__', collective)}: the backend still held "
                          f"the tensor {RELEASE_TIMEOUT_S} s after the collective returned; going "
                          "on (an exit right now could abort the process)", RuntimeWarning,
                          stacklevel=3)
            return False
        time.sleep(1e-5)
    return True


def all_reduce(tensor: torch.Tensor, op: Any = dist.ReduceOp.SUM) -> None:
    """``dist.all_reduce(tensor, op)`` in place, returning once the backend let go of ``tensor``."""
    settled(dist.all_reduce, tensor, op=op)


def broadcast(tensor: torch.Tensor, src: int) -> None:
    """``dist.broadcast(tensor, src)`` in place, returning once the backend let go of ``tensor``."""
    settled(dist.broadcast, tensor, src=src)


def guard_exit() -> None:
    """Register (once per process) an exit handler that sleeps :data:`EXIT_GRACE_S` without the
    GIL, so that backend worker threads finishing a collective whose tensors have Python objects
    release them before the interpreter finalises (see the module docstring)."""
    global _exit_guarded
    if not _exit_guarded:
        atexit.register(time.sleep, EXIT_GRACE_S)
        _exit_guarded = True


__all__ = ["EXIT_GRACE_S", "RELEASE_TIMEOUT_S", "all_reduce", "broadcast", "guard_exit",
           "settled"]
