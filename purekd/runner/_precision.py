"""Mixed precision: ``torch.autocast`` around the forward, a gradient scaler for fp16."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


class Precision:
    """``fp16`` → autocast to float16 with a ``GradScaler``; ``bf16`` → autocast to bfloat16;
    neither → full precision (the scaler is a no-op)."""

    def __init__(self, device: str | torch.device, fp16: bool = False, bf16: bool = False):
        self.device_type = torch.device(device).type
        self.dtype = torch.float16 if fp16 else torch.bfloat16 if bf16 else None
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=fp16)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.dtype is None:
            yield
        else:
            with torch.autocast(self.device_type, dtype=self.dtype):
                yield

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler.is_enabled():
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.scaler.load_state_dict(state)


__all__ = ["Precision"]
