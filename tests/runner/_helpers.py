"""Tiny models, data and distillers for the runner tests.

Everything is small enough that a few optimizer steps take milliseconds on a CPU; each model
returns logits, hidden states (embedding + each block) and, with labels, a hard-label loss.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import purekd

IN_DIM, LENGTH, CLASSES = 4, 5, 3


class Tiny(nn.Module):
    """``forward(x, labels=None) -> {'logits', 'hidden', ['loss']}``; ``x`` ``(B, L, IN_DIM)``."""

    def __init__(self, width: int = 6, layers: int = 2, dropout: float = 0.0,
                 classes: int = CLASSES):
        super().__init__()
        self.embed = nn.Linear(IN_DIM, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, Any]:
        h = self.embed(x)
        hidden = [h]
        for block in self.blocks:
            h = self.drop(torch.tanh(block(h)))
            hidden.append(h)
        logits = self.out(h[:, 0])
        result: dict[str, Any] = {"logits": logits, "hidden": hidden}
        if labels is not None:
            result["loss"] = F.cross_entropy(logits, labels)
        return result


def adaptor(batch: Any, outputs: Mapping[str, Any]) -> dict[str, Any]:
    result = {"logits": outputs["logits"], "hidden": outputs["hidden"]}
    if len(batch) > 1:
        result["labels"] = batch[1]
    if "loss" in outputs:
        result["losses"] = outputs["loss"]
    return result


def dataset(n: int = 12, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, LENGTH, IN_DIM, generator=gen),
                         torch.randint(CLASSES, (n,), generator=gen))


def models(seed: int = 0, dropout: float = 0.0, width_S: int = 6,
           width_T: int = 8) -> tuple[nn.Module, nn.Module]:
    """(teacher, student), drawn under ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return Tiny(width_T, layers=3), Tiny(width_S, layers=2, dropout=dropout)


def loader(data: TensorDataset, batch_size: int = 3, shuffle: bool = False) -> DataLoader:
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle)


def general_config(**overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "temperature": 2,
        "hard_label_weight": 0.5,
        "intermediate_matches": [
            {"layer_T": 3, "layer_S": 2, "feature": "hidden", "loss": "hidden_mse", "weight": 1,
             "proj": ["linear", 6, 8]},
        ],
    }
    config.update(overrides)
    return config


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_state_equal(actual: Mapping[str, torch.Tensor],
                       expected: Mapping[str, torch.Tensor]) -> None:
    """Bit-identical state dicts."""
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), f"{key} differs"


def checkpoints(output_dir: str | Path) -> list[str]:
    return sorted(p.name for p in Path(output_dir).glob("gs*.pkl"))


class Stop(Exception):
    """Raised by a callback to interrupt training in-process."""


def stop_at(at: int | None, record: list[int] | None = None) -> Callable[..., None]:
    """A callback that records the steps it sees and raises :class:`Stop` at global step ``at``."""

    def callback(model: nn.Module, step: int) -> None:
        del model
        if record is not None:
            record.append(step)
        if step == at:
            raise Stop(step)

    return callback


def train_config(output_dir: str | Path, **overrides: Any) -> purekd.TrainingConfig:
    return purekd.TrainingConfig(device="cpu", output_dir=str(output_dir), **overrides)


def clone(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module)


def use_runner(distiller: Any, **runner_kwargs: Any) -> None:
    """Make ``distiller.train`` run a :class:`purekd.runner.Runner` built with ``runner_kwargs``
    (``log_every``, ``check_finite_every_step``, ``progress_bar``)."""
    from purekd.runner import Runner

    def build(*args: Any, **kwargs: Any) -> Runner:
        options = dict(zip(("progress_bar",), args, strict=False), **kwargs)
        options = {k: v for k, v in options.items() if v is not None}
        options.update(runner_kwargs)
        return Runner(distiller.step, distiller.t_config, student=distiller.model_S, **options)

    distiller._runner = build
