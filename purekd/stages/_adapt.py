"""``adapt``: call the user's adaptor and normalise what it returns into :class:`Adapted`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from purekd._keys import ADAPTOR_KEYS
from purekd._sharded import whole

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
    lm_hidden: Tensor | None = None
    lm_weight: Tensor | None = None
    lm_bias: Tensor | None = None
    topk_ids: Tensor | None = None
    topk_logprobs: Tensor | None = None
    topk_mask: Tensor | None = None
    topk_next_logprobs: Tensor | None = None
    topk_vocab_size: int | None = None
    next_ids: Tensor | None = None
    sampler_logprobs: Tensor | None = None
    spans: Any = None  # cross-tokenizer: the batch's AlignedSpans (set by the models stage)

    @property
    def row_outputs(self) -> int:
        """How many row-wise outputs ``logits_mask`` and ``labels`` refer to: the number of
        ``logits``, or 1 for language-model outputs without logits."""
        if self.logits:
            return len(self.logits)
        return int(self.lm_hidden is not None or self.topk_ids is not None)


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

    Language-model outputs (single tensors or ``None``), for distillation without full logits:

    * ``lm_hidden`` ``(*rows, H)``: the final hidden states, the output layer's input;
      ``lm_weight`` ``(V, H)`` and ``lm_bias`` ``(V,)`` (or ``None``): the output layer, so that
      ``logits = lm_hidden @ lm_weight.T + lm_bias``. The KD term then computes the loss with
      :func:`~purekd.losses.fused_linear_distill`, never holding ``(rows, V)`` logits.
    * ``topk_ids`` ``(*rows, k)`` int64 and ``topk_logprobs`` ``(*rows, k)``: a teacher's ``k``
      most likely tokens per row and their log-probabilities (log-softmax at temperature 1), e.g.
      from a top-k cache; ``topk_mask`` ``rows`` 0/1: the rows the teacher has (rows past a
      sample's length are 0). Rows are the same positions as the student's rows.
      From a cross-tokenizer cache (rows are the teacher's own positions, aligned to the
      student's by the batch's spans): ``topk_next_logprobs`` ``rows``, the log-probability of
      the token that follows each row in the teacher's sequence, and ``topk_vocab_size`` (an
      int, the teacher's vocabulary ``V_T``).

    ``logits_mask[0]`` and ``labels[0]`` refer to these rows when there are no ``logits``.

    Set by the on-policy stage (:class:`~purekd.combinators.OnPolicyStage`), never by an
    adaptor: ``next_ids`` ``rows`` int64, the sampled token each row predicts, and
    ``sampler_logprobs`` ``rows`` (or ``None``), the sampler's log-probability of it.

    Set by the models stage on the student's outputs, never by an adaptor: ``spans``, the
    batch's :class:`~purekd.losses.AlignedSpans` (a cross-tokenizer batch, ``'spans'`` beside
    ``'teacher'`` and ``'student'``; see docs/cross-tokenizer.md), else ``None``.
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
_TENSOR_KEYS = ("lm_hidden", "lm_weight", "lm_bias", "topk_ids", "topk_logprobs", "topk_mask",
                "topk_next_logprobs")


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
    for key in _TENSOR_KEYS:
        value = result.get(key)
        if value is not None and not isinstance(value, Tensor):
            raise AdaptorError(
                f"adaptor key {key!r}: expected one tensor, got {type(value).__name__}")
        # an output layer sharded by FSDP2, read after its forward: gathered whole (its gradient
        # is reduce-scattered back to the shards, as FSDP2 does for the other parameters)
        if value is not None and key in ("lm_weight", "lm_bias"):
            value = whole(value)
        fields[key] = value
    if result.get("topk_vocab_size") is not None:
        fields["topk_vocab_size"] = _vocab_size(result["topk_vocab_size"])
    adapted = Adapted(**fields)
    _check_language_model_keys(adapted)
    n = adapted.row_outputs
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


def _vocab_size(value: Any) -> int:
    """``topk_vocab_size`` as an int (a Python int or a 0-dim integer tensor)."""
    if isinstance(value, Tensor) and value.dim() == 0 and not value.is_floating_point():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AdaptorError(f"adaptor key 'topk_vocab_size': expected a positive int (the "
                           f"teacher's vocabulary), got {value!r}")
    return value


def _check_language_model_keys(adapted: Adapted) -> None:
    """``lm_weight`` goes with ``lm_hidden``, ``topk_logprobs`` with ``topk_ids``, and
    language-model outputs come instead of ``logits``."""
    pairs = (("lm_hidden", "lm_weight"), ("topk_ids", "topk_logprobs"))
    for first, second in pairs:
        if (getattr(adapted, first) is None) != (getattr(adapted, second) is None):
            given, missing = ((first, second) if getattr(adapted, first) is not None
                              else (second, first))
            raise AdaptorError(f"the adaptor returned {given!r} without {missing!r}: return both")
    if adapted.lm_bias is not None and adapted.lm_hidden is None:
        raise AdaptorError("the adaptor returned 'lm_bias' without 'lm_hidden' and 'lm_weight'")
    for key in ("topk_mask", "topk_next_logprobs", "topk_vocab_size"):
        if getattr(adapted, key) is not None and adapted.topk_ids is None:
            raise AdaptorError(f"the adaptor returned {key!r} without 'topk_ids' and "
                               "'topk_logprobs'")
    forms = [key for key in ("lm_hidden", "topk_ids") if getattr(adapted, key) is not None]
    if len(forms) > 1 or (forms and adapted.logits):
        keys = (["logits"] if adapted.logits else []) + forms
        raise AdaptorError(
            f"the adaptor returned {keys}: a model's distribution comes as one of 'logits', "
            "'lm_hidden' + 'lm_weight' (fused output layer) or 'topk_ids' + 'topk_logprobs' "
            "(a teacher's top-k); return only one of them")


def adapt(adaptor: Callable[[Any, Any], Any], batch: Any, outputs: Any) -> Adapted:
    """``normalise(adaptor(batch, outputs))``: the user's adaptor, validated and normalised."""
    return normalise(adaptor(batch, outputs))


def detach(adapted: Adapted) -> Adapted:
    """The same outputs with every tensor detached (for teacher outputs)."""

    def off(values: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(v.detach() if isinstance(v, Tensor) else v for v in values)

    mask = adapted.inputs_mask
    fields: dict[str, Any] = {k: off(getattr(adapted, k)) for k in _LIST_KEYS}
    singles: dict[str, Any] = {k: off((getattr(adapted, k),))[0] for k in _TENSOR_KEYS}
    return Adapted(
        **fields,
        **singles,
        inputs_mask=mask.detach() if isinstance(mask, Tensor) else mask,
        captured=off(adapted.captured),
        topk_vocab_size=adapted.topk_vocab_size,
    )


def _same_rows(mask_S: Tensor, mask_T: Tensor) -> bool:
    if mask_S is mask_T or mask_S.shape != mask_T.shape or mask_S.device != mask_T.device:
        return mask_S is mask_T
    try:
        return torch.equal(mask_S != 0, mask_T != 0)
    except RuntimeError:  # inside a vmap: no data-dependent answer; keep both masks
        return False


def share_equal_masks(adapted_S: Adapted, adapted_T: Adapted) -> Adapted:
    """The teacher's outputs with each ``logits_mask`` that keeps the same rows as the
    student's replaced by the student's own tensor.

    Two distinct masks pair the k-th kept rows of each side (TextBrewer's rule), which copies the
    teacher's rows; two masks that keep the same rows (e.g. the next-token masks both
    ``hf_adaptor(causal=True)`` adaptors compute from one batch) pair each row with itself, so
    one mask serves both and nothing is copied. The result is the same either way.
    """
    masks_S, masks_T = adapted_S.logits_mask, adapted_T.logits_mask
    if not masks_S or len(masks_S) != len(masks_T):
        return adapted_T
    shared = tuple(m_S if _same_rows(m_S, m_T) else m_T
                   for m_S, m_T in zip(masks_S, masks_T, strict=True))
    if all(a is b for a, b in zip(shared, masks_T, strict=True)):
        return adapted_T
    return adapted_T._replace(logits_mask=shared)


def mean_logits(teachers: list[Adapted]) -> Adapted:
    """One teacher whose logits are the element-wise mean of several teachers' logits.

    ``mean_k logits_k[i]`` for each logits index ``i``, summed in teacher order and divided by
    the count (as TextBrewer's MultiTeacherDistiller); the other keys come from the first teacher.
    """
    if not teachers:
        raise ValueError("mean_logits needs at least one teacher's outputs")
    for index, teacher in enumerate(teachers):
        if teacher.lm_hidden is not None or teacher.topk_ids is not None:
            form = "'lm_hidden'" if teacher.lm_hidden is not None else "'topk_ids'"
            raise ValueError(
                f"teacher {index}'s adaptor returned {form}: several teachers are averaged by "
                "their logits, so each must return 'logits' (a fused output layer or a top-k "
                "cache serves a single teacher)")
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


__all__ = ["Adapted", "AdaptorError", "adapt", "detach", "mean_logits", "normalise",
           "share_equal_masks"]
