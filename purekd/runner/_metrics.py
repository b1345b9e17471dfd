"""Loss logging that does not stall training: values stay on the device until a flush.

Each micro-batch's total and unweighted terms (and its token count), and each optimizer step's
learning rates and gradient norm, are kept as detached tensors; at a flush they are stacked,
copied to the host in one transfer, and handed as one record per micro-batch to every metric
sink (:mod:`._sinks`): ``metrics.jsonl``, TensorBoard when a log directory is set
(``scalar/total_loss``, ``scalar/unweighted_<term>``, ``scalar/lr``; TextBrewer's tags), and
the sinks the user passes (Weights & Biases, MLflow, their own).

``metrics.jsonl`` is appended one whole batch of lines per write; a line torn by a crash or a
full disk is dropped (with a warning) when the file is next read or appended to, never fatal.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._sinks import JsonlSink, MetricSink, TensorBoardSink


def _parse(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``; unreadable lines (a torn last line) are skipped with a
    warning naming them."""
    target = Path(path)
    if not target.exists():
        return []
    records, torn = [], []
    for number, line in enumerate(target.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        record = _parse(line)
        if record is None:
            torn.append(number)
        else:
            records.append(record)
    if torn:
        warnings.warn(f"{target}: skipped unreadable line(s) {torn} (a write cut short by a crash "
                      "or a full disk)", RuntimeWarning, stacklevel=2)
    return records


def truncate_metrics(path: str | os.PathLike[str], writer_step: int) -> None:
    """Keep the records of micro-batches before ``writer_step`` (a resumed run redoes the rest),
    dropping unreadable lines; rewritten atomically."""
    target = Path(path)
    if not target.exists():
        return
    kept = [r for r in read_metrics(target) if r.get("step", 0) < writer_step]
    tmp = target.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(f"{json.dumps(r)}\n" for r in kept), encoding="utf-8")
    os.replace(tmp, target)


def set_aside_metrics(path: str | os.PathLike[str]) -> Path | None:
    """Rename an earlier run's ``metrics.jsonl`` to ``metrics.before-<its mtime>.jsonl`` so a
    fresh run's log does not interleave with it; returns the new name."""
    target = Path(path)
    if not target.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(target.stat().st_mtime))
    aside = target.with_name(f"metrics.before-{stamp}.jsonl")
    index = 1
    while aside.exists():
        aside = target.with_name(f"metrics.before-{stamp}-{index}.jsonl")
        index += 1
    os.replace(target, aside)
    return aside


class MetricsLogger:
    """Buffers per-micro-batch losses (and per-optimizer-step learning rates and gradient norms)
    on the device; at :meth:`flush`, copies them to the host in one transfer and hands one
    record per micro-batch to every sink (:mod:`._sinks`: the records' layout).

    ``MetricsLogger(output_dir, log_dir, enabled=True, sinks=())``: a :class:`~._sinks.JsonlSink`
    on ``output_dir/metrics.jsonl`` (when ``output_dir`` is set), a
    :class:`~._sinks.TensorBoardSink` on ``log_dir`` (when set), then ``sinks``. Disabled (on
    ranks other than 0) it records nothing and logs to no sink, but still closes ``sinks``.
    """

    def __init__(self, output_dir: str | os.PathLike[str] | None, log_dir: str | None,
                 enabled: bool = True, sinks: Sequence[MetricSink] = ()):
        self.enabled = enabled
        self._pending: list[tuple[int, int, Tensor, dict[str, Tensor], Tensor | None]] = []
        self._steps: dict[int, tuple[list[float], Tensor | None]] = {}
        self._closing = list(sinks)
        self.sinks: list[MetricSink] = []
        if not enabled:
            return
        if output_dir is not None:
            self.sinks.append(JsonlSink(Path(output_dir) / "metrics.jsonl"))
        if log_dir is not None:
            self.sinks.append(TensorBoardSink(log_dir))
        self.sinks.extend(sinks)

    def record(self, writer_step: int, global_step: int, loss: Tensor,
               terms: dict[str, Tensor], tokens: Tensor | None = None) -> None:
        """Keep one micro-batch's values (no host copy)."""
        if self.enabled:
            self._pending.append((writer_step, global_step, loss.detach(),
                                  {k: v.detach() for k, v in terms.items()},
                                  None if tokens is None else tokens.detach()))

    def record_step(self, global_step: int, learning_rates: list[float],
                    grad_norm: Tensor | None) -> None:
        """Keep the learning rates and the gradient norm of the optimizer step taken after
        ``global_step`` steps (no host copy)."""
        if self.enabled:
            self._steps[global_step] = (learning_rates,
                                        None if grad_norm is None else grad_norm.detach())

    def _host_values(self) -> list[float]:
        """Every buffered tensor, in :meth:`_records`' order, copied to the host at once."""
        tensors = []
        for _, _, loss, terms, tokens in self._pending:
            tensors += [loss, *terms.values(), *([tokens] if tokens is not None else [])]
        tensors += [norm for _, norm in self._steps.values() if norm is not None]
        if not tensors:
            return []
        return torch.stack([t.float().reshape(()) for t in tensors]).cpu().tolist()

    def _records(self) -> list[tuple[int, dict[str, float]]]:
        values = iter(self._host_values())
        micro = [(writer_step, global_step, next(values), {n: next(values) for n in terms},
                  next(values) if tokens is not None else None)
                 for writer_step, global_step, _, terms, tokens in self._pending]
        norms = {step: next(values) for step, (_, norm) in self._steps.items() if norm is not None}
        last = {global_step: writer_step for writer_step, global_step, *_ in micro}
        records = []
        for writer_step, global_step, loss, terms, tokens in micro:
            record: dict[str, float] = {"global_step": global_step, "loss": loss, **terms}
            if tokens is not None:
                record["tokens"] = tokens
            if global_step in self._steps:
                rates = self._steps[global_step][0]
                record.update({("lr" if i == 0 else f"lr_{i}"): lr for i, lr in enumerate(rates)})
                if last[global_step] == writer_step and global_step in norms:
                    record["grad_norm"] = norms[global_step]
            records.append((writer_step, record))
        return records

    def flush(self) -> None:
        """Copy the buffered values to the host at once and hand them to every sink."""
        if not self._pending:
            return
        records = self._records()
        self._pending.clear()
        self._steps.clear()
        for sink in self.sinks:
            for step, record in records:
                sink.log(step, record)
            flush = getattr(sink, "flush", None)
            if callable(flush):
                flush()

    def close(self) -> None:
        """Close every sink (the built-in ones and those given)."""
        for sink in {id(s): s for s in [*self.sinks, *self._closing]}.values():
            sink.close()
        self.sinks = []
        self._closing = []


__all__ = ["MetricsLogger", "read_metrics", "set_aside_metrics",
           "truncate_metrics"]
