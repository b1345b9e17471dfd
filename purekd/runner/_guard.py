"""Detect a non-finite loss without a host synchronisation on every step."""

from __future__ import annotations

import torch
from torch import Tensor


class NonFiniteLossError(FloatingPointError, ValueError):
    """The loss became NaN or infinite; the message names the global step and the term."""


class NonFiniteGuard:
    """Remembers, on the device, the first global step at which the loss or a term was not finite.

    :meth:`observe` queues a check (no synchronisation); :meth:`raise_if_tripped` synchronises
    once and raises :class:`NonFiniteLossError`. The runner calls the latter before every
    optimizer step when ``check_every_step`` is on (the default on CPU, where it is free), and
    otherwise at logging steps and always before writing a checkpoint, so no checkpoint ever
    holds weights updated from a non-finite loss.
    """

    def __init__(self) -> None:
        self._first: list[tuple[int, Tensor, tuple[str, ...], Tensor]] = []

    def observe(self, global_step: int, loss: Tensor, terms: dict[str, Tensor]) -> None:
        names = ("total loss", *terms)
        values = torch.stack([loss.detach().float().reshape(()),
                              *[t.detach().float().reshape(()) for t in terms.values()]])
        self._first.append((global_step, torch.isfinite(values).all(), names, values))

    def raise_if_tripped(self) -> None:
        if not self._first:
            return
        flags = torch.stack([ok for _, ok, _, _ in self._first]).cpu().tolist()
        for ok, (step, _, names, values) in zip(flags, self._first, strict=True):
            if not ok:
                values_host = values.cpu().tolist()
                bad = [n for n, v in zip(names, values_host, strict=True) if not torch.isfinite(torch.tensor(v))]
                culprit = next((n for n in bad if n != "total loss"), bad[0])
                self._first.clear()
                raise NonFiniteLossError(
                    f"the loss is not finite at global step {step} (term {culprit!r}; values "
                    + ", ".join(f"{n}={v}" for n, v in zip(names, values_host, strict=True))
                    + "). Training stopped; checkpoints already written are intact. Lower the "
                    "learning rate, clip gradients (max_grad_norm) or check the inputs."
                )
        self._first.clear()


_NONE = 2**62  # "no non-finite step" in the all-reduced minimum


class AllRanksNonFiniteGuard(NonFiniteGuard):
    """:class:`NonFiniteGuard` for a run over several processes: every rank raises at the same
    check, whichever rank saw the non-finite loss — a rank raising alone would leave the others
    waiting in the next collective (a gradient reduction, a clip) until the process group times
    out. :meth:`raise_if_tripped` is a collective (one all-reduce): every rank must call it at
    the same points, as the runner does."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.device = torch.device(device)

    def raise_if_tripped(self) -> None:
        import torch.distributed as dist

        local = _NONE
        if self._first:
            flags = torch.stack([ok for _, ok, _, _ in self._first]).cpu().tolist()
            local = next((step for ok, (step, *_rest) in zip(flags, self._first, strict=True)
                          if not ok), _NONE)
        first = torch.tensor([local], dtype=torch.int64, device=self.device)
        dist.all_reduce(first, op=dist.ReduceOp.MIN)
        step = int(first.item())
        if step == _NONE:
            self._first.clear()
            return
        if local == step:
            super().raise_if_tripped()  # this rank has the values: its message names them
        self._first.clear()
        raise NonFiniteLossError(
            f"the loss is not finite at global step {step} on another rank (that rank's error "
            "names the term). Training stopped; checkpoints already written are intact. Lower "
            "the learning rate, clip gradients (max_grad_norm) or check the inputs.")


__all__ = ["AllRanksNonFiniteGuard", "NonFiniteGuard", "NonFiniteLossError"]
