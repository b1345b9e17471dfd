"""The layers of DESIGN.md, read from the imports: each pure layer imports only the layers
listed above it (and the leaf helper modules), as its package docstring says."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "purekd"
LEAVES = {"_masked", "_compiling", "_keys", "_sharded", "_collectives"}
ALLOWED = {
    "losses": LEAVES,
    "schedules": LEAVES,
    "stages": LEAVES | {"losses", "schedules", "_atomic"},  # _vocabulary caches maps on disk
    "terms": LEAVES | {"losses", "schedules", "stages", "terms"},
    "combinators": LEAVES | {"losses", "schedules", "stages", "terms", "presets", "configs"},
}


def _imported(path: Path) -> set[str]:
    """The ``purekd`` subpackages or modules a file imports (first name after ``purekd.``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] == "purekd":
                names |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[1] for a in node.names
                      if a.name.startswith("purekd.")}
    return names


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_a_layer_imports_only_the_layers_above_it(layer):
    for path in sorted((PACKAGE / layer).glob("*.py")):
        extra = _imported(path) - ALLOWED[layer] - {layer}
        assert not extra, f"purekd/{layer}/{path.name} imports {sorted(extra)}"


def test_presets_and_configs_import_only_layers_one_and_two():
    allowed = LEAVES | {"losses", "schedules", "projections", "presets", "configs"}
    for path in [PACKAGE / "presets.py", *sorted((PACKAGE / "configs").glob("*.py"))]:
        extra = _imported(path) - allowed
        assert not extra, f"{path.name} imports {sorted(extra)}"
