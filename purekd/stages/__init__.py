"""Layer 3 — pipeline stages: pure functions from a batch to normalised model outputs.

``batch_split`` → ``forward`` → ``adapt`` (→ :class:`Adapted`), plus ``probability_shift`` and
the shape checks that run before the loss path.
"""

from ._adapt import Adapted, AdaptorError, adapt, detach, mean_logits, normalise
from ._forward import forward
from ._probability_shift import probability_shift
from ._split import Split, batch_split

__all__ = [
    "Adapted",
    "AdaptorError",
    "Split",
    "adapt",
    "batch_split",
    "detach",
    "forward",
    "mean_logits",
    "normalise",
    "probability_shift",
]
