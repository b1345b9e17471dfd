"""The toy problem every foreign-loop example distils: models, data, configuration, adaptor.

A teacher MLP (8 → 32 → 4) is distilled into a student MLP (8 → 16 → 4) with

* logits KD (temperature 2) whose weight decays linearly with training progress,
* the student's hard-label cross-entropy, whose weight grows linearly with progress,
* a hidden-state match through a trainable ``linear`` projection (16 → 32),

so a loop must feed the step the right ``progress`` and must train the projection as well as the
student: ``step.parameters()`` holds both, and the teacher is not among them.

Everything is seeded, the data is synthetic and the batches come in a fixed order, so the same
loop written against different frameworks ends with the same student weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

import purekd

IN_DIM, TEACHER_WIDTH, STUDENT_WIDTH, CLASSES = 8, 32, 16, 4
STEPS, BATCH_SIZE, LR = 40, 16, 0.3


class MLP(nn.Module):
    """``forward(x, labels=None) -> {'logits', 'hidden'[, 'loss']}`` (``x`` ``(B, 8)``)."""

    def __init__(self, width: int):
        super().__init__()
        self.hidden = nn.Linear(IN_DIM, width)
        self.head = nn.Linear(width, CLASSES)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        hidden = torch.tanh(self.hidden(x))
        logits = self.head(hidden)
        outputs = {"logits": logits, "hidden": hidden}
        if labels is not None:
            outputs["loss"] = F.cross_entropy(logits, labels)
        return outputs


def adaptor(batch: Any, outputs: dict[str, Tensor]) -> dict[str, Any]:
    """The models' outputs in purekd's vocabulary (the batch is not needed here)."""
    del batch
    adapted: dict[str, Any] = {"logits": outputs["logits"], "hidden": [outputs["hidden"]]}
    if "loss" in outputs:
        adapted["losses"] = outputs["loss"]
    return adapted


DISTILL_CONFIG = purekd.DistillationConfig(
    temperature=2,
    kd_loss_weight=1,
    kd_loss_weight_scheduler="linear_decay",
    hard_label_weight=0.5,
    hard_label_weight_scheduler="linear_growth",
    intermediate_matches=[{"layer_T": 0, "layer_S": 0, "feature": "hidden",
                           "loss": "hidden_mse", "weight": 1,
                           "proj": ["linear", STUDENT_WIDTH, TEACHER_WIDTH]}],
)


class Setup(NamedTuple):
    teacher: MLP
    student: MLP
    step: purekd.Step
    dataset: list[dict[str, Tensor]]


class Result(NamedTuple):
    """What each example's ``main`` returns."""

    loss_before: float
    """The step's loss on the whole data set at progress 0, before training."""
    loss_after: float
    """The same, after training."""
    train_losses: list[float]
    """The training loss of every step, as the loop saw it."""
    student_state: dict[str, Tensor]
    """The trained student's weights (detached copies)."""
    projection_state: dict[str, Tensor]
    """The trained projections' weights (detached copies)."""


def build(seed: int = 0, samples: int = 256) -> Setup:
    """Teacher, student, step and data set, all from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, IN_DIM, generator=gen)
    rule = torch.randn(IN_DIM, CLASSES, generator=gen)
    labels = (x @ rule).argmax(dim=-1)
    dataset = [{"x": x[i], "labels": labels[i]} for i in range(samples)]
    torch.manual_seed(seed)  # nn.Linear initialises from the global RNG
    teacher, student = MLP(TEACHER_WIDTH).eval(), MLP(STUDENT_WIDTH)
    step = purekd.make_step(DISTILL_CONFIG, teacher, student, adaptor, adaptor, compile=False)
    assert isinstance(step, purekd.Step)
    return Setup(teacher, student, step, dataset)


def loader(dataset: list[dict[str, Tensor]], batch_size: int = BATCH_SIZE) -> DataLoader[Any]:
    """Batches in data-set order (no shuffling), as dicts ``{'x', 'labels'}``."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)  # type: ignore[arg-type]


def batches(data: DataLoader[Any], steps: int) -> Iterator[Any]:
    """``steps`` batches, going round ``data`` as many epochs as needed."""
    done = 0
    while done < steps:
        for batch in data:
            if done == steps:
                return
            yield batch
            done += 1


@torch.no_grad()
def evaluate(step: nn.Module, dataset: list[dict[str, Tensor]]) -> float:
    """The step's loss at progress 0 on the whole data set in one batch."""
    device = next(step.parameters()).device
    batch = {k: v.to(device) for k, v in next(iter(loader(dataset, len(dataset)))).items()}
    return float(step(batch, progress=0.0).loss)


def finish(loss_before: float, step: purekd.Step, dataset: list[dict[str, Tensor]],
           train_losses: list[float]) -> Result:
    """The :class:`Result` of a finished run of ``step`` (the unwrapped step)."""

    def copy(module: nn.Module) -> dict[str, Tensor]:
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}

    return Result(loss_before, evaluate(step, dataset), train_losses, copy(step.student),
                  copy(step.projections))
