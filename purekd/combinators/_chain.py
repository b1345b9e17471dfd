"""``chain``: compose pipeline stages left to right."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def chain(*stages: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``chain(f, g, h)(x) == h(g(f(x)))``: run stages in order, each on the last one's result.

    >>> chain(lambda x: x + 1, lambda x: 2 * x)(3)
    8
    """
    if not stages:
        raise ValueError("chain needs at least one stage")
    for index, stage in enumerate(stages):
        if not callable(stage):
            raise TypeError(f"chain: stage #{index} is not callable ({type(stage).__name__})")

    def chained(value: Any) -> Any:
        for stage in stages:
            value = stage(value)
        return value

    chained.__qualname__ = "chain(" + ", ".join(
        getattr(s, "__qualname__", type(s).__name__) for s in stages) + ")"
    return chained


__all__ = ["chain"]
