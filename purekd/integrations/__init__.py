"""Layer 7, beside the distillers — integrations with other libraries' models and training
loops. Imports the stages (3), the combinators (4, ``Step``), the runner (6: the metric
sinks and the non-finite error), the teacher cache (6: its dataset and collate, refused with
an on-policy step) and the leaves ``purekd._collectives`` (the exit guard of a distributed run) and ``purekd._keys``
(the adaptor key names).

* :mod:`purekd.integrations.huggingface` — :func:`hf_adaptor`, an adaptor built from a
  ``transformers`` ``ModelOutput`` (logits, hidden states, attentions, loss, padding mask).

* :mod:`purekd.integrations.hf_trainer` — :class:`DistillationTrainer`, the Hugging Face
  ``Trainer`` with a step as its model (imports ``transformers``; loaded on first use).

Embedding a step in another foreign training loop (plain PyTorch, Lightning, Accelerate) needs
no glue beyond the step itself: see ``examples/foreign_loops/``.

Importing this package imports no third-party library; ``DistillationTrainer`` imports
``transformers`` when it is first accessed.
"""

from typing import Any

from .huggingface import HFAdaptor, hf_adaptor

__all__ = ["DistillationTrainer", "HFAdaptor", "hf_adaptor"]


def __getattr__(name: str) -> Any:
    if name == "DistillationTrainer":
        from .hf_trainer import DistillationTrainer

        return DistillationTrainer
    raise AttributeError(f"module 'purekd.integrations' has no attribute {name!r}")
