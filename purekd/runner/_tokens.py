"""Token-correct normalisation in the runner: the optimizer step's kept tokens, over every
micro-batch and every process.

A token-normalised step returns ``StepOutput.tokens`` (the micro-batch's kept tokens ``n_m``)
beside its mean loss ``L_m``. The runner back-propagates the micro-batch's token sum
``L_m * n_m`` and, when the optimizer step comes, multiplies the accumulated gradients by
``world_size / N`` with ``N = sum_m n_m`` summed over all processes (``all_reduce``; DDP has
already averaged the gradients over the ``world_size`` processes). The step's gradient is then
that of :func:`~purekd.combinators.token_normalised` — of one batch holding every token — and
``N`` need not be known before the first micro-batch runs (no prefetching of the window).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _distributed as distributed


def token_sum(loss: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum of loss * tokens, sum of tokens)``: one micro-batch's token-summed loss and its
    kept tokens (per-replica vectors from DataParallel are summed)."""
    weighted = loss * tokens.to(loss.dtype)
    return weighted.sum(), tokens.detach().sum()


class TokenWindow:
    """The kept tokens of the optimizer step being accumulated, and the gradient scale."""

    def __init__(self) -> None:
        self.tokens: Tensor | None = None

    @property
    def active(self) -> bool:
        """Whether the micro-batches of this window were token-normalised."""
        return self.tokens is not None

    def add(self, tokens: Tensor) -> None:
        tokens = tokens.detach().to(torch.float64)
        self.tokens = tokens if self.tokens is None else self.tokens + tokens

    def reset(self) -> None:
        self.tokens = None

    def gradient_scale(self) -> float:
        """``world_size / N``, ``N`` the window's kept tokens over every process (1 when ``N``
        is 0: the gradients are then 0 anyway)."""
        assert self.tokens is not None
        total = float(distributed.all_reduce_sum(self.tokens))
        return distributed.world_size() / max(total, 1.0) if total > 0 else 1.0


def scale_gradients(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Multiply every gradient the optimizer will apply by ``factor``, in place."""
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            if parameter.grad is not None:
                parameter.grad.mul_(factor)


__all__ = ["TokenWindow", "scale_gradients", "token_sum"]
