"""`purekd demo lm`: the quick run end to end (the real SmolLM2 teacher, a real top-k cache,
both trainings), the student's construction, and every bad input the issue names."""

from __future__ import annotations

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytest.importorskip("matplotlib")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from purekd.__main__ import main  # noqa: E402
from purekd.demo import lm  # noqa: E402


def _tiny_llama(vocab: int = 100, layers: int = 4, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


# -- the student ---------------------------------------------------------------------------


def test_a_student_keeping_every_layer_is_the_teacher():
    teacher = _tiny_llama()
    student = lm.compress(teacher, [0, 1, 2, 3]).eval()
    x = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(student(input_ids=x).logits, teacher(input_ids=x).logits,
                               rtol=0, atol=0)


def test_a_compressed_student_holds_copies_of_the_kept_layers_and_ties_its_output_layer():
    teacher = _tiny_llama(layers=5)
    before = {name: value.clone() for name, value in teacher.state_dict().items()}
    student = lm.compress(teacher, [0, 2, 4])
    assert student.config.num_hidden_layers == 3 and len(student.model.layers) == 3
    assert teacher.config.num_hidden_layers == 5
    for mine, theirs in zip(student.model.layers, [teacher.model.layers[i] for i in (0, 2, 4)],
                            strict=True):
        for (name, a), (_, b) in zip(mine.state_dict().items(), theirs.state_dict().items(),
                                     strict=True):
            assert torch.equal(a, b), name
            assert a.data_ptr() != b.data_ptr()  # copies: training the student leaves the teacher
    assert student.lm_head.weight is student.model.embed_tokens.weight
    assert all(p.requires_grad for p in student.parameters())
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, before[name])


def test_spread_layers_keeps_the_first_and_the_last():
    assert lm.spread_layers(30, 6) == [0, 6, 12, 18, 24, 29]
    assert lm.spread_layers(30, 2) == [0, 29]
    assert lm.spread_layers(4, 4) == [0, 1, 2, 3]
    assert lm.spread_layers(30, 1) == [29]
    for total in range(1, 41):
        for keep in range(1, total + 1):
            layers = lm.spread_layers(total, keep)
            assert len(layers) == keep and layers[-1] == total - 1
            assert layers == sorted(set(layers)) and layers[0] == (0 if keep > 1 else total - 1)


@pytest.mark.parametrize("layers", [[], [2, 1], [0, 0], [0, 4], [-1, 2]])
def test_compress_rejects_layer_lists_that_are_not_ascending_teacher_indices(layers):
    with pytest.raises(ValueError, match="layers="):
        lm.compress(_tiny_llama(), layers)


@pytest.mark.parametrize("keep", [0, 31])
def test_spread_layers_rejects_counts_outside_the_teachers_depth(keep):
    with pytest.raises(ValueError, match=f"layers={keep}.*30 decoder layers"):
        lm.spread_layers(30, keep)


def test_perplexity_is_the_exponential_of_the_mean_next_token_cross_entropy():
    model = _tiny_llama()
    rows = torch.randint(0, 100, (3, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(input_ids=rows).logits.double()
    nll = -torch.log_softmax(logits[:, :-1], -1).gather(-1, rows[:, 1:, None]).mean()
    result = lm.perplexity(model, rows, batch_size=2)
    assert result.tokens == 15
    assert result.perplexity == pytest.approx(math.exp(float(nll)), rel=1e-5)


# -- bad input: each a clear error before any training ---------------------------------------


def test_a_teacher_path_that_does_not_exist_is_named(tmp_path):
    missing = tmp_path / "nowhere.gguf"
    with pytest.raises(ValueError, match=r"teacher=.*nowhere\.gguf.*does not exist"):
        lm.load_teacher(missing)


def test_a_file_that_is_not_gguf_is_named_with_its_first_bytes(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 a zip, not a model")
    with pytest.raises(ValueError, match=r"not a GGUF file \(it starts with b'PK"):
        lm.load_teacher(path)


def test_a_truncated_gguf_file_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\x00" * 60)
    with pytest.raises(ValueError, match=r"broken\.gguf.*could not be loaded"):
        lm.load_teacher(path)


def test_a_folder_without_config_json_points_at_its_gguf_file(tmp_path):
    (tmp_path / "weights.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match=r"without config\.json.*weights\.gguf"):
        lm.load_teacher(tmp_path)


def test_a_model_folder_with_a_broken_config_is_an_error_naming_the_folder(tmp_path):
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match="could not be loaded as a causal language model"):
        lm.load_teacher(tmp_path)


def test_the_command_line_reports_a_bad_teacher_before_training(tmp_path, capsys):
    code = main(["demo", "lm", "--quick", "--teacher", str(tmp_path / "missing"),
                 "--output-dir", str(tmp_path / "out")])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out" / "text_only").exists()


def test_a_teacher_and_student_with_different_vocabularies_are_refused():
    teacher, student = _tiny_llama(vocab=100), _tiny_llama(vocab=120)
    with pytest.raises(ValueError, match="vocabulary of 100 tokens but the student one of 120"):
        lm.check_same_vocabulary(teacher, student, list(range(100)))


def test_a_tokenizer_larger_than_the_vocabulary_is_refused():
    model = _tiny_llama(vocab=100)
    with pytest.raises(ValueError, match="tokenizer has 101 tokens"):
        lm.check_same_vocabulary(model, model, list(range(101)))


@pytest.mark.parametrize(("field", "value"), [("steps", 0), ("k", 0), ("lr", 0.0),
                                              ("warmup", 1.0), ("temperature", 0.0),
                                              ("length", 1)])
def test_settings_reject_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"{field}="):
        lm.DEFAULT._replace(**{field: value}).check()


def test_the_command_line_keeps_each_demos_options_apart(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "lm", "--labels", "5"])
    assert "--labels is an option of the digits demo" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--quick"])
    assert "--quick is an option of the lm demo" in capsys.readouterr().err


@pytest.mark.parametrize("argument", ["--steps", "--layers", "--k"])
def test_the_command_line_rejects_non_positive_counts(argument, capsys):
    with pytest.raises(SystemExit):
        main(["demo", "lm", argument, "0"])
    assert argument in capsys.readouterr().err


# -- the quick demo, end to end --------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    pytest.importorskip("purekd.teacher_cache")
    try:
        lm.bundled_teacher()
    except ValueError as error:
        pytest.skip(str(error))
    out = tmp_path_factory.mktemp("demo-lm")
    results = lm.run(out, settings=lm.QUICK, progress_bar=False)
    return out, results


def test_the_quick_demo_writes_its_table_results_and_plot(quick_run, capsys):
    out, results = quick_run
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert set(saved["perplexity"]) == {"teacher", "student_initial", "text_only", "distilled"}
    assert all(math.isfinite(v) and v > 1 for v in saved["perplexity"].values())
    assert saved["seconds"] > 0
    assert saved["parameters"]["teacher"] > 100_000_000  # the real SmolLM2-135M
    assert saved["parameters"]["student"] < saved["parameters"]["teacher"] / 2
    assert saved["student_layers"] == [0, 29]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for folder in ("text_only", "distilled"):
        assert (out / folder / "metrics.jsonl").stat().st_size > 0
    assert (out / "teacher_cache" / "manifest.json").is_file()


def test_the_quick_demo_trains_both_students(quick_run):
    _, results = quick_run
    ppl = results["perplexity"]
    assert ppl["teacher"] < 100  # SmolLM2 on King James text
    assert ppl["distilled"] < ppl["student_initial"]
    assert ppl["text_only"] < ppl["student_initial"]
    assert results["ratio"] == pytest.approx(ppl["distilled"] / ppl["text_only"])


def test_a_cache_written_with_another_tokenizer_is_refused_before_training(quick_run):
    out, _ = quick_run
    other_tokenizer = [f"token{i}" for i in range(49152)]  # a vocabulary: another fingerprint
    teacher = _tiny_llama(vocab=49152, layers=1)  # SmolLM2's vocabulary size
    rows = torch.zeros(lm.QUICK.train_rows, lm.QUICK.length, dtype=torch.long)
    with pytest.raises(ValueError, match=r"tokenizer fingerprint mismatch.*delete it"):
        lm.teacher_cache(teacher, other_tokenizer, rows, out / "teacher_cache", lm.QUICK, False)


def test_a_cache_written_by_another_teacher_is_refused_before_training(quick_run):
    from purekd.teacher_cache import TeacherCache

    out, _ = quick_run
    tokenizer_fingerprint = TeacherCache(out / "teacher_cache").manifest["tokenizer_fingerprint"]
    teacher = _tiny_llama(vocab=49152, layers=1)
    rows = torch.zeros(lm.QUICK.train_rows, lm.QUICK.length, dtype=torch.long)
    with pytest.raises(ValueError, match=r"teacher fingerprint mismatch.*delete it"):
        lm.teacher_cache(teacher, tokenizer_fingerprint, rows, out / "teacher_cache", lm.QUICK,
                         False)


def test_a_cache_for_another_vocabulary_is_refused_before_training(quick_run):
    out, _ = quick_run
    teacher = _tiny_llama(vocab=50000, layers=1)
    rows = torch.zeros(lm.QUICK.train_rows, lm.QUICK.length, dtype=torch.long)
    with pytest.raises(ValueError, match=r"vocab_size=50000.*vocabulary of 49152"):
        lm.teacher_cache(teacher, None, rows, out / "teacher_cache", lm.QUICK, False)


def test_general_distiller_trains_from_a_cached_top_k_through_a_fused_output_layer(tmp_path):
    """The distilled run's wiring on a tiny model: no teacher model, the cached top-k as
    ``teacher_cache``, the student's hidden states and output layer (the distillers' preflight
    once refused it: 'nothing to train')."""
    import purekd
    from purekd.integrations import hf_adaptor

    student = _tiny_llama(vocab=100, layers=1)
    before = [p.detach().clone() for p in student.parameters()]
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 100, (2, 6), generator=gen)
    logprobs = torch.log_softmax(torch.randn(2, 6, 100, generator=gen), -1).topk(5, dim=-1)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch = {"student": inputs, "teacher": inputs,
             "teacher_cache": {"topk_ids": logprobs.indices, "topk_logprobs": logprobs.values,
                               "topk_mask": torch.ones_like(ids)}}
    distiller = purekd.GeneralDistiller(
        purekd.TrainingConfig(output_dir=str(tmp_path), device="cpu"),
        purekd.DistillationConfig(kd_loss_type="forward_kl", temperature=1.0),
        None, student, hf_adaptor(causal=True),
        hf_adaptor(causal=True, lm_head=student.get_output_embeddings()))
    with distiller:
        distiller.train(torch.optim.SGD(student.parameters(), lr=0.1), [batch], num_steps=2,
                        output_hidden_states=True, logits_to_keep=1)
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))
