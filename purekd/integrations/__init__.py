"""Integrations with other libraries' models and training loops.

* :mod:`purekd.integrations.huggingface` — :func:`hf_adaptor`, an adaptor built from a
  ``transformers`` ``ModelOutput`` (logits, hidden states, attentions, loss, padding mask).

Embedding a step in a foreign training loop (plain PyTorch, Hugging Face ``Trainer``, Lightning,
Accelerate) needs no glue beyond the step itself: see ``examples/foreign_loops/``.

Nothing here imports the third-party library it integrates with.
"""

from .huggingface import HFAdaptor, hf_adaptor

__all__ = ["HFAdaptor", "hf_adaptor"]
