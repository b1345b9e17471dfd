"""What the writer refuses instead of storing something wrong: a sample id that repeats (within a
rank's loader, or across ranks with other tokens), non-finite or positive teacher
log-probabilities, and a second writer on the same rank's files."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from purekd.teacher_cache import CacheError, TeacherCache, write_teacher_cache

from ._helpers import TinyLM, Tokens, live_adaptor, pad


def batches(data: Tokens, ids: list[list[int]], items: list[list[int]] | None = None) -> list[Any]:
    """Writer batches: batch ``b`` holds items ``items[b]`` under sample ids ``ids[b]``."""
    items = ids if items is None else items
    return [{"sample_id": torch.tensor(b), "teacher": pad([data[i] for i in rows])}
            for b, rows in zip(ids, items, strict=True)]


def run(loader: Any, out: Path, adaptor: Any = live_adaptor, **options: Any) -> Any:
    options.setdefault("k", 4)
    return write_teacher_cache(TinyLM(seed=0), adaptor, loader, out, progress_bar=False,
                               **options)


# -- item 5: repeated sample ids -------------------------------------------------------------

def test_a_repeated_sample_id_names_both_positions(tmp_path) -> None:
    data = Tokens(6)
    # sample id 1 names item 1 in batch 0 and item 4 (other tokens) in batch 2
    loader = batches(data, [[0, 1], [2, 3], [1, 5]], [[0, 1], [2, 3], [4, 5]])
    with pytest.raises(CacheError, match=r"sample id 1 appears twice in rank 0's loader: at "
                                         r"batch 0, row 1 and at batch 2, row 0"):
        run(loader, tmp_path / "a", shard_samples=2)
    # the same sample twice is refused too (each sample is cached once per rank)
    with pytest.raises(CacheError, match=r"sample id 3 appears twice .* batch 1, row 1 and at "
                                         r"batch 1, row 2"):
        run(batches(data, [[0, 1], [2, 3, 3]]), tmp_path / "b")


def test_a_resumed_run_still_refuses_a_repeat(tmp_path) -> None:
    """Ids a previous run stored are skipped once (the replay of a resume); a second
    occurrence in the same loader is the same error an uninterrupted run gives."""
    data = Tokens(6)
    out = tmp_path / "cache"
    first = run(batches(data, [[0, 1], [2, 3]]), out, shard_samples=2)
    assert first.finished and first.samples == 4
    again = run(batches(data, [[0, 1], [2, 3]]), out, shard_samples=2)  # a plain replay
    assert again.samples == 0 and again.skipped_samples == 4
    with pytest.raises(CacheError, match=r"sample id 0 appears twice in rank 0's loader: at "
                                         r"batch 0, row 0 and at batch 2, row 0"):
        run(batches(data, [[0, 1], [2, 3], [0, 4]]), out, shard_samples=2)


def _two_jobs(out: Path, second_items: list[int]) -> Path:
    data = Tokens(6)
    data.items[5] = data.items[2].flip(0)  # the same length as item 2, other tokens
    run(batches(data, [[0, 1, 2]]), out, rank=0, world_size=2)
    run(batches(data, [[2, 3]], [second_items]), out, rank=1, world_size=2)
    return out


def test_a_sample_id_stored_by_two_ranks_must_be_the_same_sample(tmp_path) -> None:
    out = _two_jobs(tmp_path / "same", [2, 3])  # DistributedSampler's padding repeat: fine
    assert TeacherCache(out).sample_ids.tolist() == [0, 1, 2, 3]
    with pytest.raises(CacheError, match=r"sample id 2 is stored by rank00000-shard00000 "
                                         r"\(row 2\) and by rank00001-shard00000 \(row 0\) with "
                                         r"other input tokens"):
        _two_jobs(tmp_path / "tokens", [5, 3])
    with pytest.raises(CacheError, match=r"sample id 2 .* with other lengths \(4 and 11 rows\)"):
        _two_jobs(tmp_path / "lengths", [4, 3])


# -- item 7: non-finite log-probabilities --------------------------------------------------------

@pytest.mark.parametrize("bad", ["nan", "inf", "all -inf"])
def test_non_finite_teacher_logits_are_refused_before_writing(tmp_path, bad) -> None:
    def poisoned(batch: Any, outputs: Any) -> dict[str, Any]:
        logits = outputs.logits.clone()
        if batch["input_ids"].shape[0] == 3:  # the second batch: sample id 4, position 2
            if bad == "all -inf":
                logits[1, 2] = -float("inf")
            else:
                logits[1, 2, 7] = float(bad)
        return {"logits": logits, "logits_mask": batch["attention_mask"]}
    out = tmp_path / "cache"
    with pytest.raises(CacheError, match=r"sample id 4, position 2: the teacher's top-k "
                                         r"log-probabilities are \[nan, .*\] \(NaN, \+inf or "
                                         r"positive\)"):
        run(batches(Tokens(6), [[0, 1], [3, 4, 5]]), out, poisoned, shard_samples=2)
    names = sorted(p.name for p in out.iterdir())
    assert "manifest.json" not in names
    progress = json.loads((out / "rank00000.progress.json").read_text())
    assert [s["name"] for s in progress["shards"]] == ["rank00000-shard00000"]


def test_minus_infinity_in_part_of_the_vocabulary_is_kept_as_the_floor(tmp_path) -> None:
    def masked_vocab(batch: Any, outputs: Any) -> dict[str, Any]:
        logits = outputs.logits.clone()
        logits[..., 3:] = -float("inf")  # 3 finite classes, k = 4
        return {"logits": logits, "logits_mask": batch["attention_mask"]}
    run(batches(Tokens(4), [[0, 1]]), tmp_path, masked_vocab, values="float32")
    lp = TeacherCache(tmp_path)[0].topk_logprobs
    assert (lp[:, 3] == -1.0e4).all() and torch.isfinite(lp).all()


# -- concurrent writers --------------------------------------------------------------------------

def test_a_second_writer_on_the_same_rank_is_refused(tmp_path) -> None:
    data = Tokens(6)
    started, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def slow_loader() -> Any:
        started.set()
        release.wait(30)
        yield from batches(data, [[0, 1], [2, 3]])

    def first() -> None:
        try:
            run(slow_loader(), tmp_path, shard_samples=1)
        except BaseException as error:  # pragma: no cover - shown by the assert below
            errors.append(error)
    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert started.wait(30)
        with pytest.raises(CacheError, match=r"another writer is writing rank 0 of .* "
                                             r"\(rank00000\.lock is held\)"):
            run(batches(data, [[0, 1]]), tmp_path)
        assert list(tmp_path.glob("*.npy")) == []  # the refused writer removed nothing either
    finally:
        release.set()
        thread.join(60)
    assert not errors, errors
    assert TeacherCache(tmp_path).sample_ids.tolist() == [0, 1, 2, 3]
    run(batches(data, [[0, 1], [2, 3]]), tmp_path, shard_samples=1)  # the lock was released


def test_sample_ids_and_k_the_format_cannot_hold(tmp_path) -> None:
    data = Tokens(2)
    loader = [{"sample_id": [2**63, 1], "teacher": pad([data[0], data[1]])}]
    with pytest.raises(ValueError, match=r"sample id 9223372036854775808 does not fit in 64 bits"):
        run(loader, tmp_path)
    with pytest.raises(ValueError, match=r"k=1048577: at most 1048576"):
        run(batches(data, [[0, 1]]), tmp_path, k=2**20 + 1)
    assert list(tmp_path.glob("*.npy")) == []
