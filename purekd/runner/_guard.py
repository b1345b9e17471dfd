"""Detect a non-finite loss or gradient without a host synchronisation on every step, and
never let non-finite weights reach a checkpoint."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn


class NonFiniteLossError(FloatingPointError, ValueError):
    """The loss, a gradient or the weights became NaN or infinite; the message names the global
    step and the term or the parameter."""


def sums_finite(tensors: Iterable[Tensor]) -> Tensor:
    """``(n,)`` bool on the device, no synchronisation: whether each tensor's float32 sum is
    finite — one cheap reduction per tensor instead of :func:`torch.isfinite`'s full-size mask.

    A NaN or ±inf element makes the sum NaN or ±inf, so a ``True`` flag proves every element
    finite. A ``False`` flag may also be an overflow of the sum (``|sum| > 3.4e38`` with finite
    elements): :func:`non_finite_names` gives the exact verdict on the rare path.
    """
    return torch.isfinite(torch.stack([t.detach().sum(dtype=torch.float32) for t in tensors]))


def non_finite_names(named: Sequence[tuple[str, Tensor]]) -> list[str]:
    """The names whose tensors hold a NaN or ±inf element (one synchronisation)."""
    flags = torch.stack([torch.isfinite(t).all() for _, t in named]).cpu().tolist()
    return [name for (name, _), ok in zip(named, flags, strict=True) if not ok]


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
        self._gradients: list[tuple[int, tuple[tuple[str, Tensor], ...], Tensor]] = []

    def observe_gradients(self, global_step: int, named: Sequence[tuple[str, Tensor]]) -> None:
        """Queue a check that every gradient in ``named`` (``(name, parameter)`` pairs) is
        finite, before the optimizer step of ``global_step`` (no synchronisation). Call
        :meth:`raise_if_tripped` before the gradients change, as the runner does: where a cheap
        flag trips, the exact check reads the gradients kept here (a sum that overflowed with
        finite elements is not an error)."""
        present = [(name, p.grad) for name, p in named if p.grad is not None]
        if present:
            self._gradients.append((global_step, tuple(present), sums_finite(g for _, g in present)))

    @staticmethod
    def check_weights(global_step: int, module: nn.Module) -> None:
        """Raise :class:`NonFiniteLossError` naming the first non-finite floating-point weight
        or buffer of ``module`` (one synchronisation); called before a checkpoint is written."""
        named = [(k, v) for k, v in module.state_dict().items() if v.is_floating_point()]
        bad = non_finite_names(named) if named else []
        if bad:
            raise NonFiniteLossError(
                f"the weights are not finite after global step {global_step} (first: {bad[0]!r}"
                f"{f', and {len(bad) - 1} more' if len(bad) > 1 else ''}). Training stopped "
                f"before writing the checkpoint of step {global_step}; every checkpoint written "
                "before was checked finite. Lower the learning rate, clip gradients "
                "(max_grad_norm) or check the inputs."
            )

    def observe(self, global_step: int, loss: Tensor, terms: dict[str, Tensor]) -> None:
        names = ("total loss", *terms)
        values = torch.stack([loss.detach().float().reshape(()),
                              *[t.detach().float().reshape(()) for t in terms.values()]])
        self._first.append((global_step, torch.isfinite(values).all(), names, values))

    def raise_if_tripped(self) -> None:
        self._raise_for_loss()
        self._raise_for_gradients()

    def _raise_for_gradients(self) -> None:
        if not self._gradients:
            return
        records, self._gradients = self._gradients, []
        verdicts = torch.stack([flags.all() for *_, flags in records]).cpu().tolist()
        for ok, (step, present, _) in zip(verdicts, records, strict=True):
            bad = [] if ok else non_finite_names(present)
            if bad:
                raise NonFiniteLossError(
                    f"the gradient is not finite at global step {step} (parameter {bad[0]!r}"
                    f"{f', and {len(bad) - 1} more' if len(bad) > 1 else ''}) although the loss "
                    "is finite. Training stopped before that optimizer step: the weights and "
                    "every checkpoint written are those of earlier steps, all finite. Check the "
                    "model's backward (e.g. sqrt or log at 0, a division by 0) or clip the inputs."
                )

    def _raise_for_loss(self) -> None:
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
                    + "). Training stopped; no checkpoint was written from this step on, and "
                    "every checkpoint written before was checked finite. Lower the learning "
                    "rate, clip gradients (max_grad_norm) or check the inputs."
                )
        self._first.clear()


_NONE = 2**62  # "no non-finite step" in the all-reduced minimum


def _local(tensor: Tensor) -> Tensor:
    """A sharded tensor's local shard (no communication); any other tensor as it is."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


class AllRanksNonFiniteGuard(NonFiniteGuard):
    """:class:`NonFiniteGuard` for a run over several processes, with sharded (FSDP) weights:
    every rank raises at the same check, whichever rank saw the non-finite loss, gradient shard
    or weight shard — a rank raising alone would leave the others waiting in their next
    collective until the process group times out. Each rank checks its own shards;
    :meth:`raise_if_tripped` and :meth:`check_weights` are collectives (one all-reduce): every
    rank calls them at the same points, as the runner does. The rank that saw the problem
    names the term or parameter; the others name the step and say it was another rank."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.device = torch.device(device)

    def _first_everywhere(self, values: list[int]) -> list[int]:
        import torch.distributed as dist

        from purekd._collectives import all_reduce

        first = torch.tensor(values, dtype=torch.int64, device=self.device)
        all_reduce(first, op=dist.ReduceOp.MIN)
        return [int(v) for v in first.cpu().tolist()]

    def observe_gradients(self, global_step: int, named: Sequence[tuple[str, Tensor]]) -> None:
        present = [(name, _local(p.grad)) for name, p in named if p.grad is not None]
        if present:
            self._gradients.append((global_step, tuple(present), sums_finite(g for _, g in present)))

    def check_weights(self, global_step: int, module: nn.Module) -> None:  # type: ignore[override]
        named = [(k, _local(v)) for k, v in module.state_dict().items() if v.is_floating_point()]
        bad = non_finite_names(named) if named else []
        (anywhere,) = self._first_everywhere([global_step if bad else _NONE])
        if anywhere == _NONE:
            return
        where = f"first: {bad[0]!r}" if bad else "on another rank"
        raise NonFiniteLossError(
            f"the weights are not finite after global step {global_step} ({where}). Training "
            f"stopped before writing the checkpoint of step {global_step}; every checkpoint "
            "written before was checked finite. Lower the learning rate, clip gradients "
            "(max_grad_norm) or check the inputs.")

    def raise_if_tripped(self) -> None:
        loss = _NONE
        if self._first:
            flags = torch.stack([ok for _, ok, _, _ in self._first]).cpu().tolist()
            loss = next((step for ok, (step, *_rest) in zip(flags, self._first, strict=True)
                         if not ok), _NONE)
        gradient = _NONE
        if self._gradients:
            verdicts = torch.stack([flags.all() for *_, flags in self._gradients]).cpu().tolist()
            gradient = next((step for ok, (step, present, _) in
                             zip(verdicts, self._gradients, strict=True)
                             if not ok and non_finite_names(present)), _NONE)
        first_loss, first_gradient = self._first_everywhere([loss, gradient])
        if first_loss != _NONE:
            if loss == first_loss:
                self._raise_for_loss()  # this rank has the values: its message names them
            self._first.clear()
            self._gradients.clear()
            raise NonFiniteLossError(
                f"the loss is not finite at global step {first_loss} on another rank (that "
                "rank's error names the term). Training stopped; no checkpoint was written from "
                "this step on. Lower the learning rate, clip gradients (max_grad_norm) or check "
                "the inputs.")
        self._first.clear()
        if first_gradient != _NONE:
            if gradient == first_gradient:
                self._raise_for_gradients()
            self._gradients.clear()
            raise NonFiniteLossError(
                f"the gradient is not finite at global step {first_gradient} on another rank "
                "(that rank's error names the parameter) although the loss is finite. Training "
                "stopped before that optimizer step.")
        self._gradients.clear()


__all__ = ["AllRanksNonFiniteGuard", "NonFiniteGuard", "NonFiniteLossError"]
