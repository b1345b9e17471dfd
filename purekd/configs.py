"""``TrainingConfig``, ``DistillationConfig`` and ``IntermediateMatch``: frozen, validated data.

Argument names and defaults are TextBrewer 0.2.1's. Differences, all deliberate:

* every value is checked when the config is built; a bad one raises ``ValueError`` (or
  ``TypeError``) naming the field, the value and what is valid;
* configs are immutable (change one with ``config.replace(temperature=8)`` or
  :func:`attrs.evolve`; assigning a field raises :class:`ImmutableConfigError` saying so);
  training never writes into them — TextBrewer overwrote ``kd_loss_weight`` as it trained, here weights are schedules;
* ``device`` defaults to CUDA when available, else CPU; ``fp16`` means ``torch.autocast`` with a
  gradient scaler (no Apex), and ``bf16`` is offered too; the output directory is created when
  training starts, not when the config is built.

``from_dict`` / ``from_json_file`` reject unknown keys; ``to_dict`` / ``to_json`` round-trip.
``TrainingConfig`` and ``DistillationConfig`` take positional arguments in TextBrewer's order
(``DistillationConfig(8)`` is ``temperature=8``); fields TextBrewer does not have (``bf16``) are
keyword-only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import attrs
import cattrs
import torch

from purekd import presets

C = TypeVar("C", bound="_ConfigIO")


def _field_error(instance: Any, attribute: attrs.Attribute, value: Any, problem: str) -> ValueError:
    return ValueError(f"{type(instance).__name__}.{attribute.name}={value!r}: {problem}")


def _positive(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise _field_error(instance, attribute, value, "must be a number > 0")


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


def _positive_int(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _field_error(instance, attribute, value, "must be an int >= 1")


def _optional_positive_int(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None:
        _positive_int(instance, attribute, value)


def _number(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _field_error(instance, attribute, value, "must be a number")


def _boolean(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, bool):
        raise _field_error(instance, attribute, value, "must be True or False")


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


def _tuple_if_list(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class _ConfigIO:
    """``from_dict`` / ``from_json_file`` / ``to_dict`` / ``to_json`` for the attrs configs."""

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        """Build from a dict; an unknown key or a bad value raises ``ValueError`` naming it."""
        if not isinstance(data, Mapping):
            raise TypeError(f"{cls.__name__}.from_dict needs a dict, got {type(data).__name__}")
        known = {a.name for a in attrs.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"{cls.__name__}: unknown key(s) {unknown}; valid keys: {sorted(known)}"
            )
        return _converter.structure(dict(data), cls)

    @classmethod
    def from_json_file(cls: type[C], path: str | os.PathLike[str]) -> C:
        """Build from a JSON file holding one object."""
        with open(path, encoding="utf-8") as file:
            return cls.from_dict(json.load(file))

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (lists, dicts, numbers, strings) that ``from_dict`` turns back into an
        equal config."""
        return dict(_converter.unstructure(self))

    def to_json(self, **json_kwargs: Any) -> str:
        """``to_dict`` as JSON text."""
        return json.dumps(self.to_dict(), **json_kwargs)

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes`` applied and validated (:func:`attrs.evolve`); configs are
        immutable, so this is how one is changed: ``config.replace(temperature=8)``."""
        known = {a.name for a in attrs.fields(type(self))}  # type: ignore[arg-type]
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"{type(self).__name__}.replace: unknown field(s) {unknown}; "
                             f"valid fields: {sorted(known)}")
        return attrs.evolve(self, **changes)  # type: ignore[misc]


class ImmutableConfigError(attrs.exceptions.FrozenInstanceError):
    """Assigning to (or deleting) a field of a config: configs are immutable."""

    def __init__(self, message: str):
        super().__init__()
        self.args = (message,)

    def __str__(self) -> str:
        return str(self.args[0])


def _refuse_setattr(self: Any, name: str, value: Any) -> None:
    raise ImmutableConfigError(
        f"configs are immutable: use attrs.evolve(config, {name}={value!r}) or "
        f"config.replace({name}={value!r}), which return a new, validated "
        f"{type(self).__name__}")


def _refuse_delattr(self: Any, name: str) -> None:
    raise ImmutableConfigError(
        f"configs are immutable: {type(self).__name__}.{name} cannot be deleted; build a new "
        f"config with config.replace({name}=...)")


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

    * ``kd_loss_type`` also takes the divergences of :data:`~purekd.presets.TOKEN_KD_LOSSES`
      (``'forward_kl'``, ``'reverse_kl'``, ``'jsd'``, ``'scaled_jsd'``, ``'skew_forward_kl'``,
      ``'skew_reverse_kl'``, ``'tvd'``), with parameters as ``['jsd', {'beta': 0.9}]`` (or
      ``['jsd', 0.9]``), ``['skew_forward_kl', {'alpha': 0.1}]``, ``['forward_kl', {'tail':
      True}]`` (top-k teacher). They work on logits, on fused output layers and on a top-k
      teacher (see :func:`~purekd.terms.token_kd`); their temperature is constant.
    * ``shared_vocab``: teacher and student vocabularies of different sizes (padded output
      layers) are compared on their first ``min(V_S, V_T)`` entries; without it a mismatch
      raises before training, naming both sizes.
    * ``loss_normalisation``: ``'batch'`` — each micro-batch's mean, averaged over
      micro-batches (TextBrewer); ``'tokens'`` — the optimizer step's loss is normalised by
      its kept tokens over every micro-batch and process (``StepOutput.tokens``); ``'auto'``
      (default) — ``'tokens'`` for the token-level divergences, ``'batch'`` for ``'ce'``,
      ``'mse'`` and registered losses.
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

    @loss_normalisation.validator
    def _check_normalisation(self, attribute: attrs.Attribute, value: Any) -> None:
        if value not in _NORMALISATIONS:
            raise _field_error(self, attribute, value, f"must be one of {list(_NORMALISATIONS)}")

    def __attrs_post_init__(self) -> None:
        name, _ = self.kd_loss
        token_level = name in presets.TOKEN_KD_LOSSES
        if token_level and self.temperature_scheduler not in ("none", "constant"):
            raise ValueError(
                f"DistillationConfig.temperature_scheduler={self.temperature_scheduler!r} with "
                f"kd_loss_type={name!r}: the token-level divergences take a constant "
                "temperature; set temperature_scheduler='none' (or use kd_loss_type='ce')")
        if self.shared_vocab and not token_level:
            raise ValueError(
                f"DistillationConfig.shared_vocab=True with kd_loss_type={name!r}: the shared "
                f"vocabulary applies to the token-level divergences {sorted(presets.TOKEN_KD_LOSSES)}; "
                "choose one of them or leave shared_vocab=False")

    @property
    def kd_loss(self) -> tuple[str, dict[str, Any]]:
        """``(name, parameters)`` of ``kd_loss_type``: ``('jsd', {'beta': 0.9})``."""
        return presets.kd_loss_spec(self.kd_loss_type)

    @property
    def normalises_by_tokens(self) -> bool:
        """Whether the loss is normalised by the optimizer step's kept tokens
        (``loss_normalisation``, with ``'auto'`` resolved)."""
        if self.loss_normalisation == "auto":
            return self.kd_loss[0] in presets.TOKEN_KD_LOSSES
        return self.loss_normalisation == "tokens"


_FP16_LEVELS = ("O0", "O1", "O2", "O3")
TEACHER_PLACEMENTS = ("shard", "replicate", "none")


def _check_blocks(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None or callable(value):
        return
    usage = ("give None (the default policy), a list of module class names such as "
             "['LlamaDecoderLayer'], or a function module -> bool")
    if not isinstance(value, tuple) or not value:
        raise _field_error(instance, attribute, value, usage)
    for name in value:
        if not isinstance(name, str) or not name:
            raise _field_error(instance, attribute, value, f"{name!r} is not a class name; {usage}")


def _blocks(value: Any) -> Any:
    if isinstance(value, str):  # one class name
        return (value,)
    return _tuple_if_list(value)


@attrs.frozen(kw_only=True)
class FSDPConfig(_ConfigIO):
    """Sharding with PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``) under torchrun.

    ``blocks`` chooses the modules sharded one by one (each is all-gathered for its own forward
    and backward, then freed): ``None`` takes, in a Hugging Face model, the layers of its
    ``nn.ModuleList`` whose class is named in the model's ``_no_split_modules``
    (``LlamaDecoderLayer``, ``BertLayer``, ``GPT2Block``, …); a tuple of class names takes the
    modules of those classes; a function ``module -> bool`` takes the modules it accepts (such
    a config does not go to JSON). The student, then the step holding it and the projections,
    are sharded on top, so every trained parameter is sharded.

    ``teacher``: ``"shard"`` (each teacher sharded by the same block policy, parameters freed
    again after every forward), ``"replicate"`` (each rank holds the whole teacher, left as
    given) or ``"none"`` (no teacher forward: the batches carry a ``teacher_cache``; calling a
    teacher raises). ``reshard_after_forward``: free the student's gathered blocks after the
    forward and gather them again for the backward (``True``, the least memory) or keep them
    until the backward (``False``, one all-gather fewer per block).
    """

    teacher: str = attrs.field(default="shard")
    blocks: tuple[str, ...] | Callable[[Any], bool] | None = attrs.field(
        default=None, converter=_blocks, validator=_check_blocks)
    reshard_after_forward: bool = attrs.field(default=True, validator=_boolean)

    @teacher.validator
    def _check_teacher(self, attribute: attrs.Attribute, value: Any) -> None:
        if value not in TEACHER_PLACEMENTS:
            raise _field_error(self, attribute, value,
                               f"must be one of {list(TEACHER_PLACEMENTS)}")


def _fsdp(value: Any) -> Any:
    if value is True:
        return FSDPConfig()
    if value is False:
        return None
    if isinstance(value, Mapping):
        try:
            return FSDPConfig.from_dict(value)
        except (ValueError, TypeError) as error:
            raise type(error)(f"TrainingConfig.fsdp: {error}") from None
    return value


def _check_fsdp(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and not isinstance(value, FSDPConfig):
        raise TypeError(f"TrainingConfig.fsdp={value!r}: give None, True, a dict of "
                        "FSDPConfig fields or a purekd.FSDPConfig")


@attrs.frozen
class TrainingConfig(_ConfigIO):
    """How to train: accumulation, checkpoints, logging, device, precision, parallelism.

    ``ckpt_frequency`` checkpoints per epoch, every ``ckpt_epoch_frequency`` epochs (epoch
    mode); every ``ckpt_steps`` optimizer steps with ``num_steps``. ``fp16`` / ``bf16``: mixed
    precision with ``torch.autocast`` (fp16 adds a gradient scaler); ``fp16_opt_level`` is
    accepted for compatibility and ignored. ``data_parallel`` wraps the step (student and
    projections) in ``torch.nn.DataParallel`` when more than one GPU is visible. ``local_rank`` >= 0 (or the ``LOCAL_RANK``
    environment variable set by torchrun) means DistributedDataParallel, unless ``fsdp`` is set:
    then the student, the projections and (by :attr:`FSDPConfig.teacher`) the teachers are
    sharded with FSDP2 instead (``True`` means ``FSDPConfig()``; with ``bf16`` the parameters
    are gathered in bfloat16 and gradients reduced in float32).
    """

    gradient_accumulation_steps: int = attrs.field(default=1, validator=_positive_int)
    ckpt_frequency: int = attrs.field(default=1, validator=_positive_int)
    ckpt_epoch_frequency: int = attrs.field(default=1, validator=_positive_int)
    ckpt_steps: int | None = attrs.field(default=None, validator=_optional_positive_int)
    log_dir: str | None = attrs.field(default=None)
    output_dir: str = attrs.field(default="./saved_models")
    device: str = attrs.field(factory=_default_device, converter=str)
    fp16: bool = attrs.field(default=False, validator=_boolean)
    fp16_opt_level: str = attrs.field(default="O1")
    data_parallel: bool = attrs.field(default=False, validator=_boolean)
    local_rank: int = attrs.field(default=-1)
    bf16: bool = attrs.field(default=False, validator=_boolean, kw_only=True)
    fsdp: FSDPConfig | None = attrs.field(default=None, converter=_fsdp, validator=_check_fsdp,
                                          kw_only=True)

    @device.validator
    def _check_device(self, attribute: attrs.Attribute, value: str) -> None:
        try:
            torch.device(value)
        except (RuntimeError, TypeError):
            raise _field_error(self, attribute, value,
                               "not a torch device; use e.g. 'cpu', 'cuda' or 'cuda:1'") from None

    @fp16_opt_level.validator
    def _check_level(self, attribute: attrs.Attribute, value: str) -> None:
        if value not in _FP16_LEVELS:
            raise _field_error(self, attribute, value, f"must be one of {list(_FP16_LEVELS)}")

    @local_rank.validator
    def _check_rank(self, attribute: attrs.Attribute, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < -1:
            raise _field_error(self, attribute, value, "must be -1 (not distributed) or a rank >= 0")

    def __attrs_post_init__(self) -> None:
        if self.fp16 and self.bf16:
            raise ValueError("TrainingConfig: fp16=True and bf16=True; choose one precision")
        if self.data_parallel and self.local_rank != -1:
            raise ValueError(
                "TrainingConfig: data_parallel=True with local_rank="
                f"{self.local_rank}; DataParallel and DistributedDataParallel exclude each other"
            )
        if self.fsdp is not None and self.data_parallel:
            raise ValueError("TrainingConfig: fsdp and data_parallel=True; FSDP shards across "
                             "torchrun processes, DataParallel replicates in one: choose one")
        if self.fsdp is not None and self.fp16:
            raise ValueError("TrainingConfig: fsdp with fp16=True is not supported (a gradient "
                             "scaler per rank could skip steps on some ranks only); use "
                             "bf16=True")
        for name in ("log_dir", "output_dir"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise TypeError(f"TrainingConfig.{name}={value!r}: must be a path string")


for _cls in (IntermediateMatch, DistillationConfig, TrainingConfig, FSDPConfig):
    _cls.__setattr__ = _refuse_setattr  # type: ignore[method-assign]
    _cls.__delattr__ = _refuse_delattr  # type: ignore[method-assign]

_converter = cattrs.Converter(forbid_extra_keys=True)
_converter.register_structure_hook(
    IntermediateMatch, lambda data, _: IntermediateMatch(**data)
    if isinstance(data, Mapping) else data)
for _cls in (DistillationConfig, TrainingConfig, FSDPConfig):
    _converter.register_structure_hook(_cls, lambda data, cls: cls(**data))
_converter.register_unstructure_hook(
    tuple, lambda value: [_converter.unstructure(v) for v in value])

__all__ = ["TEACHER_PLACEMENTS", "DistillationConfig", "FSDPConfig", "ImmutableConfigError",
           "IntermediateMatch", "TrainingConfig"]
