"""``TrainingConfig``, ``DistillationConfig``, ``IntermediateMatch``, ``FSDPConfig``: frozen,
validated data.

Argument names and defaults are TextBrewer 0.2.1's. Differences, all deliberate:

* every value is checked when the config is built; a bad one raises ``ValueError`` (or
  ``TypeError``) naming the field, the value and what is valid;
* configs are immutable (change one with ``config.replace(temperature=8)`` or
  :func:`attrs.evolve`; assigning a field raises :class:`ImmutableConfigError` saying so);
  training never writes into them — TextBrewer overwrote ``kd_loss_weight`` as it trained, here weights are schedules;
* ``device`` defaults to CUDA when available, else CPU; ``fp16`` means ``torch.autocast`` with a
  gradient scaler (no Apex), and ``bf16`` is offered too; the output directory is created when
  training starts, not when the config is built.

``from_dict`` / ``from_json_file`` reject unknown keys; ``to_dict`` / ``to_json`` round-trip.
``TrainingConfig`` and ``DistillationConfig`` take positional arguments in TextBrewer's order
(``DistillationConfig(8)`` is ``temperature=8``); fields TextBrewer does not have (``bf16``) are
keyword-only.
"""

from ._distillation import DistillationConfig, IntermediateMatch
from ._io import ImmutableConfigError
from ._on_policy import OnPolicyConfig
from ._training import TEACHER_PLACEMENTS, FSDPConfig, TrainingConfig

__all__ = ["TEACHER_PLACEMENTS", "DistillationConfig", "FSDPConfig", "ImmutableConfigError",
           "IntermediateMatch", "OnPolicyConfig", "TrainingConfig"]
