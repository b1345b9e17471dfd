"""``DistillationConfig`` and ``IntermediateMatch``: what to distil and how. Frozen,
validated data; names of losses, schedules and projections are checked against
:mod:`purekd.presets`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from purekd import presets

from ._io import (
    _boolean,
    _ConfigIO,
    _field_error,
    _number,
    _positive,
    _tuple_if_list,
    immutable_config,
)
from ._on_policy import OnPolicyConfig

TEMPERATURE_RANGE = (1e-2, 1e3)


def _temperature(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """A KD temperature that leaves a usable gradient: below ``1e-2`` the softened
    distributions are one-hot and the loss (~1/T) overflows in half precision; above ``1e3`` the
    gradient (~1/T^2, no T^2 factor as in TextBrewer) is below Adam's epsilon."""
    _positive(instance, attribute, value)
    low, high = TEMPERATURE_RANGE
    if not low <= value <= high:
        raise _field_error(instance, attribute, value,
                           f"must be in [{low:g}, {high:g}]: below, softmax(z/T) is one-hot and "
                           "the loss overflows in half precision; above, the gradient (~1/T^2) "
                           "vanishes. Typical values are 1 to 20")


def _in_map(preset: presets.PresetMap, allow_none: bool = False):
    def validate(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if allow_none and value == "none":
            return
        try:
            preset[value]
        except ValueError as error:
            hint = " or 'none'" if allow_none else ""
            raise _field_error(instance, attribute, value, f"{error}{hint}") from None

    return validate


def _kd_loss_type(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    try:
        presets.kd_loss_spec(value, f"{type(instance).__name__}.{attribute.name}")
    except presets.UnknownNameError as error:
        raise _field_error(instance, attribute, value, str(error)) from None


_NORMALISATIONS = ("auto", "batch", "tokens")


def _check_projection(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    usage = "write 'proj': [kind, dim_S, dim_T] or [kind, dim_S, dim_T, {optimizer group options}]"
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) not in (3, 4):
        raise _field_error(instance, attribute, value, usage)
    kind, dim_in, dim_out, *rest = value
    try:
        presets.PROJ_MAP[kind]
    except ValueError as error:
        raise _field_error(instance, attribute, value, str(error)) from None
    for dim in (dim_in, dim_out):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise _field_error(instance, attribute, value, f"widths must be ints >= 1; {usage}")
    if rest and not isinstance(rest[0], Mapping):
        raise _field_error(instance, attribute, value, f"the 4th element must be a dict; {usage}")


def _projection(value: Any) -> Any:
    if isinstance(value, (list, tuple)) and len(value) == 3:
        return (*value, {})
    return _tuple_if_list(value)


def _layer(value: Any) -> Any:
    return _tuple_if_list(value)


@attrs.frozen(kw_only=True)
class IntermediateMatch(_ConfigIO):
    """One intermediate-feature match: ``loss(proj(S.feature[layer_S]), T.feature[layer_T])``.

    ``layer_T`` / ``layer_S`` index the adaptor's ``feature`` list (pairs of indices for
    ``fsp``/``gram``/``mmd``/``nst``); ``proj`` is ``(kind, dim_S, dim_T, group_options)`` with
    ``kind`` in :data:`~purekd.presets.PROJ_MAP`, or ``None``.
    """

    layer_T: int | tuple[int, int] = attrs.field(converter=_layer)
    layer_S: int | tuple[int, int] = attrs.field(converter=_layer)
    weight: float = attrs.field(validator=_number)
    loss: str = attrs.field(validator=_in_map(presets.MATCH_LOSS_MAP))
    feature: str = attrs.field()
    proj: tuple[Any, ...] | None = attrs.field(default=None, converter=_projection,
                                               validator=_check_projection)

    @feature.validator
    def _check_feature(self, attribute: attrs.Attribute, value: Any) -> None:
        if value not in presets.FEATURES:
            raise _field_error(self, attribute, value, f"must be one of {presets.FEATURES}")

    def __attrs_post_init__(self) -> None:
        presets.check_layer_spec(self.loss, self.layer_T, "IntermediateMatch.layer_T")
        presets.check_layer_spec(self.loss, self.layer_S, "IntermediateMatch.layer_S")


def _matches(value: Any) -> tuple[IntermediateMatch, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, Mapping)) or not isinstance(value, Sequence):
        raise TypeError(
            f"DistillationConfig.intermediate_matches must be a list of dicts, got {type(value).__name__}"
        )
    matches = []
    for index, item in enumerate(value):
        if isinstance(item, IntermediateMatch):
            matches.append(item)
            continue
        if not isinstance(item, Mapping):
            raise TypeError(
                f"DistillationConfig.intermediate_matches[{index}] must be a dict, got {type(item).__name__}"
            )
        try:
            matches.append(IntermediateMatch.from_dict(item))
        except (ValueError, TypeError) as error:
            raise type(error)(f"DistillationConfig.intermediate_matches[{index}]: {error}") from None
    return tuple(matches)


# -- on_policy (issue 19): the field's converter and validator --------------------------------
def _on_policy(value: Any) -> Any:
    if isinstance(value, Mapping):
        try:
            return OnPolicyConfig.from_dict(value)
        except (ValueError, TypeError) as error:
            raise type(error)(f"DistillationConfig.on_policy: {error}") from None
    return value


def _check_on_policy(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and not isinstance(value, OnPolicyConfig):
        raise TypeError(f"DistillationConfig.on_policy={value!r}: give None, a "
                        "purekd.OnPolicyConfig or a dict of its fields")
    name = presets.kd_loss_spec(instance.kd_loss_type)[0]
    if name in presets.SAMPLED_KD_LOSSES and instance.temperature_scheduler not in ("none",
                                                                                "constant"):
        raise ValueError(
            f"DistillationConfig.temperature_scheduler={instance.temperature_scheduler!r} with "
            f"kd_loss_type={name!r}: the sampled-token loss takes a constant temperature; set "
            "temperature_scheduler='none'")
    if name in presets.SAMPLED_KD_LOSSES and (value is None or value.lmbda != 1):
        lmbda = None if value is None else value.lmbda
        raise ValueError(
            f"DistillationConfig(kd_loss_type={name!r}) with on_policy="
            f"{'None' if value is None else f'OnPolicyConfig(lmbda={lmbda})'}: the sampled-token "
            "loss estimates KL(p_S || p_T) from sequences the sampler drew, so every batch must "
            "be sampled; set on_policy=OnPolicyConfig(lmbda=1.0), or use a full-distribution "
            "loss (e.g. 'reverse_kl') for mixed or off-policy batches")
    if value is not None and instance.is_caching_logits:
        raise ValueError(
            "DistillationConfig(is_caching_logits=True, on_policy=...): cached teacher logits "
            "belong to the batch's own sequences, and on-policy batches are new sequences the "
            "teacher must score each step; set is_caching_logits=False")


@attrs.frozen
class DistillationConfig(_ConfigIO):
    r"""What to distil and how; defines the total loss

    .. math:: \mathcal{L} = w_{KD}\,\mathcal{L}_{KD} + w_{hl}\sum_i \operatorname{mean}(\text{losses}_i)
              + \sum_m w_m \mathcal{L}_m

    ``temperature_scheduler``: ``'none'``, ``'constant'``, ``['flsw', beta, gamma]`` or
    ``['cwsm', beta]``. Weight schedulers: ``'none'``, ``'linear_decay'``, ``'linear_growth'``;
    as in TextBrewer, a scheduled weight is the fixed weight at the first step and the
    schedule's value at the progress reached after that.

    Beyond TextBrewer (token-level distillation of language models):

    * ``kd_loss_type`` also takes every token-level divergence registered in
      :mod:`purekd.losses` (:data:`~purekd.presets.TOKEN_KD_LOSSES`: the built-ins and any
      added with :func:`~purekd.losses.register_divergence`; the table in docs/losses.md), with
      parameters as ``['jsd', {'beta': 0.9}]`` (or ``['jsd', 0.9]``), ``['forward_kl',
      {'tail': True}]`` (top-k teacher). They work on logits, on fused output layers and on a top-k
      teacher (see :func:`~purekd.terms.token_kd`); their temperature is constant.
    * ``shared_vocab``: teacher and student vocabularies of different sizes (padded output
      layers) are compared on their first ``min(V_S, V_T)`` entries; without it a mismatch
      raises before training, naming both sizes. With ``on_policy`` (where it also applies to
      ``'sampled_reverse_kl'``, which reads only the sampled tokens' log-probabilities) it
      says the two models share one tokenizer, and the sampling model's output layer must be
      no larger than the other's (checked when the step is built).

    * ``loss_normalisation``: ``'batch'`` — each micro-batch's mean, averaged over
      micro-batches (TextBrewer); ``'tokens'`` — the optimizer step's loss is normalised by
      its kept tokens over every micro-batch and process (``StepOutput.tokens``); ``'auto'``
      (default) — ``'tokens'`` for the token-level divergences and the sampled-token loss,
      ``'batch'`` for ``'ce'``,
      ``'mse'`` and losses added with ``register_new('kd_loss', ...)`` (TextBrewer's
      per-batch functions).
    * ``on_policy``: an :class:`~purekd.OnPolicyConfig` (or a dict of its fields): completions
      of the batch's prompts are sampled and distilled (see ``docs/on-policy.md``); with it,
      ``kd_loss_type='sampled_reverse_kl'`` (``['sampled_reverse_kl', {'gamma': 0.9}]``) is the
      sampled-token form, which needs ``lmbda=1``.
    * ``kd_loss_type='gold'`` (``['gold', {'loss': 'jsd', 'beta': 0.5, 'matched_weight': w,
      'unmatched_weight': u, 'top_k': k}]``) and ``'uld'`` on a cross-tokenizer batch (a teacher
      and a student with different tokenizers, ``'spans'`` in the batch): the losses over the
      aligned spans, token-normalised over the spans (docs/cross-tokenizer.md).
    """

    temperature: float = attrs.field(default=4, validator=_temperature)
    temperature_scheduler: str | tuple[Any, ...] = attrs.field(
        default="none", converter=_tuple_if_list,
        validator=_in_map(presets.TEMPERATURE_SCHEDULER, allow_none=True))
    hard_label_weight: float = attrs.field(default=0, validator=_number)
    hard_label_weight_scheduler: str = attrs.field(
        default="none", validator=_in_map(presets.WEIGHT_SCHEDULER, allow_none=True))
    kd_loss_type: str | tuple[Any, ...] = attrs.field(default="ce", converter=_tuple_if_list,
                                                      validator=_kd_loss_type)
    kd_loss_weight: float = attrs.field(default=1, validator=_number)
    kd_loss_weight_scheduler: str = attrs.field(
        default="none", validator=_in_map(presets.WEIGHT_SCHEDULER, allow_none=True))
    probability_shift: bool = attrs.field(default=False, validator=_boolean)
    intermediate_matches: tuple[IntermediateMatch, ...] = attrs.field(
        factory=tuple, converter=_matches)
    is_caching_logits: bool = attrs.field(default=False, validator=_boolean)
    shared_vocab: bool = attrs.field(default=False, validator=_boolean, kw_only=True)
    loss_normalisation: str = attrs.field(default="auto", kw_only=True)
    on_policy: OnPolicyConfig | None = attrs.field(default=None, kw_only=True,
                                                   converter=_on_policy,
                                                   validator=_check_on_policy)

    @loss_normalisation.validator
    def _check_normalisation(self, attribute: attrs.Attribute, value: Any) -> None:
        if value not in _NORMALISATIONS:
            raise _field_error(self, attribute, value, f"must be one of {list(_NORMALISATIONS)}")

    def __attrs_post_init__(self) -> None:
        name, _ = self.kd_loss
        token_level = name in presets.TOKEN_KD_LOSSES
        constant_only = token_level or name in presets.CROSS_TOKENIZER_KD_LOSSES
        if constant_only and self.temperature_scheduler not in ("none", "constant"):
            raise ValueError(
                f"DistillationConfig.temperature_scheduler={self.temperature_scheduler!r} with "
                f"kd_loss_type={name!r}: the token-level divergences take a constant "
                "temperature; set temperature_scheduler='none' (or use kd_loss_type='ce')")
        if self.shared_vocab and not (token_level or name in presets.SAMPLED_KD_LOSSES):
            raise ValueError(
                f"DistillationConfig.shared_vocab=True with kd_loss_type={name!r}: the shared "
                f"vocabulary applies to the token-level divergences {sorted(presets.TOKEN_KD_LOSSES)} "
                f"and the sampled-token loss {sorted(presets.SAMPLED_KD_LOSSES)}; choose one of "
                "them or leave shared_vocab=False")


    @property
    def kd_loss(self) -> tuple[str, dict[str, Any]]:
        """``(name, parameters)`` of ``kd_loss_type``: ``('jsd', {'beta': 0.9})``."""
        return presets.kd_loss_spec(self.kd_loss_type)

    @property
    def normalises_by_tokens(self) -> bool:
        """Whether the loss is normalised by the optimizer step's kept tokens
        (``loss_normalisation``, with ``'auto'`` resolved)."""
        if self.loss_normalisation == "auto":
            name = self.kd_loss[0]
            return (name in presets.TOKEN_KD_LOSSES or name in presets.SAMPLED_KD_LOSSES
                    or name in presets.CROSS_TOKENIZER_KD_LOSSES)
        return self.loss_normalisation == "tokens"


for _cls in (IntermediateMatch, DistillationConfig):
    immutable_config(_cls)

__all__ = ["DistillationConfig", "IntermediateMatch"]
