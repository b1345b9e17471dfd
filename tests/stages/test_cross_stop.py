"""Stopping across tokenizers: a sampled stop token that is not text (it decodes to nothing) gets
an end-of-text span — the sampler's row that predicts it paired with the other side's row after
its last text token, scored against the other side's end-of-text token (its ``eos_token``), which
``vocabulary_map`` matches with the student's. Hand-made tokenizers (characters with ``[EOS]``, a
WordPiece teacher with its own ``[END]``) and hand-made rollouts; the losses by hand; the
warnings when built where the stop cannot be taught or GOLD's map lacks the pair."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

import purekd
from purekd import losses
from purekd.integrations import hf_adaptor
from purekd.losses._uld import sorted_l1
from purekd.stages import (
    EndOfText,
    Rollout,
    Sample,
    align_spans,
    end_of_text,
    match_vocabularies,
    retokenise_rollout,
    stop_pairs,
    vocabulary_map,
)
from tests._on_policy import tiny_llama

from . import _tokenizers

pytest.importorskip("transformers")


def characters() -> Any:
    from ..combinators.test_on_policy_cross_tokenizer import characters as chars

    return chars()  # [PAD] 0, [UNK] 1, [EOS] 2, then a-z, space, '.', ','


def wordpiece_with_end(end: str | None = "[END]") -> Any:
    """A WordPiece tokenizer of every letter and a few words, with its own end-of-text token."""
    return _tokenizers.wordpiece_letters(end)


# ----------------------------------------------------------------------- the vocabulary map
def test_the_two_end_of_text_tokens_are_matched_whatever_their_strings():
    student = {"<|endoftext|>": 0, "a": 1, "<s>": 2}
    teacher = {"<eos>": 7, "a": 3, "<s>": 5}
    plain = match_vocabularies(student, teacher, scheme_S="plain", scheme_T="plain",
                               special_S=["<|endoftext|>", "<s>"], special_T=["<eos>", "<s>"])
    paired = match_vocabularies(student, teacher, scheme_S="plain", scheme_T="plain",
                                special_S=["<|endoftext|>", "<s>"], special_T=["<eos>", "<s>"],
                                end_S="<|endoftext|>", end_T="<eos>")
    assert list(zip(plain.matched_S.tolist(), plain.matched_T.tolist(), strict=True)) == [
        (1, 3), (2, 5)]
    assert list(zip(paired.matched_S.tolist(), paired.matched_T.tolist(), strict=True)) == [
        (1, 3), (2, 5), (0, 7)]
    assert paired.fingerprint != plain.fingerprint  # cached apart
    # one side without an end token (or one not in its vocabulary): nothing to pair
    assert match_vocabularies(student, teacher, scheme_S="plain", scheme_T="plain",
                              special_S=["<|endoftext|>", "<s>"], special_T=["<eos>", "<s>"],
                              end_S="<|endoftext|>", end_T="</s>") is plain


def test_vocabulary_map_pairs_the_tokenizers_eos_tokens():
    tokenizer_S, tokenizer_T = characters(), wordpiece_with_end()
    result = vocabulary_map(tokenizer_S, tokenizer_T)
    pairs = set(zip(result.matched_S.tolist(), result.matched_T.tolist(), strict=True))
    assert (tokenizer_S.eos_token_id, tokenizer_T.eos_token_id) in pairs
    without = vocabulary_map(tokenizer_S, wordpiece_with_end(None))
    assert tokenizer_S.eos_token_id not in without.matched_S.tolist()
    assert result.matched_S.numel() == without.matched_S.numel() + 1


# ----------------------------------------------------------------------- end_of_text
@pytest.mark.parametrize(("offsets_S", "offsets_T", "text", "expected"), [
    ([(0, 5), (5, 11)], [(0, 3), (3, 5), (5, 11)], "Hello world", (1, 2)),
    ([(0, 5), (5, 11), (11, 11)], [(0, 0), (0, 5), (6, 11), (11, 11)], "Hello world", (1, 2)),
    ([(0, 5), (5, 11)], [(0, 3), (3, 5)], "Hello world", None),         # T truncated
    ([(0, 3)], [(0, 4)], "abc ", (0, 0)),                                # trailing space
    ([(0, 0)], [(0, 3)], "abc", None),                                   # no text on one side
])
def test_end_of_text_by_hand(offsets_S, offsets_T, text, expected):
    assert end_of_text(offsets_S, offsets_T, text) == expected


# ----------------------------------------------------------------------- the rollout's spans
PROMPT, EOS_S = "let there be ", 2


def _rollout(tokenizer_S: Any) -> Rollout:
    """Three sequences: "light." then [EOS]; "god" cut by max_new_tokens (no stop); [EOS] right
    after the prompt. Right-padded with [PAD] (0)."""
    prompt = tokenizer_S(PROMPT)["input_ids"]
    completions = [tokenizer_S("light.")["input_ids"] + [EOS_S], tokenizer_S("god")["input_ids"],
                   [EOS_S]]
    length = len(prompt) + max(len(c) for c in completions)
    ids = torch.zeros(3, length, dtype=torch.long)
    attended, completion = torch.zeros_like(ids), torch.zeros_like(ids)
    for b, tokens in enumerate(completions):
        row = prompt + tokens
        ids[b, :len(row)] = torch.tensor(row)
        attended[b, :len(row)] = 1
        completion[b, len(prompt):len(row)] = 1
    return Rollout(ids, attended, completion, None, torch.full((3,), len(prompt)),
                   torch.tensor([len(c) for c in completions]))


@pytest.fixture(scope="module")
def rolled() -> dict[str, Any]:
    tokenizer_S, tokenizer_T = characters(), wordpiece_with_end()
    rollout = _rollout(tokenizer_S)
    pairs, unpaired = stop_pairs([EOS_S], tokenizer_S, tokenizer_T)
    assert pairs == {EOS_S: tokenizer_T.eos_token_id} and unpaired == []
    plain = retokenise_rollout(rollout, tokenizer_S, tokenizer_T)
    ended = retokenise_rollout(rollout, tokenizer_S, tokenizer_T, end_tokens=pairs)
    return {"tokenizers": (tokenizer_S, tokenizer_T), "rollout": rollout, "plain": plain,
            "ended": ended}


def test_a_stop_token_adds_one_end_of_text_span_per_stopped_sequence(rolled):
    tokenizer_S, tokenizer_T = rolled["tokenizers"]
    rollout, plain, ended = rolled["rollout"], rolled["plain"], rolled["ended"]
    assert ended.texts == [PROMPT + "light.", PROMPT + "god", PROMPT]
    assert torch.equal(ended.teacher["input_ids"], plain.teacher["input_ids"])
    length_S, length_T = rollout.input_ids.size(1), ended.teacher["input_ids"].size(1)
    last_T = [int(m.sum()) - 1 for m in ended.teacher["attention_mask"]]  # no special tokens
    eos_T = tokenizer_T.eos_token_id
    # by hand: sequence 0 stops after "light." (its [EOS] at position P + 6), sequence 2 right
    # after the prompt (position P); sequence 1 has no stop token
    p = len(tokenizer_S(PROMPT)["input_ids"])
    ends = [EndOfText(p + 6, EOS_S, last_T[0] + 1, eos_T), None,
            EndOfText(p, EOS_S, last_T[2] + 1, eos_T)]
    offsets_T = tokenizer_T(ended.texts, return_offsets_mapping=True, padding=True,
                            return_tensors="pt")["offset_mapping"]
    from purekd.stages import decode_with_offsets

    offsets_S = []
    for b in range(3):
        real = int(rollout.attention_mask[b].sum())
        text, offsets = decode_with_offsets(tokenizer_S, rollout.input_ids[b, :real].tolist())
        offsets_S.append(offsets + [(len(text), len(text))] * (length_S - real))
    starts = offsets_T[..., 0]
    chars = torch.tensor([len(PROMPT)] * 3)[:, None]
    expected = align_spans(rollout.input_ids, offsets_S, ended.teacher["input_ids"], offsets_T,
                           mask_S=rollout.completion_mask,
                           mask_T=(starts >= chars) & (ended.teacher["attention_mask"] != 0),
                           attended_S=rollout.attention_mask,
                           attended_T=ended.teacher["attention_mask"], texts=ended.texts,
                           shift=1, ends=ends)
    for name, a, b in zip(expected._fields, ended.spans, expected, strict=True):
        assert torch.equal(a, b), name
    # two more spans than without the stop tokens, each one row a side, in sequence order
    assert ended.spans.weight.sum() == plain.spans.weight.sum() + 2
    end_spans = ended.spans.ids_S[:, 0] == EOS_S
    assert end_spans.sum() == 2
    assert ended.spans.rows_S[end_spans, 0].tolist() == [p + 5, 2 * length_S + p - 1]
    assert ended.spans.rows_T[end_spans, 0].tolist() == [last_T[0], 2 * length_T + last_T[2]]
    assert ended.spans.ids_T[end_spans, 0].tolist() == [eos_T, eos_T]
    assert ended.spans.mask_S[end_spans].sum(1).tolist() == [1, 1]
    # the stop's predicting row is exactly the row that had no span before
    assert not bool((plain.spans.rows_S[plain.spans.mask_S] == p + 5).any())


def _logits(rolled: dict[str, Any], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    tokenizer_S, tokenizer_T = rolled["tokenizers"]
    ended = rolled["ended"]
    generator = torch.Generator().manual_seed(seed)
    logits_S = torch.randn(*rolled["rollout"].input_ids.shape, len(tokenizer_S),
                           generator=generator, dtype=torch.float64)
    logits_T = torch.randn(*ended.teacher["input_ids"].shape, len(tokenizer_T),
                           generator=generator, dtype=torch.float64)
    return logits_S, logits_T


def test_uld_scores_the_end_of_text_rows_as_one_more_span(rolled):
    plain, ended = rolled["plain"], rolled["ended"]
    logits_S, logits_T = _logits(rolled)
    leaf = logits_S.clone().requires_grad_(True)
    value = losses.aligned_uld(leaf, logits_T, ended.spans)
    (grad,) = torch.autograd.grad(value, leaf)
    n_plain, n = plain.spans.weight.sum(), ended.spans.weight.sum()
    flat_S, flat_T = logits_S.flatten(0, 1), logits_T.flatten(0, 1)
    end_spans = ended.spans.ids_S[:, 0] == 2
    rows_S, rows_T = ended.spans.rows_S[end_spans, 0], ended.spans.rows_T[end_spans, 0]
    by_hand = (losses.aligned_uld(logits_S, logits_T, plain.spans) * n_plain
               + sorted_l1(flat_S[rows_S].log_softmax(-1), flat_T[rows_T].log_softmax(-1)).sum()
               ) / n
    torch.testing.assert_close(value, by_hand, rtol=1e-12, atol=0)
    # the student's row that predicts its stop token now gets a gradient; without the span it
    # got none
    assert grad.flatten(0, 1)[rows_S].abs().sum(-1).min() > 0
    leaf = logits_S.clone().requires_grad_(True)
    (before,) = torch.autograd.grad(losses.aligned_uld(leaf, logits_T, plain.spans), leaf)
    assert not before.flatten(0, 1)[rows_S].any()


def test_gold_pushes_the_students_stop_toward_the_teachers_end_of_text(rolled):
    tokenizer_S, tokenizer_T = rolled["tokenizers"]
    ended = rolled["ended"]
    vmap = vocabulary_map(tokenizer_S, tokenizer_T)
    logits_S, logits_T = _logits(rolled, seed=1)
    end_spans = ended.spans.ids_S[:, 0] == EOS_S
    rows_T = ended.spans.rows_T[end_spans, 0]
    rows_S = ended.spans.rows_S[end_spans, 0]
    flat_T = logits_T.view(-1, logits_T.size(-1))
    flat_T[rows_T, tokenizer_T.eos_token_id] += 8.0  # the teacher would end the text here
    leaf = logits_S.clone().requires_grad_(True)
    value = losses.aligned_gold(leaf, logits_T, ended.spans, vmap, loss="forward_kl",
                                matched_weight=1.0, unmatched_weight=0.0)
    (grad,) = torch.autograd.grad(value, leaf)
    at_rows = grad.view(-1, grad.size(-1))[rows_S]
    # gradient descent raises the student's [EOS] logit most at both rows
    assert at_rows.argmin(-1).tolist() == [EOS_S, EOS_S] and bool((at_rows[:, EOS_S] < 0).all())
    # by hand: forward KL on the matched columns of the two rows (not renormalised), as one
    # more pair of spans among the others
    matched_S, matched_T = vmap.matched_S, vmap.matched_T
    p_T = flat_T[rows_T].softmax(-1)[:, matched_T]
    log_p_S = logits_S.view(-1, logits_S.size(-1))[rows_S].log_softmax(-1)[:, matched_S]
    ends = (p_T * (p_T.log() - log_p_S)).sum()
    rest = losses.aligned_gold(logits_S, logits_T, rolled["plain"].spans, vmap,
                               loss="forward_kl", matched_weight=1.0, unmatched_weight=0.0)
    n_plain, n = rolled["plain"].spans.weight.sum(), ended.spans.weight.sum()
    torch.testing.assert_close(value, (rest * n_plain + ends) / n, rtol=1e-12, atol=0)


def test_seq_kd_pairs_the_teachers_stop_with_the_students_end():
    # the teacher (characters, [EOS]) samples; the student (WordPiece, [END]) is re-tokenised
    tokenizer_T, tokenizer_S = characters(), wordpiece_with_end()
    rollout = _rollout(tokenizer_T)
    pairs, _ = stop_pairs([EOS_S], tokenizer_T, tokenizer_S)
    cross = retokenise_rollout(rollout, tokenizer_S, tokenizer_T, sampled_by="teacher",
                               end_tokens=pairs)
    end_spans = cross.spans.ids_T[:, 0] == EOS_S
    assert end_spans.sum() == 2
    assert cross.spans.ids_S[end_spans, 0].tolist() == [tokenizer_S.eos_token_id] * 2


# ----------------------------------------------------------------------- through make_step
def _sampler(completion: list[int]):
    def sample(model, prompt_ids, prompt_mask, *, seed):
        del model, prompt_mask, seed
        ids = torch.tensor([completion] * prompt_ids.size(0))
        return Sample(ids, torch.ones_like(ids))
    return sample


def _prompts(tokenizer_S: Any) -> dict[str, torch.Tensor]:
    ids = torch.tensor([tokenizer_S(PROMPT)["input_ids"]])
    return {"prompts": ids, "prompt_attention_mask": torch.ones_like(ids)}


def _make(loss: str, tokenizer_T: Any, tokenizer_S: Any, sampler: Any, vmap: Any = None) -> Any:
    teacher = tiny_llama(1, 8, seed=0, vocab=len(tokenizer_T), context=64).eval()
    student = tiny_llama(1, 8, seed=1, vocab=len(tokenizer_S), context=64)
    config = purekd.DistillationConfig(kd_loss_type=loss, temperature=1.0,
                                       on_policy=purekd.OnPolicyConfig(max_new_tokens=8))
    if loss == "gold" and vmap is None:
        vmap = vocabulary_map(tokenizer_S, tokenizer_T)
    return purekd.make_step(config, teacher, student, hf_adaptor(causal=True),
                            hf_adaptor(causal=True), compile=False,
                            tokenizers=(tokenizer_T, tokenizer_S), sampler=sampler,
                            vocabulary_map=vmap)


@pytest.mark.parametrize("loss", ["uld", "gold"])
def test_an_on_policy_step_counts_the_end_of_text_span(loss):
    tokenizer_S, tokenizer_T = characters(), wordpiece_with_end()
    completion = tokenizer_S("light.")["input_ids"] + [EOS_S]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # stop tokens paired, the map has the pair: no warning
        step = _make(loss, tokenizer_T, tokenizer_S, _sampler(completion))
    assert step.outputs.end_tokens == {EOS_S: tokenizer_T.eos_token_id}
    out = step(_prompts(tokenizer_S))
    spans = step.outputs.last_cross_rollout.spans
    assert out.tokens.item() == spans.weight.sum().item()
    assert int((spans.ids_S[:, 0] == EOS_S).sum()) == 1
    assert torch.isfinite(out.loss)


def test_a_teacher_tokenizer_without_eos_is_a_warning_when_built():
    tokenizer_S, tokenizer_T = characters(), wordpiece_with_end(None)
    with pytest.warns(UserWarning, match=r"^on-policy across tokenizers: the student's stop "
                                         r"token\(s\) \[2\] decode to no text, and the teacher's "
                                         r"tokenizer \(\w+\) has no eos_token to pair them with, "
                                         r"so no end-of-text span scores where the student's "
                                         r"samples stop: the student is not taught where to "
                                         r"stop; set tokenizer_T.eos_token to the teacher's "
                                         r"end-of-text token"):
        step = _make("uld", tokenizer_T, tokenizer_S, _sampler([EOS_S]))
    assert step.outputs.end_tokens == {}


def test_gold_with_a_map_without_the_stop_pair_is_a_warning_when_built():
    tokenizer_S, tokenizer_T = characters(), wordpiece_with_end()
    unpaired = vocabulary_map(characters(), wordpiece_with_end(None))  # no [END], no pair
    # a map of the same teacher vocabulary but without the end pair: rebuild it without ends
    vmap = match_vocabularies(
        tokenizer_S.get_vocab(), tokenizer_T.get_vocab(), scheme_S="plain", scheme_T="wordpiece",
        special_S=tokenizer_S.all_special_tokens, special_T=tokenizer_T.all_special_tokens)
    assert unpaired.matched_S.numel() == vmap.matched_S.numel()
    with pytest.warns(UserWarning, match=r"^kd_loss_type='gold' on-policy across tokenizers: the "
                                         r"end-of-text pair\(s\) \(student id, teacher id\) "
                                         r"\[\(2, 2\)\] are not matched in the vocabulary map"):
        _make("gold", tokenizer_T, tokenizer_S, _sampler([EOS_S]), vmap=vmap)


@pytest.mark.parametrize("loss", ["uld", "gold"])
def test_the_end_of_text_span_teaches_the_student_to_stop(rolled, loss):
    # the student's logits as free parameters, a teacher that would end both texts where the
    # student stopped (and is unsure elsewhere): 60 SGD steps on GOLD raise the student's
    # probability of [EOS] at its stop rows from under 0.1 to over 1/2 (ULD: its largest
    # probability there); without the end-of-text spans those rows do not move at all
    tokenizer_S, tokenizer_T = rolled["tokenizers"]
    ended, plain = rolled["ended"], rolled["plain"]
    vmap = vocabulary_map(tokenizer_S, tokenizer_T)
    logits_S, logits_T = _logits(rolled, seed=2)
    logits_T = logits_T * 0.1
    end_spans = ended.spans.ids_S[:, 0] == EOS_S
    rows_S, rows_T = ended.spans.rows_S[end_spans, 0], ended.spans.rows_T[end_spans, 0]
    logits_T.view(-1, logits_T.size(-1))[rows_T, tokenizer_T.eos_token_id] += 10.0
    start = logits_S * 0.1

    def trained(spans: Any) -> torch.Tensor:
        """The student's distributions at its stop rows after training on ``spans``."""
        z = start.clone().requires_grad_(True)
        for _ in range(60):
            value = (losses.aligned_gold(z, logits_T, spans, vmap) if loss == "gold"
                     else losses.aligned_uld(z, logits_T, spans))
            (grad,) = torch.autograd.grad(value, z)
            with torch.no_grad():
                z -= 20.0 * grad
        return z.detach().view(-1, z.size(-1))[rows_S].softmax(-1)

    before = start.view(-1, start.size(-1))[rows_S].softmax(-1)
    assert bool((before.max(-1).values < 0.1).all())
    after = trained(ended.spans)
    if loss == "gold":  # GOLD names the token: [EOS] itself
        assert bool((after[:, EOS_S] > 0.5).all()), after[:, EOS_S]
    else:  # ULD compares sorted probabilities: the stop rows become as sure as the teacher's
        # end rows, of some token (ULD cannot say which)
        assert bool((after.max(-1).values > 0.5).all()), after.max(-1).values
    assert torch.equal(trained(plain.spans), before)
