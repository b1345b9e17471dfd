"""Every way a cache can be wrong for a training run fails when the cache or the data set is
opened — before any weight changes — with a ValueError that names the problem and the fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from purekd.teacher_cache import (
    CachedCollate,
    CachedTeacherDataset,
    CacheError,
    MissingSamplesError,
    TeacherCache,
    default_tokens,
    fingerprint_model,
    fingerprint_tokenizer,
)

from ._helpers import VOCAB, Tokens, llama, pad, write

VOCABULARY = [f"tok{i}" for i in range(VOCAB)]


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    return llama(seed=0)


@pytest.fixture(scope="module")
def written(teacher, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache")
    write(teacher, Tokens(10), out, shard_samples=4, tokenizer=VOCABULARY)
    return out


@pytest.fixture
def cache_copy(written, tmp_path) -> Path:
    return Path(shutil.copytree(written, tmp_path / "copy"))


def test_another_vocabulary_size(written) -> None:
    with pytest.raises(CacheError, match=r"vocab_size=128 .* vocabulary of 96"):
        TeacherCache(written, vocab_size=128)
    with pytest.raises(CacheError, match=r"k=4 but .* top 8"):
        TeacherCache(written, k=4)


def test_tokenizer_and_teacher_fingerprints(written, teacher) -> None:
    TeacherCache(written, tokenizer=VOCABULARY, teacher=teacher)  # the right ones pass
    TeacherCache(written, tokenizer=fingerprint_tokenizer(VOCABULARY),
                 teacher=fingerprint_model(teacher))
    other = list(reversed(VOCABULARY))
    with pytest.raises(CacheError, match="tokenizer fingerprint mismatch"):
        TeacherCache(written, tokenizer=other)
    with pytest.raises(CacheError, match="teacher fingerprint mismatch"):
        TeacherCache(written, teacher=llama(seed=5))


def test_missing_sample_ids(written) -> None:
    cache = TeacherCache(written)
    with pytest.raises(MissingSamplesError, match=r"2 of 12 sample ids are not in the cache .*e\.g\. 10, 11"):
        CachedTeacherDataset(Tokens(12), cache)
    with pytest.raises(MissingSamplesError, match="1 of 1"):
        cache[57]
    assert isinstance(MissingSamplesError("x"), ValueError)


def test_lengths_and_tokens_that_disagree(written) -> None:
    cache = TeacherCache(written)
    shorter = Tokens(10)
    shorter.items[6] = shorter.items[6][:-1]
    with pytest.raises(ValueError, match=r"item 6 \(sample id 6\) has \d+ tokens but the cache holds"):
        CachedTeacherDataset(shorter, cache)
    changed = Tokens(10)
    changed.items[2] = changed.items[2].clone()
    changed.items[2][1] = (changed.items[2][1] + 1) % VOCAB
    with pytest.raises(ValueError, match=r"item 2 \(sample id 2\): token 1 is"):
        CachedTeacherDataset(changed, cache)
    with pytest.raises(ValueError, match=r"item 3 .* has"):  # ids that point at other samples
        CachedTeacherDataset(Tokens(10), cache, sample_ids=[0, 1, 2, 4, 3, 5, 6, 7, 8, 9])


def test_a_shard_failing_its_checksum_is_named(cache_copy) -> None:
    rows = cache_copy / "rank00000-shard00001.rows.npy"
    data = bytearray(rows.read_bytes())
    data[-3] ^= 0xFF
    rows.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="shard rank00000-shard00001 fails its checksum"):
        TeacherCache(cache_copy)
    TeacherCache(cache_copy, verify=False)  # opt-out for trusted, very large caches


def test_rerunning_the_writer_repairs_a_bad_shard(cache_copy, written, teacher) -> None:
    (cache_copy / "rank00000-shard00001.rows.npy").write_bytes(b"garbage")
    again = write(teacher, Tokens(10), cache_copy, shard_samples=4, tokenizer=VOCABULARY)
    assert again.samples == 6  # shards 1 and 2 written again
    from ._helpers import files
    assert files(cache_copy) == files(written)


def test_unfinished_and_foreign_folders(cache_copy, tmp_path) -> None:
    with pytest.raises(CacheError, match="not a finished teacher cache"):
        TeacherCache(tmp_path / "nothing")
    (cache_copy / "manifest.json").unlink()
    with pytest.raises(CacheError, match=r"unfinished cache \(rank00000.progress.json\)"):
        TeacherCache(cache_copy)


def test_resuming_with_other_settings(cache_copy, teacher) -> None:
    with pytest.raises(CacheError, match=r"other settings \(k: 8 there, 16 now\)"):
        write(teacher, Tokens(10), cache_copy, k=16, shard_samples=4, tokenizer=VOCABULARY)
    manifest = json.loads((cache_copy / "manifest.json").read_text())
    assert manifest["k"] == 8  # untouched


def test_writer_input_errors(teacher, tmp_path) -> None:
    from purekd.teacher_cache import write_teacher_cache

    from ._helpers import live_adaptor, pad, writer_loader
    with pytest.raises(ValueError, match="k=0"):
        write(teacher, Tokens(4), tmp_path, k=0)
    with pytest.raises(ValueError, match="k=200 is larger than the vocabulary"):
        write(teacher, Tokens(4), tmp_path, k=200)
    with pytest.raises(ValueError, match="values='int4'"):
        write(teacher, Tokens(4), tmp_path, values="int4")
    with pytest.raises(ValueError, match="vocab_size=50 but the teacher's logits have 96"):
        write(teacher, Tokens(4), tmp_path, vocab_size=50)
    plain = torch.utils.data.DataLoader(Tokens(4), batch_size=2, collate_fn=pad)
    with pytest.raises(ValueError, match="needs each sample's id"):
        write_teacher_cache(teacher, live_adaptor, plain, tmp_path, k=4)

    def left_padded(batch, outputs):
        return {"logits": outputs.logits, "logits_mask": batch["attention_mask"].flip(-1)}
    with pytest.raises(ValueError, match="pad on the right"):
        write_teacher_cache(teacher, left_padded, writer_loader(Tokens(4)), tmp_path / "l", k=4)


def _left_pad(items, mask=True):
    """Left padding (what the cache's right-aligned rows must refuse)."""
    length = max(len(item["input_ids"]) for item in items)
    ids = torch.zeros(len(items), length, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        ids[row, length - n:], attention[row, length - n:] = item["input_ids"], 1
    return {"input_ids": ids, "attention_mask": attention} if mask else {"input_ids": ids}


@pytest.mark.parametrize("with_mask", [True, False])
@pytest.mark.parametrize("with_tokens", [True, False])
def test_a_left_padded_student_batch_is_refused(teacher, tmp_path, with_mask, with_tokens) -> None:
    """The cache's rows are positions 0..n-1 of each sample; a student batch padded on the left
    puts sample b's token t at position t + (L - n) and would be scored against the wrong
    rows. CachedCollate refuses it — by the attention mask, by the cached tokens, or by the
    item's own tokens, whichever the batch and the cache have."""
    write(teacher, Tokens(4), tmp_path, tokens=default_tokens if with_tokens else None)
    dataset = CachedTeacherDataset(Tokens(4), TeacherCache(tmp_path))
    assert TeacherCache(tmp_path).with_tokens is with_tokens
    items = [dataset[0], dataset[2]]  # 13 and 4 tokens
    with pytest.raises(ValueError, match=r"CachedCollate: row 1 of the student's batch .* "
                                         r"padded on the left"):
        CachedCollate(lambda xs: _left_pad(xs, with_mask))(items)
    batch = CachedCollate(pad)(items)  # right padding passes
    assert batch["teacher_cache"]["topk_mask"].sum(1).tolist() == [13, 4]
    same = [dataset[3], dataset[3]]  # equal lengths: left and right padding coincide
    CachedCollate(lambda xs: _left_pad(xs, with_mask))(same)
