"""Projections that map a student feature to the teacher's width before a match.

Each builder takes ``(dim_in, dim_out)`` — the student's and the teacher's feature widths —
and returns an :class:`torch.nn.Module`: a ``Linear(dim_in, dim_out)`` whose weight is drawn
from ``normal(0, 0.02)`` with a zero bias, followed by an optional activation. The random
draws happen in the same order as in TextBrewer, so the same seed gives the same projection.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

PROJECTION_INIT_STD = 0.02

ProjectionBuilder = Callable[[int, int], nn.Module]


def _initialised_linear(dim_in: int, dim_out: int) -> nn.Linear:
    layer = nn.Linear(dim_in, dim_out, bias=True)
    with torch.no_grad():
        layer.weight.normal_(mean=0.0, std=PROJECTION_INIT_STD)
        layer.bias.zero_()
    return layer


def linear(dim_in: int, dim_out: int) -> nn.Module:
    """``y = W x + b`` with ``W ~ normal(0, 0.02)``, ``b = 0``."""
    return _initialised_linear(dim_in, dim_out)


def with_activation(activation: Callable[[], nn.Module]) -> ProjectionBuilder:
    """A projection builder: the initialised linear layer, then ``activation()``."""

    def build(dim_in: int, dim_out: int) -> nn.Module:
        return nn.Sequential(_initialised_linear(dim_in, dim_out), activation())

    build.__qualname__ = f"with_activation({getattr(activation, '__name__', activation)})"
    return build


relu = with_activation(nn.ReLU)
tanh = with_activation(nn.Tanh)

__all__ = ["PROJECTION_INIT_STD", "ProjectionBuilder", "linear", "relu", "tanh", "with_activation"]
