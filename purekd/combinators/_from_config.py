"""``make_step``: the step a TextBrewer configuration describes, built from the combinators.

The one combinator module that reads the facade's data — :mod:`purekd.configs` and
:mod:`purekd.presets`, which import only layers 1–2 — to turn names into terms, once, when the
step is built."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, cast

import attrs
import torch
from torch import nn

from purekd import losses, presets
from purekd._compiling import compiled
from purekd.configs import DistillationConfig, IntermediateMatch
from purekd.stages import check_same_tokenizer
from purekd.terms import (
    Term,
    cross_tokenizer_kd,
    custom_match,
    hard_label,
    intermediate_match,
    logits_kd,
    sampled_token_kd,
    token_kd,
)
from purekd.terms._cross_tokenizer_kd import by_spans, forbid_spans

from ._models import Adaptor, mean_of_teachers, models_stage, single_teacher
from ._objective import objective, scheduled_after_start
from ._on_policy import OnPolicyStage
from ._step import Step
from ._tasks import TaskRouter, route_by_task


@attrs.frozen(kw_only=True)
class CustomMatch:
    """A match between the outputs of two submodules (TextBrewer's ``custom_matches``).

    ``loss(proj_func(output_S), output_T, inputs_mask_S, inputs_mask_T)`` weighted by
    ``weight``; ``proj_group`` holds optimizer options for ``proj_func``'s parameters.
    """

    module_T: nn.Module
    module_S: nn.Module
    weight: float
    loss: Callable[..., torch.Tensor]
    proj_func: Callable[[Any], Any] | None = None
    proj_group: dict[str, Any] = attrs.field(factory=dict)

    @classmethod
    def coerce(cls, value: Any, index: int) -> CustomMatch:
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            try:
                return cls(**{k: v for k, v in value.items() if not (k == "proj_group" and v is None)})
            except TypeError as error:
                raise ValueError(f"custom_matches[{index}]: {error}") from None
        if hasattr(value, "module_T") and hasattr(value, "module_S"):  # TextBrewer's CustomMatch
            fields = {k: getattr(value, k) for k in ("module_T", "module_S", "proj_func")}
            weight, loss = value.weight, value.loss  # TextBrewer stores these as 1-tuples
            return cls(**fields, weight=weight[0] if isinstance(weight, tuple) else weight,
                       loss=loss[0] if isinstance(loss, tuple) else loss,
                       proj_group=dict(getattr(value, "proj_group", None) or {}))
        raise TypeError(f"custom_matches[{index}] must be a CustomMatch or a dict, "
                        f"got {type(value).__name__}")


def _config(distill_config: DistillationConfig | Mapping[str, Any] | None) -> DistillationConfig:
    if distill_config is None:
        return DistillationConfig()
    if isinstance(distill_config, Mapping):
        return DistillationConfig.from_dict(distill_config)
    if isinstance(distill_config, DistillationConfig):
        return distill_config
    raise TypeError("distill_config must be a purekd.DistillationConfig or a dict, got "
                    f"{type(distill_config).__name__}")


def _weight(base: float, scheduler: str) -> Any:
    if scheduler == "none":
        return base
    return scheduled_after_start(base, presets.WEIGHT_SCHEDULER[scheduler])


def _device_of(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def build_projections(config: DistillationConfig,
                      device: torch.device | str = "cpu") -> list[nn.Module | None]:
    """One entry per intermediate match: its projection module, or ``None``.

    Built in match order, so the random initialisation matches TextBrewer's under one seed.
    """
    built: list[nn.Module | None] = []
    for match in config.intermediate_matches:
        if match.proj is None:
            built.append(None)
        else:
            kind, dim_in, dim_out = match.proj[:3]
            built.append(presets.PROJ_MAP[kind](dim_in, dim_out).to(device))
    return built


def _match_term(match: IntermediateMatch, projection: nn.Module | None) -> Term:
    layer = (lambda v: list(v) if isinstance(v, tuple) else v)  # noqa: E731
    return intermediate_match(
        match.feature, layer(match.layer_S), layer(match.layer_T),
        presets.MATCH_LOSS_MAP[match.loss], projection, weight=match.weight,
        loss_name=match.loss,
    )


def _terms(config: DistillationConfig, projections: Sequence[nn.Module | None],
           customs: Sequence[CustomMatch], vocabulary_map: Any = None) -> list[Term]:
    temperature_schedule: Callable[..., Any] = (
        presets.TEMPERATURE_SCHEDULER["constant"] if config.temperature_scheduler == "none"
        else presets.TEMPERATURE_SCHEDULER[config.temperature_scheduler])
    kd_weight = _weight(config.kd_loss_weight, config.kd_loss_weight_scheduler)
    name, params = config.kd_loss
    kd_loss = presets.KD_LOSS_MAP[name]
    if name in presets.SAMPLED_KD_LOSSES and kd_loss is losses.sampled_reverse_kl:  # on-policy
        terms = [sampled_token_kd(gamma=params.get("gamma", 0.0), temperature=config.temperature,
                                  weight=kd_weight)]
    elif name in presets.TOKEN_KD_LOSSES and kd_loss is losses.divergence(name):
        terms = [token_kd(name, temperature=config.temperature, params=params,
                          shared_vocab=config.shared_vocab,
                          shift_probability=config.probability_shift, weight=kd_weight)]
    else:  # TextBrewer's losses, and any registered under a name of its own
        terms = [logits_kd(kd_loss, config.temperature, temperature_schedule,
                           config.probability_shift, weight=kd_weight)]
    terms = [_cross_tokenizer(config, terms[0], vocabulary_map)]
    terms += [_match_term(m, p) for m, p in zip(config.intermediate_matches, projections, strict=True)]
    terms += [custom_match(i, c.loss, c.proj_func, weight=c.weight) for i, c in enumerate(customs)]
    terms.append(hard_label(weight=_weight(config.hard_label_weight,
                                           config.hard_label_weight_scheduler)))
    return terms


def _check_stops_matched(stage: OnPolicyStage, vocabulary_map: Any) -> None:
    """Warn where an end-of-text pair of the on-policy stage (the sampler's stop token and the
    other side's end token) is not a matched pair of GOLD's vocabulary map: GOLD then compares
    the stop probabilities only through the ULD part of the unmatched columns."""
    pairs = set(zip(vocabulary_map.matched_S.tolist(), vocabulary_map.matched_T.tolist(),
                    strict=True))
    # end_tokens maps the sampling side's stop id to the other side's end token
    ends = [(other, stop) if stage.config.seq_kd else (stop, other)
            for stop, other in stage.end_tokens.items()]
    missing = [pair for pair in ends if pair not in pairs]
    if missing:
        warnings.warn(
            f"kd_loss_type='gold' on-policy across tokenizers: the end-of-text pair(s) "
            f"(student id, teacher id) {missing} are not matched in the vocabulary map, so GOLD "
            f"compares the probability of stopping only through its ULD part (sorted, "
            f"unmatched); build the map after setting each tokenizer's eos_token to its stop "
            f"token (vocabulary_map pairs the two eos tokens; see docs/cross-tokenizer.md)",
            UserWarning, stacklevel=4)


def _cross_tokenizer(config: DistillationConfig, kd_term: Term, vocabulary_map: Any) -> Term:
    """The KD term for two tokenizers (issue 20): ``'gold'`` over the aligned spans; ``'uld'``
    over them when the batch has spans (else row against row); any other loss refuses a batch
    with spans. A vocabulary map is for ``'gold'`` only."""
    name, params = config.kd_loss
    if name == "gold" or (name == "uld" and vocabulary_map is None):
        cross = cross_tokenizer_kd(name, vocabulary_map=vocabulary_map, params=params,
                                   temperature=config.temperature, weight=kd_term.weight,
                                   name=kd_term.name)
        return cross if name == "gold" else by_spans(kd_term, cross)
    if vocabulary_map is not None:
        raise ValueError(f"make_step(vocabulary_map=...) with kd_loss_type={name!r}: the "
                         "vocabulary map is for kd_loss_type='gold' (docs/cross-tokenizer.md); "
                         "set it, or leave vocabulary_map out")
    return forbid_spans(kd_term, name)


def _on_policy_across(config: DistillationConfig, tokenizers: Sequence[Any] | None) -> bool:
    """Whether on-policy distillation runs across tokenizers: ``'gold'`` always (it needs
    ``tokenizers``, checked by the stage); ``'uld'`` when ``tokenizers`` are given and differ
    (with one tokenizer it compares row against row)."""
    name = config.kd_loss[0]
    if name == "gold":
        return True
    if name != "uld" or tokenizers is None or len(tokenizers) != 2:
        return False
    try:
        check_same_tokenizer(*tokenizers)
    except ValueError:
        return True
    return False


def make_step(
    distill_config: DistillationConfig | Mapping[str, Any] | None,
    model_T: Any,
    model_S: nn.Module,
    adaptor_T: Adaptor | Sequence[Adaptor] | Mapping[str, Adaptor],
    adaptor_S: Adaptor | Mapping[str, Adaptor],
    *,
    custom_matches: Sequence[Any] | None = None,
    compile: bool | Literal["auto"] = "auto",
    projections: Sequence[nn.Module | None] | None = None,
    sampler: Any = None,
    tokenizers: Sequence[Any] | None = None,
    vocabulary_map: Any = None,
) -> Step | TaskRouter:
    """The distillation step a :class:`~purekd.DistillationConfig` describes.

    ``step(batch, progress=p)`` returns ``StepOutput(loss, terms)`` where, in TextBrewer's order,

    ``loss = w_kd(p) * kd_loss + sum_m w_m * match_m + sum_c w_c * custom_c + w_hl(p) * hard_label_loss``

    and ``terms`` holds the unweighted values under TextBrewer's names (``'kd_loss'``,
    ``'{feature}_{loss}_{S}_{T}'``, ``'hard_label_loss'``). For the same configuration and
    outputs the loss equals TextBrewer's ``GeneralDistiller.train_on_batch``.

    * ``model_T``: a module; a list of modules (their logits averaged, as MultiTeacherDistiller);
      or a dict of modules by task, with ``adaptor_T`` / ``adaptor_S`` dicts by task too — then
      the result routes ``step(batch, task, ...)`` (MultiTaskDistiller).
    * ``custom_matches``: TextBrewer custom matches (``CustomMatch`` or dicts) on submodules.
    * ``compile``: run the loss path under ``torch.compile`` (eager fallback on failure):
      ``True``, ``False``, or ``"auto"`` (the default) — measure the first few steps eagerly and
      compile only if the loss path dominates the step (see :class:`~purekd.combinators.Compiled`).
    * ``projections``: reuse existing projection modules, one entry per match (``None`` for none).

    Token-level ``kd_loss_type`` (``'forward_kl'``, ``['jsd', {'beta': b}]``, ...) builds the
    KD term with :func:`~purekd.terms.token_kd`, which reads dense ``logits``, a fused output
    layer (``lm_hidden``, ``lm_weight``, ``lm_bias``) or a top-k teacher (``topk_ids``,
    ``topk_logprobs``, ``topk_mask``) from the adaptors. With token normalisation
    (``config.normalises_by_tokens``) ``StepOutput.tokens`` holds the batch's kept tokens.

    ``step.projections`` holds the projection modules: add their parameters to the optimizer
    (or just optimise ``step.parameters()``, which covers student and projections).

    On-policy (``config.on_policy`` set): an :class:`~purekd.combinators.OnPolicyStage` goes in
    front of the models stage; batches carry ``'prompts'`` (see its docstring). ``sampler``:
    a :class:`~purekd.stages.Sampler` in place of ``transformers``' ``generate``;
    ``tokenizers``: ``(tokenizer_T, tokenizer_S)``, checked to be one vocabulary — except with
    ``kd_loss_type='gold'`` (and ``'uld'`` when they differ): then on-policy runs across
    tokenizers, each rollout decoded and re-tokenised for the teacher
    (:func:`~purekd.stages.retokenise_rollout`; docs/cross-tokenizer.md).

    Cross-tokenizer (a teacher and a student with different tokenizers, batches
    ``{'student': ..., 'teacher': ..., 'spans': AlignedSpans}`` from
    :class:`~purekd.stages.CrossTokenizerCollator`): ``kd_loss_type='gold'`` with
    ``vocabulary_map`` (:func:`~purekd.stages.vocabulary_map` of the two tokenizers), or
    ``'uld'``, builds :func:`~purekd.terms.cross_tokenizer_kd`; see docs/cross-tokenizer.md.
    """
    config = _config(distill_config)
    device = _device_of(model_S)
    projs = list(projections) if projections is not None else build_projections(config, device)
    if len(projs) != len(config.intermediate_matches):
        raise ValueError(f"{len(projs)} projections for {len(config.intermediate_matches)} "
                         "intermediate matches: give one entry (a module or None) per match")
    customs = [CustomMatch.coerce(c, i) for i, c in enumerate(custom_matches or ())]
    for custom in customs:
        if isinstance(custom.proj_func, nn.Module):
            custom.proj_func.to(device)
    matched = [(p, dict(m.proj[3]) if m.proj else {})
               for p, m in zip(projs, config.intermediate_matches, strict=True) if p is not None]
    matched += [(c.proj_func, dict(c.proj_group)) for c in customs
                if isinstance(c.proj_func, nn.Module)]
    trainable = nn.ModuleList([module for module, _ in matched])
    loss = compiled(cast(Callable[..., Any], objective(
        *_terms(config, projs, customs, vocabulary_map), count_tokens=config.normalises_by_tokens)),
        enabled=compile)

    def one(teacher_model: Any, teacher_adaptor: Any, student_adaptor: Adaptor) -> Step:
        if isinstance(teacher_model, (list, tuple)):
            if customs:
                raise ValueError("custom_matches need a single teacher")
            teacher = mean_of_teachers(teacher_model, teacher_adaptor)
        else:
            teacher = single_teacher(teacher_model, teacher_adaptor, [c.module_T for c in customs])
        outputs: Any = models_stage(teacher, model_S, student_adaptor,
                                    capture_S=[c.module_S for c in customs])
        if config.on_policy is not None:
            if isinstance(teacher_model, (list, tuple)):
                raise ValueError("DistillationConfig(on_policy=...) with a list of teachers: "
                                 "on-policy distillation scores the rollouts with one teacher; "
                                 "give a single teacher")
            if teacher_model is None:
                raise ValueError(
                    "DistillationConfig(on_policy=...) with model_T=None (a teacher read from a "
                    "top-k teacher cache): the teacher must score every newly sampled "
                    "sequence, which no cache holds; give the teacher model, or train "
                    "off-policy from the cache (on_policy=None)")
            # only the sampled-token loss reads the sampler's log-probabilities; without them
            # generate keeps no (B, V) scores per sampled position
            outputs = OnPolicyStage(config.on_policy, outputs, teacher=teacher_model,
                                    sampler=sampler, tokenizers=tokenizers,
                                    shared_vocab=config.shared_vocab,
                                    cross_tokenizer=_on_policy_across(config, tokenizers),
                                    logprobs=config.kd_loss[0] in presets.SAMPLED_KD_LOSSES)
            if config.kd_loss[0] == "gold" and vocabulary_map is not None:
                _check_stops_matched(outputs, vocabulary_map)
        elif sampler is not None or tokenizers is not None:
            raise ValueError("make_step(sampler=..., tokenizers=...) are for on-policy "
                             "distillation: set DistillationConfig(on_policy=OnPolicyConfig())")
        step = Step(student=model_S, outputs=outputs, loss=loss, projections=trainable,
                    teachers={"teacher": teacher_model})
        step.projection_options = [m.proj[3] if m.proj else None
                                   for m in config.intermediate_matches]
        step.projection_groups = [options for _, options in matched]
        return step

    if isinstance(model_T, Mapping):
        for name, table in (("adaptor_T", adaptor_T), ("adaptor_S", adaptor_S)):
            if not isinstance(table, Mapping) or set(table) != set(model_T):
                raise ValueError(
                    f"a dict of teachers (tasks {sorted(model_T)}) needs {name} as a dict with the "
                    f"same tasks, got {sorted(table) if isinstance(table, Mapping) else type(table).__name__}")
        return route_by_task({task: one(model_T[task], adaptor_T[task], adaptor_S[task])  # type: ignore[index]
                              for task in model_T})
    if isinstance(adaptor_S, Mapping):
        raise TypeError("adaptor_S is a dict but model_T is not: per-task adaptors need a dict "
                        "of teachers by task")
    return one(model_T, adaptor_T, adaptor_S)


__all__ = ["CustomMatch", "build_projections", "make_step"]
