r"""``align_spans``: where two tokenisations of the same text agree, and which rows each covers.

Two tokenizers cut a text into tokens at different places. Each token carries its character
offsets ``(start, end)`` in the text (``return_offsets_mapping=True`` of a fast tokenizer). A
*cut* of one side is a place between two consecutive tokens:

- the characters between the end of one token and the start of the next, ``[end_k, start_{k+1}]``
  (an interval, because some tokenizers leave characters uncovered — WordPiece skips spaces);
  with the text given, the interval also extends over whitespace on either side, so the
  leading-space conventions (``Ġworld``, ``▁world``: the space belongs to the next token) and a
  trailing-space one (``hello_``: to the previous) cut at the same place;
- before the first token and after the last one (exact positions, also extended over
  whitespace);
- no cut between two tokens that overlap: byte-level and byte-fallback tokenizers split a
  multi-byte character into several tokens that all carry that character's offsets
  (``<0xE2><0x82><0xAC>`` for ``€``), and those must stay together.

Zero-width tokens (``start == end``: BOS, EOS, padding, chat markers) are not text and take part
in no cut. Two cuts *agree* when their intervals intersect; walking both sides' cuts in order
pairs each agreeing cut once. A **span** is the text between two consecutive agreeing cuts: one
or more tokens on each side, whose boundaries agree at both ends. Text before the first
agreeing cut or after the last (e.g. where one side was truncated) is in no span.

A span's tokens are scored by the rows that predict them: ``position - shift`` (``shift=1`` for a
causal LM's unshifted logits, where row ``t`` predicts token ``t + 1``; ``shift=0`` when row
``t`` predicts token ``t``). How several tokens of a span become one distribution (the first
token's distribution times the probabilities of the actual later tokens, and why) is in
:mod:`purekd.losses._spans`.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from purekd.losses import AlignedSpans

Offsets = Sequence[Sequence[int]]
SpanPair = tuple[range, range]


def _tolist(value: Any) -> Any:
    return value.tolist() if isinstance(value, Tensor) else value


def _cuts(offsets: Offsets, text: str | None) -> tuple[list[int], list[tuple[int, int, int]]]:
    """The positions of the text tokens, and the cuts ``(lo, hi, k)``: ``k`` text tokens lie
    before the cut."""
    positions = [p for p, (start, end) in enumerate(offsets) if end > start]
    bounds: list[tuple[int, int, int]] = []
    if not positions:
        return positions, bounds

    def widened(lo: int, hi: int) -> tuple[int, int]:
        if text is not None:
            while lo > 0 and text[lo - 1].isspace():
                lo -= 1
            while hi < len(text) and text[hi].isspace():
                hi += 1
        return lo, hi

    first = offsets[positions[0]][0]
    bounds.append((*widened(first, first), 0))
    for k in range(1, len(positions)):
        end, start = offsets[positions[k - 1]][1], offsets[positions[k]][0]
        if end <= start:
            bounds.append((*widened(end, start), k))
    last = offsets[positions[-1]][1]
    bounds.append((*widened(last, last), len(positions)))
    return positions, bounds


def token_spans(offsets_S: Offsets, offsets_T: Offsets, text: str | None = None
                ) -> list[SpanPair]:
    """The aligned spans of one sequence: ``[(student positions, teacher positions), ...]``.

    ``offsets_S`` ``(L_S, 2)`` and ``offsets_T`` ``(L_T, 2)``: each token's character offsets
    ``(start, end)`` in the same text (lists or tensors); ``text``: that text, to let cuts
    extend over whitespace (module docstring). Each span is a pair of ``range`` s of token
    positions (contiguous, non-empty, in order; zero-width tokens inside a span are part of
    it).

    >>> token_spans([(0, 5), (5, 11)], [(0, 2), (2, 5), (5, 11)])   # "Hello world"
    [(range(0, 1), range(0, 2)), (range(1, 2), range(2, 3))]
    """
    offsets_S, offsets_T = _tolist(offsets_S), _tolist(offsets_T)
    positions_S, cuts_S = _cuts(offsets_S, text)
    positions_T, cuts_T = _cuts(offsets_T, text)
    agreed: list[tuple[int, int]] = []
    i = j = 0
    while i < len(cuts_S) and j < len(cuts_T):
        lo_S, hi_S, k_S = cuts_S[i]
        lo_T, hi_T, k_T = cuts_T[j]
        if lo_S <= hi_T and lo_T <= hi_S:
            agreed.append((k_S, k_T))
            i, j = i + 1, j + 1
        elif hi_S < lo_T:
            i += 1
        else:
            j += 1
    spans = []
    for (a_S, a_T), (b_S, b_T) in itertools.pairwise(agreed):
        spans.append((range(positions_S[a_S], positions_S[b_S - 1] + 1),
                      range(positions_T[a_T], positions_T[b_T - 1] + 1)))
    return spans


def _as_rows(value: Any, name: str) -> list[list[Any]]:
    rows = _tolist(value)
    if not isinstance(rows, list) or (rows and not isinstance(rows[0], list)):
        raise ValueError(f"align_spans: {name} must be (batch, length[, 2]), got "
                         f"{type(value).__name__}")
    return rows


def align_spans(ids_S: Any, offsets_S: Any, ids_T: Any, offsets_T: Any, *,
                mask_S: Any = None, mask_T: Any = None, attended_S: Any = None,
                attended_T: Any = None, texts: Sequence[str] | None = None,
                shift: int = 1, device: torch.device | str | None = None,
                ends: Sequence[EndOfText | None] | None = None) -> AlignedSpans:
    """The aligned spans of a batch, as padded index tensors (:class:`~purekd.losses.AlignedSpans`).

    ``ids_S`` ``(B, L_S)`` and ``offsets_S`` ``(B, L_S, 2)``: the student's token ids and their
    character offsets in each text; ``ids_T``, ``offsets_T`` the teacher's, of the same ``B``
    texts (tensors or nested lists). ``mask_S`` / ``mask_T`` ``(B, L)`` 0/1 (default all 1):
    the tokens that may take part (e.g. the attention mask, or ``labels != -100`` for the
    completion only); a span with any token outside its side's mask is dropped, and so is a
    span whose first token has no predicting row (``position < shift``). ``attended_S`` /
    ``attended_T`` ``(B, L)`` 0/1 (default all 1): the positions the model attends (the
    attention mask); a span whose first token's predicting row is not attended (left padding)
    is dropped. ``texts``: the ``B``
    texts (whitespace-tolerant cuts). ``shift``: row = position - shift (1 for a causal LM's
    unshifted logits ``(B, L, V)``).

    ``ends``: per sequence, ``None`` or an :class:`EndOfText` — a stop token that is not text
    (it decodes to nothing, so no cut can hold it) paired with the other side's: one more span,
    after the sequence's aligned ones, of the two rows that predict them (``position - shift``
    each; dropped when either row is not attended). See :func:`end_of_text`.

    Rows index each side's logits flattened to ``(B * L, V)``. No span in the whole batch → one
    padding span of weight 0 (the losses then give 0 with zero gradients).
    """
    rows_ids_S, rows_ids_T = _as_rows(ids_S, "ids_S"), _as_rows(ids_T, "ids_T")
    all_offsets_S, all_offsets_T = _as_rows(offsets_S, "offsets_S"), _as_rows(offsets_T,
                                                                               "offsets_T")
    batch = len(rows_ids_S)
    for name, value in (("ids_T", rows_ids_T), ("offsets_S", all_offsets_S),
                        ("offsets_T", all_offsets_T)):
        if len(value) != batch:
            raise ValueError(f"align_spans: ids_S has {batch} sequences, {name} {len(value)}: "
                             f"both sides must tokenise the same texts")
    if texts is not None and len(texts) != batch:
        raise ValueError(f"align_spans: {len(texts)} texts for {batch} sequences")
    if ends is not None and len(ends) != batch:
        raise ValueError(f"align_spans: {len(ends)} ends for {batch} sequences")
    if isinstance(shift, bool) or not isinstance(shift, int) or shift < 0:
        raise ValueError(f"align_spans: shift={shift!r} must be an int >= 0 (1 for a causal "
                         f"LM's unshifted logits)")
    length_S = len(rows_ids_S[0]) if batch else 0
    length_T = len(rows_ids_T[0]) if batch else 0
    masks = []
    for name, mask, ids in (("mask_S", mask_S, rows_ids_S), ("mask_T", mask_T, rows_ids_T),
                            ("attended_S", attended_S, rows_ids_S),
                            ("attended_T", attended_T, rows_ids_T)):
        rows = ([[1] * len(r) for r in ids] if mask is None else _as_rows(mask, name))
        if [len(r) for r in rows] != [len(r) for r in ids]:
            raise ValueError(f"align_spans: {name} must have the shape of its side's ids")
        masks.append(rows)
    for b in range(batch):
        for side, ids, offsets in (("S", rows_ids_S, all_offsets_S),
                                   ("T", rows_ids_T, all_offsets_T)):
            if len(offsets[b]) != len(ids[b]):
                raise ValueError(f"align_spans: sequence {b}: {len(ids[b])} ids_{side} but "
                                 f"{len(offsets[b])} offsets_{side}; one (start, end) per token")
    found: list[tuple[list[int], list[int], list[int], list[int]]] = []
    for b in range(batch):
        text = texts[b] if texts is not None else None
        for span_S, span_T in token_spans(all_offsets_S[b], all_offsets_T[b], text):
            if span_S[0] < shift or span_T[0] < shift:
                continue
            if not (masks[2][b][span_S[0] - shift] and masks[3][b][span_T[0] - shift]):
                continue
            if not (all(masks[0][b][p] for p in span_S) and all(masks[1][b][p] for p in span_T)):
                continue
            found.append(([b * length_S + p - shift for p in span_S],
                          [rows_ids_S[b][p] for p in span_S],
                          [b * length_T + p - shift for p in span_T],
                          [rows_ids_T[b][p] for p in span_T]))
        end = ends[b] if ends is not None else None
        if end is not None:
            row_S, row_T = end.position_S - shift, end.position_T - shift
            if (0 <= row_S < length_S and 0 <= row_T < length_T and masks[2][b][row_S]
                    and masks[3][b][row_T]):
                found.append(([b * length_S + row_S], [end.id_S], [b * length_T + row_T],
                              [end.id_T]))
    if not found:
        _NO_SPAN[0] += 1
        warnings.warn(
            f"align_spans: no aligned span in this batch of {batch} sequence(s) "
            f"({_NO_SPAN[0]} such batch(es) so far): the cross-tokenizer loss is 0 for it. Check "
            f"that both sides tokenised the same texts, that the masks keep some tokens, and "
            f"that sequences are longer than shift={shift}", RuntimeWarning, stacklevel=2)
    return _padded(found, device)


_NO_SPAN = [0]


class EndOfText(NamedTuple):
    """The end of one sequence's text on both sides: the student's stop token ``id_S`` at
    ``position_S`` and the teacher's ``id_T`` at ``position_T`` (a position may be one past the
    sequence: only the row predicting it, ``position - shift``, must exist)."""

    position_S: int
    id_S: int
    position_T: int
    id_T: int


def end_of_text(offsets_S: Offsets, offsets_T: Offsets, text: str | None = None
                ) -> tuple[int, int] | None:
    """``(p_S, p_T)``: the positions of each side's last text token when both tokenisations
    cover the text to the same end (their final cuts agree, whitespace-tolerant as every cut;
    module docstring), else ``None`` (e.g. one side truncated, or no text token). The row of
    ``p`` (shift 1) is then each side's prediction of what follows the whole text, conditioned
    on the same text."""
    offsets_S, offsets_T = _tolist(offsets_S), _tolist(offsets_T)
    positions_S, cuts_S = _cuts(offsets_S, text)
    positions_T, cuts_T = _cuts(offsets_T, text)
    if not positions_S or not positions_T:
        return None
    lo_S, hi_S, _ = cuts_S[-1]
    lo_T, hi_T, _ = cuts_T[-1]
    if lo_S <= hi_T and lo_T <= hi_S:
        return positions_S[-1], positions_T[-1]
    return None


def batches_without_spans() -> int:
    """How many batches :func:`align_spans` found no aligned span in (this process)."""
    return _NO_SPAN[0]


def _padded(found: list[tuple[list[int], list[int], list[int], list[int]]],
            device: torch.device | str | None) -> AlignedSpans:
    count = max(len(found), 1)
    width_S = max((len(f[0]) for f in found), default=1)
    width_T = max((len(f[2]) for f in found), default=1)
    rows_S = torch.zeros(count, width_S, dtype=torch.int64)
    ids_S = torch.zeros(count, width_S, dtype=torch.int64)
    mask_S = torch.zeros(count, width_S, dtype=torch.bool)
    rows_T = torch.zeros(count, width_T, dtype=torch.int64)
    ids_T = torch.zeros(count, width_T, dtype=torch.int64)
    mask_T = torch.zeros(count, width_T, dtype=torch.bool)
    weight = torch.zeros(count, dtype=torch.float32)
    for s, (r_S, i_S, r_T, i_T) in enumerate(found):
        rows_S[s, :len(r_S)] = torch.tensor(r_S)
        ids_S[s, :len(i_S)] = torch.tensor(i_S)
        mask_S[s, :len(r_S)] = True
        rows_T[s, :len(r_T)] = torch.tensor(r_T)
        ids_T[s, :len(i_T)] = torch.tensor(i_T)
        mask_T[s, :len(r_T)] = True
        weight[s] = 1.0
    spans = AlignedSpans(rows_S, ids_S, mask_S, rows_T, ids_T, mask_T, weight)
    return AlignedSpans(*(t.to(device) for t in spans)) if device is not None else spans


__all__ = ["EndOfText", "align_spans", "batches_without_spans", "end_of_text", "token_spans"]
