"""Sharded (``DTensor``) parameters read outside their module's forward, made whole.

FSDP2 (``fully_shard``) registers a module's parameters as sharded ``DTensor`` s between its
forwards and gathers them only while the module runs. The fused KD path reads the output layer's
weight *after* the model's forward (``hf_adaptor(lm_head=...)``, or any adaptor returning
``'lm_weight'``), when it is sharded again; mixed with the plain hidden states that fails deep
inside the loss (``aten.mm got mixed torch.Tensor and DTensor``).

:func:`whole` gathers such a tensor: ``W`` ``(V, H)`` sharded by rows over ``N`` ranks becomes
the full ``(V, H)`` on every rank (an all-gather). Its gradient goes back the way FSDP2 sends a
parameter's gradient: averaged over the ranks and scattered to the shards (a reduce-scatter
with the mean), accumulating into the sharded parameter's ``.grad`` beside the gradients FSDP2
itself reduces (a tied input embedding's, for example). So a student trained on ``N`` ranks
gets the gradient of the mean loss over all ranks' batches, as for every other parameter.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor


def is_dtensor(value: Any) -> bool:
    """Whether ``value`` is a ``torch.distributed.tensor.DTensor`` (without importing
    ``torch.distributed`` when nothing can be one)."""
    if not isinstance(value, Tensor) or type(value) is Tensor:
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def whole(value: Tensor) -> Tensor:
    """``value`` itself if it is a plain tensor; a ``DTensor`` gathered to a plain tensor of its
    global shape on every rank, whose gradient is averaged over the ranks and reduce-scattered
    back to the shards (a collective: every rank must call it)."""
    if not is_dtensor(value):
        return value
    from torch.distributed.tensor import Partial, Replicate

    ndim = value.device_mesh.ndim  # type: ignore[attr-defined]
    full = value.redistribute(placements=[Replicate()] * ndim)  # type: ignore[attr-defined]
    return full.to_local(grad_placements=[Partial("avg")] * ndim)


__all__ = ["is_dtensor", "whole"]
