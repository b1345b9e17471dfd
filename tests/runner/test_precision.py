"""Mixed precision on the CPU: ``bf16=True`` (autocast to bfloat16) and ``fp16=True`` (autocast to
float16 with a gradient scaler) train, and the loss falls."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import purekd
from purekd.runner import Precision

from ._helpers import adaptor, dataset, general_config, loader, models, train_config


def _cpu_fp16_support() -> str | None:
    """Why CPU float16 autocast with a GradScaler does not work here (None if it does)."""
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            product = torch.ones(2, 3) @ torch.ones(3, 2)
        if product.dtype != torch.float16:
            return f"CPU autocast to float16 produced {product.dtype}"
        scaler = torch.amp.GradScaler("cpu")
        weight = torch.nn.Parameter(torch.ones(2))
        optimizer = torch.optim.SGD([weight], lr=0.1)
        scaler.scale((weight * 2).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
    except (RuntimeError, TypeError, ValueError, AttributeError) as error:
        return f"this torch ({torch.__version__}) lacks CPU float16 autocast or GradScaler('cpu'): {error}"
    return None


def _train(out: Path, **precision: bool) -> tuple[list[float], list[torch.dtype]]:
    """30 steps over 3 fixed batches; returns the logged losses and the student's logits dtypes."""
    teacher, student = models()
    dtypes: list[torch.dtype] = []

    def adaptor_S(batch: Any, outputs: Any) -> dict[str, Any]:
        dtypes.append(outputs["logits"].dtype)
        return adaptor(batch, outputs)

    distiller = purekd.GeneralDistiller(train_config(out, **precision), general_config(),
                                        teacher, student, adaptor, adaptor_S, compile=False)
    with distiller:
        distiller.train(torch.optim.Adam(student.parameters(), lr=0.05),
                        loader(dataset(9), batch_size=3), num_steps=30, save_state=True)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    for value in torch.load(out / "gs30.pkl", weights_only=True).values():
        assert value.dtype == torch.float32 and torch.isfinite(value).all()  # master weights
    return losses, dtypes


def _assert_falls(losses: list[float]) -> None:
    assert len(losses) == 30
    assert all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.9 * first, (first, last)


def test_bf16_on_cpu_trains(tmp_path: Path) -> None:
    losses, dtypes = _train(tmp_path, bf16=True)
    assert set(dtypes) == {torch.bfloat16}
    _assert_falls(losses)
    assert torch.load(tmp_path / "gs30.state.pt", weights_only=True)["scaler"] in ({}, None)


def test_fp16_on_cpu_trains(tmp_path: Path) -> None:
    reason = _cpu_fp16_support()
    if reason is not None:
        pytest.skip(reason)
    losses, dtypes = _train(tmp_path, fp16=True)
    assert set(dtypes) == {torch.float16}
    _assert_falls(losses)
    scaler = torch.load(tmp_path / "gs30.state.pt", weights_only=True)["scaler"]
    assert scaler["scale"] > 0  # the gradient scaler's state is part of the full state


def test_full_precision_by_default(tmp_path: Path) -> None:
    losses, dtypes = _train(tmp_path)
    assert set(dtypes) == {torch.float32}
    _assert_falls(losses)


def test_precision_settings() -> None:
    assert Precision("cpu").dtype is None and not Precision("cpu").scaler.is_enabled()
    assert Precision("cpu", bf16=True).dtype == torch.bfloat16
    assert not Precision("cpu", bf16=True).scaler.is_enabled()
    fp16 = Precision("cpu", fp16=True)
    assert fp16.dtype == torch.float16 and fp16.scaler.is_enabled()
