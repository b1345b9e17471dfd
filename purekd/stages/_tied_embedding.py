"""A tied input embedding's gradient without a second ``(V, H)`` buffer.

Small language models tie the input embedding to the output layer (SmolLM2, Gemma 3, Llama 3.2
1B/3B, Qwen2.5 0.5B-3B): one ``(V, H)`` weight ``W``, read by the embedding lookup and by the
output layer. On the fused KD path the output layer's gradient ``G_out`` ``(V, H)`` comes out of
the loss (:func:`~purekd.losses.fused_linear_distill`), and the lookup's backward writes its own
dense ``(V, H)`` gradient ``G_in`` before autograd adds the two. For a moment both exist beside
every other gradient: at V 49152, H 576 that is 108 MiB more than the sum needs, the largest
single item of an on-policy step's peak.

:func:`sparse_tied_embedding` removes that buffer with two changes, both inside autograd:

* the lookup runs with ``sparse=True`` for the student's forward, so ``G_in`` is a sparse
  ``(V, H)`` tensor holding only the batch's ``B*L`` rows;
* the output layer's weight reaches the loss through :class:`_Alias`, an identity created
  *before* the forward. Autograd runs later-created nodes first, so the alias hands ``G_out`` to
  ``W`` last, after the lookup's sparse ``G_in``; then autograd adds the sparse rows into
  ``G_out`` in place (``G_out + G_in`` allocates a new dense tensor when ``G_out`` comes first).

``W.grad`` is dense as always, and equal to the dense path's up to float rounding (a token that
occurs several times has its rows added to ``G_out`` one by one instead of summed first).
Nothing changes unless every condition holds: gradients are on (outside ``torch.func``
transforms, which take gradients their own way), the model has a
``get_input_embeddings()`` that is a plain ``nn.Embedding`` whose weight *is* the output layer's
weight ``W`` (a plain tensor, not an FSDP2 ``DTensor``) and requires a gradient. If the loss
then never reads the alias, ``W`` gets only the sparse ``G_in``; a hook registered for that case
turns ``W.grad`` dense again right after autograd writes it, so an optimizer never sees a sparse
gradient.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from purekd._compiling import _inside_functorch_transform
from purekd._sharded import is_dtensor


class _Alias(torch.autograd.Function):
    """``W`` itself (a view), as its own autograd node: its backward hands the gradient on."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor) -> Tensor:
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad


_DENSE_HOOKS: dict[int, Any] = {}
"""The pending :func:`_densify` hook's handle, by ``id`` of its weight (at most one each; the
entry goes when the hook runs or the weight is freed)."""

_WATCHED: set[int] = set()
"""``id`` s of the weights with a finalizer that forgets them (one each, for the weight's life)."""


def _forget(key: int) -> None:
    _DENSE_HOOKS.pop(key, None)
    _WATCHED.discard(key)


def _densify(weight: Tensor) -> None:
    """Post-accumulate hook: a sparse ``weight.grad`` (the loss did not read the alias) made
    dense; then the hook removes itself."""
    handle = _DENSE_HOOKS.pop(id(weight), None)
    if handle is not None:
        handle.remove()
    if weight.grad is not None and weight.grad.layout != torch.strided:
        weight.grad = weight.grad.to_dense()


def tied_input_embedding(model: Any, weight: Tensor | None) -> nn.Embedding | None:
    """``model``'s input embedding if its weight is ``weight`` and the lookup may be made sparse
    (see the module docstring), else ``None``."""
    if weight is None or not torch.is_grad_enabled() or not weight.requires_grad:
        return None
    if _inside_functorch_transform():  # torch.func.grad & co.: autograd's order does not apply
        return None
    if not weight.is_leaf or is_dtensor(weight) or weight.layout != torch.strided:
        return None
    get = getattr(model, "get_input_embeddings", None)
    if not callable(get):
        return None
    try:
        embedding = get()
    except (AttributeError, NotImplementedError):
        return None
    if type(embedding).forward is not nn.Embedding.forward or embedding.weight is not weight:
        return None
    return embedding


@contextmanager
def sparse_tied_embedding(model: Any, weight: Tensor | None) -> Iterator[Tensor | None]:
    """While open, ``model``'s input embedding (tied to the output layer's ``weight``) gives a
    sparse gradient; yields the alias of ``weight`` the loss should read instead of ``weight``
    (created now, before the forward), or ``None`` where nothing changes. The embedding's
    ``sparse`` setting is restored on exit."""
    embedding = tied_input_embedding(model, weight)
    if embedding is None or weight is None:
        yield None
        return
    alias = _Alias.apply(weight)
    key = id(weight)
    if key not in _DENSE_HOOKS:
        _DENSE_HOOKS[key] = weight.register_post_accumulate_grad_hook(_densify)
    if key not in _WATCHED:
        _WATCHED.add(key)
        weakref.finalize(weight, _forget, key)
    previous = embedding.sparse
    embedding.sparse = True
    try:
        yield alias
    finally:
        embedding.sparse = previous


def output_weight(adaptor: Any) -> Tensor | None:
    """The output layer's weight an adaptor returns as ``'lm_weight'``, when it says so up front
    (``hf_adaptor(lm_head=...)``: its ``lm_head.weight``); else ``None``."""
    weight = getattr(getattr(adaptor, "lm_head", None), "weight", None)
    return weight if isinstance(weight, Tensor) else None


__all__ = ["output_weight", "sparse_tied_embedding", "tied_input_embedding"]
