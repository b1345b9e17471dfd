"""Moving a (nested) batch to a device: a leaf module, imported by the runner and the teacher
cache alike (neither imports the other for it)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


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


__all__ = ["move_to_device"]
