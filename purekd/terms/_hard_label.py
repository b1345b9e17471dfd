"""The hard-label term: the losses the student's adaptor computed itself."""

from __future__ import annotations

from torch import Tensor

from purekd.stages import Adapted

from ._context import Context, Term, Weight


def hard_label(weight: Weight = 1.0, name: str = "hard_label_loss") -> Term:
    """A term ``{name: sum_i losses_S[i].mean()}`` over the student adaptor's ``losses``.

    ``.mean()`` reduces per-device losses gathered by DataParallel to one value. Returns ``{}``
    when the adaptor returned no ``losses``.
    """

    def term(adapted_S: Adapted, adapted_T: Adapted, ctx: Context) -> dict[str, Tensor]:
        del adapted_T, ctx
        if not adapted_S.losses:
            return {}
        total = adapted_S.losses[0].mean()
        for loss in adapted_S.losses[1:]:
            total = total + loss.mean()
        return {name: total}

    return Term(term, weight, name=name)


__all__ = ["hard_label"]
