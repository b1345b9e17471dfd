"""A custom KD loss registered with TextBrewer's own signature ``kd_loss(logits_S, logits_T,
temperature)`` is called with three arguments, as TextBrewer calls it (it used to fail with
``TypeError: ... 4 were given``); with a logits mask, on the kept rows, as TextBrewer."""

from __future__ import annotations

import pytest
import textbrewer
import torch
import torch.nn.functional as F

import purekd
from tests._toys import ToyEncoder, assert_matches_textbrewer, toy_adaptor, toy_batch


def l1_kd(logits_S, logits_T, temperature):  # TextBrewer's 3-argument form, no mask argument
    return (F.softmax(logits_S / temperature, -1) - F.softmax(logits_T / temperature, -1)).abs().mean()


@pytest.fixture
def registered():
    purekd.register_new("kd_loss", "l1_kd", l1_kd)
    textbrewer.presets.KD_LOSS_MAP["l1_kd"] = l1_kd
    yield
    purekd.KD_LOSS_MAP.pop("l1_kd")
    textbrewer.presets.KD_LOSS_MAP.pop("l1_kd")


@pytest.mark.parametrize("token_level", [False, True], ids=["sequence", "token-masked"])
def test_a_three_argument_kd_loss_equals_textbrewers(registered, token_level):
    torch.manual_seed(0)
    teacher, student = ToyEncoder(8, layers=3, token_level=token_level), ToyEncoder(
        6, layers=2, token_level=token_level)
    adaptor = toy_adaptor(hidden=False, attention=False, logits_mask=token_level)
    config = {"kd_loss_type": "l1_kd", "temperature": 2.0, "hard_label_weight": 0.3}
    out = assert_matches_textbrewer(config, teacher, student, adaptor, adaptor,
                                    toy_batch(token_level=token_level))
    assert out.tokens is None  # a registered loss keeps TextBrewer's per-batch mean
