"""The runner: the only stateful layer. It drives a step through training, in three phases.

* :meth:`Runner._micro_step` — one micro-batch: post-process, move to the device, run the step
  under autocast, record the losses (on the device), back-propagate the loss scaled for
  accumulation.
* :meth:`Runner._optimizer_step` — every ``accumulation``-th micro-batch: check the gradients,
  unscale, clip the student's gradients, step the optimizer and the LR scheduler, zero the
  gradients.
* :meth:`Runner._checkpoint` — at TextBrewer's checkpoint steps: save ``gs{step}.pkl``
  atomically, call the callback, track early stopping, write the full state when asked.

Where the step runs — one process, DDP, FSDP2 — is a :class:`~._placement.Placement` the loop
asks for what differs (wrapping, sharding, the non-finite guard, gathering the weights, the
state's form, agreeing on a decision); the loop itself has no branch on it. What one
``train()`` call asks for is one validated :class:`~._options.RunOptions` record. The full
training state (its layout, the run's fingerprint, writing, reading, verification, validation
and fallback) lives in :mod:`._state`; the output directory's files in :mod:`._checkpoint`;
where the metrics go in :mod:`._sinks`.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from purekd._devices import move_to_device
from purekd.configs._training import TrainingConfig

from . import _state as state
from ._checkpoint import (
    atomic_save,
    run_files,
    state_files,
    weights_path,
)
from ._early_stopping import EarlyStoppingState, evaluate
from ._guard import NonFiniteGuard
from ._metrics import MetricsLogger, set_aside_metrics, truncate_metrics
from ._options import RunOptions
from ._placement import Placement, placement_for
from ._plan import EpochPlan, StepPlan, progress
from ._precision import Precision
from ._rng import rng_state, set_rng_state
from ._sources import Micro, PassLog
from ._state import RunIdentity
from ._tokens import TokenWindow, scale_gradients, token_sum

logger = logging.getLogger("purekd")

def _reduce_replicas(loss: torch.Tensor,
                     terms: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DataParallel gathers one loss per GPU; average them (TextBrewer's ``.mean()``)."""
    if loss.dim() == 0:
        return loss, terms
    return loss.mean(), {name: value.mean() for name, value in terms.items()}


@attrs.define
class Counters:
    """Where training is: optimizer steps done, micro-batches logged and consumed."""

    global_step: int = 0
    writer_step: int = 0
    consumed: int = 0
    epoch: int = 0


@attrs.frozen
class _Setup:
    """What trains and how: the step as the loop calls it (wrapped), the optimizer and the LR
    scheduler, the plan, the precision, and the parameters the loop checks and clips."""

    model: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    plan: EpochPlan | StepPlan
    precision: Precision
    student_params: list[nn.Parameter]
    named_params: list[tuple[str, nn.Parameter]]

    def learning_rates(self) -> list[float]:
        return [float(group["lr"]) for group in self.optimizer.param_groups]


@attrs.define
class _Watch:
    """What watches the loop: the metrics on their way to the sinks, the non-finite guard, the
    progress bar, the token window of the optimizer step, whether a gradient was seen."""

    metrics: MetricsLogger
    guard: NonFiniteGuard
    bar: Any = None
    gradient_seen: bool = False
    window: TokenWindow = attrs.field(factory=TokenWindow)


@attrs.frozen
class _Memory:
    """What a state file records besides the objects' own states: the run's identity, the
    random generators at the start of training, each pass's random state, early stopping's
    memory."""

    identity: RunIdentity
    start_rng: dict[str, Any]
    pass_log: PassLog
    stopping: EarlyStoppingState


@attrs.frozen
class _Run:
    """One call of :meth:`Runner.run`: what trains, what watches, what is remembered, and the
    options it was given."""

    setup: _Setup
    watch: _Watch
    memory: _Memory
    options: RunOptions


def _refuse_on_policy_without_teacher(step: Any, config: TrainingConfig) -> None:
    """An on-policy step (one whose ``samples_rollouts`` is true: a
    :class:`~purekd.combinators.Step` running an ``OnPolicyStage``; the runner asks the step and
    imports no combinator) needs a teacher that runs: ``FSDPConfig(teacher='none')`` is refused before anything runs."""
    fsdp = config.fsdp
    if fsdp is None or fsdp.teacher != "none":
        return
    steps = getattr(step, "steps", None)
    for one in (steps.values() if isinstance(steps, Mapping) else [step]):
        if getattr(one, "samples_rollouts", False):
            raise ValueError(
                "an on-policy step with TrainingConfig(fsdp=FSDPConfig(teacher='none')): the "
                "teacher must score every newly sampled sequence, but teacher='none' runs no "
                "teacher (the batches carry a cache of the dataset's text); use "
                "FSDPConfig(teacher='shard') or 'replicate'")


class Runner:

    """Trains ``step``'s parameters by TextBrewer's loop, with the additions of purekd.

    ``step(batch, progress=..., step=..., teacher_outputs=..., **args)`` (or
    ``step(batch, task, ...)`` for task sources) must return an object with ``.loss`` and
    ``.terms`` (and optionally ``.tokens``). ``student`` is the module whose weights are
    checkpointed and clipped. Where it runs is chosen from ``config`` (:func:`placement_for`).
    """

    def __init__(self, step: nn.Module, config: TrainingConfig, *, student: nn.Module,
                 log_every: int = 50, check_finite_every_step: bool | None = None,
                 progress_bar: bool | None = None):
        self.step = step
        self.config = config
        self.student = student
        self.log_every = log_every
        self.check_finite_every_step = (torch.device(config.device).type == "cpu"
                                        if check_finite_every_step is None
                                        else check_finite_every_step)
        self.progress_bar = progress_bar
        _refuse_on_policy_without_teacher(step, config)
        self.placement: Placement = placement_for(config)
        self.counters = Counters()

    # -- set-up ------------------------------------------------------------------------------

    def _progress_bar(self, total: int, enabled: bool | None) -> Any:
        if enabled is None:
            enabled = self.progress_bar
        if enabled is None:
            enabled = sys.stderr.isatty() and self.placement.is_main
        if not enabled:
            return contextlib.nullcontext(None)
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="training", unit="step", dynamic_ncols=True)

    def _fingerprint(self, optimizer: torch.optim.Optimizer, scheduler: Any,
                     plan: EpochPlan | StepPlan, describe: Mapping[str, Any] | None) -> dict[str, Any]:
        """This run's fingerprint (:func:`._state.fingerprint`)."""
        config = self.config
        training = {name: getattr(config, name) for name in (
            "gradient_accumulation_steps", "ckpt_frequency", "ckpt_epoch_frequency", "ckpt_steps",
            "fp16", "bf16")}
        training.update(self.placement.fingerprint())
        return state.fingerprint(step=self.step, optimizer=optimizer, scheduler=scheduler,
                                 plan=plan, training=training,
                                 extra=self.placement.fingerprint_parts(describe))

    @staticmethod
    def _claim_output_dir(output_dir: Path, overwrite: bool | None) -> None:
        """A fresh run in a directory holding an earlier run's files: clear them
        (``overwrite=True``), refuse (``False``) or warn and set the old ``metrics.jsonl``
        aside (``None``)."""
        earlier = run_files(output_dir)
        if not earlier:
            return
        names = ", ".join(p.name for p in earlier[:6]) + (" ..." if len(earlier) > 6 else "")
        if overwrite:
            for path in earlier:
                if path.is_dir():  # an FSDP run's sharded state
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            return
        if overwrite is False:
            raise ValueError(
                f"output_dir={str(output_dir)!r} already holds an earlier run's files ({names}); "
                "pass resume_from to continue that run, another output_dir, or "
                "overwrite_output_dir=True to delete them first")
        aside = set_aside_metrics(output_dir / "metrics.jsonl")
        warnings.warn(
            f"output_dir={str(output_dir)!r} already holds an earlier run's files ({names}). "
            "This run overwrites the checkpoints of the steps it reaches"
            + (f", its metrics.jsonl was moved to {aside.name}" if aside is not None else "")
            + ", and resuming from this directory uses only this run's states. Pass "
            "overwrite_output_dir=True to delete the earlier files first, or False to refuse.",
            UserWarning, stacklevel=5)

    def _open_run(self, optimizer: torch.optim.Optimizer, scheduler: Any,
                  plan: EpochPlan | StepPlan, describe: Mapping[str, Any] | None,
                  options: RunOptions, output_dir: Path) -> tuple[dict[str, Any] | None, RunIdentity]:
        """The state to resume from (read, verified, checked against this run's fingerprint and
        validated against its objects — all before anything is loaded), or ``None`` for a fresh
        run (which claims the output directory); and the run's identity, recorded in
        ``run.json``."""
        current = self._fingerprint(optimizer, scheduler, plan, describe)
        is_main = self.placement.is_main
        saved: dict[str, Any] | None = None
        if options.resume_from is not None:
            saved = self.placement.read_state(options.resume_from, current, self.step, optimizer,
                                              scheduler, options.extend_run)
        elif is_main:
            self._claim_output_dir(output_dir, options.overwrite_output_dir)
        run_info = saved.get("run") if saved is not None else None
        identity = (RunIdentity(run_info["id"], run_info["started"], current)
                    if isinstance(run_info, dict) else RunIdentity.new(current))
        if is_main and (options.save_state or state_files(output_dir)):
            state.write_run_file(output_dir, identity)
        return saved, identity

    def _restore(self, saved: dict[str, Any] | None, identity: RunIdentity,
                 optimizer: torch.optim.Optimizer, scheduler: Any,
                 precision: Precision) -> _Memory:
        """Load ``saved`` into the run's objects and take the run's memory from it (fresh for a
        fresh run)."""
        stopping = EarlyStoppingState()
        if saved is not None:
            stopping = state.restore(saved, self.step, optimizer, scheduler, precision)
            set_rng_state(saved["start_rng"])
        return _Memory(identity=identity, start_rng=rng_state(),
                       pass_log=PassLog(saved["passes"] if saved is not None else None),
                       stopping=stopping)

    def _resume_position(self, source: Iterator[Micro], saved: dict[str, Any] | None,
                         pass_log: PassLog, output_dir: Path) -> Counters:
        """The counters to start from: zero for a fresh run; for a resumed one, the saved ones,
        after passing over the data to the saved position (no compute; index-level skipping
        where the loader allows, :class:`PassLog`) and restoring the random generators as they
        were at the checkpoint."""
        if saved is None:
            return Counters()
        pass_log.replaying = True
        try:
            for _ in range(saved["counters"]["consumed"]):
                next(source)
        finally:
            pass_log.replaying = False
        counters = Counters(**saved["counters"])
        set_rng_state(saved["rng"])
        if self.placement.is_main:
            truncate_metrics(output_dir / "metrics.jsonl", counters.writer_step)
        return counters

    def _setup(self, optimizer: torch.optim.Optimizer, scheduler: Any,
               plan: EpochPlan | StepPlan, precision: Precision) -> _Setup:
        return _Setup(model=self.placement.wrap(self.step), optimizer=optimizer,
                      scheduler=scheduler, plan=plan, precision=precision,
                      student_params=[p for p in self.student.parameters() if p.requires_grad],
                      named_params=[(n, p) for n, p in self.step.named_parameters()
                                    if p.requires_grad])

    # -- the phases --------------------------------------------------------------------------

    def _scale_for_accumulation(self, run: _Run, loss: torch.Tensor,
                                tokens: torch.Tensor | None = None) -> torch.Tensor:
        """The micro-batch's share of the optimizer step's loss: ``loss / accumulation``
        (TextBrewer's per-batch mean); for a token-normalised step (``tokens`` given), the
        token sum ``loss * tokens``, normalised by the window's kept tokens at the optimizer
        step (:mod:`._tokens`)."""
        window = run.watch.window
        if tokens is None:
            if window.active:
                raise ValueError(
                    "a step returned StepOutput.tokens for some micro-batches of an optimizer "
                    "step and None for others: a token-normalised step reports its tokens on "
                    "every micro-batch")
            return loss / self.config.gradient_accumulation_steps
        summed, count = token_sum(loss, tokens)
        window.add(count)
        return summed

    def _micro_step(self, run: _Run, micro: Micro) -> None:
        """Forward and backward on one micro-batch; the gradients accumulate."""
        counters, device = self.counters, self.config.device
        setup, watch, options = run.setup, run.watch, run.options
        counters.consumed += 1
        counters.epoch = micro.epoch
        if micro.first_in_epoch:  # TextBrewer drops unfinished accumulation here
            setup.optimizer.zero_grad()
            watch.window.reset()
        batch = micro.batch
        post = options.batch_postprocessor
        if post is not None and not micro.postprocessed:
            batch = (post[str(micro.task)] if isinstance(post, Mapping) else post)(batch)
        batch = move_to_device(batch, device)
        teacher = micro.teacher_outputs
        if teacher is not None:
            teacher = teacher._replace(logits=tuple(t.to(device) for t in teacher.logits))
        fraction = progress(counters.global_step, setup.plan.total_steps)
        with setup.precision.autocast():
            if micro.task is not None:
                out = setup.model(batch, micro.task, progress=fraction, step=counters.global_step,
                                  **options.model_args)
            else:
                out = setup.model(batch, progress=fraction, step=counters.global_step,
                                  teacher_outputs=teacher, **options.model_args)
        loss, terms = _reduce_replicas(out.loss, out.terms)
        watch.guard.observe(counters.global_step + 1, loss, terms)
        tokens = getattr(out, "tokens", None)
        watch.metrics.record(counters.writer_step, counters.global_step, loss, terms,
                             None if tokens is None else torch.as_tensor(tokens, device=loss.device).sum())
        counters.writer_step += 1
        setup.precision.backward(self._scale_for_accumulation(
            run, out.loss if tokens is not None else loss, tokens))

    def _check_gradient_reached(self, run: _Run) -> None:
        """Once per run (one synchronisation): some gradient reached the student."""
        run.watch.gradient_seen = True
        params = run.setup.student_params
        grads = [p.grad for p in params if p.grad is not None]
        if params and (not grads or not bool(
                torch.stack([g.detach().abs().sum() for g in grads]).sum().ne(0))):
            raise ValueError(
                "no gradient reached the student's parameters in the first optimizer step "
                "(all absent or exactly 0): either no tokens kept (every label -100 or every "
                "logits_mask entry 0, so the KD loss is 0 — check the labels and the adaptor's "
                "mask), or the loss does not depend on the student (its outputs detached or "
                "computed under torch.no_grad(), or only frozen modules used). Nothing was "
                "updated")

    def _optimizer_step(self, run: _Run) -> None:
        """Check, unscale, clip, step the optimizer and the scheduler, zero the gradients,
        count the step."""
        counters, setup, watch = self.counters, run.setup, run.watch
        if not watch.gradient_seen:
            self._check_gradient_reached(run)
        if self.check_finite_every_step:
            if not setup.precision.scaler.is_enabled():  # fp16's scaler skips inf steps itself
                watch.guard.observe_gradients(counters.global_step + 1, setup.named_params)
            watch.guard.raise_if_tripped()
        setup.precision.unscale(setup.optimizer)
        if watch.window.active:  # token-normalised: divide by the step's kept tokens, globally
            scale_gradients(setup.optimizer, watch.window.gradient_scale())
            watch.window.reset()
        watch.metrics.record_step(counters.global_step, setup.learning_rates(),
                                  self._gradient_norm(run))
        setup.precision.step(setup.optimizer)
        if setup.scheduler is not None:
            setup.scheduler.step()
        setup.optimizer.zero_grad()
        counters.global_step += 1
        if watch.bar is not None:
            watch.bar.update(1)
        if counters.global_step % self.log_every == 0:
            watch.guard.raise_if_tripped()
            watch.metrics.flush()

    @staticmethod
    def _gradient_norm(run: _Run) -> torch.Tensor | None:
        """The student's gradient norm (L2, over every rank), clipped to ``max_grad_norm`` when
        that is > 0; ``None`` without gradients. On the device, no synchronisation."""
        params, limit = run.setup.student_params, run.options.max_grad_norm
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return None
        norm = (torch.nn.utils.clip_grad_norm_(params, limit) if limit > 0
                else torch.nn.utils.get_total_norm(grads))
        full_tensor = getattr(norm, "full_tensor", None)  # a sharded DTensor's whole value
        return full_tensor() if callable(full_tensor) else norm

    def _save_weights(self) -> Path | None:
        """``gs{step}.pkl``, written by the process that holds the whole weights; every
        process waits for it."""
        weights = self.placement.weights_to_save(self.student)
        path = None
        if weights is not None:
            logger.info("saving at global step %d", self.counters.global_step)
            path = atomic_save(weights, weights_path(self.config.output_dir,
                                                     self.counters.global_step))
        self.placement.barrier()
        return path

    def _early_stop(self, run: _Run, path: Path | None, value: Any) -> bool:
        """Whether early stopping ends training, decided by rank 0 for every rank."""
        stopping, placement = run.options.early_stopping, self.placement
        if stopping is None:
            return False
        stop = False
        if placement.is_main or placement.evaluates_everywhere:
            metric = evaluate(stopping, self.student, self.counters.global_step, value)
            if placement.is_main:
                stop = run.memory.stopping.update(stopping, metric, self.counters.global_step,
                                                  path, Path(self.config.output_dir))
        return placement.agree(stop)

    def _save_state(self, run: _Run) -> None:
        """The full state, after the callback: resuming continues from here."""
        setup, memory, placement = run.setup, run.memory, self.placement
        if not placement.writes_state:
            return
        captured = state.capture(self.step, setup.optimizer, setup.scheduler, setup.precision,
                                 memory.start_rng, self.counters, memory.pass_log,
                                 memory.stopping, memory.identity, sharded=placement.shards_state)
        placement.write_state(captured, self.step, setup.optimizer, Path(self.config.output_dir),
                              memory.identity.id, run.options.keep_last_states)

    def _checkpoint(self, run: _Run) -> bool:
        """Save the weights, call the callback, track early stopping, save the full state;
        returns whether early stopping ends training."""
        step, watch, options = self.counters.global_step, run.watch, run.options
        watch.guard.raise_if_tripped()
        watch.guard.check_weights(step, self.step)  # never save non-finite weights
        watch.metrics.flush()
        path = self._save_weights()
        value = None
        if options.callback is not None:
            value = options.callback(model=self.student, step=step)
            self.student.train()
        stop = self._early_stop(run, path, value)
        if options.save_state:
            self._save_state(run)
        if stop:
            logger.info("early stopping at global step %d (best %s at step %s)", step,
                        run.memory.stopping.best, run.memory.stopping.best_step)
        return stop

    # -- the loop ----------------------------------------------------------------------------

    def _finished(self, plan: EpochPlan | StepPlan) -> bool:
        """A step plan ends at its step count (an epoch plan when its source is exhausted)."""
        return isinstance(plan, StepPlan) and self.counters.global_step >= plan.total_steps

    def _loop(self, run: _Run, source: Iterator[Micro]) -> None:
        """Micro-steps; an optimizer step every ``accumulation`` of them; checkpoints at the
        plan's steps; until the plan ends or early stopping stops it."""
        plan, accumulation = run.setup.plan, self.config.gradient_accumulation_steps
        with self._progress_bar(plan.total_steps, run.options.progress_bar) as run.watch.bar:
            if run.watch.bar is not None:
                run.watch.bar.update(self.counters.global_step)
            for micro in () if self._finished(plan) else source:
                self._micro_step(run, micro)
                if (micro.position + 1) % accumulation != 0:
                    continue
                self._optimizer_step(run)
                if (plan.is_checkpoint(self.counters.global_step, micro.epoch)
                        and self._checkpoint(run)):
                    break
                if self._finished(plan):
                    break
        run.watch.guard.raise_if_tripped()
        run.watch.metrics.flush()

    def run(self, optimizer: torch.optim.Optimizer, plan: EpochPlan | StepPlan,
            make_source: Callable[[PassLog], Iterator[Micro]], *, scheduler: Any = None,
            options: RunOptions | None = None,
            describe: Mapping[str, Any] | None = None) -> Counters:
        """Train to the end of ``plan``; returns the final :class:`Counters`.

        ``make_source(pass_log)`` builds the micro-batch source; it must call
        ``pass_log.begin`` / ``pass_log.passes`` at the start of every pass over a loader.
        ``options``: what the ``train()`` call asked for (:class:`~._options.RunOptions`).
        ``describe``: more parts of the run's fingerprint (the configs, the data), checked on
        resume.
        """
        options = RunOptions() if options is None else options
        placement, output_dir = self.placement, Path(self.config.output_dir)
        placement.join()  # before anything asks for the rank
        precision = Precision(self.config.device, fp16=self.config.fp16, bf16=self.config.bf16)
        if placement.is_main:
            output_dir.mkdir(parents=True, exist_ok=True)
        placement.clean(output_dir)  # what a write killed half-way left
        metrics: MetricsLogger | None = None
        try:  # from here on, a failure still closes the sinks and undoes the placement
            placement.prepare(self.step, self.student, optimizer)  # before any state is loaded
            saved, identity = self._open_run(optimizer, scheduler, plan, describe, options,
                                             output_dir)
            memory = self._restore(saved, identity, optimizer, scheduler, precision)
            source = make_source(memory.pass_log)
            self.counters = self._resume_position(source, saved, memory.pass_log, output_dir)
            metrics = MetricsLogger(output_dir, self.config.log_dir, enabled=placement.is_main,
                                    sinks=options.metric_sinks)
            run = _Run(setup=self._setup(optimizer, scheduler, plan, precision),
                       watch=_Watch(metrics=metrics, guard=placement.guard()), memory=memory,
                       options=options)
            if saved is None:
                optimizer.zero_grad()
            self._loop(run, source)
        finally:
            if metrics is not None:
                metrics.close()
            else:
                for sink in options.metric_sinks:
                    sink.close()
            placement.close()
        return self.counters


__all__ = ["Counters", "Runner"]
