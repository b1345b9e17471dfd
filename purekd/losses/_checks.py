"""Argument checks and shape normalisation shared by the token-level losses."""

from __future__ import annotations

import math

import torch
from torch import Tensor

Temperature = float | Tensor

SHARED_VOCAB_FIX = ("pass shared_vocab=True to compare on the shared first entries (padded "
                    "output layers); purekd never pads with zeros")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 at least (float64 stays float64), whatever the inputs' precision."""
    return torch.promote_types(dtype, torch.float32)


def check_reduction(reduction: str, where: str) -> bool:
    """True for ``"sum"``, False for ``"mean"``."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"{where}: reduction={reduction!r} is not one of 'mean', 'sum'")
    return reduction == "sum"


def check_temperature(temperature: Temperature, rows: tuple[int, ...], where: str) -> None:
    if isinstance(temperature, Tensor):
        if temperature.dim() > 0 and tuple(temperature.shape) != rows:
            raise ValueError(f"{where}: temperature of shape {tuple(temperature.shape)} must be "
                             f"a number or have the rows' shape {rows}")
        if not torch.compiler.is_compiling():
            bad = ~(temperature.detach().isfinite() & (temperature.detach() > 0))
            if bool(bad.any()):
                value = temperature.detach()[bad].reshape(-1)[0].item()
                raise ValueError(f"{where}: temperature must be finite and > 0, got a tensor "
                                 f"holding {value!r}")
        return
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"{where}: temperature must be a number or a tensor, got "
                        f"{type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{where}: temperature={temperature!r} must be finite and > 0 (e.g. 1.0 "
                         f"or 2.0)")


def check_mask(mask: Tensor | None, rows: tuple[int, ...], where: str,
               name: str = "mask") -> None:
    if mask is not None and tuple(mask.shape) != rows:
        raise ValueError(f"{where}: {name} of shape {tuple(mask.shape)} must have the rows' "
                         f"shape {rows} (one 0/1 entry per token)")
    if name == "mask":
        check_mask_values(mask, where)


def check_mask_values(mask: Tensor | None, where: str) -> None:
    """A mask weights rows: a negative entry would subtract a row (one host sync; skipped for
    bool and unsigned masks and inside a compiled region)."""
    if (mask is None or mask.dtype in (torch.bool, torch.uint8)
            or torch.compiler.is_compiling()):
        return
    negative = mask.detach() < 0
    if bool(negative.any()):
        index = [int(i) for i in negative.nonzero()[0]]
        raise ValueError(f"{where}: mask holds a negative value "
                         f"{mask.detach()[tuple(index)].item()!r} at {tuple(index)}; a mask is "
                         f"0 (leave the row out) or 1 (keep it)")


def check_logits_rank(logits: Tensor, where: str, name: str = "logits") -> None:
    """Logits are ``(*rows, classes)``: 1-d ``(B,)`` would take the softmax over the batch."""
    if logits.dim() < 2:
        raise ValueError(f"{where}: 1-d {name} {tuple(logits.shape)}: the softmax is over the last "
                         f"dimension, so logits must be (rows, classes), e.g. (B, C) or (B, L, V); "
                         f"for one score per sample use unsqueeze(-1) and kd_mse")


def shared_vocabulary(size_S: int, size_T: int, shared_vocab: bool, where: str,
                      what: str = "logits") -> int:
    """The vocabulary both sides are compared on (``shared_vocab``: the smaller size)."""
    if size_S == size_T:
        return size_S
    if not shared_vocab:
        raise ValueError(f"{where}: the student's {what} have {size_S} vocabulary entries and "
                         f"the teacher's {size_T}; {SHARED_VOCAB_FIX}")
    return min(size_S, size_T)


def row_weights(mask: Tensor | None, rows: int, dtype: torch.dtype,
                device: torch.device) -> Tensor:
    """The mask as ``(rows,)`` weights in ``dtype`` (all ones without a mask); no gradient."""
    if mask is None:
        return torch.ones(rows, dtype=dtype, device=device)
    return mask.detach().reshape(rows).to(device=device, dtype=dtype)


def inverse_temperature(temperature: Temperature, rows_shape: tuple[int, ...], dtype: torch.dtype,
                        device: torch.device) -> Tensor:
    """``1 / temperature`` as ``(rows, 1)`` in ``dtype``, detached."""
    tau = torch.as_tensor(temperature, dtype=dtype, device=device).detach()
    rows = 1
    for size in rows_shape:
        rows *= size
    return (1.0 / tau).expand(rows_shape).reshape(rows, 1)


__all__ = ["SHARED_VOCAB_FIX", "Temperature", "accumulation_dtype", "check_logits_rank",
           "check_mask", "check_mask_values",
           "check_reduction", "check_temperature", "inverse_temperature", "row_weights",
           "shared_vocabulary"]
