"""The demo's data and models: scikit-learn's bundled handwritten digits (8x8 images, 10
classes, no download), a wide MLP teacher and a narrow MLP student."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset


class Digits(NamedTuple):
    """Train/test split of ``load_digits``; ``labelled`` marks the few training examples whose
    labels the students may see."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    labelled: Tensor


def load(num_labels: int, seed: int = 0) -> Digits:
    """Digits scaled to [0, 1], a stratified 75/25 split, and ``num_labels`` labelled training
    examples drawn evenly across classes."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    rng = np.random.default_rng(seed)
    per_class = max(1, num_labels // 10)
    chosen = np.concatenate([rng.permutation(np.flatnonzero(y_tr == c))[:per_class] for c in range(10)])
    chosen = chosen[:num_labels] if num_labels >= 10 else chosen
    labelled = np.zeros(len(y_tr), dtype=bool)
    labelled[chosen] = True
    return Digits(torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te),
                  torch.from_numpy(y_te), torch.from_numpy(labelled))


class MLP(nn.Module):
    """``64 -> hidden -> hidden -> 10`` with ReLU; returns ``(logits, [h1, h2], loss)`` where
    ``loss`` is the cross-entropy on the labelled rows (0 when none is labelled)."""

    def __init__(self, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.layer1 = nn.Linear(64, hidden)
        self.layer2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, 10)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, y: Tensor | None = None, labelled: Tensor | None = None) -> Any:
        h1 = F.relu(self.layer1(x))
        h2 = F.relu(self.layer2(self.dropout(h1)))
        logits = self.head(self.dropout(h2))
        loss = logits.new_zeros(())
        if y is not None:
            weights = labelled.float() if labelled is not None else torch.ones_like(y, dtype=logits.dtype)
            per_row = F.cross_entropy(logits, y, reduction="none")
            loss = (per_row * weights).sum() / weights.sum().clamp_min(1)
        return logits, [h1, h2], loss


def adaptor(batch: Any, outputs: Any) -> dict[str, Any]:
    """The adaptor for :class:`MLP`: logits, the two hidden layers, the labelled-row loss."""
    logits, hidden, loss = outputs
    return {"logits": logits, "hidden": hidden, "losses": [loss]}


class Rows(Dataset):
    """``(x, y, labelled)`` triples as a dataset."""

    def __init__(self, x: Tensor, y: Tensor, labelled: Tensor):
        self.x, self.y, self.labelled = x, y, labelled

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        return self.x[i], self.y[i], self.labelled[i]


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        predicted = model(x)[0].argmax(dim=-1)
    model.train(was_training)
    return float((predicted == y).float().mean())


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["MLP", "Digits", "Rows", "accuracy", "adaptor", "load", "parameter_count"]
