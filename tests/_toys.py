"""Toy teachers, students, adaptors and batches for the step tests, and the TextBrewer oracle.

The models are tiny but return every adaptor feature TextBrewer knows: logits (per sequence
``(B, C)`` or per token ``(B, L, C)``, one or several heads), hidden states ``(B, L, D)`` for the
embedding and each layer, attention scores ``(B, H, L, L)`` per layer (raw scores, so some are
negative and the attention losses' ``<= -1e-3`` branch is exercised) and a hard-label loss.
"""

from __future__ import annotations

import copy
import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import textbrewer
import torch
import torch.nn.functional as F
from textbrewer.distiller_utils import CustomMatch as TBCustomMatch
from torch import nn

import purekd

__all__ = [
    "BrokenTeacher",
    "TBCustomMatch",
    "ToyEncoder",
    "assert_matches_textbrewer",
    "make_step",
    "textbrewer_distiller",
    "toy_adaptor",
    "toy_batch",
]

ATOL = 1e-5
_OUTPUT_DIR: str | None = None


def output_dir() -> str:
    """One temporary directory for TextBrewer's ``output_dir`` (checkpoints land there)."""
    global _OUTPUT_DIR
    if _OUTPUT_DIR is None:
        _OUTPUT_DIR = tempfile.mkdtemp(prefix="purekd-tb-")
    return _OUTPUT_DIR


class ToyEncoder(nn.Module):
    """``forward(x, mask, labels=None, scale=1.0) -> dict``.

    ``x`` ``(B, L, in_dim)``, ``mask`` ``(B, L)``; ``labels`` ``(B,)`` (or ``(B, L)`` with
    ``token_level``, ``-100`` = ignored). Returns ``{'logits': [n_logits tensors], 'hidden':
    [layers + 1 tensors (B, L, width)], 'attention': [layers tensors (B, heads, L, L)]}`` and
    ``'loss'`` (the summed cross-entropy of every head) when labels are given.
    """

    def __init__(self, width: int = 6, layers: int = 2, classes: int = 5, heads: int = 2,
                 in_dim: int = 4, token_level: bool = False, n_logits: int = 1):
        super().__init__()
        self.heads, self.token_level = heads, token_level
        self.embed = nn.Linear(in_dim, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.scores = nn.ModuleList(nn.Linear(width, 2 * heads * 3) for _ in range(layers))
        self.outs = nn.ModuleList(nn.Linear(width, classes) for _ in range(n_logits))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None = None,
                scale: float = 1.0) -> dict[str, Any]:
        batch, length = x.shape[:2]
        h = self.embed(x) * scale
        hidden, attention = [h], []
        for block, scores in zip(self.blocks, self.scores, strict=True):
            q, k = scores(h).view(batch, length, 2, self.heads, 3).permute(2, 0, 3, 1, 4)
            attention.append(q @ k.transpose(-1, -2) / math.sqrt(3))
            h = torch.tanh(block(h))
            hidden.append(h)
        pooled = h if self.token_level else h[:, 0]
        logits = [out(pooled) for out in self.outs]
        result: dict[str, Any] = {"logits": logits, "hidden": hidden, "attention": attention}
        if labels is not None:
            result["loss"] = sum(
                F.cross_entropy(z.reshape(-1, z.size(-1)), labels.reshape(-1), ignore_index=-100)
                for z in logits)
        return result


class BrokenTeacher(nn.Module):
    """A teacher that must never be called (cached teacher outputs are used instead)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the teacher was called although its outputs were cached")


def _fields(batch: Any) -> dict[str, Any]:
    if isinstance(batch, Mapping):
        return dict(batch)
    return dict(zip(("x", "mask", "labels"), batch, strict=False))


def toy_adaptor(*, logits: bool | int | Sequence[int] = True, logits_mask: bool = False,
                labels: bool = True, losses: bool = True, hidden: bool = True,
                attention: bool = True, inputs_mask: bool = True) -> Callable[[Any, Any], dict]:
    """An adaptor for :class:`ToyEncoder` outputs and :func:`toy_batch` batches (tuple or dict).

    ``logits``: ``True`` for every head, an int or a list of ints to pick heads (an int gives a
    single tensor, not a list — the adaptor convention TextBrewer accepts too).
    """

    def adaptor(batch: Any, outputs: Any) -> dict[str, Any]:
        fields = _fields(batch)
        result: dict[str, Any] = {}
        if logits is not False:
            heads = list(outputs["logits"])
            if logits is True:
                result["logits"] = heads
            elif isinstance(logits, int):
                result["logits"] = heads[logits]
            else:
                result["logits"] = [heads[i] for i in logits]
            count = len(result["logits"]) if isinstance(result["logits"], list) else 1
            if labels and fields.get("labels") is not None:
                result["labels"] = [fields["labels"]] * count
            if logits_mask:  # one mask per logits tensor: TextBrewer 0.2.1 crashes when a
                # single mask serves several 3-d logits (select_logits_with_mask reuses `mask`)
                is_list = isinstance(result["logits"], list)
                result["logits_mask"] = [fields["mask"]] * count if is_list else fields["mask"]
        if losses and "loss" in outputs:
            result["losses"] = outputs["loss"]
        if hidden:
            result["hidden"] = list(outputs["hidden"])
        if attention:
            result["attention"] = list(outputs["attention"])
        if inputs_mask:
            result["inputs_mask"] = fields["mask"]
        return result

    return adaptor


def toy_batch(seed: int = 0, *, size: int = 4, length: int = 7, in_dim: int = 4,
              classes: int = 5, token_level: bool = False, padded: bool = True,
              as_dict: bool = False, with_labels: bool = True) -> Any:
    """``(x, mask, labels)`` (or the dict ``{'x', 'mask', 'labels'}``) with some padding."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(size, length, in_dim, generator=gen)
    mask = torch.ones(size, length, dtype=torch.long)
    if padded:
        for row in range(1, size, 2):
            mask[row, length - 1 - row % (length - 1):] = 0
    if token_level:
        labels = torch.randint(classes, (size, length), generator=gen)
        labels = labels.masked_fill(mask == 0, -100)
    else:
        labels = torch.randint(classes, (size,), generator=gen)
    parts: tuple[Any, ...] = (x, mask, labels) if with_labels else (x, mask)
    if as_dict:
        return dict(zip(("x", "mask", "labels"), parts, strict=False))
    return parts


def make_step(config: Mapping[str, Any], model_T: Any, model_S: nn.Module, adaptor_T: Any,
              adaptor_S: Any, *, seed: int = 1, **kwargs: Any) -> Any:
    """purekd's eager step, with its projections drawn under ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    kwargs.setdefault("compile", False)
    return purekd.make_step(copy.deepcopy(dict(config)), model_T, model_S, adaptor_T, adaptor_S,
                            **kwargs)


def textbrewer_distiller(config: Mapping[str, Any], model_T: Any, model_S: nn.Module,
                         adaptor_T: Any, adaptor_S: Any, *, seed: int = 1,
                         kind: str = "general", **kwargs: Any) -> Any:
    """A fresh TextBrewer distiller, its projections drawn under ``torch.manual_seed(seed)``."""
    cls = {"general": textbrewer.GeneralDistiller,
           "multiteacher": textbrewer.MultiTeacherDistiller,
           "multitask": textbrewer.MultiTaskDistiller,
           "basic": textbrewer.BasicDistiller}[kind]
    train_config = textbrewer.TrainingConfig(device="cpu", output_dir=output_dir())
    distill_config = textbrewer.DistillationConfig(**copy.deepcopy(dict(config)))
    torch.manual_seed(seed)
    return cls(train_config, distill_config, model_T, model_S, adaptor_T, adaptor_S, **kwargs)


def clone_batch(value: Any) -> Any:
    """A deep copy of a batch's tensors (TextBrewer shifts cached teacher logits in place)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(clone_batch(v) for v in value)
    if isinstance(value, Mapping):
        return {k: clone_batch(v) for k, v in value.items()}
    return value


def assert_matches_textbrewer(config: Mapping[str, Any], model_T: Any, model_S: nn.Module,
                              adaptor_T: Any, adaptor_S: Any, batch: Any, *,
                              kind: str = "general", task: str | None = None,
                              args: Mapping[str, Any] | None = None,
                              atol: float = ATOL, grads: bool = True) -> purekd.StepOutput:
    """purekd's step at progress 0 equals a fresh TextBrewer distiller's ``train_on_batch``:
    the total loss and every term (``'unweighted_X'`` is ``out.terms['X']``); with ``grads``,
    also the gradients of the student's and the projections' parameters."""
    args = dict(args or {})
    step = make_step(config, model_T, model_S, adaptor_T, adaptor_S)
    out = step(batch, **args) if task is None else step(batch, task, **args)
    distiller = textbrewer_distiller(config, model_T, model_S, adaptor_T, adaptor_S, kind=kind)
    tb_batch = clone_batch(batch) if task is None else (clone_batch(batch), task)
    tb_loss, tb_terms = distiller.train_on_batch(tb_batch, args)
    if grads:
        projections_TB = [p for p in getattr(distiller, "projs", []) if p is not None]
        _assert_same_grads(out.loss, tb_loss, [model_S, *step.projections],
                           [model_S, *projections_TB], atol)
    expected = {name.removeprefix("unweighted_"): value for name, value in tb_terms.items()}
    assert set(out.terms) == set(expected), (sorted(out.terms), sorted(expected))
    for name, value in expected.items():
        torch.testing.assert_close(out.terms[name], value.to(out.terms[name].dtype),
                                   atol=atol, rtol=0, msg=lambda m, n=name: f"term {n!r}: {m}")
    torch.testing.assert_close(out.loss, tb_loss, atol=atol, rtol=0,
                               msg=lambda m: f"total loss: {m}")
    assert out.loss.requires_grad
    return out


def _grads(loss: torch.Tensor, modules: Sequence[nn.Module]) -> list[torch.Tensor]:
    params = [p for m in modules for p in m.parameters()]
    found = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, found, strict=True)]


def _assert_same_grads(loss: torch.Tensor, loss_TB: torch.Tensor, modules: Sequence[nn.Module],
                       modules_TB: Sequence[nn.Module], atol: float) -> None:
    ours, theirs = _grads(loss, modules), _grads(loss_TB, modules_TB)
    assert len(ours) == len(theirs)
    for index, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        torch.testing.assert_close(a, b, atol=atol, rtol=0,
                                   msg=lambda m, i=index: f"gradient of parameter #{i}: {m}")


def assert_tree_close(actual: Any, expected: Any, atol: float = ATOL) -> None:
    """Nested tuples / lists / dicts (an ``Adapted`` included) of tensors are close."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), type(actual)
        torch.testing.assert_close(actual, expected, atol=atol, rtol=0)
    elif isinstance(expected, (tuple, list)):
        assert isinstance(actual, (tuple, list)) and len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            assert_tree_close(a, e, atol)
    elif isinstance(expected, Mapping):
        assert set(actual) == set(expected)
        for key in expected:
            assert_tree_close(actual[key], expected[key], atol)
    else:
        assert actual == expected
