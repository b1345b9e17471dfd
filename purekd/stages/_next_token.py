"""``next_token``: the rows a causal language model's logits are distilled on.

A causal LM's logits at position ``t`` are its prediction of the token at ``t + 1``. Rather than
slicing the logits to ``[:, :-1]`` (a copy of a ``(B, L, V)`` tensor when it is not contiguous),
the targets are shifted: the labels move one position left and the last position, which predicts
past the end of the sequence, is ignored. Logits, hidden states and a teacher's cached top-k rows
(stored unshifted: row ``t`` is the prediction of token ``t + 1``) then all keep their ``L`` rows.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

IGNORE_INDEX = -100
"""The label of a position that takes no part in the loss (the ``transformers`` convention)."""


class NextToken(NamedTuple):
    """The next-token targets of a batch of sequences.

    ``labels`` ``(B, L)``: ``labels[:, t]`` is the token the logits at position ``t`` predict
    (``ignore_index`` at the last position and wherever the input was ignored);
    ``mask`` ``(B, L)`` int64 0/1: 1 where the logits at ``t`` take part in the loss.
    """

    labels: Tensor | None
    mask: Tensor


def shift_left(values: Tensor, fill: int | float) -> Tensor:
    """``values`` moved one position left along the last dimension, ``fill`` at the end:
    ``out[..., t] = values[..., t + 1]``, ``out[..., -1] = fill``. A new tensor."""
    pad = torch.full((*values.shape[:-1], 1), fill, dtype=values.dtype, device=values.device)
    return torch.cat([values[..., 1:], pad], dim=-1)


def next_token(
    labels: Tensor | None = None,
    attention_mask: Tensor | None = None,
    *,
    ignore_index: int = IGNORE_INDEX,
) -> NextToken:
    r"""Next-token alignment and the row mask of a causal LM.

    .. math::

        \text{labels}'_{b,t} = \text{labels}_{b,t+1}, \qquad
        m_{b,t} = [\text{labels}_{b,t+1} \ne \text{ignore\_index}]
                  \cdot a_{b,t}\, a_{b,t+1}, \qquad m_{b,L-1} = 0

    with ``a`` the ``attention_mask`` (all ones when not given): a position is kept when the token
    it predicts is a real, non-ignored token and the position itself is not padding. ``labels``
    ``(B, L)`` integer (``-100`` marks prompt or padding tokens, as in ``transformers``);
    ``attention_mask`` ``(B, L)`` 0/1. At least one of them must be given. With only the
    attention mask, every predicted real token is kept and ``NextToken.labels`` is ``None``.

    The loss over the kept rows equals the loss on ``logits[:, :-1]`` against
    ``labels[:, 1:]`` with the ignored positions removed.
    """
    if labels is None and attention_mask is None:
        raise ValueError("next_token needs labels (B, L) or an attention_mask (B, L), got neither")
    reference = labels if labels is not None else attention_mask
    assert reference is not None
    if reference.dim() != 2:
        name = "labels" if labels is not None else "attention_mask"
        raise ValueError(f"next_token: {name} must have shape (batch, length), got "
                         f"{tuple(reference.shape)}")
    if labels is not None and (labels.is_floating_point() or labels.is_complex()):
        raise TypeError(f"next_token: labels must be integer token ids, got {labels.dtype}")
    if (labels is not None and attention_mask is not None
            and tuple(attention_mask.shape) != tuple(labels.shape)):
        raise ValueError(f"next_token: attention_mask {tuple(attention_mask.shape)} and labels "
                         f"{tuple(labels.shape)} must have the same shape (batch, length)")
    shifted = shift_left(labels, ignore_index) if labels is not None else None
    keep = (shifted != ignore_index if shifted is not None
            else torch.ones_like(reference, dtype=torch.bool))
    if attention_mask is not None:
        real = attention_mask != 0
        keep = keep & real & shift_left(real, False)
    return NextToken(shifted, keep.to(torch.int64))


__all__ = ["IGNORE_INDEX", "NextToken", "next_token", "shift_left"]
