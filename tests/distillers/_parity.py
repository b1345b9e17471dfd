"""TextBrewer 0.2.1 and purekd trained side by side, and what each leaves behind compared.

:func:`both` trains a deep copy of one teacher/student pair with each library — the same
configuration, the same data order (torch, ``random`` and NumPy reseeded right before the loader
is built), projections drawn under the same seed — and asserts that the two runs end alike:

* the final student weights and, for GeneralDistiller / MultiTaskDistiller, the projection
  weights (TextBrewer's ``distiller.projs`` against purekd's), within ``ATOL``;
* the steps the callback was called with, and the callback got the student itself;
* the ``gs{N}.pkl`` file names in ``output_dir`` (purekd's other files, e.g. ``metrics.jsonl``,
  are ignored), and every purekd checkpoint loads with ``torch.load(weights_only=True)`` and
  equals TextBrewer's checkpoint of the same name.
"""

from __future__ import annotations

import copy
import math
import random
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import textbrewer
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import purekd
from tests._toys import BrokenTeacher  # noqa: F401  (re-exported to the parity tests)
from tests._toys import _fields as fields

ATOL = 1e-5
PROJECTION_SEED = 1  # torch.manual_seed right before each distiller is constructed
DATA_SEED = 7  # torch / random / numpy seed right before the loader is built
CHECKPOINT = re.compile(r"gs(\d+)\.pkl$")

KINDS = ("basic", "general", "multiteacher", "multitask", "trainer")


def distiller_class(lib: Any, kind: str) -> Any:
    return {
        "basic": lib.BasicDistiller,
        "general": lib.GeneralDistiller,
        "multiteacher": lib.MultiTeacherDistiller,
        "multitask": lib.MultiTaskDistiller,
        "trainer": lib.BasicTrainer,
    }[kind]


# -- models, adaptors, data -------------------------------------------------------------------


class Encoder(nn.Module):
    """``forward(x, mask, labels=None, scale=1.0) -> dict``.

    ``x`` ``(B, L, in_dim)``, ``mask`` ``(B, L)``. Returns ``'logits'`` (a list of
    ``n_logits`` heads, ``(B, C)``, or ``(B, L, C)`` with ``token_level``), ``'hidden'``
    (``layers + 1`` tensors ``(B, L, width)``), ``'attention'`` (``layers`` raw score tensors
    ``(B, heads, L, L)``, some negative) and, with labels, ``'loss'`` (summed cross-entropy of
    the heads, ``-100`` ignored). ``dropout`` > 0 adds dropout after each block.
    """

    def __init__(self, width: int = 6, layers: int = 2, classes: int = 3, heads: int = 2,
                 in_dim: int = 4, token_level: bool = False, n_logits: int = 1,
                 dropout: float = 0.0):
        super().__init__()
        self.heads, self.token_level = heads, token_level
        self.embed = nn.Linear(in_dim, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.scores = nn.ModuleList(nn.Linear(width, 2 * heads * 3) for _ in range(layers))
        self.outs = nn.ModuleList(nn.Linear(width, classes) for _ in range(n_logits))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None = None,
                scale: float = 1.0) -> dict[str, Any]:
        batch, length = x.shape[:2]
        h = self.embed(x) * scale
        hidden, attention = [h], []
        for block, scores in zip(self.blocks, self.scores, strict=True):
            q, k = scores(h).view(batch, length, 2, self.heads, 3).permute(2, 0, 3, 1, 4)
            attention.append(q @ k.transpose(-1, -2) / math.sqrt(3))
            h = self.dropout(torch.tanh(block(h)))
            hidden.append(h)
        pooled = h if self.token_level else h[:, 0]
        logits = [out(pooled) for out in self.outs]
        result: dict[str, Any] = {"logits": logits, "hidden": hidden, "attention": attention}
        if labels is not None:
            result["loss"] = sum(
                F.cross_entropy(z.reshape(-1, z.size(-1)), labels.reshape(-1), ignore_index=-100)
                for z in logits)
        return result


class KeywordEncoder(Encoder):
    """An :class:`Encoder` whose forward takes keyword arguments only (for dict batches)."""

    def forward(self, *, x: torch.Tensor, mask: torch.Tensor,  # type: ignore[override]
                labels: torch.Tensor | None = None, scale: float = 1.0) -> dict[str, Any]:
        return super().forward(x, mask, labels, scale)


def make_adaptor(*, head: int | None = None, logits_mask: bool = False, labels: bool = True,
                 losses: bool = True, logits: bool = True,
                 inputs_mask: bool = True) -> Callable[[Any, Any], dict]:
    """An adaptor for :class:`Encoder` outputs on ``(x, mask, labels)`` or dict batches.

    ``head`` picks one logits head (a single tensor, not a list); ``logits_mask`` adds the
    input mask as the logits mask (one per logits tensor); ``inputs_mask=False`` leaves out the
    mask the intermediate losses use.
    """

    def adaptor(batch: Any, outputs: Any) -> dict[str, Any]:
        data = fields(batch)
        result: dict[str, Any] = {"hidden": list(outputs["hidden"]),
                                  "attention": list(outputs["attention"])}
        if inputs_mask:
            result["inputs_mask"] = data["mask"]
        if logits:
            result["logits"] = list(outputs["logits"]) if head is None else outputs["logits"][head]
            if labels and data.get("labels") is not None:
                result["labels"] = data["labels"]
            if logits_mask:
                result["logits_mask"] = data["mask"]
        if losses and "loss" in outputs:
            result["losses"] = outputs["loss"]
        return result

    return adaptor


def tensors(size: int, *, seed: int = 0, length: int = 5, in_dim: int = 4, classes: int = 3,
            token_level: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, mask, labels)`` with padded rows (every other row loses a tail of 1..L-1 tokens);
    token-level labels are ``-100`` at padding. Drawn from a private generator."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(size, length, in_dim, generator=gen)
    mask = torch.ones(size, length, dtype=torch.long)
    for row in range(1, size, 2):
        mask[row, length - 1 - row % (length - 1):] = 0
    if token_level:
        labels = torch.randint(classes, (size, length), generator=gen).masked_fill(mask == 0, -100)
    else:
        labels = torch.randint(classes, (size,), generator=gen)
    return x, mask, labels


def tuple_data(size: int = 14, **kwargs: Any) -> TensorDataset:
    return TensorDataset(*tensors(size, **kwargs))


def dict_data(size: int = 14, **kwargs: Any) -> list[dict[str, torch.Tensor]]:
    x, mask, labels = tensors(size, **kwargs)
    return [{"x": x[i], "mask": mask[i], "labels": labels[i]} for i in range(size)]


def loader(data: Any, batch_size: int = 4, shuffle: bool = True) -> Callable[[], DataLoader]:
    """A factory: the DataLoader is built after the data seed is set, in each run."""
    return lambda: DataLoader(data, batch_size=batch_size, shuffle=shuffle)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


# -- one run, two runs ------------------------------------------------------------------------


@attrs.define
class Run:
    lib: Any
    distiller: Any
    student: nn.Module
    steps: list[int]
    output_dir: Path

    @property
    def projections(self) -> list[nn.Module | None]:
        return list(getattr(self.distiller, "projs", []))

    def checkpoints(self) -> dict[str, Path]:
        return {p.name: p for p in self.output_dir.iterdir() if CHECKPOINT.match(p.name)}


def run(lib: Any, kind: str, teacher: Any, student: nn.Module, adaptor_T: Any, adaptor_S: Any,
        *, output_dir: Path, data: Callable[[], Any], training: Mapping[str, Any] | None = None,
        distillation: Mapping[str, Any] | None = None,
        train: Mapping[str, Any] | Callable[[torch.optim.Optimizer], Mapping[str, Any]] = (),
        lr: float = 0.1, compile: bool = False, callback_eval: bool = False,
        distiller_kwargs: Mapping[str, Any] | None = None) -> Run:
    """Train deep copies of ``teacher`` and ``student`` with ``lib`` (textbrewer or purekd).

    ``data()`` builds the loader (or the dict of loaders) after the data seed is set;
    ``train`` holds ``train()``'s keyword arguments, or builds them from the optimizer (for
    the deprecated ``scheduler=``). ``callback_eval``: the callback leaves the student in eval
    mode (the distillers must put it back in train mode).
    """
    teacher, student = copy.deepcopy((teacher, student))
    t_config = lib.TrainingConfig(device="cpu", output_dir=str(output_dir), **dict(training or {}))
    extra = dict(distiller_kwargs or {})
    if lib is purekd:
        extra["compile"] = compile
    torch.manual_seed(PROJECTION_SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # purekd: "ignores is_caching_logits"
        if kind == "trainer":
            distiller = lib.BasicTrainer(t_config, student, adaptor_S, **extra)
        else:  # a fresh config per run: TextBrewer mutates it (weights, proj lists)
            d_config = lib.DistillationConfig(**copy.deepcopy(dict(distillation or {})))
            distiller = distiller_class(lib, kind)(t_config, d_config, teacher, student,
                                                   adaptor_T, adaptor_S, **extra)
    optimizer = torch.optim.SGD(student.parameters(), lr=lr)
    kwargs = dict(train(optimizer) if callable(train) else train)
    steps: list[int] = []

    def callback(model: nn.Module, step: int) -> None:
        assert model is student
        steps.append(step)
        if callback_eval:
            model.eval()

    seed_everything(DATA_SEED)
    dataloader = data()
    with distiller, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # train(scheduler=...)
        distiller.train(optimizer, dataloader, callback=callback, **kwargs)
    return Run(lib, distiller, student, steps, Path(output_dir))


def both(kind: str, teacher: Any, student: nn.Module, adaptor_T: Any = None,
         adaptor_S: Any = None, *, tmp_path: Path, atol: float = ATOL,
         **options: Any) -> tuple[Run, Run]:
    """TextBrewer's run and purekd's, asserted alike (see the module docstring)."""
    adaptor_T = make_adaptor() if adaptor_T is None else adaptor_T
    adaptor_S = make_adaptor() if adaptor_S is None else adaptor_S
    tb = run(textbrewer, kind, teacher, student, adaptor_T, adaptor_S,
             output_dir=tmp_path / "textbrewer", **options)
    ours = run(purekd, kind, teacher, student, adaptor_T, adaptor_S,
               output_dir=tmp_path / "purekd", **options)
    assert_same(ours, tb, atol)
    assert_trained(ours.student, student)
    return tb, ours


def assert_same(ours: Run, tb: Run, atol: float = ATOL) -> None:
    assert ours.steps == tb.steps, f"callback steps: purekd {ours.steps}, TextBrewer {tb.steps}"
    assert tb.steps, "the scenario saved no checkpoint"
    assert_state_close(ours.student.state_dict(), tb.student.state_dict(), atol, "final student")
    projections, projections_TB = ours.projections, tb.projections
    assert len(projections) == len(projections_TB)
    for index, (p, q) in enumerate(zip(projections, projections_TB, strict=True)):
        assert (p is None) == (q is None), f"projs[{index}]"
        if p is not None:
            assert_state_close(p.state_dict(), q.state_dict(), atol, f"projs[{index}]")
    saved, saved_TB = ours.checkpoints(), tb.checkpoints()
    assert sorted(saved) == sorted(saved_TB), (sorted(saved), sorted(saved_TB))
    assert sorted(int(CHECKPOINT.match(n).group(1)) for n in saved) == sorted(tb.steps)  # type: ignore[union-attr]
    for name, path in saved.items():
        state = torch.load(path, weights_only=True)
        state_TB = torch.load(saved_TB[name], weights_only=True)
        assert_state_close(state, state_TB, atol, name)


def assert_state_close(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                       atol: float, what: str) -> None:
    assert list(state) == list(expected), f"{what}: keys {list(state)} != {list(expected)}"
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, atol=atol, rtol=0,
                                   msg=lambda m, k=key: f"{what}, {k}: {m}")


def assert_trained(trained: nn.Module, initial: nn.Module) -> None:
    """The scenario changed the student (a parity test of an untrained model proves little)."""
    changed = any(not torch.equal(a, b) for a, b in
                  zip(trained.state_dict().values(), initial.state_dict().values(), strict=True))
    assert changed, "training left the student unchanged"
