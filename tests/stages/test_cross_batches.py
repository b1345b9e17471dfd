"""CrossTokenizerCollator / align_batches: both models' batches from raw text, their spans, and
every bad input with its message."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from purekd import losses
from purekd.stages import (
    CrossTokenizerCollator,
    align_batches,
    batch_split,
    check_offsets_support,
    vocabulary_map,
)

from . import _tokenizers

TEXTS = ["In the beginning God created the heaven and the earth.",
         "And God said, Let there be light: and there was light. naïve café € 😀"]


def decoded_spans(collated, tokenizer_S, tokenizer_T):
    """Each span as the text of its student tokens and of its teacher tokens."""
    spans = collated["spans"]
    ids_S, ids_T = collated["student"]["input_ids"], collated["teacher"]["input_ids"]
    length_S, length_T = ids_S.size(1), ids_T.size(1)
    result = []
    for s in range(spans.weight.numel()):
        rows_S = spans.rows_S[s][spans.mask_S[s]] + 1  # shift=1: the token is row + 1
        rows_T = spans.rows_T[s][spans.mask_T[s]] + 1
        tokens_S = ids_S.reshape(-1)[rows_S]
        tokens_T = ids_T.reshape(-1)[rows_T]
        assert torch.equal(tokens_S, spans.ids_S[s][spans.mask_S[s]])
        assert torch.equal(tokens_T, spans.ids_T[s][spans.mask_T[s]])
        assert (rows_S // length_S).unique().numel() == 1  # one sequence per span
        assert (rows_T // length_T).unique().numel() == 1
        result.append((tokenizer_S.decode(tokens_S), tokenizer_T.decode(tokens_T)))
    return result


def test_wordpiece_student_and_itself():
    tokenizer = _tokenizers.wordpiece()
    collated = CrossTokenizerCollator(tokenizer, tokenizer)(TEXTS)
    assert set(collated) == {"student", "teacher", "spans"}
    split = batch_split(collated)
    assert split.student is collated["student"] and split.teacher is collated["teacher"]
    assert "offset_mapping" not in collated["student"]
    # the same tokenisation on both sides: every non-special token after the first is a span
    spans = collated["spans"]
    assert spans.mask_S.shape[1] == spans.mask_T.shape[1] == 1
    assert torch.equal(spans.ids_S, spans.ids_T) and torch.equal(spans.rows_S, spans.rows_T)
    labels = collated["student"]["labels"]
    assert (labels == -100).sum() == (collated["student"]["attention_mask"] == 0).sum()


def test_real_pair_spans_are_the_same_text():
    smollm2, gemma3 = _tokenizers.smollm2(), _tokenizers.gemma3()
    collated = CrossTokenizerCollator(smollm2, gemma3)(TEXTS)
    pairs = decoded_spans(collated, smollm2, gemma3)
    # each span decodes to the same text on both sides (up to the leading-space spelling)
    for text_S, text_T in pairs:
        assert text_S.strip() == text_T.strip(), (text_S, text_T)
    joined = [t for t, _ in pairs]
    assert " beginning" in joined and "€" in "".join(joined) and "😀" in "".join(joined)
    # the losses run on these spans with the two vocabularies
    generator = torch.Generator().manual_seed(0)
    batch, length_S = collated["student"]["input_ids"].shape
    length_T = collated["teacher"]["input_ids"].size(1)
    logits_S = torch.randn(batch, length_S, len(smollm2), generator=generator)
    logits_T = torch.randn(batch, length_T, len(gemma3), generator=generator)
    value = losses.aligned_gold(logits_S.requires_grad_(), logits_T, collated["spans"],
                        vocabulary_map(smollm2, gemma3), top_k=256)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits_S.grad).all()


def test_one_real_tokenizer_on_both_sides_aligns_token_for_token():
    smollm2 = _tokenizers.smollm2()
    collated = CrossTokenizerCollator(smollm2, smollm2)(TEXTS)
    spans = collated["spans"]
    for student, teacher in zip(spans[:3], spans[3:6], strict=True):
        assert torch.equal(student, teacher)
    # every token is a span of its own but each text's first one, and the emoji: byte-level BPE
    # spells it in two tokens that both carry its offsets, so they stay one span
    real = collated["student"]["attention_mask"].sum().item()
    assert int(spans.weight.sum()) == real - len(TEXTS) - 1
    assert spans.mask_S.sum(1).tolist().count(2) == 1 and spans.mask_S.shape[1] == 2


def test_slow_tokenizer_is_refused_naming_it_and_the_fix(tmp_path):
    slow = _tokenizers.slow_wordpiece(tmp_path)
    with pytest.raises(ValueError) as error:
        CrossTokenizerCollator(_tokenizers.wordpiece(), slow)
    assert str(error.value) == (
        "the teacher tokenizer BertTokenizerLegacy gives no offset mapping (it is a slow, "
        "Python tokenizer), and cross-tokenizer alignment needs each token's character "
        "offsets: load the fast tokenizer instead, AutoTokenizer.from_pretrained('...', "
        "use_fast=True) (it needs the `tokenizers` package)")

    class Named:
        is_fast = False
        name_or_path = "org/model"

    with pytest.raises(ValueError, match=r"^the student tokenizer Named \('org/model'\) gives no "
                                         r"offset mapping .* AutoTokenizer.from_pretrained\("
                                         r"'org/model', use_fast=True\)"):
        check_offsets_support(Named(), "student")


def test_different_texts_are_refused():
    tokenizer = _tokenizers.wordpiece()
    batch_S = dict(tokenizer(["in the beginning", "let there be light"],
                             return_offsets_mapping=True, padding=True, return_tensors="pt"))
    batch_T = dict(tokenizer(["in the beginning", "let there be heaven"],
                             return_offsets_mapping=True, padding=True, return_tensors="pt"))
    with pytest.raises(ValueError) as error:
        align_batches(batch_S, batch_T, tokenizer_S=tokenizer, tokenizer_T=tokenizer)
    assert str(error.value) == (
        "sequence 1 holds different texts in the student's and the teacher's batch: student "
        "'let there be light', teacher 'let there be heaven'. Cross-tokenizer distillation "
        "needs each side's tokenisation of the same text: build both from the raw texts "
        "(CrossTokenizerCollator), or re-tokenise the decoded student text for the teacher")
    # truncation of one side is not a difference
    batch_T = dict(tokenizer(["in the beginning", "let there"], return_offsets_mapping=True,
                             padding=True, return_tensors="pt"))
    spans = align_batches(batch_S, batch_T, tokenizer_S=tokenizer, tokenizer_T=tokenizer)
    assert spans.weight.sum() > 0
    with pytest.raises(ValueError, match=r"^the student's batch has 2 sequences and the "
                                         r"teacher's 1: each side must tokenise the same texts$"):
        align_batches(batch_S, {k: v[:1] for k, v in batch_T.items()}, tokenizer_S=tokenizer,
                      tokenizer_T=tokenizer)


def test_batch_without_offsets_is_refused():
    tokenizer = _tokenizers.wordpiece()
    batch = dict(tokenizer(["in the beginning"], return_tensors="pt"))
    name = type(tokenizer).__name__
    with pytest.raises(ValueError, match=rf"^the teacher's batch has no 'offset_mapping': call "
                                         rf"its tokenizer, {name}, with "
                                         r"return_offsets_mapping=True \(a fast tokenizer gives "
                                         r"each token's character offsets\)$"):
        align_batches({**batch, "offset_mapping": torch.zeros(1, 5, 2, dtype=torch.long)},
                      batch, tokenizer_S=tokenizer, tokenizer_T=tokenizer)


def test_batch_without_any_span_gives_zero_loss_and_a_warning():
    tokenizer = _tokenizers.wordpiece()
    collator = CrossTokenizerCollator(tokenizer, tokenizer)
    # one token per text: no row predicts it; an empty text: no token at all
    for texts in (["light", "in"], [""]):
        with pytest.warns(RuntimeWarning, match=rf"^align_spans: no aligned span in this batch "
                                                rf"of {len(texts)} sequence\(s\) \(\d+ such "
                                                r"batch\(es\) so far\)"):
            collated = collator(texts)
        length = collated["student"]["input_ids"].size(1)
        logits_S = torch.randn(len(texts), length, len(tokenizer), requires_grad=True)
        logits_T = torch.randn(len(texts), length, len(tokenizer))
        for loss in (losses.aligned_uld, losses.aligned_gold):
            extra = ((vocabulary_map(tokenizer, tokenizer),) if loss is losses.aligned_gold
                     else ())
            value = loss(logits_S, logits_T, collated["spans"], *extra)
            (grad,) = torch.autograd.grad(value, logits_S)
            assert value.item() == 0.0 and torch.isfinite(grad).all() and not grad.any()


def test_labels_mask_a_prompt():
    tokenizer = _tokenizers.wordpiece()
    text = "let there be light"
    batch = dict(tokenizer([text], return_offsets_mapping=True, return_tensors="pt"))
    assert tokenizer.convert_ids_to_tokens(batch["input_ids"][0]) == ["let", "there", "be",
                                                                      "light"]
    ids = tokenizer.convert_tokens_to_ids
    everything = align_batches(batch, batch, tokenizer_S=tokenizer, tokenizer_T=tokenizer,
                               texts=[text])
    assert everything.ids_S.reshape(-1).tolist() == ids(["there", "be", "light"])
    labels = batch["input_ids"].clone()
    labels[:, :2] = -100  # "let there": the prompt
    completion = align_batches({**batch, "labels": labels}, batch, tokenizer_S=tokenizer,
                               tokenizer_T=tokenizer, texts=[text])
    assert completion.ids_S.reshape(-1).tolist() == ids(["be", "light"])
    assert completion.rows_S.reshape(-1).tolist() == [1, 2]


def characters() -> Any:
    """A character-level fast tokenizer over lower-case letters, space and punctuation."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = ["[UNK]", "[PAD]", *"abcdefghijklmnopqrstuvwxyz .,:"]
    backend = Tokenizer(models.WordLevel({c: i for i, c in enumerate(alphabet)},
                                         unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]",
                                   pad_token="[PAD]")


@pytest.mark.parametrize("loss", ["uld", "gold"])
def test_a_student_learns_from_a_teacher_with_another_tokenizer(loss):
    # student: WordPiece words; teacher: characters, confident of each next character (as a
    # trained model is inside a word), so a word's merged teacher vector keeps most of its mass
    tokenizer_S, tokenizer_T = _tokenizers.wordpiece(), characters()
    collated = CrossTokenizerCollator(tokenizer_S, tokenizer_T)(
        ["in the beginning god created the heaven and the earth.", "let there be light."])
    spans = collated["spans"]
    # "the" is one student token and three teacher tokens: a multi-token span
    assert int(spans.mask_T.sum(1).max()) > 1
    generator = torch.Generator().manual_seed(0)
    ids_T = collated["teacher"]["input_ids"]
    following = torch.cat([ids_T[:, 1:], ids_T[:, :1]], dim=1)
    logits_T = torch.randn(*ids_T.shape, len(tokenizer_T), generator=generator)
    logits_T.scatter_add_(-1, following.unsqueeze(-1), torch.full_like(logits_T[..., :1], 9.0))
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Embedding(len(tokenizer_S), 16),
                                  torch.nn.Linear(16, len(tokenizer_S)))
    optimizer = torch.optim.Adam(student.parameters(), lr=0.05)
    extra = (vocabulary_map(tokenizer_S, tokenizer_T),) if loss == "gold" else ()
    values = []
    for _ in range(40):
        logits_S = student(collated["student"]["input_ids"])
        value = getattr(losses, f"aligned_{loss}")(logits_S, logits_T, spans, *extra)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        values.append(value.item())
    assert values[-1] < 0.5 * values[0], values
