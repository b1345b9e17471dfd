"""A cross-tokenizer teacher cache: a character-level teacher and a WordPiece student. The cache
stores the teacher's top-k with its tokens, offsets and next-token log-probabilities (format
version 2); reading it back gives the live collator's spans exactly, and make_step trained from
it equals the live teacher's step at k = V (loss and gradients, 1e-6); with k < V the student
learns. Every refusal: another student tokenizer, another text, a plain cache, batches without
offsets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader

import purekd
from purekd.stages import CrossTokenizerCollator, vocabulary_map
from purekd.teacher_cache import (
    CacheError,
    CrossTokenizerCachedCollate,
    CrossTokenizerCachedDataset,
    TeacherCache,
    TeacherTextCollate,
    WithSampleIds,
    write_teacher_cache,
)

from ..stages import _tokenizers
from ..stages.test_cross_batches import characters

TEXTS = ["in the beginning god created the heaven and the earth.", "let there be light.",
         "and the earth.", "the heaven and the new york cafe.", "god created light."]


class Output(NamedTuple):
    logits: Tensor


class CausalLM(torch.nn.Module):
    """Position t's logits depend on tokens 0..t only (a running mean of embeddings), so right
    padding changes no real row."""

    def __init__(self, vocab: int, seed: int, width: int = 16):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, width)
        self.out = torch.nn.Linear(width, vocab)

    def forward(self, input_ids: Tensor, **_: Any) -> Output:
        h = self.embed(input_ids).cumsum(1)
        h = h / torch.arange(1, input_ids.shape[1] + 1, dtype=h.dtype)[None, :, None]
        return Output(self.out(torch.tanh(h)) * 3)


class Oracle(torch.nn.Module):
    """A teacher sure of the next character (as a trained model is inside a word): random logits
    plus 9 at the token that follows (it looks ahead: a stand-in for a trained teacher)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids: Tensor, **_: Any) -> Output:
        generator = torch.Generator().manual_seed(0)
        logits = torch.randn(*input_ids.shape, self.vocab, generator=generator)
        following = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1)
        return Output(logits.scatter_add(-1, following[..., None],
                                         torch.full_like(logits[..., :1], 9.0)))


def logits_adaptor(batch: Any, outputs: Output) -> dict[str, Any]:
    del batch
    return {"logits": outputs.logits}


def writer_adaptor(batch: dict[str, Tensor], outputs: Output) -> dict[str, Any]:
    return {"logits": outputs.logits, "logits_mask": batch["attention_mask"]}


def cached_adaptor(batch: Any, cached: dict[str, Any]) -> dict[str, Any]:
    del batch
    return dict(cached)


@pytest.fixture(scope="module")
def pair() -> tuple[Any, Any]:
    return _tokenizers.wordpiece(), characters()


def write(teacher: torch.nn.Module, pair: Any, out: Path, *, k: int, texts=TEXTS,
          values: str = "float32", **options: Any) -> Any:
    tokenizer_S, tokenizer_T = pair
    loader = DataLoader(WithSampleIds(texts), batch_size=2,
                        collate_fn=TeacherTextCollate(tokenizer_T))
    return write_teacher_cache(teacher, writer_adaptor, loader, out, k=k, values=values,
                               tokenizer=tokenizer_T, student_tokenizer=tokenizer_S,
                               progress_bar=False, **options)


def cached_batches(pair: Any, out: Path, batch_size: int = 5, texts=TEXTS) -> list[dict[str, Any]]:
    tokenizer_S, tokenizer_T = pair
    cache = TeacherCache(out, tokenizer=tokenizer_T, student_tokenizer=tokenizer_S)
    data = CrossTokenizerCachedDataset(texts, cache, tokenizer_S, tokenizer_T=tokenizer_T)
    return list(DataLoader(data, batch_size=batch_size,
                           collate_fn=CrossTokenizerCachedCollate(tokenizer_S)))


def test_records_hold_the_teachers_tokens_offsets_and_next_logprobs(pair, tmp_path):
    tokenizer_S, tokenizer_T = pair
    teacher = CausalLM(len(tokenizer_T), seed=0)
    write(teacher, pair, tmp_path, k=4)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["version"] == 2 and manifest["cross_tokenizer"] is True
    assert manifest["student_tokenizer_fingerprint"] == purekd.teacher_cache.fingerprint_tokenizer(
        tokenizer_S)
    cache = TeacherCache(tmp_path)
    for sample_id, text in enumerate(TEXTS):
        encoded = tokenizer_T(text, return_offsets_mapping=True)
        tokens = torch.tensor(encoded["input_ids"])
        sample = cache[sample_id]
        assert torch.equal(sample.tokens, tokens)
        assert sample.offsets.tolist() == [list(o) for o in encoded["offset_mapping"]]
        with torch.no_grad():
            logp = torch.log_softmax(teacher(tokens[None]).logits[0], -1)
        torch.testing.assert_close(sample.next_logprobs[:-1],
                                   logp[:-1].gather(-1, tokens[1:, None])[:, 0], rtol=0, atol=1e-6)
        assert sample.next_logprobs[-1] == 0
        values, ids = logp.topk(4, -1)
        assert torch.equal(sample.topk_ids, ids)
        torch.testing.assert_close(sample.topk_logprobs, values, rtol=0, atol=1e-6)


def test_the_cached_batches_carry_the_live_collators_spans(pair, tmp_path):
    tokenizer_S, tokenizer_T = pair
    write(CausalLM(len(tokenizer_T), seed=0), pair, tmp_path, k=3)
    (cached,) = cached_batches(pair, tmp_path)
    live = CrossTokenizerCollator(tokenizer_S, tokenizer_T)(TEXTS)
    for name, a, b in zip(live["spans"]._fields, cached["spans"], live["spans"], strict=True):
        assert torch.equal(a, b), name
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(cached["student"][key], live["student"][key]), key
    assert cached["teacher_cache"]["topk_ids"].shape[:2] == live["teacher"]["input_ids"].shape
    assert torch.equal(cached["teacher_cache"]["topk_mask"], live["teacher"]["attention_mask"])
    assert cached["teacher_cache"]["topk_vocab_size"] == len(tokenizer_T)


def one_step(step: Any, student: torch.nn.Module, batch: Any) -> tuple[Tensor, list[Tensor]]:
    student.zero_grad()
    loss = step(batch).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in student.parameters()]


def assert_cached_step_is_live(live_step: Any, cached_step: Any, student: torch.nn.Module,
                               pair: Any, tmp_path: Path) -> None:
    """One step on :data:`TEXTS` from the live teacher and one from the cache written to
    ``tmp_path`` give the same loss (> 0.05) and student gradients, to 1e-6."""
    tokenizer_S, tokenizer_T = pair
    live_loss, live_grads = one_step(live_step, student,
                                     CrossTokenizerCollator(tokenizer_S, tokenizer_T)(TEXTS))
    (batch,) = cached_batches(pair, tmp_path)
    cached_loss, cached_grads = one_step(cached_step, student, batch)
    assert live_loss.item() > 0.05
    torch.testing.assert_close(cached_loss, live_loss, rtol=0, atol=1e-6)
    for a, b in zip(cached_grads, live_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("loss", "params"), [
    ("uld", {}), ("gold", {}), ("gold", {"beta": 0.9, "matched_weight": 1.0,
                                         "unmatched_weight": 0.5, "top_k": 5}),
    ("gold", {"tail": "uniform"}), ("gold", {"tail": "total", "loss": "forward_kl"})])
def test_make_step_from_the_cache_at_k_equal_v_is_the_live_step(pair, tmp_path, loss, params):
    tokenizer_S, tokenizer_T = pair
    teacher = CausalLM(len(tokenizer_T), seed=0)
    student = CausalLM(len(tokenizer_S), seed=1)
    write(teacher, pair, tmp_path, k=len(tokenizer_T))
    config = {"kd_loss_type": [loss, params] if params else loss, "temperature": 1.0}
    options = {"vocabulary_map": vocabulary_map(tokenizer_S, tokenizer_T)} if loss == "gold" else {}
    live_step = purekd.make_step(config, teacher, student, logits_adaptor, logits_adaptor,
                                 compile=False, **options)
    cached_step = purekd.make_step(config, None, student, cached_adaptor, logits_adaptor,
                                   compile=False, **options)
    assert_cached_step_is_live(live_step, cached_step, student, pair, tmp_path)


@pytest.mark.parametrize("loss", ["uld", "gold"])
def test_a_student_learns_from_a_top_k_cache(pair, tmp_path, loss):
    tokenizer_S, tokenizer_T = pair
    write(Oracle(len(tokenizer_T)), pair, tmp_path, k=4, values="float16")
    batches = cached_batches(pair, tmp_path, batch_size=5)
    student = CausalLM(len(tokenizer_S), seed=1)
    options = {"vocabulary_map": vocabulary_map(tokenizer_S, tokenizer_T)} if loss == "gold" else {}
    step = purekd.make_step({"kd_loss_type": loss, "temperature": 1.0}, None, student,
                            cached_adaptor, logits_adaptor, compile=False, **options)
    optimizer = torch.optim.Adam(student.parameters(), lr=0.05)
    values = []
    for _ in range(40):
        optimizer.zero_grad()
        out = step(batches[0])
        out.loss.backward()
        optimizer.step()
        values.append(out.loss.item())
    assert values[-1] < 0.6 * values[0], (values[0], values[-1])


def test_refusals(pair, tmp_path):
    tokenizer_S, tokenizer_T = pair
    write(CausalLM(len(tokenizer_T), seed=0), pair, tmp_path, k=3)
    other = _tokenizers.wordpiece()
    other.add_tokens(["zebra"])
    with pytest.raises(CacheError, match=r"student tokenizer fingerprint mismatch: the "
                                         r"cross-tokenizer cache at .* was written for the "
                                         r"student tokenizer"):
        TeacherCache(tmp_path, student_tokenizer=other)
    cache = TeacherCache(tmp_path)
    with pytest.raises(CacheError, match="student tokenizer fingerprint mismatch"):
        CrossTokenizerCachedDataset(TEXTS, cache, other)
    with pytest.raises(CacheError, match="tokenizer fingerprint mismatch"):
        CrossTokenizerCachedDataset(TEXTS, cache, tokenizer_S, tokenizer_T=other)
    swapped = [TEXTS[1], TEXTS[0], *TEXTS[2:]]
    with pytest.raises(ValueError, match=r"item 0 \(sample id 0\) is not the text the cache was "
                                         r"written for \(its digest differs\)"):
        CrossTokenizerCachedDataset(swapped, cache, tokenizer_S)
    # a plain cache is not a cross-tokenizer one, and a cross-tokenizer one needs offsets
    plain = tmp_path / "plain"
    loader = DataLoader(WithSampleIds(TEXTS), batch_size=2,
                        collate_fn=TeacherTextCollate(tokenizer_T))
    write_teacher_cache(CausalLM(len(tokenizer_T), seed=0), writer_adaptor,
                        ({"sample_id": b["sample_id"], "teacher": b["teacher"]} for b in loader),
                        plain, k=3, tokenizer=tokenizer_T, progress_bar=False)
    assert json.loads((plain / "manifest.json").read_text())["version"] == 1
    with pytest.raises(CacheError, match="is not a cross-tokenizer cache"):
        CrossTokenizerCachedDataset(TEXTS, TeacherCache(plain), tokenizer_S)
    with pytest.raises(CacheError, match=r"student_tokenizer= given, but the cache at .* is not "
                                         r"a cross-tokenizer cache"):
        TeacherCache(plain, student_tokenizer=tokenizer_S)
    with pytest.raises(ValueError, match=r"give batches .*'offsets': \(B, L, 2\), 'texts'"):
        write_teacher_cache(CausalLM(len(tokenizer_T), seed=0), writer_adaptor,
                            ({"sample_id": b["sample_id"], "teacher": b["teacher"]}
                             for b in loader), tmp_path / "bad", k=3, tokenizer=tokenizer_T,
                            student_tokenizer=tokenizer_S, progress_bar=False)
    with pytest.raises(ValueError, match=r"write_teacher_cache\(student_tokenizer=...\) without tokenizer=: give the teacher"):
        write_teacher_cache(CausalLM(len(tokenizer_T), seed=0), writer_adaptor, loader,
                            tmp_path / "bad2", k=3, student_tokenizer=tokenizer_S)


def test_resuming_with_another_student_tokenizer_is_refused(pair, tmp_path):
    _, tokenizer_T = pair
    write(CausalLM(len(tokenizer_T), seed=0), pair, tmp_path, k=3, shard_samples=2)
    written = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.suffix != ".lock"}
    (tmp_path / "manifest.json").unlink()
    (tmp_path / "rank00000-shard00002.rows.npy").unlink()  # as if killed before the last shard
    other = _tokenizers.wordpiece()
    other.add_tokens(["zebra"])
    with pytest.raises(CacheError, match="student_tokenizer_fingerprint"):
        write(CausalLM(len(tokenizer_T), seed=0), (other, tokenizer_T), tmp_path, k=3)
    # the same pair again finishes the cache, to the same bytes
    write(CausalLM(len(tokenizer_T), seed=0), pair, tmp_path, k=3, shard_samples=2)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.suffix != ".lock"} == written
    assert TeacherCache(tmp_path).cross_tokenizer


def test_a_model_with_a_scalar_parameter_has_a_fingerprint():
    # fingerprint_model viewed every tensor as bytes, which a 0-dim tensor cannot be
    from purekd.teacher_cache import fingerprint_model

    one, other = Oracle(5), Oracle(5)
    assert fingerprint_model(one) == fingerprint_model(other)
    with torch.no_grad():
        other.anchor.fill_(1.0)
    assert fingerprint_model(one) != fingerprint_model(other)


@pytest.mark.parametrize("loss", ["uld", "gold"])
def test_general_distiller_from_the_cache_ends_with_the_live_weights(pair, tmp_path, loss):
    # k = V, float32: two epochs of SGD from the cache (no teacher model) give the weights the
    # live teacher gives
    tokenizer_S, tokenizer_T = pair
    teacher = CausalLM(len(tokenizer_T), seed=0)
    write(teacher, pair, tmp_path / "cache", k=len(tokenizer_T))
    options = {"vocabulary_map": vocabulary_map(tokenizer_S, tokenizer_T)} if loss == "gold" else {}

    def run(model_T: Any, adaptor_T: Any, loader: DataLoader, name: str) -> torch.nn.Module:
        student = CausalLM(len(tokenizer_S), seed=1)
        distiller = purekd.GeneralDistiller(
            purekd.TrainingConfig(device="cpu", output_dir=str(tmp_path / name)),
            purekd.DistillationConfig(kd_loss_type=loss, temperature=1.0), model_T, student,
            adaptor_T, logits_adaptor, **options)
        with distiller:
            distiller.train(torch.optim.SGD(student.parameters(), lr=0.5), loader, num_epochs=2)
        return student

    live = run(teacher, logits_adaptor, DataLoader(
        TEXTS, batch_size=2, collate_fn=CrossTokenizerCollator(tokenizer_S, tokenizer_T)), "live")
    cache = TeacherCache(tmp_path / "cache", student_tokenizer=tokenizer_S)
    cached = run(None, cached_adaptor, DataLoader(
        CrossTokenizerCachedDataset(TEXTS, cache, tokenizer_S), batch_size=2,
        collate_fn=CrossTokenizerCachedCollate(tokenizer_S)), "cached")
    start = CausalLM(len(tokenizer_S), seed=1)
    moved = max((a - b).abs().max().item() for a, b in zip(live.parameters(),
                                                           start.parameters(), strict=True))
    assert moved > 1e-3
    for a, b in zip(cached.parameters(), live.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("block", [1, 3, 7, 1000])
@pytest.mark.parametrize("k", [1, 4, 9])
def test_topk_of_linear_equals_the_dense_top_k(block, k):
    from purekd.teacher_cache._writer import topk_of_linear

    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    weight = torch.randn(23, 5, generator=generator, dtype=torch.float64)
    bias = torch.randn(23, generator=generator, dtype=torch.float64)
    following_tokens = torch.tensor([0, 22, 7, 7, 15, 3])
    values, ids, following = topk_of_linear(hidden, weight, bias, k, following_tokens,
                                            block=block)
    logp = torch.log_softmax(hidden @ weight.T + bias, -1)
    want_values, want_ids = logp.topk(k, -1)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(values, want_values.float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(following, logp.gather(-1, following_tokens[:, None])[:, 0].float(),
                               rtol=0, atol=1e-6)
    assert topk_of_linear(hidden, weight, None, k, block=block)[2] is None


class HiddenOutput(NamedTuple):
    hidden: Tensor


def test_a_cache_from_hidden_states_and_the_output_layer_is_the_logits_cache(pair, tmp_path):
    # the writer given lm_hidden + lm_weight (+ lm_bias) applies the layer a vocabulary block at
    # a time and stores what it stores from the logits: the same ids, tokens, offsets, texts
    tokenizer_S, tokenizer_T = pair
    teacher = CausalLM(len(tokenizer_T), seed=0)

    def hidden_adaptor(batch: dict[str, Tensor], outputs: Any) -> dict[str, Any]:
        h = teacher.embed(batch["input_ids"]).cumsum(1)
        h = h / torch.arange(1, h.shape[1] + 1, dtype=h.dtype)[None, :, None]
        return {"lm_hidden": torch.tanh(h) * 3, "lm_weight": teacher.out.weight,
                "lm_bias": teacher.out.bias * 3, "logits_mask": batch["attention_mask"]}

    write(teacher, pair, tmp_path / "logits", k=4)
    loader = DataLoader(WithSampleIds(TEXTS), batch_size=2,
                        collate_fn=TeacherTextCollate(tokenizer_T))
    write_teacher_cache(teacher, hidden_adaptor, loader, tmp_path / "hidden", k=4,
                        values="float32", tokenizer=tokenizer_T, student_tokenizer=tokenizer_S,
                        progress_bar=False)
    from_logits, from_hidden = TeacherCache(tmp_path / "logits"), TeacherCache(tmp_path / "hidden")
    for sample_id in range(len(TEXTS)):
        a, b = from_logits[sample_id], from_hidden[sample_id]
        assert torch.equal(a.topk_ids, b.topk_ids) and torch.equal(a.tokens, b.tokens)
        assert torch.equal(a.offsets, b.offsets) and a.text_digest == b.text_digest
        torch.testing.assert_close(a.topk_logprobs, b.topk_logprobs, rtol=0, atol=1e-5)
        torch.testing.assert_close(a.next_logprobs, b.next_logprobs, rtol=0, atol=1e-5)
        assert b.next_logprobs[-1] == 0


@pytest.mark.parametrize("tail", ["total", "uniform"])
def test_the_gold_config_chooses_the_top_k_tail(pair, tmp_path, tail):
    # kd_loss_type=["gold", {"tail": ...}] from a k < V_T cache is aligned_gold_topk(tail=...)
    tokenizer_S, tokenizer_T = pair
    write(CausalLM(len(tokenizer_T), seed=0), pair, tmp_path, k=3)
    student = CausalLM(len(tokenizer_S), seed=1)
    mapping = vocabulary_map(tokenizer_S, tokenizer_T)
    step = purekd.make_step({"kd_loss_type": ["gold", {"tail": tail}], "temperature": 1.0}, None,
                            student, cached_adaptor, logits_adaptor, compile=False,
                            vocabulary_map=mapping)
    (batch,) = cached_batches(pair, tmp_path)
    got = step(batch).loss
    cached = batch["teacher_cache"]
    teacher = purekd.losses.TopkSpanTeacher(cached["topk_ids"], cached["topk_logprobs"],
                                            cached["topk_next_logprobs"],
                                            cached["topk_vocab_size"])
    want = purekd.losses.aligned_gold_topk(student(**batch["student"]).logits, teacher,
                                           batch["spans"], mapping, tail=tail)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=r"tail='flat'; choose 'total'"):
        purekd.DistillationConfig(kd_loss_type=["gold", {"tail": "flat"}], temperature=1.0)
