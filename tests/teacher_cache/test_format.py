"""The value codecs, property-tested: float16 / bfloat16 are exactly the casts, q8 is within half
a step of the row's range (rows spanning more than 30 nats: exact down to 30 nats below the top),
ids survive in the narrowest type, fingerprints tell vocabularies apart."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from purekd.teacher_cache import fingerprint_tokenizer, id_dtype
from purekd.teacher_cache._format import Q8_RANGE, decode_ids, decode_logprobs, encode, record_dtype


@st.composite
def rows(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, int]:
    k = draw(st.integers(1, 12))
    n = draw(st.integers(1, 6))
    vocab = draw(st.sampled_from([k, 200, 256, 257, 65536, 65537, 200_000]))
    vocab = max(vocab, k)
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from([0.1, 3.0, 40.0]))
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab if vocab <= 4096 else 4096, generator=gen) * scale
    values, ids = torch.log_softmax(logits, -1).topk(k, -1)
    if vocab > 4096:  # ids anywhere in a large vocabulary
        ids = ids * (vocab // 4096)
    return ids, values, vocab


@settings(max_examples=60, deadline=None)
@given(rows(), st.sampled_from(["float32", "float16", "bfloat16", "q8"]))
def test_codecs_round_trip_within_their_precision(case, codec) -> None:
    ids, values, vocab = case
    k = ids.shape[-1]
    tokens = ids[:, 0].clone()
    dtype = record_dtype(k, vocab, codec, True)
    records = encode(ids, values, tokens, dtype, codec)
    assert torch.equal(decode_ids(records), ids)
    assert np.array_equal(records["token"].astype(np.int64), tokens.numpy())
    got = decode_logprobs(records, codec)
    if codec == "float32":
        assert torch.equal(got, values)
    elif codec == "float16":
        assert torch.equal(got, values.half().float())
    elif codec == "bfloat16":
        assert torch.equal(got, values.bfloat16().float())
    else:
        top = values[:, :1]
        bottom = torch.maximum(values[:, -1:], top - Q8_RANGE)
        step = (top - bottom) / 255
        inside = values >= bottom
        error = (got - values).abs()
        bound = step * 0.5 * (1 + 2**-9) + top.abs() * 2**-11 + 1e-6
        assert (error[inside.expand_as(error)] <= bound.expand_as(error)[inside.expand_as(error)]).all()
        assert (got <= top.half().float() + 1e-6).all()


def test_id_types_are_the_narrowest() -> None:
    assert [id_dtype(v).str for v in (2, 256, 257, 65536, 65537, 2**32, 2**32 + 1)] == [
        "|u1", "|u1", "<u2", "<u2", "<u4", "<u4", "<i8"]


def test_tokenizer_fingerprints() -> None:
    vocab = {"a": 0, "b": 1}
    assert fingerprint_tokenizer(vocab) == fingerprint_tokenizer({"b": 1, "a": 0})
    assert fingerprint_tokenizer(vocab) != fingerprint_tokenizer({"a": 1, "b": 0})
    assert fingerprint_tokenizer(["a", "b"]) != fingerprint_tokenizer(["b", "a"])
    assert fingerprint_tokenizer("abc123") == "abc123"  # a fingerprint passes through
    with pytest.raises(TypeError, match="tokenizer: expected a Hugging Face tokenizer"):
        fingerprint_tokenizer(3.5)
