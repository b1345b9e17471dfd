"""The cache stores what the teacher computes, under each sample's id, in every codec; rewriting
it gives the same bytes; the reader yields the agreed ``teacher_cache`` batches whatever the
order of the writer's and the reader's loaders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from purekd.teacher_cache import (
    CachedCollate,
    CachedTeacherDataset,
    TeacherCache,
    bytes_per_token,
    pad_teacher_cache,
)

from ._helpers import VOCAB, Tokens, exact_topk, files, llama, pad, write

K = 8


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    return llama(seed=0)


@pytest.fixture(scope="module")
def data() -> Tokens:
    return Tokens(20)


@pytest.fixture(scope="module")
def exact(teacher, data) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [exact_topk(teacher, item["input_ids"], K) for item in data]


@pytest.fixture(scope="module")
def float32_cache(teacher, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("f32")
    write(teacher, data, out, k=K, values="float32", shuffle=True, shard_samples=6)
    return out


def test_float32_round_trip_is_the_teachers_top_k(float32_cache, data, exact) -> None:
    cache = TeacherCache(float32_cache, vocab_size=VOCAB, k=K)
    assert len(cache) == len(data)
    assert cache.sample_ids.tolist() == list(range(len(data)))
    for sample_id, item in enumerate(data):
        got = cache[sample_id]
        ids, values = exact[sample_id]
        assert cache.length(sample_id) == len(item["input_ids"])
        assert torch.equal(got.tokens, item["input_ids"])
        assert torch.equal(got.topk_ids, ids)
        torch.testing.assert_close(got.topk_logprobs, values, atol=1e-5, rtol=0)
        assert got.topk_ids.dtype == torch.int64 and got.topk_logprobs.dtype == torch.float32


@pytest.mark.parametrize("values", ["float16", "bfloat16", "q8"])
def test_compact_codecs_round_trip(values, teacher, data, exact, float32_cache, tmp_path) -> None:
    write(teacher, data, tmp_path, k=K, values=values, shard_samples=7)
    cache, reference = TeacherCache(tmp_path), TeacherCache(float32_cache)
    for sample_id in range(len(data)):
        got, ref = cache[sample_id], reference[sample_id]
        assert torch.equal(got.topk_ids, ref.topk_ids)
        if values == "float16":  # exactly the float16 rounding of the float32 values
            assert torch.equal(got.topk_logprobs, ref.topk_logprobs.half().float())
        elif values == "bfloat16":
            assert torch.equal(got.topk_logprobs, ref.topk_logprobs.bfloat16().float())
        else:  # half a quantisation step of the row's range, plus the float16 top
            spread = ref.topk_logprobs[:, 0] - ref.topk_logprobs[:, -1]
            bound = spread / 255 * 0.5 * 1.01 + ref.topk_logprobs[:, 0].abs() * 2**-11
            assert ((got.topk_logprobs - ref.topk_logprobs).abs() <= bound[:, None] + 1e-6).all()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    rows = np.load(tmp_path / "rank00000-shard00000.rows.npy", mmap_mode="r")
    assert rows.dtype.itemsize == manifest["record_bytes"] == bytes_per_token(K, VOCAB, values, True)


def test_record_sizes() -> None:
    # ids in the narrowest type: uint8 up to 256 entries, uint16 up to 65,536, then uint32
    assert bytes_per_token(16, 49152, "float16", False) == 16 * 2 + 16 * 2
    assert bytes_per_token(64, 49152, "bfloat16", False) == 64 * 4
    assert bytes_per_token(64, 49152, "q8", False) == 64 * 3 + 4
    assert bytes_per_token(16, 152064, "float16", True) == 16 * 6 + 4
    assert bytes_per_token(16, 256, "float32", True) == 16 * 5 + 1


def test_rewriting_gives_the_same_bytes(teacher, data, tmp_path) -> None:
    write(teacher, data, tmp_path / "a", shard_samples=5, batch_size=3)
    write(teacher, data, tmp_path / "b", shard_samples=5, batch_size=3)
    assert files(tmp_path / "a") == files(tmp_path / "b")
    # a second run over a finished cache runs no forward, stores nothing, leaves the bytes
    calls = []
    handle = teacher.register_forward_hook(lambda *_: calls.append(1))
    try:
        again = write(teacher, data, tmp_path / "a", shard_samples=5, batch_size=3)
    finally:
        handle.remove()
    assert calls == []
    assert again.samples == 0 and again.skipped_samples == len(data) and again.finished
    assert files(tmp_path / "a") == files(tmp_path / "b")


def test_shuffled_reader_yields_each_samples_rows(float32_cache, data, exact) -> None:
    cache = TeacherCache(float32_cache, vocab_size=VOCAB)
    dataset = CachedTeacherDataset(data, cache)
    loader = DataLoader(dataset, batch_size=6, shuffle=True, collate_fn=CachedCollate(pad),
                        generator=torch.Generator().manual_seed(5))
    seen = 0
    for batch in loader:
        assert batch["teacher"] is batch["student"]
        student, cached = batch["student"], batch["teacher_cache"]
        assert set(cached) == {"topk_ids", "topk_logprobs", "topk_mask"}
        rows, length = student["input_ids"].shape
        assert cached["topk_ids"].shape == (rows, length, K)
        assert cached["topk_logprobs"].dtype == torch.float32
        assert torch.equal(cached["topk_mask"], student["attention_mask"])
        for row in range(rows):  # find the sample by its tokens, not by the order
            n = int(student["attention_mask"][row].sum())
            (match,) = [i for i, item in enumerate(data)
                        if torch.equal(item["input_ids"], student["input_ids"][row, :n])]
            ids, values = exact[match]
            assert torch.equal(cached["topk_ids"][row, :n], ids)
            torch.testing.assert_close(cached["topk_logprobs"][row, :n], values, atol=1e-5, rtol=0)
            seen += 1
    assert seen == len(data)


def test_padding_rows_are_masked_and_finite(float32_cache) -> None:
    cache = TeacherCache(float32_cache)
    batch = pad_teacher_cache([cache[0], cache[1]], length=20)
    assert batch["topk_mask"].sum(1).tolist() == [cache.length(0), cache.length(1)]
    padded = batch["topk_mask"] == 0
    assert torch.isfinite(batch["topk_logprobs"]).all()
    assert torch.equal(batch["topk_ids"][padded], torch.arange(K).expand(int(padded.sum()), K))
    total = batch["topk_logprobs"][padded].exp().sum(-1)  # a distribution with mass left over
    assert (total < 1).all() and (total > 0).all()
    with pytest.raises(ValueError, match="batch is 2 long"):
        pad_teacher_cache([cache[0]], length=2)


def test_sample_ids_from_the_data_set(teacher, data, exact, tmp_path) -> None:
    ids = [1000 + 7 * i for i in range(len(data))]
    from purekd.teacher_cache import WithSampleIds, write_teacher_cache

    from ._helpers import live_adaptor, with_ids_collate
    loader = DataLoader(WithSampleIds(data, ids), batch_size=5, collate_fn=with_ids_collate)
    write_teacher_cache(teacher, live_adaptor, loader, tmp_path, k=K, values="float32",
                        progress_bar=False)
    cache = TeacherCache(tmp_path)
    assert cache.sample_ids.tolist() == ids
    assert 1007 in cache and 1001 not in cache
    dataset = CachedTeacherDataset(data, cache, sample_ids=ids)
    item = dataset[3]
    assert torch.equal(item["teacher_cache"].topk_ids, exact[3][0])


def test_separate_jobs_with_rank_and_world_size(teacher, data, exact, tmp_path) -> None:
    """Without a process group, jobs given rank= and world_size= write their own shards; the
    last one to finish merges them into one cache."""
    from torch.utils.data import Subset

    halves = [Subset(data, list(range(0, 20, 2))), Subset(data, list(range(1, 20, 2)))]
    from purekd.teacher_cache import WithSampleIds, write_teacher_cache

    from ._helpers import live_adaptor, with_ids_collate
    summaries = []
    for rank, half in enumerate(halves):
        loader = DataLoader(WithSampleIds(half, half.indices), batch_size=3,
                            collate_fn=with_ids_collate)
        summaries.append(write_teacher_cache(teacher, live_adaptor, loader, tmp_path, k=K,
                                             values="float32", rank=rank, world_size=2,
                                             progress_bar=False))
    assert [s.finished for s in summaries] == [False, True]
    cache = TeacherCache(tmp_path)
    assert cache.sample_ids.tolist() == list(range(20))
    assert {shard["rank"] for shard in cache.manifest["shards"]} == {0, 1}
    for sample_id in range(20):
        assert torch.equal(cache[sample_id].topk_ids, exact[sample_id][0])
    with pytest.raises(ValueError, match=r"rank=2 must be in 0\.\.world_size-1"):
        write_teacher_cache(teacher, live_adaptor, [], tmp_path / "x", k=K, rank=2, world_size=2)
