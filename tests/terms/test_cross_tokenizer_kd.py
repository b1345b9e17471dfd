"""Cross-tokenizer distillation through the configs: a WordPiece student and a character-level
teacher (different vocabularies, different tokenisations of the same texts), batches from
``CrossTokenizerCollator``, ``kd_loss_type='gold'`` / ``'uld'`` — the loss equals
``aligned_gold`` / ``aligned_uld`` by hand, the weights move, accumulation is token-normalised
over the aligned spans; and every misconfiguration raises naming the culprit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import purekd
from purekd import losses
from purekd._devices import move_to_device
from purekd.stages import CrossTokenizerCollator, batch_split, vocabulary_map

from ..stages import _tokenizers
from ..stages.test_cross_batches import characters

TEXTS = ["in the beginning god created the heaven and the earth.", "let there be light.",
         "and the earth.", "the heaven and the new york cafe."]
TEMPERATURE = 2.0


class TokenLM(nn.Module):
    """ids (B, L) -> logits (B, L, V), float64; each row depends on its own token only, so
    padding to another length changes no row."""

    def __init__(self, vocab: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Embedding(vocab, 8), nn.Tanh(), nn.Linear(8, vocab))
        self.double()

    def forward(self, input_ids: torch.Tensor, **_: Any) -> dict[str, torch.Tensor]:
        return {"logits": self.body(input_ids)}


def adaptor(batch: Any, outputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    del batch
    return {"logits": outputs["logits"]}


@pytest.fixture(scope="module")
def pair() -> tuple[Any, Any, losses.VocabularyMap]:
    tokenizer_S, tokenizer_T = _tokenizers.wordpiece(), characters()
    return tokenizer_S, tokenizer_T, vocabulary_map(tokenizer_S, tokenizer_T)


def models(pair: Any) -> tuple[TokenLM, TokenLM]:
    tokenizer_S, tokenizer_T, _ = pair
    return TokenLM(len(tokenizer_T), seed=0), TokenLM(len(tokenizer_S), seed=1)


def by_hand(loss: str, student: TokenLM, teacher: TokenLM, batch: dict[str, Any],
            vmap: losses.VocabularyMap, params: dict[str, Any]) -> torch.Tensor:
    logits_S = student.body(batch["student"]["input_ids"])
    with torch.no_grad():
        logits_T = teacher.body(batch["teacher"]["input_ids"])
    if loss == "gold":
        return losses.aligned_gold(logits_S, logits_T, batch["spans"], vmap,
                                   temperature=TEMPERATURE, **params)
    return losses.aligned_uld(logits_S, logits_T, batch["spans"], temperature=TEMPERATURE,
                              **params)


CASES = [("gold", {}), ("gold", {"beta": 0.9, "matched_weight": 1.0, "unmatched_weight": 0.5}),
         ("uld", {}), ("uld", {"top_k": 3})]


@pytest.mark.parametrize(("loss", "params"), CASES)
def test_the_step_is_the_aligned_loss_on_the_same_batch(pair, loss, params):
    tokenizer_S, tokenizer_T, vmap = pair
    teacher, student = models(pair)
    batch = CrossTokenizerCollator(tokenizer_S, tokenizer_T)(TEXTS)
    config = purekd.DistillationConfig(kd_loss_type=[loss, params] if params else loss,
                                       temperature=TEMPERATURE)
    step = purekd.make_step(config, teacher, student, adaptor, adaptor, compile=False,
                            vocabulary_map=vmap if loss == "gold" else None)
    out = step(batch)
    want = by_hand(loss, student, teacher, batch, vmap, params)
    torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.terms["kd_loss"], want, rtol=1e-12, atol=0)
    assert out.tokens is not None and out.tokens.item() == batch["spans"].weight.sum().item()
    assert out.tokens.item() > 10


def sgd_by_hand(pair: Any, loss: str, params: dict[str, Any], lr: float
                ) -> dict[str, torch.Tensor]:
    tokenizer_S, tokenizer_T, vmap = pair
    teacher, student = models(pair)
    batch = CrossTokenizerCollator(tokenizer_S, tokenizer_T)(TEXTS)
    by_hand(loss, student, teacher, batch, vmap, params).backward()
    with torch.no_grad():
        return {k: p - lr * p.grad for k, p in student.named_parameters()}  # type: ignore[operator]


def distil(tmp_path: Path, pair: Any, loss: str, params: dict[str, Any], lr: float,
           accumulation: int, steps: int = 1, normalisation: str = "auto"
           ) -> dict[str, torch.Tensor]:
    tokenizer_S, tokenizer_T, vmap = pair
    teacher, student = models(pair)
    collate = CrossTokenizerCollator(tokenizer_S, tokenizer_T)
    size = len(TEXTS) // accumulation
    # micro-batches of unequal span counts, each padded to its own longest text
    loader = [collate(TEXTS[i:i + size]) for i in range(0, len(TEXTS), size)]
    config = purekd.DistillationConfig(kd_loss_type=[loss, params] if params else loss,
                                       temperature=TEMPERATURE, loss_normalisation=normalisation)
    train = purekd.TrainingConfig(device="cpu", output_dir=str(tmp_path),
                                  gradient_accumulation_steps=accumulation)
    distiller = purekd.GeneralDistiller(train, config, teacher, student, adaptor, adaptor,
                                        compile=False,
                                        vocabulary_map=vmap if loss == "gold" else None)
    with distiller:
        distiller.train(torch.optim.SGD(student.parameters(), lr=lr), loader * steps,
                        num_steps=steps)
    return {k: p.detach().clone() for k, p in student.named_parameters()}


@pytest.mark.parametrize(("loss", "params"), [CASES[1], CASES[2]])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_one_distiller_step_is_sgd_on_the_aligned_loss_of_all_spans(tmp_path, pair, loss, params,
                                                                    accumulation):
    expected = sgd_by_hand(pair, loss, params, lr=0.5)
    got = distil(tmp_path, pair, loss, params, lr=0.5, accumulation=accumulation)
    start = {k: p.detach() for k, p in models(pair)[1].named_parameters()}
    assert max((got[k] - start[k]).abs().max().item() for k in got) > 1e-4  # the weights moved
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-10, atol=1e-12)


def test_the_micro_batches_have_unequal_span_counts(tmp_path, pair):
    tokenizer_S, tokenizer_T, _ = pair
    collate = CrossTokenizerCollator(tokenizer_S, tokenizer_T)
    counts = [collate(TEXTS[i:i + 2])["spans"].weight.sum().item() for i in (0, 2)]
    assert counts[0] != counts[1]
    # so the mean of per-micro-batch means (loss_normalisation='batch') is another gradient
    expected = sgd_by_hand(pair, "uld", {}, lr=0.5)
    means = distil(tmp_path, pair, "uld", {}, lr=0.5, accumulation=2, normalisation="batch")
    assert max((means[k] - expected[k]).abs().max().item() for k in expected) > 1e-6


def test_the_basic_distiller_takes_the_vocabulary_map(tmp_path, pair):
    tokenizer_S, tokenizer_T, vmap = pair
    teacher, student = models(pair)
    distiller = purekd.BasicDistiller(
        purekd.TrainingConfig(device="cpu", output_dir=str(tmp_path)),
        purekd.DistillationConfig(kd_loss_type="gold", temperature=TEMPERATURE), teacher,
        student, adaptor, adaptor, compile=False, vocabulary_map=vmap)
    batch = CrossTokenizerCollator(tokenizer_S, tokenizer_T)(TEXTS)
    torch.testing.assert_close(distiller.step(batch).loss,
                               by_hand("gold", student, teacher, batch, vmap, {}),
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("loss", ["gold", "uld"])
def test_a_few_distiller_steps_lower_the_loss(tmp_path, pair, loss):
    tokenizer_S, tokenizer_T, vmap = pair
    batch = CrossTokenizerCollator(tokenizer_S, tokenizer_T)(TEXTS)
    teacher, student = models(pair)
    before = by_hand(loss, student, teacher, batch, vmap, {}).item()
    weights = distil(tmp_path, pair, loss, {}, lr=0.5, accumulation=1, steps=5)
    student.load_state_dict(weights)
    after = by_hand(loss, student, teacher, batch, vmap, {}).item()
    assert after < before


def test_uld_without_spans_stays_row_against_row():
    torch.manual_seed(0)
    teacher, student = TokenLM(9, seed=0), TokenLM(9, seed=1)
    ids = torch.randint(0, 9, (2, 5))
    step = purekd.make_step({"kd_loss_type": "uld", "temperature": 1}, teacher, student, adaptor,
                            adaptor, compile=False)
    out = step({"input_ids": ids})
    torch.testing.assert_close(out.loss, losses.uld(student.body(ids), teacher.body(ids)),
                               rtol=1e-12, atol=0)
    assert out.tokens is not None and out.tokens.item() == 10


# ----------------------------------------------------------------------- the batch's route
def test_batch_split_carries_the_spans_and_move_to_device_keeps_them(pair):
    tokenizer_S, tokenizer_T, _ = pair
    batch = CrossTokenizerCollator(tokenizer_S, tokenizer_T)(TEXTS[:2])
    moved = move_to_device(batch, "cpu")
    assert isinstance(moved["spans"], losses.AlignedSpans)
    split = batch_split(moved)
    assert split.spans is not None
    for got, want in zip(split.spans, batch["spans"], strict=True):
        assert torch.equal(got, want)
    # a plain 7-tuple (a loader's flattening) is rebuilt; anything else is refused
    assert isinstance(batch_split({**batch, "spans": tuple(batch["spans"])}).spans,
                      losses.AlignedSpans)
    with pytest.raises(TypeError, match=r"the batch's 'spans' is a dict: it must be the "
                                        r"AlignedSpans"):
        batch_split({**batch, "spans": {}})
    # without 'teacher' and 'student', 'spans' is the models' own input, fed to both
    assert batch_split({"spans": 3}).teacher == {"spans": 3}
    assert batch_split({"teacher": 1, "student": 2}).spans is None


# ----------------------------------------------------------------------- bad input
def test_gold_without_a_vocabulary_map_is_refused_when_the_step_is_built(pair):
    teacher, student = models(pair)
    with pytest.raises(ValueError, match=r"^kd_loss_type='gold' needs the vocabulary map of the "
                                         r"two tokenizers .*vocabulary_map\(tokenizer_S, "
                                         r"tokenizer_T\) and pass make_step\(\.\.\., "
                                         r"vocabulary_map=\.\.\.\).*'uld'.*cross-tokenizer\.md"):
        purekd.make_step({"kd_loss_type": "gold"}, teacher, student, adaptor, adaptor,
                         compile=False)
    with pytest.raises(ValueError, match=r"needs the vocabulary map"):
        purekd.GeneralDistiller(purekd.TrainingConfig(device="cpu"),
                                purekd.DistillationConfig(kd_loss_type="gold"), teacher, student,
                                adaptor, adaptor, compile=False)


def test_a_vocabulary_map_with_another_loss_is_refused(pair):
    teacher, student = models(pair)
    for loss in ("forward_kl", "uld"):
        with pytest.raises(ValueError, match=rf"vocabulary_map=\.\.\.\) with kd_loss_type="
                                             rf"'{loss}': the vocabulary map is for "
                                             rf"kd_loss_type='gold'"):
            purekd.make_step({"kd_loss_type": loss}, teacher, student, adaptor, adaptor,
                             compile=False, vocabulary_map=pair[2])


@pytest.mark.parametrize("loss", ["forward_kl", ["jsd", {"beta": 0.2}], "ce"])
def test_a_cross_tokenizer_batch_with_a_one_vocabulary_loss_is_refused(pair, loss):
    tokenizer_S, tokenizer_T, _ = pair
    teacher, student = models(pair)
    batch = CrossTokenizerCollator(tokenizer_S, tokenizer_T)(TEXTS[:2])
    step = purekd.make_step({"kd_loss_type": loss}, teacher, student, adaptor, adaptor,
                            compile=False)
    name = loss if isinstance(loss, str) else loss[0]
    with pytest.raises(ValueError, match=rf"^the batch carries 'spans' \(a cross-tokenizer "
                                         rf"batch.*kd_loss_type='{name}' compares row t.*"
                                         rf"kd_loss_type='gold'.*or 'uld'"):
        step(batch)


def test_gold_on_a_batch_without_spans_is_refused(pair):
    teacher, student = models(pair)
    step = purekd.make_step({"kd_loss_type": "gold"}, teacher, student, adaptor, adaptor,
                            compile=False, vocabulary_map=pair[2])
    with pytest.raises(ValueError, match=r"^kd_loss_type='gold' over aligned spans needs a "
                                         r"cross-tokenizer batch.*CrossTokenizerCollator.*no "
                                         r"'spans'"):
        step({"input_ids": torch.zeros(1, 3, dtype=torch.long)})


def test_different_vocabularies_without_spans_point_to_cross_tokenizer_distillation(pair):
    teacher, student = models(pair)
    step = purekd.make_step({"kd_loss_type": "forward_kl"}, teacher, student, adaptor, adaptor,
                            compile=False)
    with pytest.raises(ValueError, match=r"vocabulary has 26 entries but the teacher's has 32.*probability mass\. "
                                         r"If the two models have different tokenizers, distil "
                                         r"across tokenizers instead: batches from purekd\."
                                         r"stages\.CrossTokenizerCollator and kd_loss_type='gold'"
                                         r" or 'uld' \(docs/cross-tokenizer\.md\)"):
        step({"input_ids": torch.zeros(1, 3, dtype=torch.long)})


def test_a_vocabulary_map_of_other_tokenizers_is_refused(pair):
    tokenizer_S, tokenizer_T, _ = pair
    teacher, student = models(pair)
    other = losses.VocabularyMap(torch.tensor([0, 99]), torch.tensor([0, 1]))
    step = purekd.make_step({"kd_loss_type": "gold"}, teacher, student, adaptor, adaptor,
                            compile=False, vocabulary_map=other)
    with pytest.raises(ValueError, match=r"kd_loss_type='gold'"):
        step(CrossTokenizerCollator(tokenizer_S, tokenizer_T)(TEXTS[:2]))


@pytest.mark.parametrize(("value", "match"), [
    (["gold", {"beta": 2}], r"beta=2 is outside \[0, 1\]"),
    (["gold", {"loss": "nope"}], r"loss='nope' is the divergence on the matched tokens; choose "
                                 r"one of \['forward_kl', 'jsd'"),
    (["gold", {"loss": "uld"}], r"loss='uld' is the divergence on the matched tokens"),
    (["gold", {"matched_weight": 1}], r"give both matched_weight and unmatched_weight"),
    (["gold", {"matched_weight": -1, "unmatched_weight": 1}],
     r"matched_weight=-1 must be a finite number >= 0"),
    (["gold", {"top_k": 0}], r"top_k=0 must be a positive int"),
    (["gold", {"gamma": 1}], r"takes no argument\(s\) \['gamma'\]"),
    (["gold", 0.5], r"'gold' takes its parameters as one dict"),
])
def test_bad_gold_parameters_are_refused_by_the_config(value, match):
    with pytest.raises(ValueError, match=r"^DistillationConfig\.kd_loss_type=.*" + match):
        purekd.DistillationConfig(kd_loss_type=value)


def test_gold_config_parameters():
    config = purekd.DistillationConfig(kd_loss_type=["gold", {"loss": "tvd", "top_k": 4}])
    assert config.kd_loss == ("gold", {"loss": "tvd", "top_k": 4})
    assert config.normalises_by_tokens
    assert purekd.presets.KD_LOSS_MAP["gold"] is losses.aligned_gold
    with pytest.raises(ValueError, match="temperature"):
        purekd.DistillationConfig(kd_loss_type="gold", temperature_scheduler=["cwsm", 1.0])


def test_the_compiled_loss_path_is_the_same_loss(pair):
    tokenizer_S, tokenizer_T, vmap = pair
    teacher, student = models(pair)
    batch = CrossTokenizerCollator(tokenizer_S, tokenizer_T)(TEXTS)
    step = purekd.make_step({"kd_loss_type": "gold", "temperature": TEMPERATURE}, teacher,
                            student, adaptor, adaptor, compile=True, vocabulary_map=vmap)
    out = step(batch)
    assert step.loss.fallback_reason is None  # compiled, no eager fallback
    want = by_hand("gold", student, teacher, batch, vmap, {})
    torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=0)
    got = torch.autograd.grad(out.loss, list(student.parameters()))
    expected = torch.autograd.grad(want, list(student.parameters()))
    for g, w in zip(got, expected, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13)
