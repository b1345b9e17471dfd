"""``hard_label`` sums the adaptor's losses; ``make_context`` / ``Term`` / ``as_term``."""

from __future__ import annotations

import torch

from purekd.stages import Adapted, normalise
from purekd.terms import Context, Term, as_term, hard_label, make_context


def test_hard_label_sums_the_means_of_the_losses():
    losses = [torch.tensor([1.0, 3.0]), torch.tensor(0.5), torch.tensor([[2.0]])]
    got = hard_label()(normalise({"losses": losses}), normalise({"logits": torch.zeros(1, 2)}),
                       make_context())
    torch.testing.assert_close(got["hard_label_loss"], torch.tensor(2.0 + 0.5 + 2.0))
    assert hard_label(name="ce")(normalise({"losses": losses[1]}), Adapted(), make_context()) \
        == {"ce": losses[1]}


def test_hard_label_without_losses_gives_no_term():
    assert hard_label()(normalise({"logits": torch.zeros(1, 2)}), Adapted(), make_context()) == {}


def test_make_context_holds_0_dim_tensors():
    ctx = make_context(0.25, 7)
    assert isinstance(ctx, Context)
    assert ctx.progress.dtype == torch.float32 and ctx.progress.dim() == 0
    assert ctx.step.dtype == torch.int64 and ctx.step.item() == 7
    assert ctx.progress.item() == 0.25
    progress = torch.tensor(0.5)
    assert make_context(progress).progress is progress  # tensors pass through


def test_term_and_as_term():
    def fn(s, t, ctx):
        return {"x": ctx.progress}

    term = as_term(fn)
    assert isinstance(term, Term) and term.weight == 1.0
    assert as_term(term) is term
    term.check(None, None)  # the default check accepts anything
    assert term(None, None, make_context(0.5))["x"].item() == 0.5
