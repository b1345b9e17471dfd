"""What the runner, the distillers, the integrations and the teacher cache import, read from
their source: the runner imports neither the distillation config nor the losses (only the
training config's own module), the teacher cache does not import the runner, and each package's
docstring states its layer and what it imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PURE = Path(__file__).resolve().parents[2] / "purekd"


def imported(package: str) -> set[str]:
    """Every ``purekd...`` module the package's files import (relative ones resolved)."""
    found: set[str] = set()
    for path in (PURE / package).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:  # from . import x / from ._y import z: inside the package
                    continue
                found.add(node.module or "")
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("purekd")}


def test_the_runner_imports_the_training_config_alone() -> None:
    assert imported("runner") == {"purekd._atomic", "purekd._collectives", "purekd._devices",
                                  "purekd.configs._training", "purekd.stages"}


def test_the_teacher_cache_does_not_import_the_runner() -> None:
    assert not any(name.startswith("purekd.runner") for name in imported("teacher_cache"))


@pytest.mark.parametrize(("package", "layer", "allowed"), [
    ("runner", "Layer 6", {"purekd._atomic", "purekd._collectives", "purekd._devices",
                           "purekd.configs._training",
                           "purekd.stages"}),
    ("distillers", "Layer 7", {"purekd._devices", "purekd.combinators", "purekd.configs",
                               "purekd.runner", "purekd.stages", "purekd.teacher_cache",
                               "purekd.terms"}),
    ("integrations", "Layer 7", {"purekd._collectives", "purekd._keys", "purekd.combinators", "purekd.runner", "purekd.runner._guard",
                                 "purekd.runner._sinks", "purekd.stages",
                                 "purekd.teacher_cache", "purekd.integrations.hf_trainer"}),
])
def test_each_docstring_names_its_layer_and_imports(package: str, layer: str,
                                                    allowed: set[str]) -> None:
    doc = ast.get_docstring(ast.parse((PURE / package / "__init__.py").read_text())) or ""
    assert doc.startswith(layer), doc[:80]
    assert imported(package) <= allowed, imported(package) - allowed
