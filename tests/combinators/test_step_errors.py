"""Bad outputs raise a ``ValueError`` at step time, before the loss path runs (so before any
backward), with a message that names the culprit and the fix."""

from __future__ import annotations

import re

import pytest
import torch

from tests._toys import ToyEncoder, make_step, toy_adaptor, toy_batch


class LossSpy:
    """Wraps a step's loss path: counts calls, forwards ``check``."""

    def __init__(self, loss):
        self.loss, self.calls = loss, 0

    def check(self, student, teacher):
        self.loss.check(student, teacher)

    def __call__(self, *args):
        self.calls += 1
        return self.loss(*args)


def assert_fails_before_the_loss_path(step, batch, *fragments):
    """``step(batch)`` raises a ValueError whose message contains every fragment; the loss path
    was never entered and no gradient exists."""
    spy = LossSpy(step.loss)
    step.loss = spy
    with pytest.raises(ValueError) as info:
        step(batch)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert spy.calls == 0
    assert all(p.grad is None for p in step.parameters())
    return message


# compile=True costs nothing here: the check fails before anything is compiled
COMPILE = pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])


@COMPILE
def test_logits_count_differs(compile):
    torch.manual_seed(0)
    step = make_step({}, ToyEncoder(8, 3), ToyEncoder(6, n_logits=2), toy_adaptor(),
                     toy_adaptor(), compile=compile)
    assert_fails_before_the_loss_path(
        step, toy_batch(), "student's adaptor returned 2 logits [(4, 5), (4, 5)]",
        "teacher's returned 1 [(4, 5)]", "same number of logits")


@COMPILE
def test_logits_class_dimension_differs(compile):
    torch.manual_seed(0)
    step = make_step({}, ToyEncoder(8, 3, classes=7), ToyEncoder(6), toy_adaptor(),
                     toy_adaptor(), compile=compile)
    assert_fails_before_the_loss_path(step, toy_batch(), "logits[0] differ in class dimension",
                                      "student (4, 5)", "teacher (4, 7)")


def test_token_logits_shape_differs():
    torch.manual_seed(0)
    step = make_step({}, ToyEncoder(8, 3, token_level=True), ToyEncoder(6, token_level=True),
                     toy_adaptor(), toy_adaptor())
    batch_T = toy_batch(length=9, token_level=True)
    assert_fails_before_the_loss_path(
        step, {"teacher": batch_T, "student": toy_batch(token_level=True)},
        "logits[0] differ in shape", "(4, 7, 5)", "(4, 9, 5)")


@COMPILE
@pytest.mark.parametrize(("side", "layer_S", "layer_T", "index", "count", "who"), [
    ("S", 5, 3, 5, 3, "student"),
    ("T", 2, 4, 4, 4, "teacher"),
    ("S", -4, 3, -4, 3, "student"),
])
def test_layer_index_not_returned(side, layer_S, layer_T, index, count, who, compile):
    torch.manual_seed(0)
    match = {"layer_T": layer_T, "layer_S": layer_S, "feature": "hidden", "loss": "hidden_mse",
             "weight": 1, "proj": ["linear", 6, 8]}
    step = make_step({"intermediate_matches": [match]}, ToyEncoder(8, 3), ToyEncoder(6),
                     toy_adaptor(), toy_adaptor(), compile=compile)
    message = assert_fails_before_the_loss_path(
        step, toy_batch(),
        f"'hidden_hidden_mse_{layer_S}_{layer_T}'",  # the match
        "feature 'hidden'",  # the feature
        f"layer_{side}={index}",  # the index
        f"the {who}'s adaptor returned {count} 'hidden' layer(s)",  # how many there are
        f"valid indices 0..{count - 1}")
    assert re.search(r"intermediate match", message)


def test_layer_index_of_a_pair_and_of_a_missing_feature():
    torch.manual_seed(0)
    pair = {"layer_T": [0, 7], "layer_S": [0, 1], "feature": "hidden", "loss": "mmd", "weight": 1}
    step = make_step({"intermediate_matches": [pair]}, ToyEncoder(8, 3), ToyEncoder(6),
                     toy_adaptor(), toy_adaptor())
    assert_fails_before_the_loss_path(step, toy_batch(), "'hidden_mmd_0-1_0-7'", "layer_T=7",
                                      "returned 4 'hidden' layer(s)")
    attention = {"layer_T": 0, "layer_S": 0, "feature": "attention", "loss": "attention_mse",
                 "weight": 1}
    step = make_step({"intermediate_matches": [attention]}, ToyEncoder(8, 3), ToyEncoder(6),
                     toy_adaptor(), toy_adaptor(attention=False))
    assert_fails_before_the_loss_path(step, toy_batch(), "layer_S=0",
                                      "returned 0 'attention' layer(s)",
                                      "return 'attention' from the adaptor")


@COMPILE
@pytest.mark.parametrize("loss", ["hidden_mse", "cos", "pkd", "fsp"])
def test_feature_widths_differ_without_projection(loss, compile):
    torch.manual_seed(0)
    pair = loss == "fsp"
    match = {"layer_T": [1, 2] if pair else 2, "layer_S": [0, 1] if pair else 1,
             "feature": "hidden", "loss": loss, "weight": 1}
    step = make_step({"intermediate_matches": [match]}, ToyEncoder(8, 3), ToyEncoder(6),
                     toy_adaptor(), toy_adaptor(), compile=compile)
    assert_fails_before_the_loss_path(
        step, toy_batch(), "student's feature has width 6 (shape (4, 7, 6))",
        "teacher's has width 8 (shape (4, 7, 8))", "'proj': ['linear', 6, 8]")


def test_widths_may_differ_for_mmd():
    torch.manual_seed(0)
    match = {"layer_T": [1, 2], "layer_S": [0, 1], "feature": "hidden", "loss": "mmd", "weight": 1}
    step = make_step({"intermediate_matches": [match]}, ToyEncoder(8, 3), ToyEncoder(6),
                     toy_adaptor(), toy_adaptor())
    assert torch.isfinite(step(toy_batch()).loss)


@COMPILE
def test_probability_shift_without_labels(compile):
    torch.manual_seed(0)
    step = make_step({"probability_shift": True}, ToyEncoder(8, 3), ToyEncoder(6),
                     toy_adaptor(), toy_adaptor(labels=False), compile=compile)
    assert_fails_before_the_loss_path(step, toy_batch(), "probability_shift=True",
                                      "return 'labels' from the student's adaptor")


@COMPILE
def test_unknown_adaptor_key(compile):
    torch.manual_seed(0)
    base = toy_adaptor()

    def adaptor_S(batch, outputs):
        return {**base(batch, outputs), "hiddens": outputs["hidden"]}

    step = make_step({}, ToyEncoder(8, 3), ToyEncoder(6), base, adaptor_S, compile=compile)
    assert_fails_before_the_loss_path(
        step, toy_batch(), "unknown key 'hiddens'",
        "valid keys: ['logits', 'logits_mask', 'losses', 'inputs_mask', 'labels', 'hidden', "
        "'attention', 'lm_hidden', 'lm_weight', 'lm_bias', 'topk_ids', 'topk_logprobs', "
        "'topk_mask', 'topk_next_logprobs', 'topk_vocab_size']")


def test_adaptor_returning_a_non_dict():
    torch.manual_seed(0)
    step = make_step({}, ToyEncoder(8, 3), ToyEncoder(6), lambda b, o: o["logits"],
                     toy_adaptor())
    assert_fails_before_the_loss_path(step, toy_batch(), "must return a dict", "got list")
