"""Capture and restore every random number generator training draws from."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def _numpy_state() -> tuple[Any, ...]:
    # As plain Python values and a tensor, so a state file loads with weights_only=True.
    name, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    return (str(name), torch.from_numpy(np.asarray(keys).astype(np.int64)), int(pos), int(has_gauss),
            float(gauss))


def rng_state() -> dict[str, Any]:
    """The states of Python's ``random``, NumPy's global generator, torch's CPU generator and
    (when present) every CUDA generator."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


__all__ = ["rng_state", "set_rng_state"]
