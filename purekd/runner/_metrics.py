"""Loss logging that does not stall training: values stay on the device until a flush.

Each micro-batch's total and unweighted terms are kept as detached tensors; at a flush they are
stacked, copied to the host in one transfer, and written — to TensorBoard (``scalar/total_loss``,
``scalar/unweighted_<term>``, ``scalar/lr``; TextBrewer's tags) when a log directory is set,
and as JSON lines to ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


class MetricsLogger:
    """Buffers per-micro-batch losses on the device; writes them at :meth:`flush`."""

    def __init__(self, output_dir: str | os.PathLike[str] | None, log_dir: str | None,
                 enabled: bool = True):
        self.enabled = enabled
        self._pending: list[tuple[int, int, Tensor, dict[str, Tensor]]] = []
        self._writer: Any = None
        self._jsonl: Path | None = None
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
            with self._jsonl.open("a", encoding="utf-8") as file:
                file.write("\n".join(lines) + "\n")
        self._pending.clear()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None


__all__ = ["MetricsLogger"]
