"""The runner: the only stateful layer. It drives a step through training.

Per micro-batch: post-process, move to the device, run the step under autocast, record the
losses (on the device), back-propagate ``loss / accumulation``. Every ``accumulation``-th
micro-batch: clip the student's gradients, step the optimizer and the LR scheduler, zero the
gradients, and — at TextBrewer's checkpoint steps — save ``gs{step}.pkl`` atomically (plus the
full training state when asked) and call the callback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from purekd.configs import TrainingConfig

from . import _distributed as distributed
from ._checkpoint import atomic_save, latest_state, state_path, weights_path
from ._early_stopping import EarlyStopping, EarlyStoppingState, evaluate
from ._guard import NonFiniteGuard
from ._metrics import MetricsLogger
from ._plan import EpochPlan, StepPlan, progress
from ._precision import Precision
from ._rng import rng_state, set_rng_state
from ._sources import Micro, PassLog

logger = logging.getLogger("purekd")

STATE_VERSION = 1


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


def _truncate_metrics(path: Path, writer_step: int) -> None:
    """Drop the log lines of micro-batches a resumed run will redo (``step >= writer_step``)."""
    if not path.exists():
        return
    import json

    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line and json.loads(line).get("step", 0) < writer_step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


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

    # -- set-up ------------------------------------------------------------------------------

    def _model(self) -> Any:
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

    # -- checkpoints -------------------------------------------------------------------------

    def _full_state(self, optimizer: torch.optim.Optimizer, scheduler: Any, precision: Precision,
                    start_rng: dict[str, Any], stopping: EarlyStoppingState,
                    pass_log: PassLog) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "step": self.step.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": precision.state_dict(),
            "rng": rng_state(),
            "start_rng": start_rng,
            "counters": attrs.asdict(self.counters),
            "passes": dict(pass_log.latest),
            "early_stopping": attrs.asdict(stopping),
        }

    def _save_weights(self) -> Path | None:
        step = self.counters.global_step
        if distributed.rank() != 0:
            distributed.barrier()
            return None
        logger.info("saving at global step %d", step)
        path = atomic_save(self.student.state_dict(), weights_path(self.config.output_dir, step))
        if self.local_rank != -1:
            distributed.barrier()
        return path

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
    ) -> Counters:
        """Train to the end of ``plan``; returns the final :class:`Counters`.

        ``make_source(pass_log)`` builds the micro-batch source; it must call
        ``pass_log.begin`` / ``pass_log.passes`` at the start of every pass over a loader.
        """
        config = self.config
        if self.local_rank != -1:  # before anything asks for the rank
            distributed.ensure_process_group(config.device)
        accumulation = config.gradient_accumulation_steps
        args = dict(model_args or {})
        precision = Precision(config.device, fp16=config.fp16, bf16=config.bf16)
        stopping = EarlyStoppingState()
        output_dir = Path(config.output_dir)
        is_main = distributed.rank() == 0
        if is_main:
            output_dir.mkdir(parents=True, exist_ok=True)

        saved: dict[str, Any] | None = None
        if resume_from is not None:
            saved = torch.load(latest_state(resume_from), map_location="cpu", weights_only=True)
            if saved.get("version") != STATE_VERSION:
                raise ValueError(f"resume_from={str(resume_from)!r}: not a purekd state file")
            self.step.load_state_dict(saved["step"])
            optimizer.load_state_dict(saved["optimizer"])
            if scheduler is not None and saved["scheduler"] is not None:
                scheduler.load_state_dict(saved["scheduler"])
            precision.load_state_dict(saved["scaler"])
            stopping = EarlyStoppingState(**saved["early_stopping"])
            set_rng_state(saved["start_rng"])
        start_rng = rng_state()
        pass_log = PassLog(saved["passes"] if saved is not None else None)
        source = make_source(pass_log)
        if saved is not None:
            for _ in range(saved["counters"]["consumed"]):  # replay the data order, no compute
                next(source)
            self.counters = Counters(**saved["counters"])
            set_rng_state(saved["rng"])
            if is_main:
                _truncate_metrics(output_dir / "metrics.jsonl", self.counters.writer_step)
        else:
            self.counters = Counters()

        model = self._model()
        metrics = MetricsLogger(output_dir, config.log_dir, enabled=is_main)
        guard = NonFiniteGuard()
        counters = self.counters
        total = plan.total_steps
        student_params = [p for p in self.student.parameters() if p.requires_grad]
        if saved is None:
            optimizer.zero_grad()

        def learning_rates() -> list[float]:
            return [float(group["lr"]) for group in optimizer.param_groups]

        try:
            with self._progress_bar(total) as bar:
                if bar is not None:
                    bar.update(counters.global_step)
                if isinstance(plan, StepPlan) and counters.global_step >= total:
                    return counters
                for micro in source:
                    counters.consumed += 1
                    counters.epoch = micro.epoch
                    if micro.first_in_epoch:  # TextBrewer drops unfinished accumulation here
                        optimizer.zero_grad()
                    batch = micro.batch
                    if batch_postprocessor is not None and not micro.postprocessed:
                        post = (batch_postprocessor[str(micro.task)] if isinstance(batch_postprocessor, Mapping)
                                else batch_postprocessor)
                        batch = post(batch)
                    batch = move_to_device(batch, config.device)
                    teacher = micro.teacher_outputs
                    if teacher is not None:
                        teacher = teacher._replace(logits=tuple(t.to(config.device) for t in teacher.logits))
                    fraction = progress(counters.global_step, total)
                    with precision.autocast():
                        if micro.task is not None:
                            out = model(batch, micro.task, progress=fraction,
                                        step=counters.global_step, **args)
                        else:
                            out = model(batch, progress=fraction, step=counters.global_step,
                                        teacher_outputs=teacher, **args)
                    loss, terms = _reduce_replicas(out.loss, out.terms)
                    guard.observe(counters.global_step + 1, loss, terms)
                    metrics.record(counters.writer_step, counters.global_step, loss, terms)
                    counters.writer_step += 1
                    precision.backward(loss / accumulation)

                    if (micro.position + 1) % accumulation != 0:
                        continue
                    if self.check_finite_every_step:
                        guard.raise_if_tripped()
                    precision.unscale(optimizer)
                    if max_grad_norm > 0:
                        torch.nn.utils.clip_grad_norm_(student_params, max_grad_norm)
                    precision.step(optimizer)
                    if scheduler is not None:
                        scheduler.step()
                    optimizer.zero_grad()
                    counters.global_step += 1
                    if bar is not None:
                        bar.update(1)
                    if counters.global_step % self.log_every == 0:
                        guard.raise_if_tripped()
                        metrics.flush(learning_rates())
                    if plan.is_checkpoint(counters.global_step, micro.epoch):
                        guard.raise_if_tripped()
                        metrics.flush(learning_rates())
                        path = self._save_weights()
                        value = None
                        if callback is not None:
                            value = callback(model=self.student, step=counters.global_step)
                            self.student.train()
                        stop = False
                        if early_stopping is not None and is_main:
                            metric = evaluate(early_stopping, self.student, counters.global_step, value)
                            stop = stopping.update(early_stopping, metric, counters.global_step,
                                                   path, output_dir)
                        if save_state and is_main:  # after the callback: resume continues from here
                            atomic_save(self._full_state(optimizer, scheduler, precision, start_rng,
                                                         stopping, pass_log),
                                        state_path(output_dir, counters.global_step))
                        if stop:
                            logger.info("early stopping at global step %d (best %s at step %s)",
                                        counters.global_step, stopping.best, stopping.best_step)
                            break
                    if isinstance(plan, StepPlan) and counters.global_step >= total:
                        break
            guard.raise_if_tripped()
            metrics.flush(learning_rates())
        finally:
            metrics.close()
        self.early_stopping_state = stopping
        return counters


__all__ = ["Counters", "Runner", "move_to_device"]
