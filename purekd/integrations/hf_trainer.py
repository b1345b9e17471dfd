"""``DistillationTrainer``: the Hugging Face ``Trainer`` with a purekd step as its model.

::

    from purekd.integrations.hf_trainer import DistillationTrainer

    step = purekd.make_step(config, teacher, student, adaptor_T, adaptor_S)
    trainer = DistillationTrainer(step, args, train_dataset=..., eval_dataset=...)
    trainer.train()
    trainer.evaluate()              # eval_loss: the distillation loss on the eval set
    trainer.save_model("student")   # the student, as student.save_pretrained("student") writes it

What it does beyond a plain ``Trainer(model=step)``:

* the Trainer's model is the step: ``model.parameters()`` are the student's and the projections',
  so the default optimizer, device placement, DDP/FSDP wrapping and ``model.train()`` cover
  exactly what is trained; the teacher(s), held but not registered by the step, are moved to
  ``args.device`` and put in eval mode here;
* ``progress = global_step / max_steps`` goes to the step, so scheduled weights follow training;
* the loss's normalisation under gradient accumulation: by default the step's loss is a mean
  per micro-batch, and the Trainer divides it by the accumulation steps (what purekd's runner
  and TextBrewer do). With ``token_level=True`` the loss is instead normalised by the number of
  counted tokens in the *whole* optimizer step (``num_items_in_batch``, summed over
  micro-batches and, with ``average_tokens_across_devices``, over processes): each micro-batch's
  loss, a mean over its own ``count_tokens(batch)`` tokens, is rescaled by
  ``count_tokens(batch) / num_items_in_batch``, which makes the accumulated gradient that of one
  batch holding every token. ``model_accepts_loss_kwargs`` is set after ``super().__init__()``,
  which would otherwise overwrite it;
* ``evaluate()`` works without ``label_names``: the evaluation loss is the step's loss (with
  ``prediction_loss_only`` semantics: no logits are gathered);
* the data collator keeps the columns the *student's* forward takes (the step's own signature,
  ``batch, progress, ...``, would make ``remove_unused_columns`` drop everything);
* the step's unweighted terms (``kd_loss``, ``hard_label_loss``, each match), averaged over the
  logging window, are added to the Trainer's logs beside ``loss``, ``learning_rate`` and
  ``grad_norm``, so they reach every ``report_to`` integration; ``metric_sinks=[...]`` (purekd's
  :class:`~purekd.runner.MetricSink` objects) get the same logs at the global step, on the main
  process, and are closed when ``train()`` ends;
* a non-finite loss, term or gradient stops training with purekd's
  :class:`~purekd.runner.NonFiniteLossError` naming the global step and the term or the
  parameter, before the optimizer step (as purekd's runner does; not under fp16, whose gradient
  scaler skips such steps itself);
* ``save_model`` writes the student with its ``save_pretrained`` (or its ``state_dict`` as
  ``model.safetensors`` for a plain module) and the projections beside it in
  ``purekd_projections.safetensors``; checkpoints hold the same, and resuming from one loads both.

``token_level`` needs the step's loss to be a mean over the tokens ``count_tokens`` counts
(default: ``labels != -100``, over ``labels[..., 1:]`` with ``shift_labels=True`` as for causal
LMs; a cross-tokenizer batch, ``{'student', 'teacher', 'spans'}`` from
:class:`~purekd.stages.CrossTokenizerCollator`, counts its aligned spans, over which ``'gold'`` and
``'uld'`` average), for every term of the objective. Cross-tokenizer batches keep their
``AlignedSpans`` intact on the way to the device (``_prepare_input``).

With an **on-policy** step (:class:`~purekd.combinators.OnPolicyStage`) the tokens exist only
after sampling, so ``token_level`` counts the step's own ``StepOutput.tokens`` (the sampled
completion tokens; across tokenizers, the completion's aligned spans) instead: each micro-batch
back-propagates its token sum ``L_m * n_m``, and the last micro-batch of the optimizer step
multiplies the accumulated gradients by ``world_size / N`` (``N = sum_m n_m`` over the
micro-batches and every process), before clipping and the optimizer step.
``tokenizers=(tokenizer_T, tokenizer_S)`` checks that both models share one tokenizer (across
tokenizers: that each fits its model); a top-k teacher cache as the data is refused at
construction.
"""


from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import safetensors.torch
import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from purekd._collectives import guard_exit
from purekd.combinators import Objective, OnPolicyStage, Step, on_policy_stage
from purekd.runner import MetricSink, NonFiniteLossError
from purekd.runner._guard import non_finite_names, sums_finite
from purekd.runner._sinks import check_sinks
from purekd.stages import check_same_tokenizer, check_tokenizers_fit, vocabulary_rows
from purekd.teacher_cache import CachedCollate, CachedTeacherDataset

PROJECTIONS_FILE = "purekd_projections.safetensors"
# kept by remove_unused_columns: the split batch, the cache, a cross-tokenizer batch's spans and
# an on-policy batch's prompts
_SPLIT_KEYS = ["teacher", "student", "teacher_cache", "spans", *OnPolicyStage.prompt_keys]

__all__ = ["PROJECTIONS_FILE", "DistillationTrainer", "count_label_tokens"]


def count_label_tokens(batch: Mapping[str, Any], shift_labels: bool = True) -> torch.Tensor:
    """The tokens a token-level loss averages over: ``labels != -100`` (``labels[..., 1:]`` when
    ``shift_labels``, as a causal LM predicts token ``t + 1`` at position ``t``). A
    cross-tokenizer batch (``'spans'``: :class:`~purekd.losses.AlignedSpans`) counts its aligned
    spans instead (``spans.weight.sum()``), which is what ``'gold'`` / ``'uld'`` average over."""
    spans = batch.get("spans") if isinstance(batch, Mapping) and "student" in batch else None
    if spans is not None:
        weight = getattr(spans, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"the batch's 'spans' is a {type(spans).__name__}: it must be the "
                            "AlignedSpans of the two tokenisations (CrossTokenizerCollator)")
        return weight.detach().sum()
    labels = batch.get("labels") if isinstance(batch, Mapping) else None
    if isinstance(batch, Mapping) and "student" in batch and labels is None:
        labels = batch["student"].get("labels") if isinstance(batch["student"], Mapping) else None
    if not isinstance(labels, torch.Tensor):
        raise ValueError(
            "DistillationTrainer(token_level=True) counts the tokens of each batch from its "
            "'labels' (-100 = not counted), but the batch has none: add 'labels' to the batch, "
            "or pass count_tokens=fn(batch) -> number of tokens the step's loss averages over")
    kept = labels[..., 1:] if shift_labels else labels
    return (kept != -100).sum()


class DistillationTrainer(Trainer):
    """A ``transformers.Trainer`` whose model is a purekd :class:`~purekd.Step`.

    ``DistillationTrainer(step, args, *, token_level=False, count_tokens=None, **trainer_kwargs)``;
    ``trainer_kwargs`` are the Trainer's (``train_dataset``, ``eval_dataset``,
    ``data_collator``, ``optimizers``, ``callbacks``, ``processing_class``, ...), except
    ``model`` (the step is the model) and ``compute_loss_func`` (the step computes the loss).
    ``self.train_losses`` holds each training micro-batch's loss (as computed, before any
    scaling) and ``self.last_terms`` the unweighted terms of the last one.
    ``metric_sinks``: purekd metric sinks that get the Trainer's logs (with the terms).
    """

    def __init__(self, step: Step, args: Any = None, *, token_level: bool = False,
                 count_tokens: Callable[[Any], Any] | None = None, shift_labels: bool = True,
                 metric_sinks: Sequence[MetricSink] = (),
                 tokenizers: Sequence[Any] | None = None, **kwargs: Any):
        if not isinstance(step, Step):
            raise TypeError(f"DistillationTrainer(step=...): expected a purekd Step (from "
                            f"purekd.make_step or Step(...)), got {type(step).__name__}")
        for argument in ("model", "compute_loss_func", "model_init"):
            if argument in kwargs:
                raise TypeError(f"DistillationTrainer: do not pass {argument}=; the step is the "
                                "model and computes the loss")
        if not isinstance(token_level, bool):
            raise TypeError(f"DistillationTrainer(token_level={token_level!r}): True or False")
        self.on_policy = on_policy_stage(step) is not None
        _check_on_policy(step, token_level=token_level, count_tokens=count_tokens,
                         tokenizers=tokenizers, kwargs=kwargs)
        super().__init__(model=step, args=args, **kwargs)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            guard_exit()  # the Trainer's collectives hold tensors with Python objects
        self.step = step
        self.token_level = token_level
        self.count_tokens = count_tokens or (lambda b: count_label_tokens(b, shift_labels))
        self._window: _SampledTokens | None = None
        # Trainer.__init__ sets these from the model's forward signature (the step's **kwargs
        # would read as "normalises by num_items_in_batch itself"): decide them here, after it.
        self.model_accepts_loss_kwargs = token_level
        self.loss_is_scaled_for_ga = token_level
        self.train_losses: list[float] = []
        self.last_terms: dict[str, float] = {}
        self.metric_sinks = check_sinks(metric_sinks)
        self._term_sums: dict[str, float] = {}
        self._term_counts: dict[str, int] = {}
        self.add_callback(_Guard(self))
        for teacher in step.teachers.values():
            if isinstance(teacher, nn.Module):
                teacher.to(self.args.device)
                teacher.eval()

    # ---- data: the student's columns --------------------------------------------------------

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            forward = getattr(self.step.student, "forward", self.step.student)
            names = list(inspect.signature(forward).parameters)
            columns: list[str] = [*names, *_SPLIT_KEYS,
                                  *set(["label", "label_ids", "labels", *self.label_names])]
            self._signature_columns = columns  # type: ignore[assignment]

    # ---- the loss ---------------------------------------------------------------------------

    def _progress(self) -> float:
        total = self.state.max_steps
        if not total or total <= 0:
            return 0.0
        return min(max(self.state.global_step / total, 0.0), 1.0)

    def compute_loss(self, model: nn.Module, inputs: Any, return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        out = model(inputs, progress=self._progress(), step=self.state.global_step)
        loss = out.loss
        if model.training:
            self._observe(float(loss.detach()), {k: float(v.detach()) for k, v in out.terms.items()})
        if self.token_level and model.training and self.on_policy:
            loss = self._sampled_token_sum(loss, out.tokens)
        elif self.token_level and model.training:
            if num_items_in_batch is None:
                raise ValueError(
                    "DistillationTrainer(token_level=True) got no num_items_in_batch from the "
                    "Trainer: the batches need 'labels' (the Trainer counts labels != -100)")
            tokens = torch.as_tensor(self.count_tokens(inputs), device=loss.device,
                                     dtype=loss.dtype)
            loss = loss * tokens / torch.as_tensor(num_items_in_batch, device=loss.device,
                                                   dtype=loss.dtype)
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                # DDP averages gradients over processes; num_items_in_batch is the global count
                loss = loss * self.accelerator.num_processes
        return (loss, out) if return_outputs else loss

    def _observe(self, loss: float, terms: dict[str, float]) -> None:
        """Keep a training micro-batch's loss and terms; a non-finite one stops training."""
        self.train_losses.append(loss)
        self.last_terms = terms
        bad = [name for name, value in {"total loss": loss, **terms}.items()
               if not math.isfinite(value)]
        if bad:
            culprit = next((n for n in bad if n != "total loss"), bad[0])
            raise NonFiniteLossError(
                f"the loss is not finite at global step {self.state.global_step + 1} (term "
                f"{culprit!r}; values total loss={loss}, "
                + ", ".join(f"{n}={v}" for n, v in terms.items())
                + "). Training stopped before the optimizer step. Lower the learning rate, clip "
                "gradients (max_grad_norm) or check the inputs.")
        for name, value in terms.items():
            self._term_sums[name] = self._term_sums.get(name, 0.0) + value
            self._term_counts[name] = self._term_counts.get(name, 0) + 1

    def check_gradients(self) -> None:
        """Raise :class:`~purekd.runner.NonFiniteLossError` naming the first parameter of the
        step whose gradient holds a NaN or an inf (one synchronisation)."""
        named = [(name, p.grad) for name, p in self.step.named_parameters() if p.grad is not None]
        if not named or bool(sums_finite(g for _, g in named).all()):
            return  # one cheap sum per gradient; the exact check only when one is not finite
        bad = non_finite_names(named)
        if bad:
            raise NonFiniteLossError(
                f"the gradient is not finite at global step {self.state.global_step + 1} "
                f"(parameter {bad[0]!r}{f', and {len(bad) - 1} more' if len(bad) > 1 else ''}) "
                "although the loss is finite. Training stopped before that optimizer step: the "
                "weights are those of earlier steps, all finite. Check the model's backward "
                "(e.g. sqrt or log at 0, a division by 0) or the inputs (a NaN teacher logit).")

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's logs; a training log (one with ``loss``) gets the mean of each term over
        the micro-batches since the last one. The metric sinks get them too."""
        if "loss" in logs and self._term_sums:
            for name, total in self._term_sums.items():
                logs.setdefault(name, total / self._term_counts[name])
            self._term_sums, self._term_counts = {}, {}
        super().log(logs, start_time)
        if self.metric_sinks and self.is_world_process_zero():
            numbers = {k: float(v) for k, v in logs.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}
            for sink in self.metric_sinks:
                sink.log(self.state.global_step, numbers)
                flush = getattr(sink, "flush", None)
                if callable(flush):
                    flush()

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; the metric sinks are closed when it ends, by an error or not."""
        try:
            return super().train(*args, **kwargs)
        finally:
            for sink in self.metric_sinks:
                sink.close()

    # ---- token_level with an on-policy step: normalised by the sampled tokens ---------------

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device
                          ) -> tuple[list, Any]:
        """``Trainer.get_batch_samples`` (the micro-batches of one optimizer step); with an
        on-policy step and ``token_level``, a new window of sampled tokens starts."""
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.token_level and self.on_policy:
            self._window = _SampledTokens(len(batch_samples))
        return batch_samples, num_items

    def _sampled_token_sum(self, loss: torch.Tensor, tokens: Any) -> torch.Tensor:
        """A micro-batch's token sum ``L_m * n_m`` (``n_m`` its sampled tokens,
        ``StepOutput.tokens``), whose gradient :meth:`training_step` rescales at the window's
        last micro-batch."""
        if tokens is None:
            raise ValueError(
                "DistillationTrainer(token_level=True) with an on-policy step: the step "
                "returned no StepOutput.tokens (its loss is a per-batch mean); build it with a "
                "token-level kd_loss_type or DistillationConfig(loss_normalisation='tokens')")
        if self._window is None:  # not from Trainer.get_batch_samples: a window of its own
            if self.args.gradient_accumulation_steps != 1:
                raise RuntimeError(
                    "DistillationTrainer(token_level=True) with an on-policy step: this "
                    "micro-batch did not come through Trainer.get_batch_samples, so the "
                    "micro-batches of its optimizer step are unknown and the gradients cannot "
                    "be normalised by their sampled tokens; train with Trainer.train, or with "
                    "gradient_accumulation_steps=1")
            self._window = _SampledTokens(1)

        count = torch.as_tensor(tokens, device=loss.device).detach().sum()
        summed = loss * count.to(loss.dtype)
        self._window.add(count, summed.detach())
        return summed

    def training_step(self, model: nn.Module, inputs: Any, num_items_in_batch: Any = None
                      ) -> torch.Tensor:
        """``Trainer.training_step``. With ``token_level`` and an on-policy step, the last
        micro-batch of the optimizer step multiplies the accumulated gradients by
        ``world_size / N`` (``N``: the step's sampled tokens over every micro-batch and process;
        DDP has averaged the gradients over the processes), before clipping and the optimizer
        step: the gradient of one batch holding every sampled token. The returned (logged) loss
        is 0 for the earlier micro-batches and the step's token mean for the last one."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        window = self._window
        if window is None or not (self.token_level and self.on_policy):
            return loss
        window.seen += 1
        if window.seen < window.size:
            return torch.zeros_like(loss)
        self._window = None
        tokens, summed = window.tokens.to(loss.device), window.summed.to(loss.device)
        world = self.accelerator.num_processes
        if world > 1:
            tokens = self.accelerator.reduce(tokens, reduction="sum")
        total = float(tokens)
        scale = world / total if total > 0 else 1.0  # no token: the gradients are 0 anyway
        with torch.no_grad():
            for parameter in self.step.parameters():
                if parameter.grad is not None:
                    parameter.grad.mul_(scale)
        return (summed * scale).to(loss.dtype)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> Any:
        if not self.token_level or self.on_policy:  # on-policy: counted after sampling
            return None
        counts = [torch.as_tensor(self.count_tokens(batch)) for batch in batch_samples]
        if not counts:
            return None
        total = torch.stack([c.to(device) for c in counts]).sum()
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            total = self.accelerator.gather(total).sum()
        return total

    def _prepare_input(self, data: Any) -> Any:
        """``Trainer._prepare_input``, except that a NamedTuple (a cross-tokenizer batch's
        :class:`~purekd.losses.AlignedSpans`) stays that NamedTuple, each of its tensors moved to
        the device with its own dtype (the Trainer rebuilds tuples from a generator, which a
        NamedTuple's constructor does not take, and may cast floating tensors under DeepSpeed)."""
        if isinstance(data, tuple) and hasattr(data, "_fields"):
            return type(data)(*(v.to(self.args.device) if isinstance(v, torch.Tensor)
                                else self._prepare_input(v) for v in data))
        return super()._prepare_input(data)

    def prediction_step(self, model: nn.Module, inputs: Any, prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> Any:
        """The step's loss on ``inputs`` (no logits or labels are returned)."""
        del prediction_loss_only, ignore_keys
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ---- saving and resuming ----------------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        del state_dict  # the step's; the student and the projections are saved separately
        output_dir = str(output_dir if output_dir is not None else self.args.output_dir)
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        student: Any = self.step.student
        if hasattr(student, "save_pretrained"):
            student.save_pretrained(output_dir)
        else:
            safetensors.torch.save_file(
                {k: v.detach().contiguous() for k, v in student.state_dict().items()},
                os.path.join(output_dir, "model.safetensors"), metadata={"format": "pt"})
        projections = {k: v.detach().contiguous()
                       for k, v in self.step.projections.state_dict().items()}
        if projections:
            safetensors.torch.save_file(projections, os.path.join(output_dir, PROJECTIONS_FILE),
                                        metadata={"format": "pt"})
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None
                              ) -> None:
        del model
        weights = os.path.join(resume_from_checkpoint, "model.safetensors")
        if not os.path.isfile(weights):
            raise ValueError(f"{resume_from_checkpoint!r} holds no model.safetensors: not a "
                             "checkpoint written by DistillationTrainer")
        result = self.step.student.load_state_dict(safetensors.torch.load_file(weights),
                                                   strict=False)
        if result.unexpected_keys:
            raise ValueError(f"{weights}: keys {result.unexpected_keys[:5]} are not the "
                             "student's: a checkpoint of another model")
        tied = set(getattr(self.step.student, "_tied_weights_keys", None) or ())
        missing = [k for k in result.missing_keys if k not in tied]
        if missing:
            raise ValueError(f"{weights}: the student's {missing[:5]} are missing")
        projections = os.path.join(resume_from_checkpoint, PROJECTIONS_FILE)
        if os.path.isfile(projections):
            self.step.projections.load_state_dict(safetensors.torch.load_file(projections))
        elif len(self.step.projections.state_dict()):
            raise ValueError(f"{resume_from_checkpoint!r} holds no {PROJECTIONS_FILE}, but the "
                             "step has projections to restore")

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: the best checkpoint's student and projections."""
        best = self.state.best_model_checkpoint
        if best is None:
            raise ValueError("load_best_model_at_end: no best checkpoint was recorded")
        self._load_from_checkpoint(best)


class _SampledTokens:
    """One optimizer step's sampled tokens (``tokens``, float64) and token-summed loss
    (``summed``) so far, over ``size`` micro-batches (``seen`` of them run)."""

    def __init__(self, size: int):
        self.size, self.seen = size, 0
        self.tokens = torch.zeros((), dtype=torch.float64)
        self.summed = torch.zeros((), dtype=torch.float64)

    def add(self, tokens: torch.Tensor, summed: torch.Tensor) -> None:
        self.tokens = self.tokens + tokens.detach().to("cpu", torch.float64)
        self.summed = self.summed + summed.detach().to("cpu", torch.float64)


def _counts_tokens(step: Step) -> bool | None:
    """Whether the step's objective reports ``StepOutput.tokens`` (``None``: not an
    :class:`~purekd.combinators.Objective`, known at the first batch)."""
    try:
        objective = step.objective
    except TypeError:
        return None
    return objective.count_tokens if isinstance(objective, Objective) else None


def _check_on_policy(step: Step, *, token_level: bool, count_tokens: Any, tokenizers: Any,
                     kwargs: Mapping[str, Any]) -> None:
    """What the Trainer can check of an on-policy step at construction: the token count, the
    tokenizers, and a top-k teacher cache in the data."""
    stage = on_policy_stage(step)
    if stage is None:
        if tokenizers is not None:
            raise ValueError("DistillationTrainer(tokenizers=...) is for an on-policy step "
                             "(DistillationConfig(on_policy=...)), which checks that teacher "
                             "and student share one tokenizer; leave it out")
        return
    if token_level and count_tokens is not None:
        raise ValueError(
            "DistillationTrainer(token_level=True, count_tokens=...) with an on-policy step: "
            "the tokens are the sampled completion tokens the step reports "
            "(StepOutput.tokens), known only after sampling; leave count_tokens out")
    if token_level and _counts_tokens(step) is False:
        raise ValueError(
            "DistillationTrainer(token_level=True) with an on-policy step whose loss is a "
            "per-batch mean (it reports no StepOutput.tokens): build the step with a "
            "token-level kd_loss_type or DistillationConfig(loss_normalisation='tokens'), or "
            "use token_level=False")
    across = stage.cross_tokenizer  # the teacher reads its own tokenisation of the samples
    if tokenizers is not None:
        if len(tokenizers) != 2:
            raise ValueError("DistillationTrainer(tokenizers=...): give (tokenizer_T, tokenizer_S)")
        if across:
            check_tokenizers_fit(tokenizers[0], tokenizers[1], step.teachers.get("teacher"),
                                 step.student)
        else:
            check_same_tokenizer(*tokenizers)
    tokenizer = kwargs.get("processing_class")
    if tokenizer is not None and hasattr(tokenizer, "__len__"):
        models = [("student", step.student)]
        if not across:
            models += [(f"teacher {name!r}", t) for name, t in step.teachers.items()]
        for who, model in models:
            rows = vocabulary_rows(model)
            if rows is not None and len(tokenizer) > rows:
                raise ValueError(
                    f"on-policy: processing_class has {len(tokenizer)} tokens but the {who}'s "
                    f"next-token distribution has {rows} entries: the tokenizer is not this "
                    "model's (ids past its vocabulary); give the models' tokenizer, or use "
                    "cross-tokenizer distillation (docs/cross-tokenizer.md)")
    for name in ("train_dataset", "eval_dataset"):
        data = kwargs.get(name)
        datasets = data.values() if isinstance(data, Mapping) else [data]
        if any(isinstance(d, CachedTeacherDataset) for d in datasets):
            raise ValueError(
                f"on-policy: {name} is a CachedTeacherDataset (a top-k teacher cache), but the "
                "teacher must score every newly sampled sequence, which no cache holds; give "
                "a dataset of prompts (and the teacher model), or train off-policy")
    if isinstance(kwargs.get("data_collator"), CachedCollate):
        raise ValueError(
            "on-policy: data_collator is a CachedCollate (batches of a top-k teacher cache), "
            "but the teacher must score every newly sampled sequence, which no cache holds; "
            "collate prompts ('prompts', 'prompt_attention_mask'), or train off-policy")


class _Guard(TrainerCallback):

    """Checks the gradients before each optimizer step (not under fp16, whose scaler skips a
    step with inf gradients itself)."""

    def __init__(self, trainer: DistillationTrainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not args.fp16:
            self.trainer.check_gradients()
