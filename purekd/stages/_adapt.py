"""``adapt``: call the user's adaptor and normalise what it returns into :class:`Adapted`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from purekd.presets import ADAPTOR_KEYS

Tensors = tuple[Tensor, ...]


class AdaptorError(ValueError, TypeError):
    """An adaptor returned something that is not a valid adaptor dict."""


class _AdaptedFields(NamedTuple):
    """The fields of :class:`Adapted`."""


    logits: Tensors = ()
    logits_mask: Tensors = ()
    labels: Tensors = ()
    losses: Tensors = ()
    hidden: Tensors = ()
    attention: Tensors = ()
    inputs_mask: Tensor | None = None
    captured: tuple[Any, ...] = ()


def _tupled(field: str, value: Any) -> Any:
    """A tuple-valued field given as one tensor or a list, as a tuple."""
    if isinstance(value, Tensor):
        return (value,)
    if isinstance(value, list):
        return tuple(value)
    if value is None:
        return ()
    if not isinstance(value, tuple):
        raise TypeError(f"Adapted({field}=...): expected a tensor or a tuple/list of tensors, "
                        f"got {type(value).__name__}")
    return value


class Adapted(_AdaptedFields):
    """A model's outputs in the adaptor format, normalised.

    Every list-valued key is a tuple (empty when the adaptor did not return it); a single tensor
    became a 1-tuple (also when built by hand: ``Adapted(logits=tensor)`` holds ``(tensor,)``).
    ``inputs_mask`` is a tensor or ``None``. ``captured`` holds the outputs of custom-match
    modules, captured during the forward pass, in match order.

    Shapes: ``logits[i]`` ``(B, C)`` or ``(B, L, C)``; ``logits_mask[i]`` ``(B, L)``;
    ``labels[i]`` ``(B,)`` or ``(B, L)``; ``losses[i]`` any (reduced with ``.mean()``);
    ``hidden[k]`` ``(B, L, D)``; ``attention[k]`` ``(B, H, L, L)`` or ``(B, L, L)``;
    ``inputs_mask`` ``(B, L)``.
    """

    __slots__ = ()

    def __new__(cls, *args: Any, **kwargs: Any) -> Adapted:
        fields = _AdaptedFields.__new__(cls, *args, **kwargs)
        defaults = cls._field_defaults
        values = [_tupled(name, value) if defaults.get(name) == () else value
                  for name, value in zip(cls._fields, fields, strict=True)]
        return tuple.__new__(cls, values)

    def _replace(self, **changes: Any) -> Adapted:
        unknown = set(changes) - set(self._fields)
        if unknown:
            raise ValueError(f"Adapted has no field(s) {sorted(unknown)}; fields: {self._fields}")
        return type(self)(*[changes.get(name, value)
                            for name, value in zip(self._fields, self, strict=True)])


_LIST_KEYS = ("logits", "logits_mask", "labels", "losses", "hidden", "attention")


def _as_tuple(key: str, value: Any) -> Tensors:
    if isinstance(value, Tensor):
        return (value,)
    if isinstance(value, (list, tuple)):
        return tuple(value)
    raise AdaptorError(
        f"adaptor key {key!r}: expected a tensor or a list of tensors, got {type(value).__name__}"
    )


def normalise(result: Any) -> Adapted:
    """Validate an adaptor's dict and turn it into :class:`Adapted`.

    Raises :class:`AdaptorError` (a ``ValueError``) for a non-dict, an unknown key, an empty
    dict, or ``logits`` / ``logits_mask`` / ``labels`` lists whose lengths do not line up.
    """
    if not isinstance(result, Mapping):
        raise AdaptorError(
            f"an adaptor must return a dict with keys among {ADAPTOR_KEYS}, "
            f"got {type(result).__name__}"
        )
    unknown = [key for key in result if key not in ADAPTOR_KEYS]
    if unknown:
        raise AdaptorError(
            f"the adaptor returned the unknown key {unknown[0]!r}; valid keys: {ADAPTOR_KEYS}"
        )
    if not result:
        raise AdaptorError(
            f"the adaptor returned an empty dict: return at least one of {ADAPTOR_KEYS}"
        )
    fields: dict[str, Any] = {k: _as_tuple(k, result[k]) for k in _LIST_KEYS if k in result}
    if "inputs_mask" in result:
        mask = result["inputs_mask"]
        if mask is not None and not isinstance(mask, Tensor):
            raise AdaptorError(
                f"adaptor key 'inputs_mask': expected a tensor (B, L), got {type(mask).__name__}"
            )
        fields["inputs_mask"] = mask
    adapted = Adapted(**fields)
    n = len(adapted.logits)
    if adapted.logits_mask and len(adapted.logits_mask) not in (1, n):
        raise AdaptorError(
            f"the adaptor returned {n} logits but {len(adapted.logits_mask)} logits_mask: give one "
            "mask per logits tensor, or a single mask for all"
        )
    if adapted.labels and len(adapted.labels) != n:
        raise AdaptorError(
            f"the adaptor returned {n} logits but {len(adapted.labels)} labels: give one labels "
            "tensor per logits tensor"
        )
    return adapted


def adapt(adaptor: Callable[[Any, Any], Any], batch: Any, outputs: Any) -> Adapted:
    """``normalise(adaptor(batch, outputs))``: the user's adaptor, validated and normalised."""
    return normalise(adaptor(batch, outputs))


def detach(adapted: Adapted) -> Adapted:
    """The same outputs with every tensor detached (for teacher outputs)."""

    def off(values: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(v.detach() if isinstance(v, Tensor) else v for v in values)

    mask = adapted.inputs_mask
    fields: dict[str, Any] = {k: off(getattr(adapted, k)) for k in _LIST_KEYS}
    return Adapted(
        **fields,
        inputs_mask=mask.detach() if isinstance(mask, Tensor) else mask,
        captured=off(adapted.captured),
    )


def mean_logits(teachers: list[Adapted]) -> Adapted:
    """One teacher whose logits are the element-wise mean of several teachers' logits.

    ``mean_k logits_k[i]`` for each logits index ``i``, summed in teacher order and divided by
    the count (as TextBrewer's MultiTeacherDistiller); the other keys come from the first teacher.
    """
    if not teachers:
        raise ValueError("mean_logits needs at least one teacher's outputs")
    counts = {len(t.logits) for t in teachers}
    if len(counts) != 1:
        raise ValueError(f"teachers returned different numbers of logits: {[len(t.logits) for t in teachers]}")
    for index, group in enumerate(zip(*(t.logits for t in teachers), strict=True)):
        shapes = [tuple(logits.shape) for logits in group]
        if len(set(shapes)) != 1:
            raise ValueError(
                f"the teachers' logits[{index}] differ in shape: "
                + ", ".join(f"teacher {k}: {s}" for k, s in enumerate(shapes))
                + "; teachers are averaged entry by entry, so their logits must have one shape")
    averaged = tuple(
        sum(group, torch.zeros((), dtype=group[0].dtype, device=group[0].device)) / len(group)
        for group in zip(*(t.logits for t in teachers), strict=True)
    )
    return teachers[0]._replace(logits=averaged)


__all__ = ["Adapted", "AdaptorError", "adapt", "detach", "mean_logits", "normalise"]
