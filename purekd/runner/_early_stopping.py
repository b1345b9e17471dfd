"""Early stopping and keep-best, evaluated at checkpoints."""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
from torch import nn


def _mode(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if value not in ("max", "min"):
        raise ValueError(f"EarlyStopping.mode={value!r}: must be 'max' or 'min'")


def _patience(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"EarlyStopping.patience={value!r}: must be None or an int >= 1")


@attrs.frozen(kw_only=True)
class EarlyStopping:
    """Track a metric at every checkpoint; keep the best checkpoint; stop when it stalls.

    ``metric(model=student, step=global_step) -> float`` is called after each checkpoint (if
    ``None``, the value the ``callback`` returned is used). With ``keep_best`` the best weights
    are copied to ``output_dir/best.pkl``. Training stops after ``patience`` checkpoints
    without improvement (never, if ``patience`` is ``None``).
    """

    metric: Callable[..., float] | None = None
    patience: int | None = attrs.field(default=None, validator=_patience)
    mode: str = attrs.field(default="max", validator=_mode)
    keep_best: bool = True
    min_delta: float = 0.0


@attrs.define
class EarlyStoppingState:
    """What early stopping remembers between checkpoints (saved in full-state checkpoints)."""

    best: float | None = None
    best_step: int | None = None
    stale: int = 0

    def update(self, rule: EarlyStopping, value: float, step: int, weights: Path | None,
               output_dir: Path) -> bool:
        """Record ``value``; copy the best weights; return True when training should stop."""
        if not math.isfinite(value):
            improved = False
        elif self.best is None:
            improved = True
        elif rule.mode == "max":
            improved = value > self.best + rule.min_delta
        else:
            improved = value < self.best - rule.min_delta
        if improved:
            self.best, self.best_step, self.stale = value, step, 0
            if rule.keep_best and weights is not None:
                tmp = output_dir / ".best.pkl.tmp"
                shutil.copyfile(weights, tmp)
                tmp.replace(output_dir / "best.pkl")
        else:
            self.stale += 1
        return rule.patience is not None and self.stale >= rule.patience


def evaluate(rule: EarlyStopping, student: nn.Module, step: int, callback_value: Any) -> float:
    value = rule.metric(model=student, step=step) if rule.metric is not None else callback_value
    if value is None:
        raise ValueError("EarlyStopping has no metric: give EarlyStopping(metric=...) or a "
                         "callback that returns a number")
    return float(value)


__all__ = ["EarlyStopping", "EarlyStoppingState", "evaluate"]
