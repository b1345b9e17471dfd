"""Token-correct normalisation: a token-level loss over several micro-batches.

Averaging each micro-batch's per-token mean and then averaging those means again (what a plain
``loss / accumulation`` does) weights a token in a short micro-batch more than one in a long
micro-batch — the Hugging Face 2024 gradient-accumulation bug. The loss of an optimizer step must
instead be the sum over every kept token of the step, divided by how many there are:

.. math::

    \\mathcal{L} = \\frac{\\sum_m \\mathcal{L}_m\\, n_m}{\\sum_m n_m}

where micro-batch ``m`` has mean loss :math:`\\mathcal{L}_m` over its :math:`n_m` kept tokens
(``StepOutput.loss`` and ``StepOutput.tokens``), and the sum runs over every micro-batch of the
optimizer step on every process. It equals the mean loss of one batch holding all those tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from purekd._masked import safe_divide

from ._objective import StepOutput


def token_share(loss: Tensor, tokens: Tensor, total_tokens: Tensor | float) -> Tensor:
    """One micro-batch's share of the optimizer step's token-normalised loss:
    ``loss * tokens / total_tokens`` (0 when ``total_tokens`` is 0).

    ``loss`` is the micro-batch's mean over its ``tokens`` kept tokens; ``total_tokens`` the
    kept tokens of the whole optimizer step (all micro-batches, all processes). Summing the
    shares of every micro-batch gives :func:`token_normalised`.
    """
    total = torch.as_tensor(total_tokens, dtype=loss.dtype, device=loss.device)
    return safe_divide(loss * tokens.to(loss.dtype), total)


def token_normalised(outputs: Sequence[StepOutput]) -> Tensor:
    """``sum_m loss_m * tokens_m / sum_m tokens_m`` over the step outputs of one optimizer step.

    Every output must carry ``tokens`` (a token-normalised step). The result equals the loss of
    one batch holding every micro-batch's tokens; its gradient, the gradient of that batch.
    """
    if not outputs:
        raise ValueError("token_normalised needs at least one StepOutput")
    missing = [i for i, out in enumerate(outputs) if out.tokens is None]
    if missing:
        raise ValueError(
            f"token_normalised: outputs {missing} have tokens=None (a per-batch normalised step); "
            "build the step with DistillationConfig(loss_normalisation='tokens')")
    counts = [out.tokens for out in outputs if out.tokens is not None]
    total = torch.stack([c.to(outputs[0].loss.dtype) for c in counts]).sum()
    shares = [token_share(out.loss, count, total) for out, count in zip(outputs, counts, strict=True)]
    return torch.stack(shares).sum()


__all__ = ["token_normalised", "token_share"]
