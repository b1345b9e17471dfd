"""`purekd demo cross-tokenizer`: its pieces on tiny models (bits per byte against a
hand-computed value, the teacher shared by the two KD students, one training step of each arm
against the loss by hand, results.json's structure, the texts, the settings, the command line),
and the quick run end to end on the real Gemma 3 / SmolLM2 pair (slow: `-m slow`)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from transformers import LlamaConfig, LlamaForCausalLM

import purekd
from purekd.__main__ import main
from purekd.demo import cross_tokenizer as ct
from purekd.recipes import _models as models


def _tiny_llama(vocab: int, layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


class _Characters:
    """A character tokenizer (one id per character of ``alphabet``, BOS last)."""

    def __init__(self, alphabet: str) -> None:
        self.alphabet = alphabet
        self.bos_token_id, self.eos_token_id = len(alphabet), None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [self.alphabet.index(c) for c in text]}

    def decode(self, ids: list[int]) -> str:
        return "".join(self.alphabet[i] for i in ids)


# -- bits per byte ----------------------------------------------------------------------------


def test_bits_per_byte_of_a_uniform_model_is_log2_vocabulary_per_token_over_utf8_bytes():
    model = _tiny_llama(vocab=8)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # logits 0: every token has probability 1/8, 3 bits
    tokenizer = _Characters("abé€ \n")  # 6 characters and BOS in a vocabulary of 8
    texts = ["abé", "€ a\nb"]  # 3 + 5 tokens; 4 + 7 bytes (é is 2 bytes, € is 3)
    result = models.bits_per_byte(model, tokenizer, texts)
    assert (result.tokens, result.bytes) == (8, 11)
    assert result.bits == pytest.approx(8 * 3.0, rel=1e-6)
    assert result.bits_per_byte == pytest.approx(24 / 11, rel=1e-6)


def test_bits_per_byte_equals_the_float64_next_token_log_likelihood_in_any_row_blocks():
    model = _tiny_llama(vocab=8, seed=3)
    tokenizer = _Characters("abé€ \n")
    text = "ab €\néa b"
    ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(text)["input_ids"]]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()[0, :-1]
    nats = -torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None]).sum()
    expected = float(nats) / math.log(2)
    for rows in (1, 3, 128):
        bits, tokens = models.text_bits(model, tokenizer, text, rows=rows)
        assert tokens == 9
        assert bits == pytest.approx(expected, rel=1e-5)
    assert ct.bits_per_byte(model, tokenizer, [text]) == pytest.approx(
        expected / len(text.encode("utf-8")), rel=1e-5)


def test_bits_per_byte_refuses_a_tokenizer_that_does_not_reproduce_the_text():
    class Lossy(_Characters):
        def decode(self, ids: list[int]) -> str:
            return super().decode(ids).upper()

    with pytest.raises(ValueError, match="does not reproduce the text 'ab'"):
        models.bits_per_byte(_tiny_llama(vocab=8), Lossy("abé€ \n"), ["ab"])
    with pytest.raises(ValueError, match="no texts"):
        models.bits_per_byte(_tiny_llama(vocab=8), _Characters("ab"), [])


# -- texts ------------------------------------------------------------------------------------


def test_verses_are_joined_into_texts_of_at_least_the_asked_characters_never_split():
    verses = ["aaaa", "bb", "cccccc", "d", "ee"]
    assert ct.chunk_texts(verses, 4) == ["aaaa", "bb\ncccccc", "d\nee"]
    assert ct.chunk_texts(verses, 6) == ["aaaa\nbb", "cccccc"]  # "d\nee" (4 < 6) dropped
    assert ct.chunk_texts(verses, 7) == ["aaaa\nbb", "cccccc\nd"]  # "ee" (2 < 7) dropped
    with pytest.raises(ValueError, match="text_chars=0"):
        ct.chunk_texts(verses, 0)


def test_training_and_held_out_texts_do_not_overlap_and_too_few_verses_are_named(tmp_path):
    path = tmp_path / "kjv.jsonl"
    path.write_text("".join(json.dumps({"text": f"verse {i:03d}."}) + "\n" for i in range(100)))
    settings = ct.Settings(verses=100, text_chars=20, steps=5, batch_size=2, held_out_texts=3)
    texts = ct.split_texts(settings, path)
    assert len(texts.train) == 10 and len(texts.held_out) == 3
    chunks = ct.chunk_texts([f"verse {i:03d}." for i in range(100)], 20)
    assert sorted(texts.train) == sorted(chunks[:10])  # the first ones, shuffled
    assert texts.held_out == chunks[-3:]
    with pytest.raises(ValueError, match=r"make 50 texts.*60 training.*3 held-out"):
        ct.split_texts(settings._replace(steps=30), path)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("steps", 0, "steps=0"), ("batch_size", 1.5, "batch_size=1.5"), ("lr", 0.0, "lr=0.0"),
    ("warmup", 1.0, "warmup=1.0"), ("top_k", 0, "top_k=0"), ("beta", 2.0, "beta=2.0"),
    ("matched_weight", None, "give both or neither"), ("analysis_texts", 99, "analysis_texts"),
    ("ce_weight", -1.0, "ce_weight=-1.0"), ("max_length", 1, "max_length=1"),
    ("gold_tail", "flat", "gold_tail='flat'"), ("analysis_texts", -1, "analysis_texts=-1"),
])
def test_settings_reject_bad_values_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        ct.Settings(**{field: value}).check()


# -- the students' losses and the shared teacher -------------------------------------------------


def _pair():
    """Two fast tokenizers that cut text differently: WordPiece and characters."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    from tests.stages import _tokenizers

    student = _tokenizers.wordpiece()
    letters = sorted(set("in the beginning god created heaven and earth. let there be light,"))
    vocab = {c: i for i, c in enumerate(["<pad>", "<bos>", *letters])}
    backend = Tokenizer(tok_models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    teacher = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                      bos_token="<bos>")
    return student, teacher


TEXTS = ["in the beginning god created the heaven and the earth.",
         "let there be light, and the earth.", "god created light.", "the heaven and earth."]


def test_the_two_kd_students_share_one_teacher_forward_per_batch():
    tokenizer_S, tokenizer_T = _pair()
    collate = purekd.stages.CrossTokenizerCollator(tokenizer_S, tokenizer_T)
    teacher = _tiny_llama(len(tokenizer_T), seed=1)
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    shared = ct.SharedTeacher(teacher)
    student = _tiny_llama(len(tokenizer_S), seed=2).train()
    settings = ct.Settings(steps=2, batch_size=2, top_k=None)
    vocabulary_map = purekd.stages.vocabulary_map(tokenizer_S, tokenizer_T)
    arms = ct.make_arms(student, shared, vocabulary_map, settings)
    for step, i in enumerate((0, 2)):
        batch = collate(TEXTS[i:i + 2])
        shared.prime(**batch["teacher"])
        for arm in arms.values():
            arm.train_on(batch, step / 2)
        shared.release()
    assert len(calls) == 2  # once per batch, for both KD students
    assert [len(arm.log) for arm in arms.values()] == [2, 2, 2]
    assert set(arms["gold"].log[0]) == {"step", "loss", "kd_loss", "hard_label_loss"}
    # a forward on inputs it was not primed with runs the teacher
    batch = collate(TEXTS[:1])
    shared(**batch["teacher"])
    assert len(calls) == 3


@pytest.mark.parametrize("name", ["uld", "gold"])
def test_one_step_of_a_kd_student_is_kd_plus_cross_entropy_by_hand(name):
    tokenizer_S, tokenizer_T = _pair()
    batch = purekd.stages.CrossTokenizerCollator(tokenizer_S, tokenizer_T)(TEXTS[:2])
    teacher = _tiny_llama(len(tokenizer_T), seed=1)
    student = _tiny_llama(len(tokenizer_S), seed=2).train()
    vocabulary_map = purekd.stages.vocabulary_map(tokenizer_S, tokenizer_T)
    settings = ct.Settings(top_k=4, kd_weight=0.7, ce_weight=0.3, lr=1e-2, warmup=0.0)
    by_hand = _tiny_llama(len(tokenizer_S), seed=2).train()
    by_hand.load_state_dict(student.state_dict())
    arm = ct.make_arms(student, ct.SharedTeacher(teacher), vocabulary_map, settings)[name]
    arm.train_on(batch, 0.0)

    logits_T = teacher(**{k: v for k, v in batch["teacher"].items() if k != "labels"}).logits
    outputs = by_hand(**batch["student"])
    if name == "uld":
        kd = purekd.losses.aligned_uld(outputs.logits, logits_T, batch["spans"], top_k=4)
    else:
        kd = purekd.losses.aligned_gold(outputs.logits, logits_T, batch["spans"], vocabulary_map,
                                        top_k=4, loss="forward_kl", matched_weight=1.0,
                                        unmatched_weight=1.0)
    loss = 0.7 * kd + 0.3 * outputs.loss
    assert arm.log[0]["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    assert arm.log[0]["kd_loss"] == pytest.approx(float(kd.detach()), rel=1e-5)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(by_hand.parameters(), 1.0)
    optimizer = torch.optim.AdamW(by_hand.parameters(), lr=1e-2, weight_decay=0.0)
    optimizer.step()
    for (key, mine), theirs in zip(arm.student.state_dict().items(),
                                   by_hand.state_dict().values(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6, msg=key)


def test_the_kd_configs_are_uld_and_gold_mixed_with_the_texts_cross_entropy():
    configs = ct.kd_configs(ct.Settings(kd_weight=0.5, ce_weight=2.0, top_k=64,
                                        gold_tail="total"))
    assert configs["uld"].kd_loss == ("uld", {"top_k": 64})
    assert configs["gold"].kd_loss == ("gold", {"loss": "forward_kl", "top_k": 64,
                                                "tail": "total", "matched_weight": 1.0,
                                                "unmatched_weight": 1.0})
    for config in configs.values():
        assert (config.kd_loss_weight, config.hard_label_weight) == (0.5, 2.0)
    tsd = ct.kd_configs(ct.Settings(gold_loss="jsd", beta=0.3, matched_weight=None,
                                    unmatched_weight=None, top_k=None))
    assert tsd["gold"].kd_loss == ("gold", {"loss": "jsd", "tail": "total", "beta": 0.3})
    assert ct.DEFAULT.gold_tail == "total"  # the budget's choice (docs/demo-cross-tokenizer.md)
    uniform = ct.kd_configs(ct.Settings(top_k=64, gold_tail="uniform"))
    assert uniform["gold"].kd_loss == ("gold", {"loss": "forward_kl", "top_k": 64,
                                                "tail": "uniform", "matched_weight": 1.0,
                                                "unmatched_weight": 1.0})
    assert uniform["uld"].kd_loss == ("uld", {"top_k": 64})


def test_the_span_analysis_is_off_by_default_and_on_in_the_quick_run():
    assert ct.DEFAULT.analysis_texts == 0 and ct.QUICK.analysis_texts == 2


# -- held-out scores kept between runs --------------------------------------------------------


def test_held_out_scores_are_kept_per_model_file_variant_and_texts(tmp_path, monkeypatch):
    model, tokenizer = _tiny_llama(vocab=8, seed=5), _Characters("abé€ \n")
    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"weights")
    cache = tmp_path / "cache"
    texts = ["ab €", "éa b\na"]
    expected = models.bits_per_byte(model, tokenizer, texts).bits_per_byte
    assert ct.cached_bits_per_byte(model, tokenizer, texts, cache, weights) == (expected, False)
    assert len(list(cache.glob("bits-per-byte-*.json"))) == 1

    calls = []
    real = ct.bits_per_byte

    def counted(*args):
        calls.append(args[2])
        return real(*args)

    monkeypatch.setattr(ct, "bits_per_byte", counted)
    assert ct.cached_bits_per_byte(model, tokenizer, texts, cache, weights) == (expected, True)
    assert calls == []  # read back, not scored
    # other texts, another variant, another file (a new modification time): scored again
    assert ct.cached_bits_per_byte(model, tokenizer, texts[:1], cache, weights)[1] is False
    assert ct.cached_bits_per_byte(model, tokenizer, texts, cache, weights,
                                   variant="layers [0]")[1] is False
    os.utime(weights, ns=(1, 1))
    assert ct.cached_bits_per_byte(model, tokenizer, texts, cache, weights)[1] is False
    assert len(calls) == 3
    # an unreadable file is scored again and rewritten; no cache: always scored
    for path in cache.glob("bits-per-byte-*.json"):
        path.write_text("{")
    assert ct.cached_bits_per_byte(model, tokenizer, texts, cache, weights) == (expected, False)
    assert ct.cached_bits_per_byte(model, tokenizer, texts, cache, weights) == (expected, True)
    assert ct.cached_bits_per_byte(model, tokenizer, texts, None, weights) == (expected, False)


# -- results.json, the table, the plot -----------------------------------------------------------


def _fake_results(tmp_path: Path) -> dict:
    rows = [ct.Row(name, 10, bpb, tps, mb) for name, bpb, tps, mb in (
        ("teacher (Gemma 3 270M)", 0.6, 300.0, 900.0), ("SmolLM2-135M (source)", 0.9, None, None),
        ("student before training", 5.0, None, None), ("student, text only", 1.2, 400.0, 500.0),
        ("student, ULD + CE", 1.15, 250.0, 600.0), ("student, GOLD + CE", 1.1, 200.0, 700.0))]
    arms = {}
    for name in ct.ARMS:
        arm = ct.Arm.__new__(ct.Arm)
        arm.meter, arm.log = ct.Meter(), [{"step": 1, "loss": 2.0, "hard_label_loss": 2.0}]
        if name != "text_only":
            arm.log[0]["kd_loss"] = 0.5
        arms[name] = arm
    return ct._results(rows, arms, ct.QUICK, [0, 29], 30, {"load": 1.0}, 12.0, {},
                       {"student": 100, "teacher": 400, "matched": 80},
                       {"student": 50, "teacher": 60}, ct.Meter(), {})


def test_results_hold_every_figure_by_model_and_the_ratios_to_the_text_only_student(tmp_path):
    results = _fake_results(tmp_path)
    assert results["bits_per_byte"] == {"teacher": 0.6, "source": 0.9, "student_initial": 5.0,
                                        "text_only": 1.2, "uld": 1.15, "gold": 1.1}
    assert results["ratio"] == {"uld": pytest.approx(1.15 / 1.2), "gold": pytest.approx(1.1 / 1.2)}
    assert results["tokens_per_second"] == {"teacher": 300.0, "text_only": 400.0, "uld": 250.0,
                                            "gold": 200.0}
    assert set(results["peak_memory_mb"]) == {"teacher", *ct.ARMS}
    assert results["vocabulary"]["matched_share_student"] == pytest.approx(0.8)
    assert results["vocabulary"]["matched_share_teacher"] == pytest.approx(0.2)
    assert set(results["curves"]) == set(ct.ARMS)
    assert json.loads(json.dumps(results)) == results  # JSON as it is
    text = ct.table([ct.Row("student, GOLD + CE", 1234, 1.1, None, 700.0)])
    assert "1,234" in text and "1.100" in text and "700" in text and " - " in text


def test_the_plot_is_a_png(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(_fake_results(tmp_path)))
    png = ct.plot_results(tmp_path / "results.json", tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- the command line --------------------------------------------------------------------------


def test_the_command_line_keeps_the_other_demos_options_apart(capsys):
    for argument, owner in (("--k", "lm"), ("--labels", "digits"), ("--teacher", "lm")):
        with pytest.raises(SystemExit):
            main(["demo", "cross-tokenizer", argument, "3"])
        assert f"{argument} is an option of the {owner} demo" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "cross-tokenizer", "--steps", "0"])
    assert "--steps must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "cross-tokenizer", "--span-analysis", "-1"])
    assert "--span-analysis must be >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "lm", "--span-analysis", "4"])
    assert "--span-analysis is an option of the cross-tokenizer demo" in capsys.readouterr().err


def test_the_command_line_turns_the_span_analysis_on(monkeypatch, tmp_path):
    given = []
    monkeypatch.setattr(ct, "run", lambda out, settings: given.append(settings))
    assert main(["demo", "cross-tokenizer", "--output-dir", str(tmp_path)]) == 0
    assert main(["demo", "cross-tokenizer", "--span-analysis", "4", "--steps", "5",
                 "--output-dir", str(tmp_path)]) == 0
    assert given == [ct.DEFAULT, ct.DEFAULT._replace(analysis_texts=4, steps=5)]


def test_the_default_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PUREKD_DEMO_CACHE", str(tmp_path / "mine"))
    assert ct.default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("PUREKD_DEMO_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert ct.default_cache_dir() == tmp_path / "purekd-demo"


# -- the quick run on the real pair (slow) -------------------------------------------------------


@pytest.mark.slow
def test_the_quick_demo_on_gemma_and_smollm2_writes_its_table_results_and_plot(
        tmp_path, request):
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("slow (loads Gemma 3 270M and SmolLM2-135M): run with -m slow")
    pytest.importorskip("gguf")
    try:
        models.bundled_gemma(), models.bundled_teacher()
    except ValueError as error:
        pytest.skip(str(error))
    results = ct.run(tmp_path, settings=ct.QUICK, progress_bar=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert set(saved["bits_per_byte"]) == {"teacher", "source", "student_initial", *ct.ARMS}
    assert all(math.isfinite(v) and v > 0 for v in saved["bits_per_byte"].values())
    assert saved["bits_per_byte"]["teacher"] < saved["bits_per_byte"]["source"]
    assert saved["parameters"]["teacher"] > 200_000_000  # the real Gemma 3 270M
    assert saved["vocabulary"] == {**saved["vocabulary"], "student": 49152, "teacher": 262144}
    assert saved["span_analysis"]["spans"] > 0
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
