"""Linear layers on oneDNN-packed weights, for the few-row products of a CPU decode loop.

A decode step multiplies one row per sequence, ``x`` ``(B, 1, H_in)``, by every weight of the
model, ``y = x W^T + b`` with ``W`` ``(H_out, H_in)``. With so few rows the CPU's BLAS is slow
(it streams ``W`` at a fraction of the memory bandwidth); oneDNN's linear on a copy of ``W``
reordered once for ``B`` rows does the same product about twice as fast. Measured on 2 threads,
8 rows, weights out of cache: 1536 x 576 took 0.20 against 0.45 ms, 576 x 1536 0.21 against
0.49 ms, 576 x 576 0.125 against 0.17 ms, and the 49152 x 576 output layer 5.7 against 22 ms
(10.6 against 26 ms on one thread). Reordering costs about 60 ms per 100 MiB of weights and
holds one more copy of them while it is in use.

:func:`packed_linears` does this for one block of code without touching the model's weights: it
gives each plain :class:`torch.nn.Linear` of the model (exactly that class; its weight a
contiguous float32 CPU tensor, not a ``DTensor``; no quantised or LoRA subclass; no ``forward``
already replaced by someone else) a ``forward`` of its own for the block and removes it
afterwards, also on an exception. Inputs it cannot take (another dtype, gradients wanted, CPU
autocast on: its lower-precision product is what the model would compute) go to the module's
usual product; under CPU autocast nothing is packed at all. The copies are bounded: modules are
packed in order while their weights add up to at most half the memory the system reports
available (``MemAvailable`` of ``/proc/meminfo``; no bound where it is not reported); the rest
keep their own product, so a model too large to copy still samples, only slower. The swap is
visible to anything that calls the same modules while the block runs (another thread, say): it
gets the packed product too, the same to rounding.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def onednn_packing() -> bool:
    """Whether this PyTorch has oneDNN's packed linear (CPU builds with ``mkldnn``)."""
    mkldnn = getattr(torch.backends, "mkldnn", None)
    try:
        return bool(mkldnn is not None and mkldnn.is_available()
                    and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
                    and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
    except (AttributeError, RuntimeError):
        return False


def available_memory() -> int | None:
    """Bytes of memory the system reports available (``MemAvailable`` in ``/proc/meminfo``), or
    ``None`` where it reports none."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _packable(module: nn.Module) -> bool:
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    return (type(module) is nn.Linear and "forward" not in module.__dict__
            and type(weight) in (Tensor, nn.Parameter) and isinstance(weight, Tensor)
            and weight.dim() == 2 and weight.dtype == torch.float32
            and weight.device.type == "cpu" and weight.layout == torch.strided
            and weight.is_contiguous()
            and (bias is None or (type(bias) in (Tensor, nn.Parameter)
                                  and bias.dtype == torch.float32)))


def _packed_forward(weight: Tensor, packed: Tensor, bias: Tensor | None, x: Tensor) -> Tensor:
    """``x W^T + b`` through oneDNN on ``packed`` (``W`` reordered); the module's usual product
    for an input it cannot take (not float32 on the CPU, gradients wanted, or CPU autocast on)."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or torch.is_autocast_enabled("cpu") \
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [None], "")


@contextmanager
def packed_linears(model: nn.Module, rows: int) -> Iterator[int]:
    """Within the block, every packable ``nn.Linear`` of ``model`` (see the module docstring)
    computes ``x W^T + b`` through oneDNN on a copy of ``W`` reordered for ``rows`` rows (a
    hint: other row counts work). Yields the number of modules packed (0 where this PyTorch
    has no oneDNN or CPU autocast is on; the block then runs as usual). A weight shared by
    several modules (a tied output layer is one of them only once) is reordered once. The
    copies are dropped when the block ends."""
    swapped: list[nn.Module] = []
    try:
        if onednn_packing() and not torch.is_autocast_enabled("cpu"):
            packed: dict[int, Tensor] = {}
            available = available_memory()
            budget = None if available is None else available // 2
            for module in model.modules():
                if not _packable(module):
                    continue
                weight: Any = module.weight
                bias: Any = module.bias
                key = id(weight)
                if key not in packed:
                    size = weight.numel() * weight.element_size()
                    if budget is not None and size > budget:
                        continue
                    budget = None if budget is None else budget - size
                    packed[key] = torch.ops.mkldnn._reorder_linear_weight(weight.detach(),
                                                                          int(rows))
                module.forward = functools.partial(
                    _packed_forward, weight, packed[key], bias)
                swapped.append(module)
        yield len(swapped)
    finally:
        for module in swapped:
            module.__dict__.pop("forward", None)


__all__ = ["available_memory", "onednn_packing", "packed_linears"]
