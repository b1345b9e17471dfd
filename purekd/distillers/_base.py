"""What every distiller shares: mode handling, optimizer preparation, and ``train``."""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from purekd._devices import move_to_device
from purekd.combinators import Step, TaskRouter, TeacherStage
from purekd.configs import DistillationConfig, TrainingConfig
from purekd.runner import (
    EpochPlan,
    Micro,
    PassLog,
    Runner,
    RunOptions,
    StepPlan,
    cached_epochs,
    cycled,
    epochs,
    join_process_group,
    local_rank_from,
)
from purekd.stages import Adapted, batch_split

from . import _preflight as preflight


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
        preflight.check_device_exists(self.t_config)
        if local_rank_from(self.t_config.local_rank) != -1:
            # under torchrun: join the process group now, so the launch script's
            # DistributedSampler (built after the distiller) finds it
            join_process_group(self.t_config)
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
        if scheduler_args is not None and not isinstance(scheduler_args, Mapping):
            raise TypeError(f"scheduler_args must be a dict of the scheduler's arguments, got "
                            f"{type(scheduler_args).__name__}")
        if scheduler_class is None and scheduler_args:
            raise ValueError(f"scheduler_args={dict(scheduler_args)!r} without scheduler_class: "
                             "no scheduler would be built and the learning rate stays constant; "
                             "pass scheduler_class too (e.g. torch.optim.lr_scheduler.StepLR)")
        if scheduler_class is not None:
            if scheduler is not None:
                warnings.warn("train() got both scheduler_class and scheduler: the scheduler "
                              "object is ignored (as in TextBrewer)", UserWarning, stacklevel=3)
            if not callable(scheduler_class):
                raise TypeError(f"scheduler_class={scheduler_class!r}: must be a scheduler class "
                                "(e.g. torch.optim.lr_scheduler.StepLR)")
            name = getattr(scheduler_class, "__name__", repr(scheduler_class))
            try:
                return scheduler_class(optimizer=optimizer, **dict(scheduler_args or {}))
            except TypeError as error:
                raise TypeError(f"scheduler_class={name} could not be built from "
                                f"scheduler_args={dict(scheduler_args or {})!r}: {error}. Give "
                                "its required arguments in scheduler_args (the optimizer is "
                                "passed for you)") from None
        if scheduler is not None and getattr(scheduler, "optimizer", optimizer) is not optimizer:
            raise ValueError("scheduler was built over another optimizer than the one given to "
                             "train(): it would change that optimizer's learning rate, not this "
                             "one's; build it over this optimizer, or pass scheduler_class")
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
            if not adapted.logits:
                raise ValueError(
                    "is_caching_logits=True caches the teacher's 'logits', but its adaptor "
                    "returned none (a fused output layer 'lm_hidden' or top-k 'topk_ids' is not "
                    "cached here: use purekd's top-k teacher cache instead, or return 'logits')")
            cache.append((batch, Adapted(logits=tuple(t.to("cpu") for t in adapted.logits))))
        return cache

    # -- train -------------------------------------------------------------------------------

    def _runner(self, progress_bar: bool | None = None) -> Runner:
        return Runner(self.step, self.t_config, student=self.model_S, progress_bar=progress_bar)

    def _launch(self, optimizer: torch.optim.Optimizer, plan: EpochPlan | StepPlan,
                make_source: Callable[[PassLog], Iterator[Micro]], options: RunOptions, *,
                data: Any, scheduler_class: Any, scheduler_args: Mapping[str, Any] | None,
                scheduler: Any, describe: Mapping[str, Any] | None = None) -> None:
        """Add the projections to the optimizer, build the LR scheduler, run the runner.

        The run's fingerprint (checked on resume) gets the distillation config and ``data``'s
        description (:func:`describe_data`) besides what the runner adds itself."""
        steps = self.step.steps.values() if isinstance(self.step, TaskRouter) else [self.step]
        preflight.check_on_policy_data(steps, data)
        self._prepare_optimizer(optimizer)
        preflight.check_optimizer(optimizer, self.student)
        preflight.check_weights(self.d_config, len(getattr(self, "custom_matches", None) or ()))
        preflight.check_device(self.t_config, self.student, self.teacher_modules)
        preflight.check_modes(self.teacher_modules, self.student)
        preflight.install_output_checks(steps, self.d_config, self.t_config.device)

        lr_scheduler = self._scheduler(optimizer, scheduler_class, scheduler_args, scheduler)
        self.runner = self._runner(options.progress_bar)
        teachers = {str(i): {k: list(v.shape) for k, v in t.state_dict().items()}
                    for i, t in enumerate(self.teacher_modules)}
        parts = {"distillation": self.d_config.to_dict(), "data": describe_data(data),
                 "teachers": teachers, "options": options.describe(), **dict(describe or {})}
        self.runner.run(optimizer, plan, make_source, scheduler=lr_scheduler, options=options,
                        describe=parts)

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
        **args: Any,
    ) -> None:
        """Train the student, TextBrewer's way (TextBrewer's signature).

        ``num_steps`` (cycling the loader, a checkpoint every ``ckpt_steps``) takes precedence
        over ``num_epochs`` (``ckpt_frequency`` checkpoints per epoch every
        ``ckpt_epoch_frequency`` epochs). ``callback(model=student, step=global_step)`` runs
        after each checkpoint. ``**args`` go to every model call, except purekd's own options,
        keywords named as the fields of :class:`~purekd.runner.RunOptions` (checked there,
        once): ``save_state=True`` writes the full training state beside each checkpoint,
        ``resume_from`` (a state file or the output directory) continues such a run exactly,
        ``extend_run=True`` with it continues the run for more ``num_steps``/``num_epochs``;
        ``early_stopping`` tracks a metric at checkpoints; ``progress_bar`` forces the tqdm bar
        on or off (default: on when stderr is a terminal, on rank 0); ``keep_last_states=N``
        keeps only the run's last N state files; ``overwrite_output_dir`` decides what a fresh
        run does in a directory holding an earlier run's files (``None``: warn and set its
        ``metrics.jsonl`` aside; ``False``: refuse; ``True``: delete them); ``metric_sinks``
        are more places the metrics go besides ``metrics.jsonl`` and TensorBoard
        (:class:`~purekd.runner.WandbSink`, :class:`~purekd.runner.MlflowSink`, your own object
        with ``log(step, metrics)`` and ``close()``).
        """
        options = RunOptions.split(args, max_grad_norm=max_grad_norm, callback=callback,
                                   batch_postprocessor=batch_postprocessor)
        if num_epochs is None and num_steps is None:
            raise ValueError("train() needs num_epochs or num_steps")
        caching = self.caches_logits and self.d_config.is_caching_logits
        if caching and num_steps is not None:
            raise ValueError("is_caching_logits=True needs epoch-based training: pass num_epochs "
                             "and num_steps=None (or set is_caching_logits=False)")
        length = len(dataloader) if hasattr(dataloader, "__len__") else None  # type: ignore[arg-type]
        make_source: Callable[[PassLog], Iterator[Micro]]
        if num_steps is not None:
            plan: EpochPlan | StepPlan = StepPlan(positive_count("num_steps", num_steps),
                                                  self.t_config.ckpt_steps)
            preflight.check_schedule(self.t_config, epochs_mode=False, loader_length=length)
            make_source = functools.partial(cycled, dataloader)
        else:
            plan, make_source = self._epochs(dataloader, num_epochs, caching, options)
        self._launch(optimizer, plan, make_source, options, data=dataloader,
                     scheduler_class=scheduler_class, scheduler_args=scheduler_args,
                     scheduler=scheduler)

    def _epochs(self, dataloader: Iterable[Any], num_epochs: Any, caching: bool,
                options: RunOptions) -> tuple[EpochPlan, Callable[[PassLog], Iterator[Micro]]]:
        """The plan of ``num_epochs`` epochs over ``dataloader`` and its micro-batch source
        (the teacher's logits cached first with ``caching``)."""
        if not hasattr(dataloader, "__len__"):
            raise ValueError("num_epochs needs a dataloader with a length; use num_steps")
        count = positive_count("num_epochs", num_epochs)
        length = len(dataloader)  # type: ignore[arg-type]
        preflight.check_schedule(self.t_config, epochs_mode=True, loader_length=length)
        plan = EpochPlan(length // self.t_config.gradient_accumulation_steps, count,
                         self.t_config.ckpt_frequency, self.t_config.ckpt_epoch_frequency)
        distributed = (local_rank_from(self.t_config.local_rank) != -1
                       or self.t_config.fsdp is not None)

        def make_source(log: PassLog) -> Iterator[Micro]:
            if caching:
                return cached_epochs(self._cache(dataloader, options.batch_postprocessor,  # type: ignore[arg-type]
                                                 options.model_args), count, log)
            return epochs(dataloader, count, distributed, log)

        return plan, make_source


def describe_data(data: Any) -> Any:
    """What identifies a loader in a run's fingerprint: its kind, length, batch size, sampler
    kind and dataset length (a dict of those by task for a dict of loaders)."""
    if isinstance(data, Mapping):
        return {str(k): describe_data(v) for k, v in data.items()}
    info: dict[str, Any] = {"kind": type(data).__qualname__}
    for name in ("batch_size", "drop_last"):
        if hasattr(data, name):
            info[name] = getattr(data, name)
    for name, obj in (("length", data), ("dataset_length", getattr(data, "dataset", None))):
        if hasattr(obj, "__len__"):
            info[name] = len(obj)  # type: ignore[arg-type]
    sampler = getattr(data, "sampler", None)
    if sampler is not None:
        info["sampler"] = type(sampler).__qualname__
    return info


def positive_count(name: str, value: Any) -> int:
    """``int(value)`` (TextBrewer's conversion), or a ``ValueError`` naming ``name`` when that
    is below 1 or ``value`` is a bool."""
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or int(value) < 1):
        raise ValueError(f"{name}={value!r}: must be an int >= 1")
    if int(value) != value:
        raise ValueError(f"{name}={value!r}: must be a whole number (it would be truncated to "
                         f"{int(value)}); pass an int")
    return int(value)


__all__ = ["Distiller", "ModeContext", "describe_data", "positive_count"]
