"""A recipe's data: formats, the completion-only mask against a hand-built one, packing and
padding, and the batch order on one process and across ranks."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader

from purekd.recipes import Data
from purekd.recipes._data import (
    IGNORE,
    PadCollate,
    RankBatches,
    RowDataset,
    build,
    encode,
    read_records,
)

from . import _tiny


@pytest.fixture(scope="module")
def tok():
    return _tiny.tokenizer()


def test_the_chat_formats_completion_only_mask_equals_a_hand_built_one(tok):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Say the first verse."},
                {"role": "assistant", "content": "In the beginning God created the heaven."}]
    ids, labels = encode({"messages": messages}, 0, "messages", Data(path="x"), tok)
    # by hand: the template's text, the prompt ending with the assistant's tag
    prompt = "<|system|>Be brief.<|end|><|user|>Say the first verse.<|end|><|assistant|>"
    reply = "In the beginning God created the heaven.<|end|>"
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    reply_ids = tok(reply, add_special_tokens=False)["input_ids"]
    assert ids == prompt_ids + reply_ids
    assert labels == [IGNORE] * len(prompt_ids) + reply_ids
    assert tok.decode([t for t, m in zip(ids, labels, strict=True) if m != IGNORE]) == reply
    assert ids[len(prompt_ids) - 1] == tok.convert_tokens_to_ids("<|assistant|>")
    # without completion_only every token is a label
    _, every = encode({"messages": messages}, 0, "messages", Data(path="x",
                                                                   completion_only=False), tok)
    assert every == ids


def test_prompt_completion_masks_the_prompt_and_ends_with_eos(tok):
    ids, labels = encode({"prompt": "Verse 1:", "completion": " And God said"}, 0,
                         "prompt_completion", Data(path="x"), tok)
    prompt = tok("Verse 1:")["input_ids"]
    completion = tok(" And God said", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ids == prompt + completion
    assert labels == [IGNORE] * len(prompt) + completion


def test_a_chat_whose_last_message_is_not_the_assistants_is_refused(tok):
    with pytest.raises(ValueError, match="record 3: the last of its 'messages' must be the "
                                         "assistant's"):
        encode({"messages": [{"role": "user", "content": "hi"}]}, 3, "messages",
               Data(path="x"), tok)


def test_packed_text_is_the_separator_joined_text_cut_into_rows(tok, data_files):
    data = Data(path=str(data_files["text"]), format="text", separator="\n", seq_len=8,
                limit=10, eval_rows=2)
    split = build(data, tok)
    texts = [json.loads(line)["text"] for line in data_files["text"].read_text().splitlines()][:10]
    ids = tok("\n".join(texts), add_special_tokens=False)["input_ids"]
    rows = len(ids) // 8
    table = torch.tensor(ids[:rows * 8]).view(rows, 8)
    assert len(split.train) == rows - 2 and len(split.held_out) == 2
    assert torch.equal(torch.stack(split.train.ids), table[:rows - 2])
    assert torch.equal(torch.stack(split.held_out.ids), table[rows - 2:])
    assert all(torch.equal(a, b) for a, b in zip(split.train.ids, split.train.labels, strict=True))
    assert split.tokens == len(ids)


def test_unpacked_chats_are_padded_per_batch_with_masked_labels(tok, data_files):
    split = build(Data(path=str(data_files["chat"]), seq_len=64, packing=False), tok)
    items = [RowDataset(split.train)[i] for i in range(3)]
    batch = PadCollate(tok.pad_token_id)(items)
    longest = max(len(item["input_ids"]) for item in items)
    assert batch["input_ids"].shape == (3, longest)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        assert torch.equal(batch["input_ids"][row, :n], item["input_ids"])
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (longest - n)
        assert (batch["labels"][row, n:] == IGNORE).all()
        assert (batch["input_ids"][row, n:] == tok.pad_token_id).all()


def test_too_few_rows_name_the_fix(tok, data_files):
    with pytest.raises(ValueError, match=r"fewer than the 500 training \+ 2 held-out rows"):
        build(Data(path=str(data_files["text"]), seq_len=8, train_rows=500, eval_rows=2), tok)


def test_parquet_and_a_datasets_directory_read_the_same_records(data_files, tmp_path):
    records = read_records(str(data_files["chat"]))
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(records), tmp_path / "chat.parquet")
    assert read_records(str(tmp_path / "chat.parquet")) == records
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    assert read_records(str(tmp_path / "saved")) == records
    assert read_records(str(tmp_path / "saved"), limit=3) == records[:3]


def test_rank_batches_follow_a_shuffled_dataloader_and_split_its_batches_over_ranks():
    data = list(range(23))

    def take(loader, n):
        out = []
        while len(out) < n:
            for batch in loader:
                out.append(batch.tolist())
                if len(out) == n:
                    break
        return out

    reference = DataLoader(data, batch_size=4, shuffle=True, drop_last=True,
                           generator=torch.Generator().manual_seed(5))
    one = RankBatches(23, 4, seed=5)
    assert take(DataLoader(data, batch_sampler=one, generator=one.generator), 14) == \
        take(reference, 14)  # three epochs and more
    ranks = [RankBatches(23, 2, seed=5, rank=r, world_size=2) for r in range(2)]
    halves = [take(DataLoader(data, batch_sampler=b, generator=b.generator), 14) for b in ranks]
    whole = take(DataLoader(data, batch_size=4, shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(5)), 14)
    assert [a + b for a, b in zip(*halves, strict=True)] == whole
