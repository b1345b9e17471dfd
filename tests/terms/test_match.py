"""``intermediate_match`` and ``custom_match``: equal to the loss called by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from purekd import losses
from purekd.stages import normalise
from purekd.terms import custom_match, intermediate_match, make_context, match_name, select_layers

CTX = make_context()


def features(seed, width, n, length=5):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(3, length)
    mask[2, 2:] = 0
    return normalise({
        "hidden": [torch.randn(3, length, width, generator=gen) for _ in range(n)],
        "attention": [torch.randn(3, 2, length, length, generator=gen) for _ in range(n)],
        "inputs_mask": mask,
    })


S, T = features(0, 4, 3), features(1, 6, 4)


def test_single_layer_match_with_projection():
    torch.manual_seed(0)
    proj = nn.Linear(4, 6)
    got = intermediate_match("hidden", 2, 3, losses.hidden_mse, proj, loss_name="hidden_mse")(S, T, CTX)
    expected = losses.hidden_mse(proj(S.hidden[2]), T.hidden[3], mask=S.inputs_mask)
    assert list(got) == ["hidden_hidden_mse_2_3"]
    torch.testing.assert_close(got["hidden_hidden_mse_2_3"], expected)


def test_pair_match_projects_both_student_layers():
    torch.manual_seed(0)
    proj = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
    got = intermediate_match("hidden", [0, 2], [1, 3], losses.fsp, proj, loss_name="fsp")(S, T, CTX)
    expected = losses.fsp([proj(S.hidden[0]), proj(S.hidden[2])], [T.hidden[1], T.hidden[3]],
                          mask=S.inputs_mask)
    torch.testing.assert_close(got["hidden_fsp_0-2_1-3"], expected)


def test_attention_match_and_the_students_inputs_mask():
    got = intermediate_match("attention", 1, 0, losses.attention_ce, name="att")(S, T, CTX)
    torch.testing.assert_close(got["att"], losses.attention_ce(S.attention[1], T.attention[0],
                                                               mask=S.inputs_mask))
    unmasked = intermediate_match("attention", 1, 0, losses.attention_ce, name="att")(
        S._replace(inputs_mask=None), T, CTX)
    torch.testing.assert_close(unmasked["att"], losses.attention_ce(S.attention[1], T.attention[0]))


def test_names():
    assert match_name("hidden", "mmd", [0, 1], [2, 3]) == "hidden_mmd_0-1_2-3"
    assert match_name("attention", "attention_mse", 1, 4) == "attention_attention_mse_1_4"
    assert select_layers(S, "hidden", [0, 2])[1] is S.hidden[2]
    term = intermediate_match("hidden", 0, 0, losses.cos, nn.Linear(4, 6))
    assert list(term(S, T, CTX)) == ["hidden_cos_0_0"]  # loss_name defaults to loss.__name__


def test_check_skips_widths_for_custom_losses_and_mmd():
    def my_loss(s, t, mask=None):
        return s.mean() - t.mean()

    intermediate_match("hidden", 0, 0, my_loss).check(S, T)  # unknown loss: widths not checked
    intermediate_match("hidden", [0, 1], [0, 1], losses.mmd, loss_name="mmd").check(S, T)
    with pytest.raises(ValueError, match=r"'proj': \['linear', 4, 6\]"):
        intermediate_match("hidden", 0, 0, losses.hidden_mse, loss_name="hidden_mse").check(S, T)


def test_custom_match_on_captured_outputs():
    gen = torch.Generator().manual_seed(0)
    out_S, out_T = torch.randn(3, 5, 4, generator=gen), torch.randn(3, 5, 6, generator=gen)
    torch.manual_seed(0)
    proj = nn.Linear(4, 6)

    def loss(s, t, mask_S, mask_T):
        return ((s - t) ** 2).mean() * mask_S.sum() / mask_T.numel()

    s, t = S._replace(captured=(None, out_S)), T._replace(captured=(None, out_T))
    term = custom_match(1, loss, proj, weight=0.5)
    assert term.weight == 0.5
    got = term(s, t, CTX)["custom_match_1"]
    torch.testing.assert_close(got, loss(proj(out_S), out_T, S.inputs_mask, T.inputs_mask))
    with pytest.raises(ValueError, match=r"custom match #0 .*student's module was not called"):
        custom_match(0, loss).check(s, t)
