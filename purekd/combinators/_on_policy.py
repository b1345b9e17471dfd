"""``OnPolicyStage``: sample completions of the batch's prompts, then run the models stage on them.

It goes in front of a :func:`~purekd.combinators.models_stage` and has its signature,
``(batch, *, teacher_outputs=None, **args) -> Outputs``, so a :class:`~purekd.Step` (and with
it a plain loop, the Hugging Face Trainer integration and the distillers) takes it in the
models stage's place: ``Step(outputs=OnPolicyStage(config, models_stage(...)), loss=...)``;
:func:`~purekd.make_step` does this when ``DistillationConfig.on_policy`` is set.

The batch (a dict, as TRL's GKD collator gives it):

* ``'prompts'`` ``(B, P)`` token ids, left-padded, and ``'prompt_attention_mask'`` ``(B, P)``
  (all ones when absent) — required;
* ``'input_ids'``, ``'attention_mask'`` and optionally ``'labels'``: the batch's own sequences,
  used as they are on the off-policy batches (with probability ``1 - lmbda``); needed only when
  ``lmbda < 1``.

On an on-policy batch the sampling model (the student; the teacher with ``seq_kd``) draws a
completion of every prompt (:func:`~purekd.stages.rollout`), and the models stage runs on the
sampled sequences ``{'input_ids', 'attention_mask'}`` (plus ``'labels'`` — the sequence with
``-100`` on prompt and padding — when the batch had labels); both models' outputs are then
restricted to the completion rows (:func:`~purekd.stages.completion_rows`).

The ``lmbda`` draws and the per-batch sampling seeds come from the stage's generator, held by
``stage.state`` (a :class:`GeneratorState`, an ``nn.Module`` without parameters whose
``state_dict`` is the generator's state). A :class:`~purekd.Step` built on the stage registers
it (``step.outputs_state``), so the step's ``state_dict`` — which the runner saves and
restores — resumes the same rollouts.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from purekd.configs import OnPolicyConfig
from purekd.stages import (
    IGNORE_INDEX,
    Adapted,
    HFGenerateSampler,
    Rollout,
    Sampler,
    check_context,
    check_offsets_support,
    check_prompts,
    check_same_tokenizer,
    check_same_vocabulary,
    check_tokenizers_fit,
    completion_rows,
    prompts_for,
    retokenise_rollout,
    rollout,
    share_equal_masks,
    stop_pairs,
)

from ._models import ModelsStage, Outputs

PROMPT_KEYS = ("prompts", "prompt_attention_mask")
SEQUENCE_KEYS = ("input_ids", "attention_mask", "labels")
CROSS_KEYS = ("student", "teacher", "spans")
"""An on-policy batch across tokenizers: the off-policy part is a cross-tokenizer batch."""


_RANK_STRIDE = 0x9E3779B97F4A7C15
"""Added to the sampling seed once per process rank: every rank takes the same ``lmbda``
decision (one generator, one seed), but draws its own samples."""


def _rank() -> int:
    distributed = torch.distributed
    if distributed.is_available() and distributed.is_initialized():
        return int(distributed.get_rank())
    return 0


def _context(model: Any) -> int | None:
    """A model's context (``config.max_position_embeddings`` or ``n_positions``), if it has one."""
    config = getattr(model, "config", None)
    context = (getattr(config, "max_position_embeddings", None)
               or getattr(config, "n_positions", None))
    return context if isinstance(context, int) else None


def _is_split(batch: Mapping[str, Any]) -> bool:
    return "teacher" in batch or "student" in batch


class GeneratorState(nn.Module):
    """A ``torch.Generator`` as module state: ``state_dict()`` holds its state (a uint8 tensor,
    ``_extra_state``), ``load_state_dict`` restores it."""

    def __init__(self, seed: int):
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)

    def get_extra_state(self) -> Tensor:
        return self.generator.get_state()

    def set_extra_state(self, state: Any) -> None:
        self.generator.set_state(torch.as_tensor(state, dtype=torch.uint8).cpu())


class OnPolicyStage:
    """``stage(batch, *, teacher_outputs=None, **args) -> Outputs`` on sampled completions.

    ``config``: the :class:`~purekd.OnPolicyConfig`; ``models``: the
    :class:`~purekd.combinators.ModelsStage` it feeds (its ``student`` is the stage's);
    ``teacher``: the teacher model (it samples with ``seq_kd``; its context is checked);
    ``sampler``: a :class:`~purekd.stages.Sampler` (default: :class:`~purekd.stages.HFGenerateSampler`
    with the config's knobs); ``logprobs``: whether that default sampler returns its
    log-probabilities — only the sampled-token loss reads them (its importance ratio); without,
    ``generate`` keeps no ``(B, V)`` scores per sampled position (``make_step`` sets it from the
    loss); ``tokenizers``: ``(tokenizer_T, tokenizer_S)`` to check that both
    models share one vocabulary (:func:`~purekd.stages.check_same_tokenizer`). Without them the
    sizes of the two models' next-token distributions are compared at construction
    (:func:`~purekd.stages.check_same_vocabulary`; ``shared_vocab``: one tokenizer, output
    layers padded to different sizes).

    ``cross_tokenizer=True`` (a teacher and a student with different tokenizers, both given in
    ``tokenizers``): each rollout is decoded and re-tokenised for the teacher
    (:func:`~purekd.stages.retokenise_rollout`), and the models stage gets a cross-tokenizer
    batch ``{'student', 'teacher', 'spans'}`` (the KD loss is then ``'gold'`` or ``'uld'`` over
    the completion's aligned spans). The off-policy batches (``lmbda < 1``) are the batch's own
    cross-tokenizer parts (``'student'``, ``'teacher'``, ``'spans'``, from
    :class:`~purekd.stages.CrossTokenizerCollator`), beside ``'prompts'`` in the student's ids.
    With ``seq_kd`` the prompts are decoded and tokenised for the teacher
    (:func:`~purekd.stages.prompts_for`), the teacher samples, and the student's side is
    re-tokenised.

    ``stage.generator`` draws the ``lmbda`` decisions and the sampling seeds;
    ``stage.empty_rollouts`` counts the on-policy batches that had no completion token; the last
    rollout is kept in ``stage.last_rollout`` (for logging and tests). ``prompt_keys``: the batch
    keys it reads (:data:`PROMPT_KEYS`).
    """

    prompt_keys = PROMPT_KEYS

    def __init__(self, config: OnPolicyConfig, models: ModelsStage, *, teacher: Any = None,
                 sampler: Sampler | None = None, logprobs: bool = True,
                 tokenizers: Sequence[Any] | None = None, shared_vocab: bool = False,
                 cross_tokenizer: bool = False):
        if not isinstance(config, OnPolicyConfig):
            raise TypeError(f"OnPolicyStage(config=...): expected a purekd.OnPolicyConfig, got "
                            f"{type(config).__name__}")
        if not isinstance(models, ModelsStage):
            raise TypeError("OnPolicyStage(models=...): expected the models stage "
                            f"(combinators.models_stage(...)), got {type(models).__name__}")
        if config.seq_kd and teacher is None:
            raise ValueError("OnPolicyConfig(seq_kd=True): the teacher samples, so give "
                             "OnPolicyStage(teacher=model_T)")
        if teacher is not None and not callable(teacher):
            raise ValueError(
                f"on-policy: the teacher is a {type(teacher).__name__}, not a model: the teacher "
                "must score every newly sampled sequence, which no cache of its outputs holds; "
                "give the teacher model, or train off-policy (on_policy=None)")
        if tokenizers is not None and len(tokenizers) != 2:
            raise ValueError("OnPolicyStage(tokenizers=...): give (tokenizer_T, tokenizer_S)")
        if cross_tokenizer:
            if tokenizers is None:
                raise ValueError(
                    "on-policy across tokenizers: the student's samples are decoded and "
                    "re-tokenised for the teacher, which needs both tokenizers: give "
                    "make_step(..., tokenizers=(tokenizer_T, tokenizer_S)) (fast tokenizers)")
            check_offsets_support(tokenizers[1], "student")  # before any sampling
            check_offsets_support(tokenizers[0], "teacher")
            check_tokenizers_fit(tokenizers[0], tokenizers[1], teacher, models.student)
        else:
            if tokenizers is not None:
                check_same_tokenizer(*tokenizers)
            if teacher is not None:
                check_same_vocabulary(teacher, models.student, shared_vocab=shared_vocab,
                                      seq_kd=config.seq_kd)
        self.cross_tokenizer = cross_tokenizer
        self.tokenizers = tuple(tokenizers) if tokenizers is not None else None
        self.config = config
        self._models = models
        self._teacher = teacher
        self.sampler: Sampler = sampler if sampler is not None else HFGenerateSampler(
            max_new_tokens=config.max_new_tokens, temperature=config.temperature,
            top_p=config.top_p, top_k=config.top_k, stop_token_ids=config.stop_token_ids,
            pad_token_id=config.pad_token_id, logprobs=logprobs)
        self.state = GeneratorState(config.seed)
        self.end_tokens: dict[int, int] = {}
        if cross_tokenizer:
            self.end_tokens = self._stop_pairs(teacher)
        self.empty_rollouts = 0
        self.last_rollout: Rollout | None = None
        self.last_cross_rollout: Any = None

    def _stop_pairs(self, teacher: Any) -> dict[int, int]:
        """The sampling side's stop ids that are not text, each paired with the other side's
        end-of-text token (:func:`~purekd.stages.stop_pairs`); a warning, when built, where
        the other tokenizer has none: the stop cannot be taught."""
        assert self.tokenizers is not None
        tokenizer_T, tokenizer_S = self.tokenizers
        seq_kd = self.config.seq_kd
        sampler_model = teacher if seq_kd else self.student
        tokenizer_A, tokenizer_B = (tokenizer_T, tokenizer_S) if seq_kd else (tokenizer_S,
                                                                               tokenizer_T)
        stops = list(self.config.stop_token_ids)
        stops_and_pad = getattr(self.sampler, "stops_and_pad", None)
        if stops_and_pad is not None:
            stops += list(stops_and_pad(sampler_model)[0])
        if getattr(tokenizer_A, "eos_token_id", None) is not None:
            stops.append(int(tokenizer_A.eos_token_id))
        pairs, unpaired = stop_pairs(stops, tokenizer_A, tokenizer_B)
        if unpaired:
            sampler, other = ("teacher", "student") if seq_kd else ("student", "teacher")
            warnings.warn(
                f"on-policy across tokenizers: the {sampler}'s stop token(s) {unpaired} decode to "
                f"no text, and the {other}'s tokenizer ({type(tokenizer_B).__name__}) has no "
                f"eos_token to pair them with, so no end-of-text span scores where the "
                f"{sampler}'s samples stop: the student is not taught where to stop; set "
                f"tokenizer_{other[0].upper()}.eos_token to "
                f"the {other}'s end-of-text token (e.g. '<eos>' or '<end_of_turn>') before "
                f"building the step", UserWarning, stacklevel=4)
        return pairs

    # -- the step sees the stage as its models stage --------------------------------------
    @property
    def student(self) -> Any:
        """The student (the models stage's)."""
        return self._models.student

    @property
    def models(self) -> ModelsStage:
        return self._models

    @property
    def generator(self) -> torch.Generator:
        """The generator of the ``lmbda`` draws and the sampling seeds (``state.generator``)."""
        return self.state.generator

    # -- one batch ---------------------------------------------------------------------------
    def draw(self) -> tuple[bool, int]:
        """``(on_policy, seed)`` for the next batch, from ``generator``: one uniform draw
        compared with ``lmbda`` (the same on every process), then one sampling seed (both are
        drawn every batch), offset by the process's rank under ``torch.distributed`` so that
        ranks do not share their random draws."""
        u = float(torch.rand((), generator=self.generator))
        seed = int(torch.randint(0, 2**62, (), generator=self.generator))
        return u < self.config.lmbda, (seed + _RANK_STRIDE * _rank()) % 2**62

    def _pad_id(self, model: Any) -> int:
        stops_and_pad = getattr(self.sampler, "stops_and_pad", None)
        if stops_and_pad is not None:
            return int(stops_and_pad(model)[1])
        return self.config.pad_token_id if self.config.pad_token_id is not None else 0

    def _check_batch(self, batch: Any) -> None:
        if not isinstance(batch, Mapping):
            raise TypeError(f"on-policy: a batch must be a dict with 'prompts' (and "
                            f"'prompt_attention_mask'), got {type(batch).__name__}")
        if "teacher_cache" in batch:
            raise ValueError(
                "on-policy: the batch carries a 'teacher_cache' (a top-k teacher cache), but "
                "the teacher must score the newly sampled sequences, which no cache holds; "
                "drop the cache (run the teacher), or train off-policy (on_policy=None)")
        if _is_split(batch) and not self.cross_tokenizer:
            raise ValueError(
                "on-policy: the batch has 'teacher'/'student' parts; on-policy distillation "
                "feeds both models the same sampled token ids (one tokenizer), so give one "
                "batch with 'prompts' for both")
        if "prompts" not in batch:
            raise ValueError(
                f"on-policy: the batch has no 'prompts' (its keys: {sorted(batch)}); give the "
                "prompts to sample from as 'prompts' (B, P) token ids, left-padded, with "
                "'prompt_attention_mask' (B, P)")
        if self.cross_tokenizer:
            self._check_cross_batch(batch)
            return
        unknown = sorted(set(batch) - set(PROMPT_KEYS) - set(SEQUENCE_KEYS))
        if unknown:
            raise ValueError(
                f"on-policy: the batch has key(s) {unknown} that cannot follow the sampled "
                f"sequences (the models see only {list(SEQUENCE_KEYS)} of them); drop them, or "
                "pass constant model arguments to the step call (step(batch, **args))")
        if self.config.lmbda < 1 and "input_ids" not in batch:
            raise ValueError(
                f"on-policy: OnPolicyConfig(lmbda={self.config.lmbda}) uses the batch's own "
                "sequences on a share 1 - lmbda of the batches, but the batch has no "
                "'input_ids'; give the full sequences ('input_ids', 'attention_mask', "
                "'labels' with -100 on the prompt) beside 'prompts', or set lmbda=1.0")

    def _check_cross_batch(self, batch: Mapping[str, Any]) -> None:
        unknown = sorted(set(batch) - set(PROMPT_KEYS) - set(CROSS_KEYS))
        if unknown:
            raise ValueError(
                f"on-policy across tokenizers: the batch has key(s) {unknown}; it takes "
                f"{list(PROMPT_KEYS)} (the student's token ids) and, for the off-policy "
                f"batches, the cross-tokenizer parts {list(CROSS_KEYS)} "
                "(CrossTokenizerCollator)")
        missing = [k for k in CROSS_KEYS if k not in batch]
        if self.config.lmbda < 1 and missing:
            raise ValueError(
                f"on-policy across tokenizers: OnPolicyConfig(lmbda={self.config.lmbda}) uses "
                f"the batch's own texts on a share 1 - lmbda of the batches, but the batch has "
                f"no {missing}; give the CrossTokenizerCollator's output ('student', 'teacher', "
                "'spans') beside 'prompts', or set lmbda=1.0")

    def _cross(self, sampled: Rollout, batch: Mapping[str, Any], args: Mapping[str, Any]
               ) -> Outputs:
        assert self.tokenizers is not None
        tokenizer_T, tokenizer_S = self.tokenizers
        student_part = batch.get("student")
        labels = "labels" in batch or (isinstance(student_part, Mapping)
                                       and "labels" in student_part)
        cross = retokenise_rollout(sampled, tokenizer_S, tokenizer_T, labels=labels,
                                   context_T=_context(self._teacher),
                                   context_S=_context(self.student),
                                   sampled_by="teacher" if self.config.seq_kd else "student",
                                   end_tokens=self.end_tokens)
        self.last_cross_rollout = cross
        return self._models({"student": cross.student, "teacher": cross.teacher,
                             "spans": cross.spans}, **args)

    def __call__(self, batch: Any, *, teacher_outputs: Adapted | None = None,
                **args: Any) -> Outputs:
        if teacher_outputs is not None:
            raise ValueError("on-policy: teacher_outputs (cached teacher outputs) cannot score "
                             "newly sampled sequences; leave teacher_outputs=None")
        self._check_batch(batch)
        on_policy, seed = self.draw()
        if not on_policy:
            return self._models({k: v for k, v in batch.items() if k not in PROMPT_KEYS},
                                **args)
        prompts: Tensor = batch["prompts"]
        prompt_mask = batch.get("prompt_attention_mask")
        if prompt_mask is None:
            prompt_mask = torch.ones_like(prompts, dtype=torch.int64)
        lengths = check_prompts(prompts, prompt_mask)
        sampler_model = self._teacher if self.config.seq_kd else self.student
        if self.cross_tokenizer:  # only the sampler's context: the other side is re-tokenised
            if self.config.seq_kd:  # the teacher samples from the prompts in its own tokens
                assert self.tokenizers is not None
                prompts, prompt_mask = prompts_for(prompts, prompt_mask, self.tokenizers[1],
                                                   self.tokenizers[0])
                lengths = check_prompts(prompts, prompt_mask)
            check_context(lengths, self.config.max_new_tokens,
                          [("teacher" if self.config.seq_kd else "student", sampler_model)])
        else:
            check_context(lengths, self.config.max_new_tokens,
                          [("student", self.student)]
                          + ([("teacher", self._teacher)] if self._teacher is not None else []))
        pad = self._pad_id(sampler_model)
        sampled = rollout(self.sampler, sampler_model, prompts, prompt_mask, seed=seed,
                          pad_token_id=pad)
        self.last_rollout = sampled
        longest = int(sampled.completion_lengths.max())
        if longest > self.config.max_new_tokens:
            raise ValueError(
                f"on-policy: the sampler returned a completion of {longest} tokens (sample "
                f"{int(sampled.completion_lengths.argmax())}), more than "
                f"OnPolicyConfig.max_new_tokens={self.config.max_new_tokens}, which the models' "
                "context was checked against; make the sampler stop at max_new_tokens")
        if int(sampled.completion_lengths.sum()) == 0:
            self.empty_rollouts += 1
            warnings.warn(
                f"on-policy: the rollout has no completion token (every sample ended at once); "
                f"this batch's KD loss is 0 ({self.empty_rollouts} such batch(es) so far)",
                UserWarning, stacklevel=2)
        if self.cross_tokenizer:
            return self._cross(sampled, batch, args)
        inputs: dict[str, Tensor] = {"input_ids": sampled.input_ids,
                                     "attention_mask": sampled.attention_mask}
        if "labels" in batch:
            inputs["labels"] = torch.where(sampled.completion_mask != 0, sampled.input_ids,
                                           IGNORE_INDEX)
        outputs = self._models(inputs, **args)
        student = completion_rows(outputs.student, sampled, pad)
        teacher = completion_rows(outputs.teacher, sampled, pad)
        return Outputs(student, share_equal_masks(student, teacher))


def on_policy_stage(step: Any) -> OnPolicyStage | None:
    """The :class:`OnPolicyStage` that ``step`` (a :class:`~purekd.Step`, or a models stage)
    runs — found through ``step.outputs`` and wrappers that keep the stage they wrap as
    ``.inner`` — or ``None``."""
    stage = getattr(step, "outputs", step)
    seen: set[int] = set()
    while stage is not None and id(stage) not in seen:
        if isinstance(stage, OnPolicyStage):
            return stage
        seen.add(id(stage))
        stage = getattr(stage, "inner", None)
    return None


__all__ = ["CROSS_KEYS", "GeneratorState", "OnPolicyStage", "on_policy_stage"]
