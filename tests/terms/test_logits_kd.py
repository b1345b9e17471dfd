"""``logits_kd``: equal to the KD loss computed by hand on (shifted, masked) logits."""

from __future__ import annotations

import pytest
import torch

from purekd import losses, schedules
from purekd.stages import normalise, probability_shift
from purekd.terms import check_logits, logits_kd, logits_mask_for, make_context

CTX = make_context(0.3)


def logits(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_sum_over_logits_pairs():
    s = normalise({"logits": [logits(0, 4, 5), logits(1, 4, 3)]})
    t = normalise({"logits": [logits(2, 4, 5), logits(3, 4, 3)]})
    got = logits_kd(losses.kd_mse, 2.0)(s, t, CTX)
    expected = (losses.kd_mse(s.logits[0], t.logits[0], 2.0)
                + losses.kd_mse(s.logits[1], t.logits[1], 2.0))
    assert list(got) == ["kd_loss"]
    torch.testing.assert_close(got["kd_loss"], expected)


def test_temperature_schedule_and_probability_shift():
    labels = torch.tensor([0, 3, 1, 4])
    s = normalise({"logits": logits(0, 4, 5), "labels": labels})
    t = normalise({"logits": logits(1, 4, 5)})
    schedule = schedules.flsw(1.0, 2.0)
    got = logits_kd(losses.kd_ce, 4.0, schedule, shift_probability=True)(s, t, CTX)["kd_loss"]
    shifted = probability_shift(t.logits[0], labels)
    tau = schedule(s.logits[0], shifted, 4.0)
    torch.testing.assert_close(got, losses.kd_ce(s.logits[0], shifted, tau))
    torch.testing.assert_close(shifted.argmax(-1), labels)


def test_token_logits_use_the_logits_mask_and_pass_it_to_the_schedule():
    mask = torch.ones(2, 6)
    mask[1, 3:] = 0
    s = normalise({"logits": logits(0, 2, 6, 5), "logits_mask": mask})
    t = normalise({"logits": logits(1, 2, 6, 5)})
    schedule = schedules.cwsm(1.0)
    got = logits_kd(losses.kd_ce, 2.0, schedule)(s, t, CTX)["kd_loss"]
    # by hand: select the unmasked rows, as TextBrewer does
    rows = mask.bool()
    rows_S, rows_T = s.logits[0][rows], t.logits[0][rows]
    torch.testing.assert_close(got, losses.kd_ce(rows_S, rows_T, schedule(rows_S, rows_T, 2.0)))


def test_one_mask_serves_every_logits_tensor():
    """Beyond TextBrewer 0.2.1 (which crashes on it): one logits_mask for several 3-d logits."""
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    pair = [logits(0, 2, 3, 4), logits(1, 2, 3, 2)]
    teacher = normalise({"logits": [logits(2, 2, 3, 4), logits(3, 2, 3, 2)]})
    term = logits_kd(losses.kd_ce, 1.0)
    single = term(normalise({"logits": pair, "logits_mask": mask}), teacher, CTX)
    each = term(normalise({"logits": pair, "logits_mask": [mask, mask]}), teacher, CTX)
    torch.testing.assert_close(single["kd_loss"], each["kd_loss"])


def test_a_flat_token_mask_on_2d_logits_is_honoured():
    """Flat (N, V) token logits with an (N,) mask: the mask selects rows (TextBrewer would drop
    it silently)."""
    keep = torch.tensor([1, 0, 0, 1])
    s = normalise({"logits": logits(0, 4, 5), "logits_mask": keep})
    t = normalise({"logits": logits(1, 4, 5)})
    got = logits_kd(losses.kd_ce, 2.0)(s, t, CTX)["kd_loss"]
    rows = keep.bool()
    torch.testing.assert_close(got, losses.kd_ce(s.logits[0][rows], t.logits[0][rows], 2.0))


def test_a_mask_that_does_not_fit_2d_logits_is_ignored_with_a_warning():
    """TextBrewer's own case, a (B, L) padding mask beside (B, C) logits: ignored as TextBrewer
    does, but said."""
    s = normalise({"logits": logits(0, 2, 5), "logits_mask": torch.ones(2, 7)})
    t = normalise({"logits": logits(1, 2, 5)})
    term = logits_kd(losses.kd_ce, 2.0)
    with pytest.warns(UserWarning, match=r"logits_mask of shape \(2, 7\).*ignored"):
        term.check(s, t)
    torch.testing.assert_close(term(s, t, CTX)["kd_loss"],
                               losses.kd_ce(s.logits[0], t.logits[0], 2.0))


def test_a_mask_that_does_not_fit_3d_logits_raises():
    s = normalise({"logits": logits(0, 2, 3, 5), "logits_mask": torch.ones(2, 4)})
    t = normalise({"logits": logits(1, 2, 3, 5)})
    with pytest.raises(ValueError, match=r"shape \(2, 4\).*must be \(2, 3\)"):
        logits_kd(losses.kd_ce, 2.0).check(s, t)


def test_logits_mask_for_prefers_the_students():
    m_S, m_T = torch.ones(2, 3), torch.zeros(2, 3)
    s = normalise({"logits": logits(0, 2, 3, 4), "logits_mask": m_S})
    t = normalise({"logits": logits(1, 2, 3, 4), "logits_mask": m_T})
    assert logits_mask_for(s, t, 0) is m_S
    assert logits_mask_for(s._replace(logits_mask=()), t, 0) is m_T
    assert logits_mask_for(s._replace(logits_mask=()), t._replace(logits_mask=()), 0) is None


def test_no_logits_on_either_side_gives_no_term():
    s = normalise({"logits": logits(0, 4, 5)})
    t = normalise({"hidden": [logits(1, 4, 2, 3)]})
    assert logits_kd()(s, t, CTX) == {}
    assert logits_kd()(t, s, CTX) == {}
    check_logits(s, t)  # nothing to check


def test_custom_name_and_weight():
    s, t = normalise({"logits": logits(0, 4, 5)}), normalise({"logits": logits(1, 4, 5)})
    term = logits_kd(weight=0.3, name="soft")
    assert term.weight == 0.3
    assert list(term(s, t, CTX)) == ["soft"]


def test_check_rejects_labels_of_the_wrong_shape():
    s = normalise({"logits": logits(0, 4, 5), "labels": torch.zeros(3, dtype=torch.long)})
    t = normalise({"logits": logits(1, 4, 5)})
    with pytest.raises(ValueError, match=r"labels\[0\] has shape \(3,\).*must have shape \(4,\)"):
        logits_kd(shift_probability=True).check(s, t)
