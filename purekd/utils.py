"""``display_parameters``: a table of a model's parameter counts and memory, layer by layer.

The same text as TextBrewer 0.2.1's ``textbrewer.utils.display_parameters``, so scripts written
for TextBrewer (its random-tokens example prints both models with it) run unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

_HEADER = ("LAYER NAME", "#PARAMS", "RATIO", "MEM(MB)")


class ParameterNode:
    """One level of a module tree: ``name``, dotted ``fullname``, ``value = [count, MB]`` (the
    sum over everything below it) and ``children`` by name (insertion order = ``state_dict``
    order). A tensor seen before (tied weights: same storage) counts 0 and is marked
    ``"(shared)"``."""

    def __init__(self, name: str, fullname: str):
        self.name = name
        self.fullname = fullname
        self.value: list[float] = [0, 0.0]
        self.children: dict[str, ParameterNode] = {}

    def child(self, name: str) -> ParameterNode:
        if name not in self.children:
            self.children[name] = ParameterNode(name, f"{self.fullname}.{name}")
        return self.children[name]

    def _width(self, level: int, max_level: int | None) -> int:
        """The widest ``indent + name`` at or below this node (children down to ``max_level``)."""
        own = len(self.name) + 2 + 2 * level
        if max_level is not None and level >= max_level:
            return own
        return max([own, *(c._width(level + 1, max_level) for c in self.children.values())])

    def _row(self, label: str, width: int, total: float) -> str:
        count, megabytes = self.value
        ratio = count / total if total else 0.0
        return f"{label + ':':<{width}}\t{int(count):15,d}\t{ratio:>10.2%}\t{megabytes:>8.2f}\n"

    def format(self, max_level: int | None = None, level: int = 0,
               total: float | None = None, width: int | None = None) -> str:
        """The table: a header, then one row per node (a node with exactly one child shows its
        name only), children indented by two spaces, down to ``max_level`` (rows at
        ``max_level`` sum everything below)."""
        text = ""
        if total is None:
            total = self.value[0]
        if width is None:
            width = self._width(0, max_level) + 1
        if level == 0:
            name, count, ratio, memory = _HEADER
            text += f"\n{name:<{width}}\t{count:>15}\t{ratio:>10}\t{memory:>8}\n"
        label = "  " * level + "--" + self.name
        if max_level is not None and level == max_level:
            return text + self._row(label, width, total)
        text += f"{label:<{width}}\n" if len(self.children) == 1 else self._row(label, width,
                                                                                 total)
        for child in self.children.values():
            text += child.format(max_level, level + 1, total, width)
        return text


def display_parameters(model: torch.nn.Module | Mapping[str, torch.Tensor],
                       max_level: int | None = None) -> tuple[str, ParameterNode]:
    """The parameter (and buffer) counts and memory of ``model``, per module, as a table.

    ``model`` is a module (its ``state_dict()``) or a state dict; ``max_level`` the deepest
    level shown (``None``: all). Returns ``(text, root)``: the formatted table — the same text
    TextBrewer 0.2.1's ``textbrewer.utils.display_parameters`` returns — and the tree of
    :class:`ParameterNode` it was made from. Memory is ``numel * element_size`` in MiB.
    """
    if isinstance(model, torch.nn.Module):
        state: Mapping[str, Any] = model.state_dict()
    elif isinstance(model, Mapping):
        state = model
    else:
        raise TypeError(f"display_parameters(model=...): expected an nn.Module or a state dict, "
                        f"got {type(model).__name__}")
    if max_level is not None and (isinstance(max_level, bool) or not isinstance(max_level, int)
                                  or max_level < 0):
        raise ValueError(f"display_parameters(max_level={max_level!r}): an int >= 0, or None "
                         "for every level")
    root = ParameterNode("model", "model")
    seen: set[int] = set()
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"display_parameters: state[{key!r}] is a {type(tensor).__name__}, "
                            "expected a tensor")
        path = [root]
        for part in key.split("."):
            path.append(path[-1].child(part))
        leaf = path[-1]
        if tensor.data_ptr() in seen:
            value: list[float] = [0, 0.0]
            leaf.name += "(shared)"
            leaf.fullname += "(shared)"
        else:
            seen.add(tensor.data_ptr())
            value = [tensor.numel(), tensor.numel() * tensor.element_size() / 1024 / 1024]
        leaf.value = list(value)
        for node in path[:-1]:
            node.value = [node.value[0] + value[0], node.value[1] + value[1]]
    return root.format(max_level=max_level), root


__all__ = ["ParameterNode", "display_parameters"]
