"""Loss logging that does not stall training: values stay on the device until a flush.

Each micro-batch's total and unweighted terms are kept as detached tensors; at a flush they are
stacked, copied to the host in one transfer, and written — to TensorBoard (``scalar/total_loss``,
``scalar/unweighted_<term>``, ``scalar/lr``; TextBrewer's tags) when a log directory is set,
and as JSON lines to ``metrics.jsonl``.

``metrics.jsonl`` is appended one whole batch of lines per write; a line torn by a crash or a
full disk is dropped (with a warning) when the file is next read or appended to, never fatal.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


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


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line without its newline (a torn append), so the next append starts clean."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as file:
        file.seek(-1, os.SEEK_END)
        if file.read(1) == b"\n":
            return
        file.seek(0)
        data = file.read()
        cut = data.rfind(b"\n") + 1
        warnings.warn(f"{path}: dropped a torn last line ({len(data) - cut} bytes without a "
                      "newline)", RuntimeWarning, stacklevel=3)
        file.truncate(cut)


class MetricsLogger:
    """Buffers per-micro-batch losses on the device; writes them at :meth:`flush`."""

    def __init__(self, output_dir: str | os.PathLike[str] | None, log_dir: str | None,
                 enabled: bool = True):
        self.enabled = enabled
        self._pending: list[tuple[int, int, Tensor, dict[str, Tensor]]] = []
        self._writer: Any = None
        self._jsonl: Path | None = None
        self._appended = False
        if not enabled:
            return
        if output_dir is not None:
            self._jsonl = Path(output_dir) / "metrics.jsonl"
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=log_dir)

    def record(self, writer_step: int, global_step: int, loss: Tensor,
               terms: dict[str, Tensor]) -> None:
        """Keep one micro-batch's values (no host copy)."""
        if self.enabled:
            self._pending.append((writer_step, global_step, loss.detach(),
                                  {k: v.detach() for k, v in terms.items()}))

    def flush(self, learning_rates: list[float] | None = None) -> None:
        """Copy the buffered values to the host at once and write them."""
        if not self._pending:
            return
        names = sorted({name for *_, terms in self._pending for name in terms})
        rows = torch.stack([
            torch.stack([loss.float().reshape(()),
                         *[terms[n].float().reshape(()) if n in terms else loss.new_tensor(math.nan)
                           for n in names]])
            for _, _, loss, terms in self._pending
        ]).cpu().tolist()
        lines = []
        for (writer_step, global_step, _, terms), values in zip(self._pending, rows, strict=True):
            record: dict[str, Any] = {"step": writer_step, "global_step": global_step,
                                      "loss": values[0]}
            record.update({n: v for n, v in zip(names, values[1:], strict=True) if n in terms})
            if learning_rates is not None:
                record["lr"] = learning_rates
            lines.append(json.dumps(record))
            if self._writer is not None:
                self._writer.add_scalar("scalar/total_loss", values[0], writer_step)
                for name, value in zip(names, values[1:], strict=True):
                    if name in terms:
                        self._writer.add_scalar(f"scalar/unweighted_{name}", value, writer_step)
        if self._writer is not None and learning_rates:
            self._writer.add_scalar("scalar/lr", learning_rates[0], self._pending[-1][1])
        if self._jsonl is not None:
            self._jsonl.parent.mkdir(parents=True, exist_ok=True)
            if not self._appended:
                _drop_torn_tail(self._jsonl)
                self._appended = True
            with self._jsonl.open("a", encoding="utf-8") as file:
                file.write("\n".join(lines) + "\n")  # one write of whole lines
                file.flush()
        self._pending.clear()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None


__all__ = ["MetricsLogger", "read_metrics", "set_aside_metrics", "truncate_metrics"]
