"""``probability_shift``: make the ground-truth class the teacher's top class."""

from __future__ import annotations

import torch
from torch import Tensor


def probability_shift(logits: Tensor, labels: Tensor) -> Tensor:
    """Swap, in each row, the largest logit with the logit of the true label.

    ``logits`` ``(B, C)`` or ``(B, L, C)``; ``labels`` ``(B,)`` or ``(B, L)`` of class indices.
    Rows whose label is negative (e.g. ``-100`` for ignored tokens) are left as they are.
    Returns a new tensor; ``logits`` is not modified. Where the label already has the largest
    logit, the row is unchanged.
    """
    if logits.dim() not in (2, 3):
        raise ValueError(f"probability_shift takes 2-d or 3-d logits, got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"probability_shift: labels of shape {tuple(labels.shape)} do not match logits of "
            f"shape {tuple(logits.shape)}; labels must have shape {tuple(logits.shape[:-1])}"
        )
    top = logits.argmax(dim=-1, keepdim=True)
    target = labels.to(top.dtype).unsqueeze(-1)
    target = torch.where(target < 0, top, target)
    top_value = logits.gather(-1, top)
    target_value = logits.gather(-1, target)
    return logits.scatter(-1, top, target_value).scatter(-1, target, top_value)


__all__ = ["probability_shift"]
