"""The TextBrewer distillers, each a thin facade: configs → :func:`~purekd.make_step` → runner."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, cast

import attrs
import torch
from torch import nn

from purekd.combinators import (
    Step,
    TaskRouter,
    TeacherStage,
    build_projections,
    compiled,
    make_step,
    mean_of_teachers,
    models_stage,
    objective,
    single_teacher,
)
from purekd.configs import DistillationConfig, TrainingConfig
from purekd.runner import RunOptions, StepPlan, sampled_tasks
from purekd.stages import Adapted, Split
from purekd.terms import hard_label

from . import _preflight as preflight
from ._base import Distiller, positive_count

Adaptor = Callable[[Any, Any], Any]


class BasicDistiller(Distiller):
    """Single teacher, single task: logits KD plus the hard-label losses (no intermediate
    matches — use :class:`GeneralDistiller` for those). Supports ``is_caching_logits``.

    ``compile`` puts the loss path under ``torch.compile`` (eager fallback on failure): ``True``, ``False`` or ``"auto"`` (default: compile only a loss path that dominates the step, decided by measuring the first steps).

    ``vocabulary_map``: for ``kd_loss_type='gold'`` with a teacher and a student of different
    tokenizers (:func:`~purekd.stages.vocabulary_map`; docs/cross-tokenizer.md).

    On-policy (``DistillationConfig(on_policy=...)``): ``tokenizers=(tokenizer_T, tokenizer_S)``
    checks at construction that both models share one tokenizer
    (:func:`~purekd.stages.check_same_tokenizer`) — or, with ``kd_loss_type='gold'`` (``'uld'``
    with two different tokenizers), re-tokenises each rollout for the teacher (on-policy across
    tokenizers, docs/cross-tokenizer.md); ``sampler``: a :class:`~purekd.stages.Sampler` in
    place of ``transformers``' ``generate``.
    """

    caches_logits = True

    def __init__(self, train_config: TrainingConfig | Mapping[str, Any],
                 distill_config: DistillationConfig | Mapping[str, Any] | None,
                 model_T: nn.Module, model_S: nn.Module, adaptor_T: Adaptor, adaptor_S: Adaptor,
                 *, compile: bool | Literal["auto"] = "auto", vocabulary_map: Any = None,
                 tokenizers: Sequence[Any] | None = None, sampler: Any = None):
        super().__init__(train_config, distill_config, model_T, model_S)
        preflight.check_on_policy(self.t_config, self.d_config)
        self.adaptor_T, self.adaptor_S = adaptor_T, adaptor_S
        config = attrs.evolve(self.d_config, intermediate_matches=())
        self.step = make_step(config, model_T, model_S, adaptor_T, adaptor_S, compile=compile,
                              vocabulary_map=vocabulary_map, tokenizers=tokenizers,
                              sampler=sampler)

    def _teacher_stage(self) -> TeacherStage | None:
        return single_teacher(self.model_T, self.adaptor_T)


class GeneralDistiller(Distiller):
    """Single teacher, single task, with intermediate-feature matches (recommended).

    ``projs`` has one entry per intermediate match: the projection module, or ``None``;
    ``custom_matches`` match outputs of arbitrary submodules (captured with forward hooks that
    exist only during the forward pass). ``is_caching_logits`` is ignored, as in TextBrewer:
    intermediate matches need the teacher's features at every step.

    ``vocabulary_map``: for ``kd_loss_type='gold'`` with a teacher and a student of different
    tokenizers (:func:`~purekd.stages.vocabulary_map`; docs/cross-tokenizer.md).

    On-policy: ``tokenizers`` and ``sampler`` as for :class:`BasicDistiller`.
    """

    def __init__(self, train_config: TrainingConfig | Mapping[str, Any],
                 distill_config: DistillationConfig | Mapping[str, Any] | None,
                 model_T: Any, model_S: nn.Module, adaptor_T: Any, adaptor_S: Any,
                 custom_matches: Sequence[Any] | None = None, *, compile: bool | Literal["auto"] = "auto",
                 vocabulary_map: Any = None, tokenizers: Sequence[Any] | None = None,
                 sampler: Any = None):
        super().__init__(train_config, distill_config, model_T, model_S)
        preflight.check_on_policy(self.t_config, self.d_config)
        if self.d_config.is_caching_logits:
            warnings.warn(f"{type(self).__name__} ignores is_caching_logits=True (as TextBrewer "
                          "does); use BasicDistiller or MultiTeacherDistiller to cache logits",
                          stacklevel=2)
        self.adaptor_T, self.adaptor_S = adaptor_T, adaptor_S
        self.projs: list[nn.Module | None] = build_projections(self.d_config, self.t_config.device)
        self.custom_matches = list(custom_matches or ())
        self.step = make_step(self.d_config, model_T, model_S, adaptor_T, adaptor_S,
                              custom_matches=custom_matches, compile=compile,
                              projections=self.projs, vocabulary_map=vocabulary_map,
                              tokenizers=tokenizers, sampler=sampler)

    def _extra_param_groups(self) -> list[tuple[nn.Module, dict[str, Any]]]:
        step: Step = (self.step if isinstance(self.step, Step)
                      else next(iter(self.step.steps.values())))  # type: ignore[assignment]
        return list(zip(step.projections, step.projection_groups, strict=True))


class MultiTeacherDistiller(BasicDistiller):
    """Several teachers of the same task; the student learns their averaged logits (no
    intermediate matches). ``adaptor_T`` is one adaptor or one per teacher."""

    def __init__(self, train_config: TrainingConfig | Mapping[str, Any],
                 distill_config: DistillationConfig | Mapping[str, Any] | None,
                 model_T: Sequence[nn.Module], model_S: nn.Module,
                 adaptor_T: Adaptor | Sequence[Adaptor], adaptor_S: Adaptor,
                 *, compile: bool | Literal["auto"] = "auto"):
        if not isinstance(model_T, (list, tuple)) or not model_T:
            raise TypeError("MultiTeacherDistiller needs model_T as a non-empty list of teachers")
        if isinstance(adaptor_T, (list, tuple)) and len(adaptor_T) != len(model_T):
            raise ValueError(f"{len(model_T)} teachers but {len(adaptor_T)} teacher adaptors")
        super().__init__(train_config, distill_config, model_T, model_S,  # type: ignore[arg-type]
                         adaptor_T, adaptor_S, compile=compile)  # type: ignore[arg-type]

    def _teacher_stage(self) -> TeacherStage | None:
        return mean_of_teachers(self.model_T, self.adaptor_T)


class MultiTaskDistiller(GeneralDistiller):
    """Teachers of different tasks into one student: ``model_T``, ``adaptor_T`` and
    ``adaptor_S`` are dicts by task. Each step samples a task with probability proportional to
    ``len(dataloader) ** tau``. On-policy: ``tokenizers`` and ``sampler`` as for
    :class:`BasicDistiller` (one pair, one sampler for every task).

    ``vocabulary_map`` as in :class:`GeneralDistiller`; one serves every task (one KD loss for
    all tasks): with ``kd_loss_type='gold'`` every task's batches are cross-tokenizer batches of
    that pair of tokenizers; with ``'uld'`` (no map) a task whose batches carry ``'spans'`` runs
    across tokenizers and the others row against row.
    """

    def __init__(self, train_config: TrainingConfig | Mapping[str, Any],
                 distill_config: DistillationConfig | Mapping[str, Any] | None,
                 model_T: Mapping[str, nn.Module], model_S: nn.Module,
                 adaptor_T: Mapping[str, Adaptor], adaptor_S: Mapping[str, Adaptor],
                 *, compile: bool | Literal["auto"] = "auto", vocabulary_map: Any = None,
                 tokenizers: Sequence[Any] | None = None, sampler: Any = None):
        if not isinstance(model_T, Mapping) or not model_T:
            raise TypeError("MultiTaskDistiller needs model_T as a dict of teachers by task")
        super().__init__(train_config, distill_config, model_T, model_S, adaptor_T, adaptor_S,
                         compile=compile, vocabulary_map=vocabulary_map, tokenizers=tokenizers,
                         sampler=sampler)

    def train(  # type: ignore[override]
        self,
        optimizer: torch.optim.Optimizer,
        dataloaders: Mapping[str, Iterable[Any]],
        num_steps: int,
        scheduler_class: Any = None,
        scheduler_args: Mapping[str, Any] | None = None,
        scheduler: Any = None,
        max_grad_norm: float = -1.0,
        tau: float = 1,
        callback: Callable[..., Any] | None = None,
        batch_postprocessors: Mapping[str, Callable[[Any], Any]] | None = None,
        **args: Any,
    ) -> None:
        """Train for ``num_steps`` optimizer steps over tasks sampled from ``dataloaders``
        (TextBrewer's signature; purekd's options among ``**args`` as in
        :meth:`Distiller.train`)."""
        assert isinstance(self.step, TaskRouter)
        if not isinstance(dataloaders, Mapping) or set(dataloaders) != set(self.step.tasks):
            raise ValueError(f"dataloaders must be a dict with the tasks {sorted(self.step.tasks)}, "
                             f"got {sorted(dataloaders) if isinstance(dataloaders, Mapping) else type(dataloaders).__name__}")
        if batch_postprocessors is not None and set(batch_postprocessors) - set(self.step.tasks):
            raise ValueError(f"batch_postprocessors has unknown tasks "
                             f"{sorted(set(batch_postprocessors) - set(self.step.tasks))}")
        plan = StepPlan(positive_count("num_steps", num_steps), self.t_config.ckpt_steps)
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau):
            raise ValueError(f"tau={tau!r}: must be a finite number (tasks are sampled in "
                             "proportion to len(dataloader) ** tau)")
        empty = [t for t, d in dataloaders.items() if hasattr(d, "__len__") and len(d) == 0]  # type: ignore[arg-type]
        if empty:
            raise ValueError(f"the dataloader(s) of task(s) {empty} have no batch "
                             "(len(dataloader) == 0); check the datasets and drop_last")
        preflight.check_schedule(self.t_config, epochs_mode=False, loader_length=None)
        posts = dict(batch_postprocessors or {})
        options = RunOptions.split(
            args, max_grad_norm=max_grad_norm, callback=callback,
            batch_postprocessor={t: posts.get(t, _identity) for t in self.step.tasks})
        self._launch(optimizer, plan, lambda log: sampled_tasks(dataloaders, tau, log), options,
                     data=dataloaders, describe={"tau": tau}, scheduler_class=scheduler_class,
                     scheduler_args=scheduler_args, scheduler=scheduler)


def _identity(batch: Any) -> Any:
    return batch


class BasicTrainer(Distiller):
    """Supervised training of one model (e.g. the teacher) on the sum of its adaptor's
    ``losses``. ``with trainer:`` puts the model in train mode."""

    def __init__(self, train_config: TrainingConfig | Mapping[str, Any], model: nn.Module,
                 adaptor: Adaptor, *, compile: bool = False):
        super().__init__(train_config, DistillationConfig(kd_loss_weight=0, hard_label_weight=1),
                         [], model)
        self.model, self.adaptor = model, adaptor
        self.step = _trainer_step(model, adaptor, compile)


def _trainer_step(model: nn.Module, adaptor: Adaptor, compile: bool) -> Step:
    def no_teacher(split: Split, args: Mapping[str, Any]) -> Adapted:
        del split, args
        return Adapted()

    def needs_losses(adapted_S: Adapted, adapted_T: Adapted) -> None:
        if not adapted_S.losses:
            raise ValueError("BasicTrainer optimises the adaptor's 'losses', but the adaptor "
                             "returned none: add 'losses': [loss] to its dict")

    term = hard_label(name="loss")
    loss = compiled(cast(Callable[..., Any], objective(term._replace(check=needs_losses))),
                    enabled=compile)
    return Step(student=model, outputs=models_stage(no_teacher, model, adaptor), loss=loss)


__all__ = ["BasicDistiller", "BasicTrainer", "GeneralDistiller", "MultiTaskDistiller",
           "MultiTeacherDistiller"]
