"""The runner: the only stateful layer. It drives a step through training, in three phases.

* :meth:`Runner._micro_step` — one micro-batch: post-process, move to the device, run the step
  under autocast, record the losses (on the device), back-propagate the loss scaled for
  accumulation.
* :meth:`Runner._optimizer_step` — every ``accumulation``-th micro-batch: clip the student's
  gradients, step the optimizer and the LR scheduler, zero the gradients.
* :meth:`Runner._checkpoint` — at TextBrewer's checkpoint steps: save ``gs{step}.pkl``
  atomically, call the callback, track early stopping, write the full state when asked.

The full training state (its layout, the run's fingerprint, writing, reading, verification,
validation and fallback) lives in :mod:`._state`; the output directory's files in
:mod:`._checkpoint`.

With ``TrainingConfig.fsdp`` the step is sharded by FSDP2 before anything else (:mod:`._fsdp`):
the weights ``gs{step}.pkl`` are gathered to rank 0, the full state is a sharded
``torch.distributed.checkpoint`` directory every rank writes its part of, and the non-finite
guard and early stopping decide for all ranks at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from purekd.configs._training import TrainingConfig

from . import _distributed as distributed
from . import _fsdp as fsdp
from . import _state as state
from ._checkpoint import (
    atomic_save,
    remove_temporary_files,
    run_files,
    state_files,
    weights_path,
)
from ._early_stopping import EarlyStopping, EarlyStoppingState, evaluate
from ._guard import AllRanksNonFiniteGuard, NonFiniteGuard
from ._metrics import MetricsLogger, set_aside_metrics, truncate_metrics
from ._plan import EpochPlan, StepPlan, progress
from ._precision import Precision
from ._rng import rng_state, set_rng_state
from ._sources import Micro, PassLog
from ._state import RunIdentity
from ._tokens import TokenWindow, scale_gradients, token_sum

logger = logging.getLogger("purekd")

STATE_VERSION = state.STATE_VERSION


def move_to_device(batch: Any, device: torch.device | str) -> Any:
    """Every tensor in a (nested) batch moved to ``device``; lists and tuples become tuples,
    mappings dicts (TextBrewer's rule)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return tuple(move_to_device(item, device) for item in batch)
    if isinstance(batch, Mapping):
        return {key: move_to_device(value, device) for key, value in batch.items()}
    return batch


_truncate_metrics = truncate_metrics


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


@attrs.define(kw_only=True)
class _Run:
    """What one call of :meth:`Runner.run` works with: its arguments and its helpers."""

    model: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    plan: EpochPlan | StepPlan
    precision: Precision
    metrics: MetricsLogger
    guard: NonFiniteGuard
    stopping: EarlyStoppingState
    pass_log: PassLog
    start_rng: dict[str, Any]
    student_params: list[nn.Parameter]
    named_params: list[tuple[str, nn.Parameter]]
    identity: RunIdentity
    keep_last_states: int | None
    output_dir: Path
    is_main: bool
    max_grad_norm: float
    callback: Callable[..., Any] | None
    batch_postprocessor: Callable[[Any], Any] | Mapping[str, Callable[[Any], Any]] | None
    model_args: dict[str, Any]
    save_state: bool
    early_stopping: EarlyStopping | None
    bar: Any = None
    gradient_seen: bool = False
    window: TokenWindow = attrs.field(factory=TokenWindow)

    def learning_rates(self) -> list[float]:
        return [float(group["lr"]) for group in self.optimizer.param_groups]


class Runner:
    """Trains ``step``'s parameters by TextBrewer's loop, with the additions of purekd.

    ``step(batch, progress=..., step=..., teacher_outputs=..., **args)`` (or
    ``step(batch, task, ...)`` for task sources) must return an object with ``.loss`` and
    ``.terms``. ``student`` is the module whose weights are checkpointed and clipped.
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
        self.local_rank = distributed.local_rank_from(config.local_rank)
        self.counters = Counters()
        self.sharding: fsdp.ShardedModels | None = None

    @property
    def sharded(self) -> bool:
        """Whether the step is sharded with FSDP2 (``TrainingConfig.fsdp``)."""
        return self.config.fsdp is not None

    # -- set-up ------------------------------------------------------------------------------

    def _join_process_group(self) -> None:
        """Join torchrun's process group (DDP, FSDP); FSDP without one is an error."""
        if self.sharded and self.local_rank == -1 and not distributed.is_initialized():
            raise ValueError(
                "TrainingConfig.fsdp is set but this process is not part of a distributed run: "
                "launch it with torchrun --nproc-per-node N (which sets LOCAL_RANK), or call "
                "torch.distributed.init_process_group first")
        distributed.ensure_process_group(self.config.device)

    def _shard(self, optimizer: torch.optim.Optimizer) -> None:
        """Shard the step and the teachers with FSDP2 and point the optimizer at the shards."""
        assert self.config.fsdp is not None
        names = fsdp.parameter_names(self.step)
        self.sharding = fsdp.shard_models(self.step, self.student, self.config.fsdp,
                                          device=torch.device(self.config.device),
                                          bf16=self.config.bf16)
        fsdp.rebind_optimizer(optimizer, names, self.step)

    def _wrap_model(self) -> Any:
        """The step as the loop calls it: wrapped for data parallelism (DataParallel, DDP);
        under FSDP, the step itself (sharded by :meth:`_shard`)."""
        if self.sharded:
            return self.step
        if self.local_rank == -1:
            if self.config.data_parallel and torch.cuda.device_count() > 1:
                return nn.DataParallel(self.step)
            return self.step
        return distributed.wrap(self.step, self.config.device, self.local_rank)

    def _progress_bar(self, total: int) -> Any:
        enabled = self.progress_bar
        if enabled is None:
            enabled = sys.stderr.isatty() and distributed.rank() == 0
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
        if config.fsdp is not None:  # only then: the fingerprints of unsharded runs stay as they were
            training["fsdp"] = config.fsdp.to_dict()
            # the global batch, not the per-process one: a sharded state resumes on another
            # number of processes with the same global batches
            describe = fsdp.global_batches(describe, distributed.world_size())
        return state.fingerprint(step=self.step, optimizer=optimizer, scheduler=scheduler,
                                 plan=plan, training=training, extra=describe)

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
                  resume_from: str | os.PathLike[str] | None, save_state: bool,
                  overwrite_output_dir: bool | None, output_dir: Path,
                  is_main: bool) -> tuple[dict[str, Any] | None, RunIdentity]:
        """The state to resume from (read, verified, checked against this run's fingerprint and
        validated against its objects — all before anything is loaded), or ``None`` for a fresh
        run (which claims the output directory); and the run's identity, recorded in
        ``run.json``."""
        current = self._fingerprint(optimizer, scheduler, plan, describe)
        saved: dict[str, Any] | None = None
        if resume_from is not None and self.sharded:  # checks, then loads the shards in place
            saved, _ = state.read_sharded(resume_from, current, self.step, optimizer, scheduler)
        elif resume_from is not None:
            saved, path = state.read(resume_from, current)
            state.validate(saved, path, self.step, optimizer, scheduler)
        elif is_main:
            self._claim_output_dir(output_dir, overwrite_output_dir)
        run_info = saved.get("run") if saved is not None else None
        identity = (RunIdentity(run_info["id"], run_info["started"], current)
                    if isinstance(run_info, dict) else RunIdentity.new(current))
        if is_main and (save_state or state_files(output_dir)):
            state.write_run_file(output_dir, identity)
        return saved, identity

    def _resume_position(self, source: Iterator[Micro], saved: dict[str, Any] | None,
                         pass_log: PassLog, output_dir: Path, is_main: bool) -> Counters:
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
        if is_main:
            truncate_metrics(output_dir / "metrics.jsonl", counters.writer_step)
        return counters

    # -- the phases --------------------------------------------------------------------------

    def _scale_for_accumulation(self, run: _Run, loss: torch.Tensor, micro: Micro,
                                tokens: torch.Tensor | None = None) -> torch.Tensor:
        """The micro-batch's share of the optimizer step's loss: ``loss / accumulation``
        (TextBrewer's per-batch mean); for a token-normalised step (``tokens`` given), the
        token sum ``loss * tokens``, normalised by the window's kept tokens at the optimizer
        step (:mod:`._tokens`)."""
        del micro
        if tokens is None:
            if run.window.active:
                raise ValueError(
                    "a step returned StepOutput.tokens for some micro-batches of an optimizer "
                    "step and None for others: a token-normalised step reports its tokens on "
                    "every micro-batch")
            return loss / self.config.gradient_accumulation_steps
        summed, count = token_sum(loss, tokens)
        run.window.add(count)
        return summed

    def _micro_step(self, run: _Run, micro: Micro) -> None:
        """Forward and backward on one micro-batch; the gradients accumulate."""
        counters, device = self.counters, self.config.device
        counters.consumed += 1
        counters.epoch = micro.epoch
        if micro.first_in_epoch:  # TextBrewer drops unfinished accumulation here
            run.optimizer.zero_grad()
            run.window.reset()
        batch = micro.batch
        post = run.batch_postprocessor
        if post is not None and not micro.postprocessed:
            batch = (post[str(micro.task)] if isinstance(post, Mapping) else post)(batch)
        batch = move_to_device(batch, device)
        teacher = micro.teacher_outputs
        if teacher is not None:
            teacher = teacher._replace(logits=tuple(t.to(device) for t in teacher.logits))
        fraction = progress(counters.global_step, run.plan.total_steps)
        with run.precision.autocast():
            if micro.task is not None:
                out = run.model(batch, micro.task, progress=fraction, step=counters.global_step,
                                **run.model_args)
            else:
                out = run.model(batch, progress=fraction, step=counters.global_step,
                                teacher_outputs=teacher, **run.model_args)
        loss, terms = _reduce_replicas(out.loss, out.terms)
        run.guard.observe(counters.global_step + 1, loss, terms)
        run.metrics.record(counters.writer_step, counters.global_step, loss, terms)
        counters.writer_step += 1
        tokens = getattr(out, "tokens", None)
        run.precision.backward(self._scale_for_accumulation(
            run, out.loss if tokens is not None else loss, micro, tokens))

    def _optimizer_step(self, run: _Run) -> None:
        """Clip, step the optimizer and the scheduler, zero the gradients, count the step."""
        counters, optimizer = self.counters, run.optimizer
        if not run.gradient_seen:  # once per run: one synchronisation
            run.gradient_seen = True
            grads = [p.grad for p in run.student_params if p.grad is not None]
            if run.student_params and (not grads or not bool(
                    torch.stack([g.detach().abs().sum() for g in grads]).sum().ne(0))):
                raise ValueError(
                    "no gradient reached the student's parameters in the first optimizer step "
                    "(all absent or exactly 0): "
                    "the loss does not depend on the student (its outputs detached or computed "
                    "under torch.no_grad(), or only frozen modules used). Nothing was updated")
        if self.check_finite_every_step:
            if not run.precision.scaler.is_enabled():  # fp16's scaler skips inf steps itself
                run.guard.observe_gradients(counters.global_step + 1, run.named_params)
            run.guard.raise_if_tripped()
        run.precision.unscale(optimizer)
        if run.window.active:  # token-normalised: divide by the step's kept tokens, globally
            scale_gradients(optimizer, run.window.gradient_scale())
            run.window.reset()
        if run.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(run.student_params, run.max_grad_norm)
        run.precision.step(optimizer)
        if run.scheduler is not None:
            run.scheduler.step()
        optimizer.zero_grad()
        counters.global_step += 1
        if run.bar is not None:
            run.bar.update(1)
        if counters.global_step % self.log_every == 0:
            run.guard.raise_if_tripped()
            run.metrics.flush(run.learning_rates())

    def _save_weights(self) -> Path | None:
        step = self.counters.global_step
        if self.sharded:  # every rank gathers; rank 0 writes the student as one state dict
            weights = fsdp.full_state_dict(self.student)
            path = None
            if distributed.rank() == 0:
                logger.info("saving at global step %d", step)
                path = atomic_save(weights, weights_path(self.config.output_dir, step))
            distributed.barrier()
            return path
        if distributed.rank() != 0:
            distributed.barrier()
            return None
        logger.info("saving at global step %d", step)
        path = atomic_save(self.student.state_dict(), weights_path(self.config.output_dir, step))
        if self.local_rank != -1:
            distributed.barrier()
        return path

    def _checkpoint(self, run: _Run) -> bool:
        """Save the weights, call the callback, track early stopping, save the full state;
        returns whether early stopping ends training."""
        counters = self.counters
        run.guard.raise_if_tripped()
        run.guard.check_weights(counters.global_step, self.step)  # never save non-finite weights
        run.metrics.flush(run.learning_rates())
        path = self._save_weights()
        value = None
        if run.callback is not None:
            value = run.callback(model=self.student, step=counters.global_step)
            self.student.train()
        stop = False
        if run.early_stopping is not None and (run.is_main or self.sharded):
            # under FSDP every rank evaluates (a metric calling the sharded model is a
            # collective) and rank 0 decides for all
            metric = evaluate(run.early_stopping, self.student, counters.global_step, value)
            if run.is_main:
                stop = run.stopping.update(run.early_stopping, metric, counters.global_step,
                                           path, run.output_dir)
            if self.sharded:
                stop = distributed.broadcast_flag(stop, self.config.device)
        if run.save_state and self.sharded:  # every rank writes its shards
            state.write_sharded(state.capture(self.step, run.optimizer, run.scheduler,
                                              run.precision, run.start_rng, counters,
                                              run.pass_log, run.stopping, run.identity,
                                              sharded=True),
                                self.step, run.optimizer, run.output_dir)
            if run.keep_last_states is not None and run.is_main:
                from ._sharded_state import prune_sharded

                prune_sharded(run.output_dir, run.identity.id, run.keep_last_states)
        elif run.save_state and run.is_main:  # after the callback: resume continues from here
            state.write(state.capture(self.step, run.optimizer, run.scheduler, run.precision,
                                      run.start_rng, counters, run.pass_log, run.stopping,
                                      run.identity),
                        run.output_dir)
            if run.keep_last_states is not None:
                state.prune(run.output_dir, run.identity.id, run.keep_last_states)
        if stop:
            logger.info("early stopping at global step %d (best %s at step %s)",
                        counters.global_step, run.stopping.best, run.stopping.best_step)
        return stop

    # -- the loop ----------------------------------------------------------------------------

    def run(
        self,
        optimizer: torch.optim.Optimizer,
        plan: EpochPlan | StepPlan,
        make_source: Callable[[PassLog], Iterator[Micro]],
        *,
        scheduler: Any = None,
        max_grad_norm: float = -1.0,
        callback: Callable[..., Any] | None = None,
        batch_postprocessor: Callable[[Any], Any] | Mapping[str, Callable[[Any], Any]] | None = None,
        model_args: Mapping[str, Any] | None = None,
        resume_from: str | os.PathLike[str] | None = None,
        save_state: bool = False,
        early_stopping: EarlyStopping | None = None,
        describe: Mapping[str, Any] | None = None,
        keep_last_states: int | None = None,
        overwrite_output_dir: bool | None = None,
    ) -> Counters:
        """Train to the end of ``plan``; returns the final :class:`Counters`.

        ``make_source(pass_log)`` builds the micro-batch source; it must call
        ``pass_log.begin`` / ``pass_log.passes`` at the start of every pass over a loader.
        ``describe``: more parts of the run's fingerprint (the configs, the data), checked on
        resume. ``keep_last_states``: delete this run's older state files but the last N.
        ``overwrite_output_dir``: what a fresh run does in a directory holding an earlier run's
        files (``None`` warns, ``False`` refuses, ``True`` deletes them first).
        """
        config = self.config
        if self.local_rank != -1 or self.sharded:  # before anything asks for the rank
            self._join_process_group()
        precision = Precision(config.device, fp16=config.fp16, bf16=config.bf16)
        output_dir = Path(config.output_dir)
        is_main = distributed.rank() == 0
        if keep_last_states is not None and (isinstance(keep_last_states, bool)
                                             or not isinstance(keep_last_states, int)
                                             or keep_last_states < 1):
            raise ValueError(f"keep_last_states={keep_last_states!r}: must be None (keep every "
                             "state) or an int >= 1")
        if is_main:
            output_dir.mkdir(parents=True, exist_ok=True)
            remove_temporary_files(output_dir)  # left by a write killed half-way
        if self.sharded:
            if is_main:
                from ._sharded_state import remove_temporary_directories

                remove_temporary_directories(output_dir)
            self._shard(optimizer)  # before the fingerprint and any state: loaded into shards

        saved, identity = self._open_run(optimizer, scheduler, plan, describe, resume_from,
                                          save_state, overwrite_output_dir, output_dir, is_main)
        stopping = EarlyStoppingState()
        if saved is not None:
            stopping = state.restore(saved, self.step, optimizer, scheduler, precision)
            set_rng_state(saved["start_rng"])
        start_rng = rng_state()
        pass_log = PassLog(saved["passes"] if saved is not None else None)
        source = make_source(pass_log)
        self.counters = counters = self._resume_position(source, saved, pass_log, output_dir,
                                                         is_main)

        run = _Run(model=self._wrap_model(), optimizer=optimizer, scheduler=scheduler, plan=plan,
                   precision=precision,
                   metrics=MetricsLogger(output_dir, config.log_dir, enabled=is_main),
                   guard=(AllRanksNonFiniteGuard(config.device) if self.sharded
                          else NonFiniteGuard()),
                   stopping=stopping, pass_log=pass_log,
                   start_rng=start_rng,
                   student_params=[p for p in self.student.parameters() if p.requires_grad],
                   named_params=[(n, p) for n, p in self.step.named_parameters()
                                 if p.requires_grad],
                   identity=identity, keep_last_states=keep_last_states,
                   output_dir=output_dir, is_main=is_main, max_grad_norm=max_grad_norm,
                   callback=callback, batch_postprocessor=batch_postprocessor,
                   model_args=dict(model_args or {}), save_state=save_state,
                   early_stopping=early_stopping)
        if saved is None:
            optimizer.zero_grad()
        accumulation = config.gradient_accumulation_steps
        total = plan.total_steps
        try:
            with self._progress_bar(total) as run.bar:
                if run.bar is not None:
                    run.bar.update(counters.global_step)
                if isinstance(plan, StepPlan) and counters.global_step >= total:
                    return counters
                for micro in source:
                    self._micro_step(run, micro)
                    if (micro.position + 1) % accumulation != 0:
                        continue
                    self._optimizer_step(run)
                    if plan.is_checkpoint(counters.global_step, micro.epoch) and self._checkpoint(run):
                        break
                    if isinstance(plan, StepPlan) and counters.global_step >= total:
                        break
            run.guard.raise_if_tripped()
            run.metrics.flush(run.learning_rates())
        finally:
            run.metrics.close()
            if self.sharding is not None:
                self.sharding.close()
        self.early_stopping_state = stopping
        return counters


__all__ = ["Counters", "Runner", "move_to_device"]
