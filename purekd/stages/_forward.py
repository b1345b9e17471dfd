"""``forward``: call a model on a batch by the forward conventions."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any


def forward(model: Callable[..., Any], batch: Any, **args: Any) -> Any:
    """Call ``model`` on ``batch``: a mapping as ``model(**batch, **args)``, a tuple or list as
    ``model(*batch, **args)``.

    Extra keyword ``args`` (TextBrewer's ``**args`` of ``train``) go to every call. A list of
    dicts (samples a ``collate_fn`` did not stack) raises a ``TypeError`` pointing at the
    ``collate_fn``.
    """
    if isinstance(batch, Mapping):
        return model(**batch, **args)
    if isinstance(batch, (tuple, list)):
        if batch and all(isinstance(item, Mapping) for item in batch):
            raise TypeError(
                f"the batch is a {type(batch).__name__} of {len(batch)} dicts (one per sample, "
                f"keys {list(batch[0].keys())}), not a dict of batched tensors: the DataLoader's "
                "collate_fn did not stack the samples (e.g. collate_fn=lambda items: items); "
                "drop that collate_fn (the default stacks dicts of tensors), or return "
                "torch.utils.data.default_collate(items) from it"
            )
        return model(*batch, **args)
    raise TypeError(
        f"a batch must be a dict (called as model(**batch)) or a tuple/list (called as "
        f"model(*batch)), got {type(batch).__name__}; wrap a single tensor as (tensor,)"
    )


__all__ = ["forward"]
