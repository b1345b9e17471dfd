r"""On-policy across tokenizers: the student's samples as text, re-tokenised for the teacher.

The student samples token ids with *its* tokenizer (:func:`~purekd.stages.rollout`); the
teacher reads another vocabulary. :func:`retokenise_rollout` turns a :class:`Rollout` into a
cross-tokenizer batch (``{'student': ..., 'teacher': ..., 'spans': AlignedSpans}``, the form
:class:`~purekd.stages.CrossTokenizerCollator` gives for data):

1. each sequence (prompt and completion) is decoded to text with the student's tokenizer
   (``skip_special_tokens=True``: BOS, EOS and chat markers are not text);
2. the **student keeps its own sampled token ids**, and each gets character offsets in that
   text from *per-token decoding* (:func:`decode_with_offsets`);
3. the text is tokenised by the teacher's tokenizer with offsets (as the collator does);
4. :func:`~purekd.stages.align_spans` aligns the two; only spans whose tokens all lie in the
   completion (the student's sampled tokens; the teacher's tokens starting at or after the
   prompt's text) enter the loss.

**Why the student is not re-tokenised.** Decoding and re-encoding is not an identity: a
sampled sequence ``Hel`` ``lo`` comes back as ``Hello``, a byte-level BPE may sample the bytes of
one character as several tokens, WordPiece drops case or spaces. Re-tokenising the student would
score a sequence the student did not sample (its log-probabilities, its positions and its
token count would all be another sequence's): the loss would no longer be on-policy. So the
student's ids stay as sampled, and their offsets come from decoding prefixes: token ``k`` ends
where ``decode(ids[:k+1])`` ends, when that decoded prefix is a prefix of the whole text (and not
shorter than the previous boundary). Where it is not (a token that ends inside a multi-byte
character decodes to ``\ufffd``; a decoder's clean-up that rewrites an earlier character), no
boundary is placed there: the tokens up to the next valid boundary all get that boundary's
offsets, so they overlap and :func:`~purekd.stages.align_spans` keeps them together in one
span — the convention byte-fallback tokenizers already use. A token that decodes to nothing
(a special token) gets zero width and is in no span. Only the teacher's side is re-tokenised,
and that is exact: the teacher's offsets come from its own tokenizer on the decoded text.

With ``seq_kd`` the roles swap (``sampled_by="teacher"``): the teacher's sampled ids are kept
and the student's side is re-tokenised (the student did not sample, so its canonical
tokenisation is the right one); :func:`prompts_for` gives the teacher the prompts in its tokens.

Prompt spans are out: the sampling side's mask is the completion mask, the re-tokenised side's
the tokens that start at or after the prompt's decoded text.

**Stopping.** A stop token that is not text (EOS, ``<|im_end|>``: it decodes to nothing) is in
no aligned span. A sequence whose last completion token is such a stop gets an **end-of-text
span** instead: the sampling side's row that predicts the stop, paired with the other side's
row after its last text token (both conditioned on the whole text), the other side's
end-of-text token (its tokenizer's ``eos_token``, :func:`stop_pairs`) standing as that span's
id — provided both tokenisations cover the text to the same end
(:func:`~purekd.stages.end_of_text`). ULD compares the two rows sorted; GOLD compares the
student's stop with the teacher's end token directly, as :func:`~purekd.stages.vocabulary_map`
matches the two ``eos_token`` s. See docs/cross-tokenizer.md, "Stopping across tokenizers".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from purekd.losses import AlignedSpans

from ._align import EndOfText, align_spans, end_of_text
from ._cross_batches import check_offsets_support
from ._next_token import IGNORE_INDEX
from ._rollout import Rollout


class CrossRollout(NamedTuple):
    """A rollout as a cross-tokenizer batch.

    ``student``: ``{'input_ids', 'attention_mask'[, 'labels']}`` ``(B, L_S)`` — the rollout's own
    sequences; ``teacher``: the same ``(B, L_T)`` from the teacher's tokenizer on the decoded
    texts; ``spans``: their :class:`~purekd.losses.AlignedSpans` (completion only, ``shift=1``);
    ``texts``: the decoded texts; ``prompt_chars``: where each completion's text begins.
    ``labels`` (when asked for): each side's ids with ``-100`` outside the completion."""

    student: dict[str, Tensor]
    teacher: dict[str, Tensor]
    spans: AlignedSpans
    texts: list[str]
    prompt_chars: list[int]


def decode_with_offsets(tokenizer: Any, ids: Sequence[int], *, window: int | None = 8
                        ) -> tuple[str, list[tuple[int, int]]]:
    """``(text, offsets)``: ``ids`` decoded (``skip_special_tokens=True``) and each token's
    character offsets ``(start, end)`` in that text, from decoding prefixes (module docstring):
    the tokens of one multi-byte character share its offsets, a special token has zero width.

    ``window=None`` decodes every prefix ``ids[:k]`` whole (``O(L^2)`` characters). ``window=w``
    (the default, 8) decodes incrementally: token ``k``'s piece is the text that
    ``ids[lo:k]`` adds to ``ids[lo:a]``, where ``a`` is the last token after which a boundary was
    placed and ``lo = a - w`` (a few tokens of context, so leading-space and byte conventions
    decode as they do in the whole sequence); when the piece is not the whole text's next
    characters (a token ending inside a multi-byte character, or a decoder's clean-up joining the
    window's end to the new token), the prefix is decoded whole and checked as with
    ``window=None``. ``O(L w)`` decodes where the pieces agree; the same offsets as
    ``window=None`` on the tokenizers tested (SmolLM2's byte-level BPE, Gemma 3's
    SentencePiece, WordPiece, characters).
    """
    ids = [int(i) for i in ids]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    boundaries: list[tuple[int, int]] = []  # (tokens so far, characters so far)
    last = anchor = 0
    for k in range(1, len(ids)):
        if window is None:
            prefix = tokenizer.decode(ids[:k], skip_special_tokens=True)
            if len(prefix) >= last and text.startswith(prefix):
                boundaries.append((k, len(prefix)))
                last = len(prefix)
            continue
        lo = max(0, anchor - window)
        base = tokenizer.decode(ids[lo:anchor], skip_special_tokens=True) if anchor > lo else ""
        grown = tokenizer.decode(ids[lo:k], skip_special_tokens=True)
        if grown.startswith(base) and text.startswith(grown[len(base):], last):
            last += len(grown) - len(base)
        else:  # e.g. a decoder's clean-up joined the window's end to the new token: decode whole
            prefix = tokenizer.decode(ids[:k], skip_special_tokens=True)
            if len(prefix) < last or not text.startswith(prefix):
                continue
            last = len(prefix)
        boundaries.append((k, last))
        anchor = k
    if ids:
        boundaries.append((len(ids), len(text)))
    offsets: list[tuple[int, int]] = []
    start, done = 0, 0
    for count, end in boundaries:
        offsets.extend([(start, end)] * (count - done))
        start, done = end, count
    return text, offsets


def _check_vocabulary(ids: Tensor, tokenizer: Any, side: str) -> None:
    size = len(tokenizer)
    if ids.numel() and int(ids.max()) >= size:
        raise ValueError(
            f"on-policy across tokenizers: the {side}'s sequences hold token id {int(ids.max())}, "
            f"past its tokenizer's {size} tokens ({type(tokenizer).__name__}): are the "
            f"tokenizers given in the order (tokenizer_T, tokenizer_S)?")


def model_vocabulary(model: Any) -> int | None:
    """A model's vocabulary size (``config.vocab_size``), or ``None`` where it has none."""
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def check_tokenizers_fit(tokenizer_T: Any, tokenizer_S: Any, teacher: Any, student: Any) -> None:
    """Raise when a tokenizer has more tokens than its model's vocabulary (``config.vocab_size``;
    a model may have more rows than its tokenizer, never fewer) — e.g. the two given in the
    wrong order."""
    for side, tokenizer, model in (("teacher", tokenizer_T, teacher),
                                   ("student", tokenizer_S, student)):
        size = model_vocabulary(model)
        if size is not None and len(tokenizer) > size:
            raise ValueError(
                f"on-policy across tokenizers: the {side}'s tokenizer "
                f"({type(tokenizer).__name__}) has {len(tokenizer)} tokens but the {side} model's "
                f"vocabulary only {size}: give the tokenizers in the order (tokenizer_T, "
                f"tokenizer_S), each its own model's")


def stop_pairs(stop_ids: Sequence[int], tokenizer_A: Any, tokenizer_B: Any
               ) -> tuple[dict[int, int], list[int]]:
    """``(pairs, unpaired)``: the sampling side's stop ids that are not text (they decode to
    nothing with ``tokenizer_A``), each paired with the other side's end-of-text token,
    ``tokenizer_B.eos_token_id`` (module docstring, "Stopping"); ``unpaired``: those stop ids
    when ``tokenizer_B`` has no ``eos_token`` (the stop cannot be taught)."""
    silent = [int(i) for i in dict.fromkeys(stop_ids)
              if 0 <= int(i) < len(tokenizer_A)
              and tokenizer_A.decode([int(i)], skip_special_tokens=True) == ""]
    end = getattr(tokenizer_B, "eos_token_id", None)
    if end is None:
        return {}, silent
    return dict.fromkeys(silent, int(end)), []


def retokenise_rollout(rollout: Rollout, tokenizer_S: Any, tokenizer_T: Any, *,
                       labels: bool = False, context_T: int | None = None,
                       sampled_by: str = "student", context_S: int | None = None,
                       end_tokens: dict[int, int] | None = None) -> CrossRollout:
    """The rollout (the sampling side's token ids) as a cross-tokenizer batch (module docstring).

    ``sampled_by``: ``"student"`` (the rollout holds the student's ids; the teacher's side is
    re-tokenised) or ``"teacher"`` (``seq_kd``: the teacher's ids are kept and the student's side
    is re-tokenised). Both tokenizers must be fast (offsets). ``labels``: add each side's
    ``labels`` (``-100`` outside the completion and on padding). ``context_T`` /
    ``context_S``: the re-tokenised side's context; a sequence longer than it raises, naming
    the sequence. ``end_tokens``: ``{stop id of the sampling side: end-of-text id of the
    other}`` (:func:`stop_pairs`); a sequence whose last completion token is one of these stop
    ids, and is not text, gets an end-of-text span (module docstring, "Stopping").
    """
    if sampled_by not in ("student", "teacher"):
        raise ValueError(f"retokenise_rollout(sampled_by={sampled_by!r}): 'student' or "
                         "'teacher'")
    check_offsets_support(tokenizer_S, "student")
    check_offsets_support(tokenizer_T, "teacher")
    by_student = sampled_by == "student"
    tokenizer_A, tokenizer_B = (tokenizer_S, tokenizer_T) if by_student else (tokenizer_T,
                                                                               tokenizer_S)
    side_B = "teacher" if by_student else "student"
    context = context_T if by_student else context_S
    ids_A, attended_A = rollout.input_ids, rollout.attention_mask
    _check_vocabulary(ids_A, tokenizer_A, sampled_by)
    length_A = ids_A.size(1)
    texts: list[str] = []
    offsets_A: list[list[tuple[int, int]]] = []
    prompt_chars: list[int] = []
    for b in range(ids_A.size(0)):
        real = int(attended_A[b].sum())
        prompt = int(rollout.prompt_lengths[b])
        text, offsets = decode_with_offsets(tokenizer_A, ids_A[b, :real].tolist())
        texts.append(text)
        # the completion's text begins where the last prompt token ends (or at the first
        # completion token's start, when a character straddles the two)
        ends = [end for _, end in offsets[:prompt]]
        starts = [start for start, _ in offsets[prompt:]]
        prompt_chars.append(min([max(ends, default=0), *starts[:1]]))
        offsets_A.append(offsets + [(len(text), len(text))] * (length_A - real))
    encoded = tokenizer_B(texts, return_offsets_mapping=True, padding=True, padding_side="right",
                          return_tensors="pt")
    device = ids_A.device
    ids_B = encoded["input_ids"].to(device)
    attended_B = encoded["attention_mask"].to(device)
    offsets_B = encoded["offset_mapping"]
    if context is not None and ids_B.size(1) > context:
        lengths = attended_B.sum(-1)
        index = int(lengths.argmax())
        raise ValueError(
            f"on-policy across tokenizers: sequence {index} re-tokenised for the {side_B} is "
            f"{int(lengths[index])} tokens, past the {side_B}'s context of {context}: shorten "
            f"the prompts or lower max_new_tokens")
    text_ends: list[EndOfText | None] = []
    for b in range(ids_A.size(0)):
        text_ends.append(_end(b, rollout, offsets_A[b], offsets_B[b], attended_B[b], texts[b],
                              end_tokens or {}, by_student))
    starts_B = offsets_B[..., 0].to(device)
    chars = torch.tensor(prompt_chars, device=device).unsqueeze(1)
    completion_B = ((starts_B >= chars) & (attended_B != 0)).to(torch.int64)
    completion_A = rollout.completion_mask
    kept = {"input_ids": ids_A, "attention_mask": attended_A}
    retokenised = {"input_ids": ids_B, "attention_mask": attended_B}
    if labels:
        kept["labels"] = torch.where(completion_A != 0, ids_A, IGNORE_INDEX)
        retokenised["labels"] = torch.where(completion_B != 0, ids_B, IGNORE_INDEX)
    if by_student:
        spans = align_spans(ids_A, offsets_A, ids_B, offsets_B, mask_S=completion_A,
                            mask_T=completion_B, attended_S=attended_A, attended_T=attended_B,
                            texts=texts, shift=1, device=device, ends=text_ends)
        return CrossRollout(kept, retokenised, spans, texts, prompt_chars)
    spans = align_spans(ids_B, offsets_B, ids_A, offsets_A, mask_S=completion_B,
                        mask_T=completion_A, attended_S=attended_B, attended_T=attended_A,
                        texts=texts, shift=1, device=device, ends=text_ends)
    return CrossRollout(retokenised, kept, spans, texts, prompt_chars)


def _end(b: int, rollout: Rollout, offsets_A: list[tuple[int, int]], offsets_B: Tensor,
         attended_B: Tensor, text: str, end_tokens: dict[int, int], by_student: bool
         ) -> EndOfText | None:
    """Sequence ``b``'s end-of-text pair (``S`` / ``T`` order), or ``None``: its last
    completion token must be a stop id of ``end_tokens`` that is not text (zero width), and
    both tokenisations must cover the text to the same end (:func:`end_of_text`)."""
    completion = int(rollout.completion_lengths[b])
    if completion < 1 or not end_tokens:
        return None
    last = int(rollout.prompt_lengths[b]) + completion - 1
    stop = int(rollout.input_ids[b, last])
    start, end = offsets_A[last]
    if stop not in end_tokens or end > start:
        return None
    real_B = int(attended_B.sum())
    found = end_of_text(offsets_A[:last], offsets_B[:real_B].tolist(), text)
    if found is None:
        return None
    # the sampling side's row predicting its stop, the other side's row after its last text
    # token: both see the whole text (row = position - 1)
    position_A, position_B = last, found[1] + 1
    if by_student:
        return EndOfText(position_A, stop, position_B, end_tokens[stop])
    return EndOfText(position_B, end_tokens[stop], position_A, stop)


def prompts_for(prompt_ids: Tensor, prompt_mask: Tensor, tokenizer_S: Any, tokenizer_T: Any
                ) -> tuple[Tensor, Tensor]:
    """The student's left-padded prompts ``(B, P)`` decoded and tokenised by the teacher's
    tokenizer (with its special tokens, e.g. its BOS), left-padded: the prompts the teacher
    samples from with ``seq_kd``."""
    texts = [tokenizer_S.decode(ids[mask != 0].tolist(), skip_special_tokens=True)
             for ids, mask in zip(prompt_ids, prompt_mask, strict=True)]
    encoded = tokenizer_T(texts, padding=True, padding_side="left", return_tensors="pt")
    device = prompt_ids.device
    return encoded["input_ids"].to(device), encoded["attention_mask"].to(device)


__all__ = ["CrossRollout", "check_tokenizers_fit", "decode_with_offsets", "model_vocabulary",
           "prompts_for", "retokenise_rollout", "stop_pairs"]
