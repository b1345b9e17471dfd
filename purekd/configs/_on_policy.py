r"""``OnPolicyConfig``: the student learns on its own samples (GKD, the sampled-token form).

Frozen, validated data; the stage that acts on it is :class:`purekd.combinators.OnPolicyStage`.

**Two temperatures, on purpose.** ``OnPolicyConfig.temperature`` is the *sampling* temperature
(with ``top_p`` / ``top_k``): it shapes the distribution the completions are drawn from.
``DistillationConfig.temperature`` is the *loss* temperature: it softens both models'
distributions inside the KD loss. They are independent. TRL's GKD trainer samples at its
``temperature`` (0.9 by default) and computes the loss at 1 without saying so; here each is set
where it acts, and neither silently takes the other's value.
"""

from __future__ import annotations

import math
from typing import Any

import attrs

from ._io import _ConfigIO, _field_error, immutable_config


def _unit_interval(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and 0.0 <= value <= 1.0):
        raise _field_error(instance, attribute, value,
                           "must be a number in [0, 1] (the share of batches on which the "
                           "student samples its own completions: 0 = off-policy, 1 = always)")


def _int_at_least(low: int):
    def validate(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise _field_error(instance, attribute, value, f"must be an int >= {low}")
    return validate


def _sampling_temperature(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value > 0):
        raise _field_error(instance, attribute, value,
                           "must be a number > 0 (the sampling temperature; for greedy "
                           "decoding use top_k=1). It is not the loss temperature, which is "
                           "DistillationConfig.temperature")


def _top_p(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise _field_error(instance, attribute, value, "must be in (0, 1] (1: no nucleus filter)")


def _token_ids(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    return tuple(value) if isinstance(value, list) else value


def _check_token_ids(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, tuple) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
        raise _field_error(instance, attribute, value,
                           "must be a list of token ids (ints >= 0); empty: the model's "
                           "generation_config.eos_token_id")


def _optional_token_id(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise _field_error(instance, attribute, value, "must be a token id (int >= 0) or None")


@attrs.frozen(kw_only=True)
class OnPolicyConfig(_ConfigIO):
    r"""On-policy distillation: completions of the batch's prompts are sampled, then distilled.

    Each batch, a draw :math:`u \sim U[0, 1)` from the stage's own generator (seeded with
    ``seed``; its state is part of the step's ``state_dict``, so a resumed run draws the same)
    decides: :math:`u < \lambda` (``lmbda``) — the student (the teacher with ``seq_kd``) samples a
    completion of every prompt and both models are scored on those sequences, the loss on the
    completion tokens only; otherwise the batch's own sequences are used as they are (off-policy).
    ``lmbda=1`` is always on-policy (``trl.DistillationTrainer``), ``lmbda=0`` never (the plain
    step exactly).

    * ``seq_kd``: the teacher samples instead of the student (sequence-level KD).
    * ``max_new_tokens``: at most this many sampled tokens per prompt.
    * ``temperature``, ``top_p``, ``top_k``: the **sampling** distribution (``top_k=0`` and
      ``top_p=1``: no filter). The loss has its own temperature,
      ``DistillationConfig.temperature`` (see the module docstring: TRL's trap).
    * ``stop_token_ids``: a sampled completion ends at (and includes) the first of these;
      empty: the sampling model's ``generation_config.eos_token_id``. The stop token is a
      completion token: the student learns where to stop.
    * ``pad_token_id``: the id written after a completion ends (never scored); ``None``: the
      model's ``generation_config.pad_token_id``, else the first stop token.
    * ``seed``: the seed of the generator behind the ``lmbda`` draws and the per-batch
      sampling seeds.
    """

    lmbda: float = attrs.field(default=1.0, validator=_unit_interval)
    seq_kd: bool = attrs.field(default=False)
    max_new_tokens: int = attrs.field(default=128, validator=_int_at_least(1))
    temperature: float = attrs.field(default=1.0, validator=_sampling_temperature)
    top_p: float = attrs.field(default=1.0, validator=_top_p)
    top_k: int = attrs.field(default=0, validator=_int_at_least(0))
    stop_token_ids: tuple[int, ...] = attrs.field(default=(), converter=_token_ids,
                                                  validator=_check_token_ids)
    pad_token_id: int | None = attrs.field(default=None, validator=_optional_token_id)
    seed: int = attrs.field(default=0, validator=_int_at_least(0))

    @seq_kd.validator
    def _check_seq_kd(self, attribute: attrs.Attribute, value: Any) -> None:
        if not isinstance(value, bool):
            raise _field_error(self, attribute, value, "must be True or False")


immutable_config(OnPolicyConfig)

__all__ = ["OnPolicyConfig"]
