"""Layer 7, beside the distillers — language-model distillation from one recipe file:
``purekd distill RECIPE.yaml [key=value ...]`` (see ``docs/recipes.md``).

* The schema (:class:`Recipe` and its sections: frozen ``attrs`` classes), read from YAML and
  validated by :func:`load` / :func:`validate` — every problem in one :class:`RecipeError`,
  each with its key path — before anything heavy is imported; :func:`apply_overrides` types
  the command line's dotted ``key=value`` overrides by the schema.
* :func:`run` runs a recipe: models, data, the teacher (live, its top-k cache, on the
  student's own samples with ``teacher.source: on_policy``, or with a tokenizer of its own
  and ``gold``/``uld``), training through
  ``GeneralDistiller``, a ``save_pretrained`` student (:func:`save_pretrained_student`) at each
  checkpoint and at the end, a progress bar and a summary.
* Shipped recipes: :func:`names`, :func:`shipped_text` (``purekd recipes [show NAME]``).

Importing this package imports neither torch nor transformers; :func:`run`,
:func:`train_student` and :func:`save_pretrained_student` import them when called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._convert import RecipeError
from ._load import apply_overrides, dump, load, read_yaml, validate
from ._schema import (
    Checkpoint,
    Data,
    Loss,
    Match,
    Metrics,
    OnPolicy,
    Optimizer,
    Recipe,
    Schedule,
    Student,
    Teacher,
    Train,
)
from ._shipped import names, shipped_path, shipped_text

if TYPE_CHECKING:
    from ._export import save_pretrained_student
    from ._progress import Summary
    from ._run import run
    from ._train import train_student

_LAZY = {"run": "._run", "Summary": "._progress", "train_student": "._train",
         "save_pretrained_student": "._export"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'purekd.recipes' has no attribute {name!r}")


__all__ = [
    "Checkpoint",
    "Data",
    "Loss",
    "Match",
    "Metrics",
    "OnPolicy",
    "Optimizer",
    "Recipe",
    "RecipeError",
    "Schedule",
    "Student",
    "Summary",
    "Teacher",
    "Train",
    "apply_overrides",
    "dump",
    "load",
    "names",
    "read_yaml",
    "run",
    "save_pretrained_student",
    "shipped_path",
    "shipped_text",
    "train_student",
    "validate",
]
