"""Layer 7 — the TextBrewer-compatible distillers: thin facades over make_step and the runner."""

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
