"""On-policy distillation across tokenizers: the student (a character-level tokenizer) samples,
its rollout is decoded and re-tokenised for a WordPiece teacher, and ``'gold'`` / ``'uld'`` run
over the completion's aligned spans. A fixed seed gives identical rollouts; the loss on a rollout
equals the same aligned loss on the same texts given as off-policy data
(``CrossTokenizerCollator`` with ``(prompt, completion)`` pairs); ``lmbda=0`` is the off-policy
cross-tokenizer step exactly; no completion span gives 0 with finite gradients and a counted
warning; the student's own sampled ids are kept when the round trip is not exact; bad input."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

import purekd
from purekd.combinators import OnPolicyStage
from purekd.integrations import hf_adaptor
from purekd.stages import (
    CrossTokenizerCollator,
    Sample,
    batches_without_spans,
    decode_with_offsets,
    retokenise_rollout,
    vocabulary_map,
)
from tests._on_policy import tiny_llama

from ..stages import _tokenizers

pytest.importorskip("transformers")

PROMPTS = ["let there be ", "in the beginning god ", "and the "]
SPECIALS = ["[PAD]", "[UNK]", "[EOS]"]


def characters() -> Any:
    """A character-level fast tokenizer with a decoder that joins characters (so decode, then
    encode, gives the same ids back for any text of its alphabet)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = [*SPECIALS, *"abcdefghijklmnopqrstuvwxyz .,"]
    backend = Tokenizer(models.WordLevel({c: i for i, c in enumerate(alphabet)},
                                         unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]",
                                   pad_token="[PAD]", eos_token="[EOS]")


def wordpiece_any() -> Any:
    """A WordPiece teacher tokenizer whose vocabulary has a few words and every letter (alone
    and as a ``##`` continuation), so that any lower-case text is tokenised without [UNK]."""
    return _tokenizers.wordpiece_letters()


@pytest.fixture(scope="module")
def tokenizers() -> tuple[Any, Any]:
    """(tokenizer_T, tokenizer_S), the order make_step takes them in."""
    return wordpiece_any(), characters()


def _without_pad_and_unk(model: Any, vocab: int, width: int) -> Any:
    """``model`` with an output layer whose bias is -40 on ids 0 and 1 ([PAD], [UNK])."""
    head = torch.nn.Linear(width, vocab, bias=True).double()
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[:2] = -40.0
    model.lm_head = head
    return model


def _models(tokenizers: tuple[Any, Any]) -> tuple[Any, Any]:
    """The student's output layer gets a bias of -40 on [PAD] and [UNK], so it never samples
    them inside a sequence (special tokens decode to nothing, so they would not survive the
    decode-encode round trip that the comparison with data relies on)."""
    tokenizer_T, tokenizer_S = tokenizers
    teacher = tiny_llama(2, 16, seed=0, vocab=len(tokenizer_T), context=64).eval()
    student = tiny_llama(1, 8, seed=1, vocab=len(tokenizer_S), context=64).train()
    return teacher, _without_pad_and_unk(student, len(tokenizer_S), 8)


def _prompts(tokenizer_S: Any) -> dict[str, torch.Tensor]:
    tokenizer_S.padding_side = "left"
    try:
        encoded = tokenizer_S(PROMPTS, padding=True, return_tensors="pt")
    finally:
        tokenizer_S.padding_side = "right"
    return {"prompts": encoded["input_ids"], "prompt_attention_mask": encoded["attention_mask"]}


def _config(loss: Any, **on_policy: Any) -> purekd.DistillationConfig:
    return purekd.DistillationConfig(
        kd_loss_type=loss, temperature=1.5,
        on_policy=purekd.OnPolicyConfig(**{"max_new_tokens": 10, "seed": 3, **on_policy}))


def _step(tokenizers, models, loss="gold", *, sampler=None, **on_policy):
    teacher, student = models
    vmap = vocabulary_map(tokenizers[1], tokenizers[0]) if loss == "gold" or (
        isinstance(loss, list) and loss[0] == "gold") else None
    return purekd.make_step(_config(loss, **on_policy), teacher, student,
                            hf_adaptor(causal=True), hf_adaptor(causal=True), compile=False,
                            tokenizers=tokenizers, vocabulary_map=vmap, sampler=sampler)


def _off_policy_step(tokenizers, models, loss="gold"):
    teacher, student = models
    vmap = vocabulary_map(tokenizers[1], tokenizers[0]) if loss == "gold" or (
        isinstance(loss, list) and loss[0] == "gold") else None
    config = purekd.DistillationConfig(kd_loss_type=loss, temperature=1.5)
    return purekd.make_step(config, teacher, student, hf_adaptor(causal=True),
                            hf_adaptor(causal=True), compile=False, vocabulary_map=vmap)


def _grads(model):
    return [p.grad.clone() if p.grad is not None else None for p in model.parameters()]


LOSSES = ["gold", ["gold", {"loss": "forward_kl", "matched_weight": 1.0,
                            "unmatched_weight": 0.5}], "uld", ["uld", {"top_k": 4}]]


@pytest.mark.parametrize("loss", LOSSES)
def test_the_loss_on_a_rollout_equals_the_aligned_loss_on_the_same_texts_as_data(tokenizers,
                                                                                  loss):
    tokenizer_T, tokenizer_S = tokenizers
    models = _models(tokenizers)
    step = _step(tokenizers, models, loss)
    stage = step.outputs
    assert isinstance(stage, OnPolicyStage) and stage.cross_tokenizer
    out = step(_prompts(tokenizer_S))
    out.loss.backward()
    on_grads = _grads(models[1])
    models[1].zero_grad()
    sampled, cross = stage.last_rollout, stage.last_cross_rollout
    assert sampled is not None and cross is not None
    # the character tokenizer round-trips exactly, except for special tokens, which decode to
    # nothing: none may stand inside a sequence (a stop token at its end is fine)
    for b in range(len(PROMPTS)):
        real = sampled.input_ids[b, :int(sampled.attention_mask[b].sum())].tolist()
        while real and real[-1] == tokenizer_S.eos_token_id:
            real.pop()
        assert all(i >= len(SPECIALS) for i in real), real
        assert tokenizer_S(cross.texts[b])["input_ids"] == real
    # the same texts as data, the prompts out of the loss
    pairs = [(text[:chars], text[chars:]) for text, chars in zip(cross.texts, cross.prompt_chars,
                                                                   strict=True)]
    assert [p for p, _ in pairs] == PROMPTS and all(c for _, c in pairs)
    data = CrossTokenizerCollator(tokenizer_S, tokenizer_T)(pairs)
    assert torch.equal(data["spans"].weight, cross.spans.weight)
    reference = _off_policy_step(tokenizers, models, loss)(data)
    reference.loss.backward()
    assert out.tokens is not None and out.tokens.item() == cross.spans.weight.sum().item() > 5
    torch.testing.assert_close(out.loss, reference.loss, rtol=1e-6, atol=1e-12)
    assert out.tokens == reference.tokens
    for got, want in zip(on_grads, _grads(models[1]), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)
    # only completion spans: every student row of a span predicts a sampled token
    rows = cross.spans.rows_S[cross.spans.mask_S] + 1
    completion = sampled.completion_mask.flatten()
    assert bool((completion[rows] == 1).all())
    # the teacher's span tokens all start in the completion's text (labels != -100)
    again = retokenise_rollout(sampled, tokenizer_S, tokenizer_T, labels=True)
    assert torch.equal(again.teacher["input_ids"], cross.teacher["input_ids"])
    labels_T = again.teacher["labels"].flatten()
    assert bool((labels_T[cross.spans.rows_T[cross.spans.mask_T] + 1] != -100).all())
    assert bool((labels_T == -100).any())


def test_a_fixed_seed_gives_identical_rollouts(tokenizers):
    runs = []
    for _ in range(2):
        step = _step(tokenizers, _models(tokenizers), "uld")
        outs = [step(_prompts(tokenizers[1])).loss.detach() for _ in range(2)]
        cross = step.outputs.last_cross_rollout
        runs.append((outs, step.outputs.last_rollout.input_ids, cross.teacher["input_ids"],
                     tuple(cross.spans), cross.texts))
    (loss_a, ids_a, t_a, spans_a, texts_a), (loss_b, ids_b, t_b, spans_b, texts_b) = runs
    assert texts_a == texts_b and torch.equal(ids_a, ids_b) and torch.equal(t_a, t_b)
    assert all(torch.equal(a, b) for a, b in zip(spans_a, spans_b, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(loss_a, loss_b, strict=True))
    assert not torch.equal(loss_a[0], loss_a[1])  # the second batch sampled anew


@pytest.mark.parametrize("loss", ["gold", "uld"])
def test_lmbda_zero_is_the_off_policy_cross_tokenizer_step_exactly(tokenizers, loss):
    tokenizer_T, tokenizer_S = tokenizers
    models = _models(tokenizers)
    texts = ["let there be light.", "in the beginning god created the heaven."]
    batch = {**CrossTokenizerCollator(tokenizer_S, tokenizer_T)(texts), **_prompts(tokenizer_S)}
    step = _step(tokenizers, models, loss, lmbda=0.0)
    out = step(batch)
    out.loss.backward()
    on_grads = _grads(models[1])
    models[1].zero_grad()
    assert step.outputs.last_rollout is None
    plain = _off_policy_step(tokenizers, models, loss)
    reference = plain({k: batch[k] for k in ("student", "teacher", "spans")})
    reference.loss.backward()
    assert torch.equal(out.loss, reference.loss) and torch.equal(out.tokens, reference.tokens)
    for got, want in zip(on_grads, _grads(models[1]), strict=True):
        assert torch.equal(got, want)


def test_mixed_lmbda_needs_the_off_policy_parts(tokenizers):
    step = _step(tokenizers, _models(tokenizers), "uld", lmbda=0.5)
    with pytest.raises(ValueError, match=r"^on-policy across tokenizers: OnPolicyConfig\("
                                         r"lmbda=0\.5\) uses the batch's own texts.*no "
                                         r"\['student', 'teacher', 'spans'\]"):
        step(_prompts(tokenizers[1]))
    with pytest.raises(ValueError, match=r"^on-policy across tokenizers: the batch has key\(s\) "
                                         r"\['input_ids'\]"):
        step({**_prompts(tokenizers[1]), "input_ids": torch.zeros(3, 2, dtype=torch.long)})


def _eos_sampler(eos: int):
    def sampler(model, prompt_ids, prompt_mask, *, seed):
        del model, prompt_mask, seed
        ids = torch.full((prompt_ids.size(0), 1), eos, dtype=torch.long)
        return Sample(ids, torch.ones_like(ids))
    return sampler


def test_no_completion_span_gives_zero_with_finite_gradients_and_a_counted_warning(tokenizers):
    tokenizer_S = tokenizers[1]
    models = _models(tokenizers)
    step = _step(tokenizers, models, "gold", sampler=_eos_sampler(tokenizer_S.eos_token_id))
    before = batches_without_spans()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = step(_prompts(tokenizer_S))
    assert batches_without_spans() == before + 1
    assert any("no aligned span in this batch" in str(w.message) for w in caught)
    assert out.loss.item() == 0.0 and out.tokens.item() == 0
    out.loss.backward()
    grads = [p.grad for p in models[1].parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() and not g.any() for g in grads)


def test_the_student_keeps_its_sampled_ids_when_the_round_trip_is_not_exact():
    # an uncased WordPiece student: sampled pieces such as "god" "##s" or a lone "##ed" come
    # back as other tokens when the text is re-encoded; the student's sequence stays as sampled
    tokenizer_S, tokenizer_T = _tokenizers.wordpiece(), characters()
    teacher = tiny_llama(1, 8, seed=0, vocab=len(tokenizer_T), context=96).eval()
    student = tiny_llama(1, 8, seed=2, vocab=len(tokenizer_S), context=96).train()
    config = purekd.DistillationConfig(
        kd_loss_type="uld", temperature=1,
        on_policy=purekd.OnPolicyConfig(max_new_tokens=12, seed=5))
    step = purekd.make_step(config, teacher, student, hf_adaptor(causal=True),
                            hf_adaptor(causal=True), compile=False,
                            tokenizers=(tokenizer_T, tokenizer_S))
    tokenizer_S.padding_side = "left"
    prompts = tokenizer_S(["let there be", "in the beginning"], padding=True,
                          return_tensors="pt", add_special_tokens=False)
    tokenizer_S.padding_side = "right"
    out = step({"prompts": prompts["input_ids"],
                "prompt_attention_mask": prompts["attention_mask"]})
    assert torch.isfinite(out.loss)
    stage = step.outputs
    sampled, cross = stage.last_rollout, stage.last_cross_rollout
    assert torch.equal(cross.student["input_ids"], sampled.input_ids)
    differs = 0
    for b in range(2):
        real = sampled.input_ids[b, :int(sampled.attention_mask[b].sum())].tolist()
        text, offsets = decode_with_offsets(tokenizer_S, real)
        assert text == cross.texts[b]
        differs += tokenizer_S(text, add_special_tokens=False)["input_ids"] != real
        # each token's offsets cover its own decoded characters
        for token, (start, end) in zip(real, offsets, strict=True):
            piece = tokenizer_S.decode([token], skip_special_tokens=True).removeprefix("##")
            if end > start and piece:
                assert text[start:end].strip() == piece.strip()
    assert differs  # the round trip changed at least one sequence
    # the spans' student ids are the sampled ones
    flat = sampled.input_ids.flatten()
    spans = cross.spans
    assert torch.equal(flat[spans.rows_S[spans.mask_S] + 1], spans.ids_S[spans.mask_S])


def test_decode_with_offsets_keeps_the_bytes_of_one_character_together():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend = Tokenizer(models.BPE({c: i for i, c in enumerate(sorted(alphabet))}, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    ids = tokenizer("a€ b", add_special_tokens=False)["input_ids"]
    assert len(ids) == 6  # a, three bytes of €, Ġ, b
    text, offsets = decode_with_offsets(tokenizer, ids)
    assert text == "a€ b"
    assert offsets == [(0, 1), (1, 2), (1, 2), (1, 2), (2, 3), (3, 4)]


# ----------------------------------------------------------------------- bad input
def test_gold_on_policy_without_tokenizers_is_refused(tokenizers):
    teacher, student = _models(tokenizers)
    with pytest.raises(ValueError, match=r"^on-policy across tokenizers: the student's samples "
                                         r"are decoded and re-tokenised.*tokenizers=\("
                                         r"tokenizer_T, tokenizer_S\)"):
        purekd.make_step(_config("gold"), teacher, student, hf_adaptor(causal=True),
                         hf_adaptor(causal=True), compile=False,
                         vocabulary_map=vocabulary_map(tokenizers[1], tokenizers[0]))


def test_swapped_tokenizers_are_caught(tokenizers):
    models = _models(tokenizers)
    with pytest.raises(ValueError, match=r"^on-policy across tokenizers: the student's tokenizer "
                                         r"\(\w+\) has 74 tokens but the student model's "
                                         r"vocabulary only 32: give the tokenizers in the order "
                                         r"\(tokenizer_T, tokenizer_S\)"):
        purekd.make_step(_config("uld"), *models, hf_adaptor(causal=True),
                         hf_adaptor(causal=True), compile=False, tokenizers=tokenizers[::-1])


def test_a_one_vocabulary_loss_with_different_tokenizers_points_to_gold_and_uld(tokenizers):
    with pytest.raises(ValueError, match=r"cross-tokenizer distillation \(kd_loss_type 'uld' "
                                         r"or 'gold'\)"):
        _step(tokenizers, _models(tokenizers), "forward_kl")


def test_uld_with_one_tokenizer_stays_row_against_row():
    tokenizer = characters()
    teacher = tiny_llama(1, 8, seed=0, vocab=len(tokenizer), context=64).eval()
    student = tiny_llama(1, 8, seed=1, vocab=len(tokenizer), context=64)
    step = purekd.make_step(_config("uld"), teacher, student, hf_adaptor(causal=True),
                            hf_adaptor(causal=True), compile=False,
                            tokenizers=(tokenizer, tokenizer))
    assert not step.outputs.cross_tokenizer
    assert torch.isfinite(step(_prompts(tokenizer)).loss)


REAL_TEXT = ("In the beginning God created the heaven and the earth. Café €5 — naïve 日本語 🙂 "
             "done.\n  And  God said.")


@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_decode_with_offsets_on_the_real_tokenizers_covers_their_own_offsets(which):
    tokenizer = getattr(_tokenizers, which)()
    encoded = tokenizer(REAL_TEXT, add_special_tokens=False, return_offsets_mapping=True)
    text, offsets = decode_with_offsets(tokenizer, encoded["input_ids"])
    assert text == REAL_TEXT
    # each token's derived offsets are its own, or a coarser group's (where a token ends
    # inside a multi-byte character no boundary is placed), never another token's
    for (start, end), (own_start, own_end) in zip(offsets, encoded["offset_mapping"],
                                                  strict=True):
        assert start <= own_start and own_end <= end
    exact = sum(tuple(a) == tuple(b) for a, b in zip(offsets, encoded["offset_mapping"],
                                                      strict=True))
    assert exact >= len(offsets) - 4


def test_a_smollm2_rollout_is_aligned_with_gemma3():
    from purekd.stages import Rollout

    tokenizer_S, tokenizer_T = _tokenizers.smollm2(), _tokenizers.gemma3()
    prompt = tokenizer_S("In the beginning", add_special_tokens=False)["input_ids"]
    completion = tokenizer_S(" God created the heaven and the earth. Café €5 🙂",
                             add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + completion + [tokenizer_S.eos_token_id]])
    mask = torch.zeros_like(ids)
    mask[0, len(prompt):] = 1
    rollout = Rollout(ids, torch.ones_like(ids), mask, None, torch.tensor([len(prompt)]),
                      torch.tensor([len(completion) + 1]))
    cross = retokenise_rollout(rollout, tokenizer_S, tokenizer_T, labels=True)
    assert cross.texts == ["In the beginning God created the heaven and the earth. Café €5 🙂"]
    assert cross.prompt_chars == [len("In the beginning")]
    spans = cross.spans
    # every span is in the completion, and together they cover most of its words
    assert bool((mask.flatten()[spans.rows_S[spans.mask_S] + 1] == 1).all())
    assert int(spans.weight.sum()) >= 10
    words_T = tokenizer_T.convert_ids_to_tokens(cross.teacher["input_ids"][0].tolist())
    assert words_T[0] == tokenizer_T.bos_token  # the teacher's own BOS, zero width


def test_both_routes_right_pad_whatever_the_tokenizers_padding_side(tokenizers):
    # a causal LM numbers positions from column 0, so a left-padded teacher batch would shift
    # every row of its shorter sequences
    tokenizer_T, tokenizer_S = wordpiece_any(), characters()
    tokenizer_T.padding_side = tokenizer_S.padding_side = "left"
    batch = CrossTokenizerCollator(tokenizer_S, tokenizer_T)(["let there be light.", "and"])
    for side in ("student", "teacher"):
        mask = batch[side]["attention_mask"]
        assert bool((mask[:, 0] == 1).all()) and bool((mask[:, 1:] <= mask[:, :-1]).all())
    step = _step((tokenizer_T, tokenizer_S), _models(tokenizers), "uld")
    tokenizer_S.padding_side = "right"
    step(_prompts(tokenizer_S))
    mask = step.outputs.last_cross_rollout.teacher["attention_mask"]
    assert bool((mask[:, 1:] <= mask[:, :-1]).all()) and bool((mask[:, -1] == 0).any())


def test_a_retokenised_sequence_past_the_teachers_context_is_refused(tokenizers):
    teacher = tiny_llama(1, 8, seed=0, vocab=len(tokenizers[0]), context=6).eval()
    student = _models(tokenizers)[1]
    step = _step(tokenizers, (teacher, student), "uld")
    with pytest.raises(ValueError, match=r"^on-policy across tokenizers: sequence \d re-tokenised "
                                         r"for the teacher is \d+ tokens, past the teacher's "
                                         r"context of 6: shorten the prompts or lower "
                                         r"max_new_tokens"):
        step(_prompts(tokenizers[1]))


@pytest.mark.parametrize("loss", ["gold", "uld"])
def test_seq_kd_across_tokenizers_the_teacher_samples_and_the_student_is_retokenised(loss):
    # the teacher (characters, exact round trip) samples from the prompts re-tokenised for it;
    # the loss equals the off-policy step on the same (prompt, completion) texts as data
    tokenizer_T, tokenizer_S = characters(), wordpiece_any()
    teacher = _without_pad_and_unk(
        tiny_llama(2, 16, seed=0, vocab=len(tokenizer_T), context=64), len(tokenizer_T), 16)
    student = tiny_llama(1, 8, seed=1, vocab=len(tokenizer_S), context=64).train()
    models = (teacher.eval(), student)
    step = _step((tokenizer_T, tokenizer_S), models, loss, seq_kd=True)
    out = step(_prompts(tokenizer_S))
    out.loss.backward()
    on_grads = _grads(student)
    student.zero_grad()
    sampled, cross = step.outputs.last_rollout, step.outputs.last_cross_rollout
    assert torch.equal(cross.teacher["input_ids"], sampled.input_ids)  # the teacher's own ids
    assert int(sampled.input_ids.max()) < len(tokenizer_T)
    # WordPiece decodes "let there be " without its trailing space
    assert [t[:k] for t, k in zip(cross.texts, cross.prompt_chars, strict=True)] == [
        p.strip() for p in PROMPTS]
    data = CrossTokenizerCollator(tokenizer_S, tokenizer_T)(
        [(t[:k], t[k:]) for t, k in zip(cross.texts, cross.prompt_chars, strict=True)])
    assert torch.equal(data["student"]["input_ids"], cross.student["input_ids"])
    reference = _off_policy_step((tokenizer_T, tokenizer_S), models, loss)(data)
    reference.loss.backward()
    assert out.tokens.item() == reference.tokens.item() > 3
    torch.testing.assert_close(out.loss, reference.loss, rtol=1e-6, atol=1e-12)
    for got, want in zip(on_grads, _grads(student), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)


def test_a_smollm2_student_samples_and_a_gemma3_teacher_scores():
    # the real pair's tokenizers (byte-level BPE, 49,152; SentencePiece, 262,144) on tiny random
    # models: random samples hold partial UTF-8 characters and odd merges; every step is finite
    tokenizer_S, tokenizer_T = _tokenizers.smollm2(), _tokenizers.gemma3()
    teacher = tiny_llama(1, 8, seed=0, vocab=len(tokenizer_T), context=256).float().eval()
    student = tiny_llama(1, 8, seed=1, vocab=len(tokenizer_S), context=256).float()
    student.generation_config.eos_token_id = tokenizer_S.eos_token_id
    config = purekd.DistillationConfig(
        kd_loss_type=["uld", {"top_k": 64}], temperature=1,
        on_policy=purekd.OnPolicyConfig(max_new_tokens=24, seed=0))
    step = purekd.make_step(config, teacher, student, hf_adaptor(causal=True),
                            hf_adaptor(causal=True), compile=False,
                            tokenizers=(tokenizer_T, tokenizer_S))
    tokenizer_S.padding_side = "left"
    try:
        prompts = tokenizer_S(["In the beginning God created", "And God said, Let there"],
                              padding=True, return_tensors="pt")
    finally:
        tokenizer_S.padding_side = "right"
    out = step({"prompts": prompts["input_ids"],
                "prompt_attention_mask": prompts["attention_mask"]})
    out.loss.backward()
    cross = step.outputs.last_cross_rollout
    assert torch.isfinite(out.loss) and out.tokens.item() >= 30
    assert cross.texts[0].startswith("In the beginning God created")
    assert torch.equal(cross.student["input_ids"], step.outputs.last_rollout.input_ids)
    assert cross.teacher["input_ids"][0, 0].item() == tokenizer_T.bos_token_id
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


@pytest.mark.parametrize("which", ["characters", "wordpiece_any", "wordpiece", "smollm2",
                                   "gemma3"])
def test_windowed_decoding_gives_the_offsets_of_whole_prefix_decoding(which):
    tokenizer = (globals()[which]() if which in ("characters", "wordpiece_any")
                 else getattr(_tokenizers, which)())
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(0, len(tokenizer), (n,), generator=generator).tolist()
                 for n in (1, 7, 64, 200)]
    sequences.append(tokenizer(REAL_TEXT * 2, add_special_tokens=False)["input_ids"])
    for ids in sequences:
        exact = decode_with_offsets(tokenizer, ids, window=None)
        for window in (1, 8):
            assert decode_with_offsets(tokenizer, ids, window=window) == exact
    assert decode_with_offsets(tokenizer, []) == ("", [])
