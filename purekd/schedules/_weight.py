"""Weight schedules: functions of training progress ``p`` in ``[0, 1]``.

A schedule maps progress (a float or a 0-dim tensor) to a weight of the same kind, so it works
both in plain Python and inside compiled code, where progress travels as a 0-dim tensor and a
new value does not trigger a recompilation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import Tensor

P = TypeVar("P", float, Tensor)
WeightSchedule = Callable[[P], P]


def linear_decay(progress: P) -> P:
    """``w(p) = 1 - p``: from 1 at the start to 0 at the end of training."""
    return 1 - progress


def linear_growth(progress: P) -> P:
    """``w(p) = p``: from 0 at the start to 1 at the end of training."""
    return progress


def constant(value: float) -> Callable[[P], P]:
    """``w(p) = value`` for every ``p``.

    >>> constant(0.5)(0.9)
    0.5
    """

    def constant_schedule(progress: P) -> P:
        return progress * 0 + value

    constant_schedule.__qualname__ = f"constant({value!r})"
    return constant_schedule


__all__ = ["WeightSchedule", "constant", "linear_decay", "linear_growth"]
