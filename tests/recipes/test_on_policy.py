"""A recipe with ``teacher.source: on_policy``: the student samples completions of each
record's prompt (prompt/completion, chat, or the first tokens of text), the teacher scores
them, the loss runs on the sampled tokens; the run writes a student that from_pretrained
loads; the ``lmbda`` draws follow the recipe's seed."""

from __future__ import annotations

import json
import math

import pytest
import torch

from purekd.recipes import validate
from purekd.recipes._run import run


@pytest.fixture
def on_policy_data(recipe_data, data_files, tmp_path):
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in recipe_data.items()}
    data["teacher"] = {"path": recipe_data["teacher"]["path"], "source": "on_policy"}
    data["data"] = {"path": str(data_files["pc"]), "packing": False, "seq_len": 32,
                    "eval_rows": 2}
    data["loss"] = {"kd_loss_type": "reverse_kl"}
    data["on_policy"] = {"lmbda": 0.5, "max_new_tokens": 6, "temperature": 0.9, "top_k": 20,
                         "seed": 3}
    data["checkpoint"] = {"output_dir": str(tmp_path / "op"), "every": 2}
    return data


@pytest.fixture
def sampled(monkeypatch):
    """The batches the student sampled on (their prompt batch sizes)."""
    from purekd.stages import HFGenerateSampler

    calls: list[int] = []
    original = HFGenerateSampler.__call__

    def counting(self, model, prompt_ids, prompt_mask, *, seed):
        calls.append(int(prompt_ids.shape[0]))
        return original(self, model, prompt_ids, prompt_mask, seed=seed)

    monkeypatch.setattr(HFGenerateSampler, "__call__", counting)
    return calls


def _expected_draws(seed, lmbda, batches):
    generator = torch.Generator().manual_seed(seed)
    decisions = []
    for _ in range(batches):
        decisions.append(float(torch.rand((), generator=generator)) < lmbda)
        torch.randint(0, 2**62, (), generator=generator)
    return decisions


def test_an_on_policy_recipe_samples_on_a_share_lmbda_of_the_batches(on_policy_data, sampled,
                                                                       tmp_path):
    from transformers import AutoModelForCausalLM

    summary = run(validate(on_policy_data), progress_bar=False, echo=lambda _: None)
    out = tmp_path / "op"
    assert summary.steps == 4 and math.isfinite(summary.perplexity)
    expected = _expected_draws(3, 0.5, 4)
    assert len(sampled) == sum(expected) and 0 < len(sampled) < 4
    assert all(size == 4 for size in sampled)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(math.isfinite(r["kd_loss"]) for r in records)
    loaded = AutoModelForCausalLM.from_pretrained(out / "student")
    final = torch.load(out / "gs4.pkl", weights_only=True)
    assert all(torch.equal(v, final[k]) for k, v in loaded.state_dict().items())


def test_text_records_with_prompt_tokens_and_the_sampled_token_loss(on_policy_data, data_files,
                                                                    sampled, tmp_path):
    data = dict(on_policy_data)
    data["data"] = {"path": str(data_files["text"]), "format": "text", "packing": False,
                    "seq_len": 24, "limit": 12}
    data["loss"] = {"kd_loss_type": "sampled_reverse_kl", "params": {"gamma": 0.5}}
    data["on_policy"] = {"lmbda": 1.0, "max_new_tokens": 5, "prompt_tokens": 3, "seed": 1}
    data["train"] = {**on_policy_data["train"], "steps": 2}
    data["checkpoint"] = {"output_dir": str(tmp_path / "text"), "save_state": False}
    summary = run(validate(data), progress_bar=False, echo=lambda _: None)
    assert summary.steps == 2 and sampled == [4, 4]  # every batch sampled
    assert 0 < summary.tokens <= 2 * 4 * 5  # the sampled tokens the loss read
    records = [json.loads(line)
               for line in (tmp_path / "text" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["kd_loss"]) for r in records)


def test_prompts_are_the_records_prompts_left_padded(data_files):
    from purekd.recipes._data import PromptCollate, RowDataset, build

    from . import _tiny

    tok = _tiny.tokenizer()
    recipe = validate({"teacher": {"path": str(data_files["pc"]), "source": "on_policy"},
                       "data": {"path": str(data_files["chat"]), "packing": False,
                                "seq_len": 64},
                       "student": {"layers": 1}, "train": {"steps": 1}})
    split = build(recipe.data, tok, prompts=True)
    batch = PromptCollate(tok.pad_token_id)([RowDataset(split.train)[i] for i in range(2)])
    records = [json.loads(line) for line in data_files["chat"].read_text().splitlines()[:2]]
    for row, record in enumerate(records):
        text = tok.apply_chat_template(record["messages"][:-1], tokenize=False,
                                       add_generation_prompt=True)
        prompt = tok(text, add_special_tokens=False)["input_ids"]
        width = batch["prompts"].shape[1]
        assert batch["prompts"][row, width - len(prompt):].tolist() == prompt
        assert batch["prompt_attention_mask"][row].tolist() == \
            [0] * (width - len(prompt)) + [1] * len(prompt)
        assert batch["input_ids"][row, :len(prompt)].tolist() == prompt  # the sequence follows
        assert (batch["labels"][row, :len(prompt)] == -100).all()
    assert text.endswith("<|assistant|>")


def test_prompts_alone_when_every_batch_is_sampled(on_policy_data, sampled, tmp_path):
    """TRL's DistillationTrainer form: records that are prompts only (a ``prompt`` without
    ``completion``, a chat ending with the user's message); with lmbda < 1 they are refused
    (the batches not sampled need completions)."""
    from . import _tiny

    path = tmp_path / "prompts.jsonl"
    with open(path, "w") as f:
        for i, line in enumerate(_tiny.LINES * 2):
            if i % 2:
                f.write(json.dumps({"prompt": " ".join(line.split()[:3])}) + "\n")
            else:
                f.write(json.dumps({"messages": [{"role": "user",
                                                  "content": f"Say verse {i}."}]}) + "\n")
    data = dict(on_policy_data)
    data["data"] = {"path": str(path), "packing": False, "seq_len": 32}
    data["on_policy"] = {"lmbda": 1.0, "max_new_tokens": 4, "seed": 5}
    data["train"] = {**on_policy_data["train"], "steps": 2}
    data["checkpoint"] = {"output_dir": str(tmp_path / "alone"), "save_state": False}
    summary = run(validate(data), progress_bar=False, echo=lambda _: None)
    assert summary.steps == 2 and sampled == [4, 4] and summary.perplexity is None

    from purekd.recipes._data import build

    rows = build(validate(data).data, _tiny.tokenizer(), prompts=True, need_labels=False).train
    assert all(torch.equal(ids, prompt) for ids, prompt in zip(rows.ids, rows.prompts,
                                                                strict=True))
    assert all((labels == -100).all() for labels in rows.labels)
    chat = _tiny.tokenizer().apply_chat_template(
        [{"role": "user", "content": "Say verse 0."}], tokenize=False, add_generation_prompt=True)
    assert rows.prompts[0].tolist() == _tiny.tokenizer()(chat, add_special_tokens=False)[
        "input_ids"]

    data["on_policy"] = {"lmbda": 0.5, "max_new_tokens": 4}
    with pytest.raises(ValueError, match=r"data: record 0 is a prompt without a completion; "
                                         r"with on_policy\.lmbda < 1 the batches not sampled "
                                         r"train on the records' own completions: give every "
                                         r"record one, or set on_policy\.lmbda: 1"):
        run(validate(data), progress_bar=False, echo=lambda _: None)
