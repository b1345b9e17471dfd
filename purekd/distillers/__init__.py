"""Layer 7 — the TextBrewer-compatible distillers: thin facades over make_step and the runner.

Imports the terms and stages (3), the combinators (4), the runner and the teacher cache (6:
its dataset and collate, to refuse them with an on-policy step), the configs and the leaf
module ``purekd._devices``."""

from ._base import Distiller, ModeContext
from ._distillers import (
    BasicDistiller,
    BasicTrainer,
    GeneralDistiller,
    MultiTaskDistiller,
    MultiTeacherDistiller,
)

__all__ = [
    "BasicDistiller",
    "BasicTrainer",
    "Distiller",
    "GeneralDistiller",
    "ModeContext",
    "MultiTaskDistiller",
    "MultiTeacherDistiller",
]
