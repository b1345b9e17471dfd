"""What every distiller shares: mode handling, optimizer preparation, and ``train``."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from purekd.combinators import Step, TaskRouter, TeacherStage
from purekd.configs import DistillationConfig, TrainingConfig
from purekd.runner import (
    EarlyStopping,
    EpochPlan,
    Micro,
    PassLog,
    Runner,
    StepPlan,
    cached_epochs,
    cycled,
    epochs,
    local_rank_from,
    move_to_device,
)
from purekd.stages import Adapted, batch_split


def _check_config(value: Any, cls: type, name: str) -> Any:
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        return cls.from_dict(value)  # type: ignore[attr-defined]
    raise TypeError(f"{name} must be a purekd.{cls.__name__} (or a dict), got {type(value).__name__}")


def _models(model: Any) -> list[nn.Module]:
    if isinstance(model, Mapping):
        return list(model.values())
    if isinstance(model, (list, tuple)):
        return list(model)
    return [model]


class ModeContext:
    """``with distiller:`` — teachers in eval mode, the student in train mode; the modes each
    had are restored on exit."""

    student: nn.Module
    teacher_modules: list[nn.Module]

    def __enter__(self) -> ModeContext:
        self._saved = [(m, m.training) for m in [*self.teacher_modules, self.student]]
        for teacher in self.teacher_modules:
            teacher.eval()
        self.student.train()
        return self

    def __exit__(self, *exc: object) -> None:
        for module, training in self._saved:
            module.train(training)


class Distiller(ModeContext):
    """The shared ``train``: validate, prepare the optimizer and scheduler, hand over to the
    :class:`~purekd.runner.Runner`."""

    step: Step | TaskRouter
    caches_logits: bool = False

    def __init__(self, train_config: TrainingConfig | Mapping[str, Any],
                 distill_config: DistillationConfig | Mapping[str, Any] | None,
                 model_T: Any, model_S: nn.Module):
        self.t_config: TrainingConfig = _check_config(train_config, TrainingConfig, "train_config")
        self.d_config: DistillationConfig = (
            DistillationConfig() if distill_config is None
            else _check_config(distill_config, DistillationConfig, "distill_config"))
        if not isinstance(model_S, nn.Module):
            raise TypeError(f"model_S must be a torch.nn.Module, got {type(model_S).__name__}")
        self.model_T = model_T
        self.model_S = model_S
        self.student = model_S
        self.teacher_modules = [m for m in _models(model_T) if isinstance(m, nn.Module)]

    # -- optimizer and scheduler -------------------------------------------------------------

    def _extra_param_groups(self) -> list[tuple[nn.Module, dict[str, Any]]]:
        """(module, optimizer options) pairs to add to the optimizer: the projections."""
        return []

    def _prepare_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        present = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for module, options in self._extra_param_groups():
            params = [p for p in module.parameters() if id(p) not in present]
            if params:
                optimizer.add_param_group({"params": params, **options})
                present.update(id(p) for p in params)

    @staticmethod
    def _scheduler(optimizer: torch.optim.Optimizer, scheduler_class: Any,
                   scheduler_args: Mapping[str, Any] | None, scheduler: Any) -> Any:
        if scheduler_class is not None:
            return scheduler_class(optimizer=optimizer, **dict(scheduler_args or {}))
        if scheduler is not None:
            warnings.warn("train(scheduler=...) is deprecated: pass scheduler_class and "
                          "scheduler_args instead", DeprecationWarning, stacklevel=3)
        return scheduler

    # -- teacher-logit caching ---------------------------------------------------------------

    def _teacher_stage(self) -> TeacherStage | None:
        """The teacher stage whose logits can be cached (None: caching unsupported)."""
        return None

    def _cache(self, dataloader: Iterable[Any], postprocessor: Callable[[Any], Any] | None,
               args: Mapping[str, Any]) -> list[tuple[Any, Adapted]]:
        teacher = self._teacher_stage()
        assert teacher is not None
        cache = []
        for batch in dataloader:
            if postprocessor is not None:
                batch = postprocessor(batch)
            batch = move_to_device(batch, self.t_config.device)
            adapted = teacher(batch_split(batch), args)
            cache.append((batch, Adapted(logits=tuple(t.to("cpu") for t in adapted.logits))))
        return cache

    # -- train -------------------------------------------------------------------------------

    def _runner(self, progress_bar: bool | None = None) -> Runner:
        return Runner(self.step, self.t_config, student=self.model_S, progress_bar=progress_bar)

    def _launch(self, optimizer: torch.optim.Optimizer, plan: EpochPlan | StepPlan,
                make_source: Callable[[PassLog], Iterator[Micro]], *, scheduler_class: Any,
                scheduler_args: Mapping[str, Any] | None, scheduler: Any,
                progress_bar: bool | None, **run_options: Any) -> None:
        """Add the projections to the optimizer, build the LR scheduler, run the runner."""
        self._prepare_optimizer(optimizer)
        lr_scheduler = self._scheduler(optimizer, scheduler_class, scheduler_args, scheduler)
        self.runner = self._runner(progress_bar)
        self.runner.run(optimizer, plan, make_source, scheduler=lr_scheduler, **run_options)

    def train(
        self,
        optimizer: torch.optim.Optimizer,
        dataloader: Iterable[Any],
        num_epochs: int | None = None,
        scheduler_class: Any = None,
        scheduler_args: Mapping[str, Any] | None = None,
        scheduler: Any = None,
        max_grad_norm: float = -1.0,
        num_steps: int | None = None,
        callback: Callable[..., Any] | None = None,
        batch_postprocessor: Callable[[Any], Any] | None = None,
        *,
        resume_from: str | os.PathLike[str] | None = None,
        save_state: bool = False,
        early_stopping: EarlyStopping | None = None,
        progress_bar: bool | None = None,
        **args: Any,
    ) -> None:
        """Train the student, TextBrewer's way.

        ``num_steps`` (cycling the loader, a checkpoint every ``ckpt_steps``) takes precedence
        over ``num_epochs`` (``ckpt_frequency`` checkpoints per epoch every
        ``ckpt_epoch_frequency`` epochs). ``callback(model=student, step=global_step)`` runs
        after each checkpoint. ``**args`` go to every model call.

        Beyond TextBrewer: ``save_state=True`` writes the full training state beside each
        checkpoint, ``resume_from`` (a state file or the output directory) continues such a run
        exactly; ``early_stopping`` tracks a metric at checkpoints; ``progress_bar`` forces the
        tqdm bar on or off (default: on when stderr is a terminal, on rank 0).
        """
        if num_epochs is None and num_steps is None:
            raise ValueError("train() needs num_epochs or num_steps")
        caching = self.caches_logits and self.d_config.is_caching_logits
        if caching and num_steps is not None:
            raise ValueError("is_caching_logits=True needs epoch-based training: pass num_epochs "
                             "and num_steps=None (or set is_caching_logits=False)")
        plan: EpochPlan | StepPlan
        make_source: Callable[[PassLog], Iterator[Micro]]
        if num_steps is not None:
            plan = StepPlan(positive_count("num_steps", num_steps), self.t_config.ckpt_steps)

            def make_source(log: PassLog) -> Iterator[Micro]:
                return cycled(dataloader, log)
        else:
            assert num_epochs is not None
            if not hasattr(dataloader, "__len__"):
                raise ValueError("num_epochs needs a dataloader with a length; use num_steps")
            epochs_ = positive_count("num_epochs", num_epochs)
            plan = EpochPlan(len(dataloader) // self.t_config.gradient_accumulation_steps,  # type: ignore[arg-type]
                             epochs_, self.t_config.ckpt_frequency,
                             self.t_config.ckpt_epoch_frequency)
            distributed = (local_rank_from(self.t_config.local_rank) != -1
                           or self.t_config.fsdp is not None)

            def make_source(log: PassLog) -> Iterator[Micro]:
                if caching:
                    return cached_epochs(self._cache(dataloader, batch_postprocessor, args),
                                         epochs_, log)
                return epochs(dataloader, epochs_, distributed, log)
        self._launch(optimizer, plan, make_source, scheduler_class=scheduler_class,
                     scheduler_args=scheduler_args, scheduler=scheduler,
                     progress_bar=progress_bar, max_grad_norm=max_grad_norm, callback=callback,
                     batch_postprocessor=batch_postprocessor, model_args=args,
                     resume_from=resume_from, save_state=save_state,
                     early_stopping=early_stopping)


def positive_count(name: str, value: Any) -> int:
    """``int(value)`` (TextBrewer's conversion), or a ``ValueError`` naming ``name`` when that
    is below 1 or ``value`` is a bool."""
    if isinstance(value, bool) or int(value) < 1:
        raise ValueError(f"{name}={value!r}: must be an int >= 1")
    return int(value)


__all__ = ["Distiller", "ModeContext", "positive_count"]
