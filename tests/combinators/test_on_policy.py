"""The on-policy stage inside ``make_step``: a full-distribution KD on a rollout equals the same
KD on the same sequences given as data (dense and fused); ``lmbda=0`` is the off-policy step
exactly; the ``lmbda`` draws come from the stage's generator and resume from the step's
``state_dict``; the sampled-token form equals its definition on the models' logits (dense and
fused); ``seq_kd`` samples with the teacher; an empty rollout gives 0 with finite gradients and a
counted warning; bad input."""

from __future__ import annotations

import pytest
import torch

import purekd
from purekd.combinators import OnPolicyStage
from purekd.integrations import hf_adaptor
from purekd.losses import sampled_reverse_kl
from purekd.stages import Sample
from tests._on_policy import EOS, PAD, Recording, full_batch, prompt_batch, tiny_cache, tiny_llama

pytest.importorskip("transformers")


@pytest.fixture
def models():
    return tiny_llama(2, 16, seed=0).eval(), tiny_llama(1, 8, seed=1).train()


def _adaptors(teacher, student, fused):
    if not fused:
        return hf_adaptor(causal=True), hf_adaptor(causal=True)
    return (hf_adaptor(causal=True, lm_head=teacher.get_output_embeddings()),
            hf_adaptor(causal=True, lm_head=student.get_output_embeddings()))


def _step(models, kd="forward_kl", fused=False, **on_policy):
    teacher, student = models
    config = purekd.DistillationConfig(
        kd_loss_type=kd, temperature=1,
        on_policy=purekd.OnPolicyConfig(**{"max_new_tokens": 5, "seed": 7, **on_policy}))
    return purekd.make_step(config, teacher, student, *_adaptors(teacher, student, fused),
                            compile=False)


def _grads(model):
    return [p.grad.clone() if p.grad is not None else None for p in model.parameters()]


def _args(fused):
    """The fused path reads the last hidden states; the models need not build their logits."""
    return {"output_hidden_states": True, "logits_to_keep": 1} if fused else {}


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("kd", ["forward_kl", ["jsd", {"beta": 0.3}], "reverse_kl"])
def test_kd_on_a_rollout_equals_the_same_kd_on_the_same_sequences_as_data(models, kd, fused):
    teacher, student = models
    step = _step(models, kd, fused)
    out = step(prompt_batch(), **_args(fused))
    out.loss.backward()
    on_grads = _grads(student)
    student.zero_grad()
    sampled = step.outputs.last_rollout
    assert int(sampled.completion_lengths.sum()) > 0
    data = {"input_ids": sampled.input_ids, "attention_mask": sampled.attention_mask,
            "labels": torch.where(sampled.completion_mask != 0, sampled.input_ids, -100)}
    plain = purekd.make_step(purekd.DistillationConfig(kd_loss_type=kd, temperature=1), teacher,
                             student, *_adaptors(teacher, student, fused), compile=False)
    # the data carries labels, so the model computes its own loss: it needs every position's
    # logits there (no logits_to_keep)
    reference = plain(data, **({"output_hidden_states": True} if fused else {}))
    reference.loss.backward()
    torch.testing.assert_close(out.loss, reference.loss, rtol=1e-12, atol=1e-12)
    assert out.tokens == reference.tokens == sampled.completion_lengths.sum()
    for got, want in zip(on_grads, _grads(student), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fused", [False, True])
def test_lmbda_zero_is_the_off_policy_step_exactly(models, fused):
    teacher, student = models
    step = _step(models, fused=fused, lmbda=0.0)
    args = {"output_hidden_states": True} if fused else {}  # labels: every position's logits
    out = step(full_batch(), **args)
    out.loss.backward()
    on_grads = _grads(student)
    student.zero_grad()
    assert step.outputs.last_rollout is None  # nothing was sampled
    plain = purekd.make_step(purekd.DistillationConfig(kd_loss_type="forward_kl", temperature=1),
                             teacher, student, *_adaptors(teacher, student, fused), compile=False)
    batch = {k: v for k, v in full_batch().items() if not k.startswith("prompt")}
    reference = plain(batch, **args)
    reference.loss.backward()
    assert torch.equal(out.loss, reference.loss)
    for got, want in zip(on_grads, _grads(student), strict=True):
        assert torch.equal(got, want)


def test_lmbda_draws_come_from_the_stages_generator(models):
    step = _step(models, lmbda=0.5, seed=3)
    generator = torch.Generator().manual_seed(3)
    expected = []
    for _ in range(8):
        expected.append(float(torch.rand((), generator=generator)) < 0.5)
        torch.randint(0, 2**62, (), generator=generator)
    got = []
    for _ in range(8):
        step.outputs.last_rollout = None
        step(full_batch())
        got.append(step.outputs.last_rollout is not None)
    assert got == expected
    assert True in got and False in got


def test_the_generator_state_is_in_the_steps_state_dict_and_resumes_the_same_rollouts(models):
    step = _step(models, lmbda=0.6)
    for _ in range(2):
        step(full_batch())
    saved = {k: v.clone() for k, v in step.state_dict().items()}
    assert "outputs_state._extra_state" in saved
    assert all(k.startswith("student.") for k in saved if k != "outputs_state._extra_state")
    continued = []
    for _ in range(3):
        step.outputs.last_rollout = None
        step(full_batch())
        continued.append(step.outputs.last_rollout)
    fresh = _step(models, lmbda=0.6)
    fresh.load_state_dict(saved)
    for expected in continued:
        fresh.outputs.last_rollout = None
        fresh(full_batch())
        got = fresh.outputs.last_rollout
        assert (got is None) == (expected is None)
        if got is not None:
            assert torch.equal(got.input_ids, expected.input_ids)


def test_parameters_are_the_students_only(models):
    _, student = models
    step = _step(models, seq_kd=True)
    assert {id(p) for p in step.parameters()} == {id(p) for p in student.parameters()}


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("gamma", [0.0, 0.8])
def test_sampled_reverse_kl_equals_its_definition_on_the_models_logits(models, fused, gamma):
    teacher, student = models
    step = _step(models, ["sampled_reverse_kl", {"gamma": gamma}], fused, temperature=0.8)
    out = step(prompt_batch(), **_args(fused))
    out.loss.backward()
    sampled = step.outputs.last_rollout
    grads = _grads(student)
    student.zero_grad()
    ids = sampled.input_ids
    logits_S = student(input_ids=ids, attention_mask=sampled.attention_mask).logits
    with torch.no_grad():
        logits_T = teacher(input_ids=ids, attention_mask=sampled.attention_mask).logits
    next_ids = ids[:, 1:, None]
    lp_S = logits_S.log_softmax(-1)[:, :-1].gather(-1, next_ids).squeeze(-1)
    lp_T = logits_T.log_softmax(-1)[:, :-1].gather(-1, next_ids).squeeze(-1)
    mask = sampled.completion_mask[:, 1:]
    reference = sampled_reverse_kl(lp_S, lp_T, mask=mask,
                                   sampler_logprobs=sampled.sampler_logprobs[:, 1:], gamma=gamma)
    reference.backward()
    torch.testing.assert_close(out.loss, reference, rtol=1e-10, atol=1e-12)
    assert out.tokens == mask.sum()
    for got, want in zip(grads, _grads(student), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def test_seq_kd_samples_with_the_teacher_and_modes_are_kept(models):
    teacher, student = models
    seen = []

    def recording(model, prompt_ids, prompt_mask, *, seed):
        seen.append((model, model.training))
        return Sample(torch.full((prompt_ids.size(0), 2), 4), torch.ones(prompt_ids.size(0), 2))

    config = purekd.DistillationConfig(kd_loss_type="reverse_kl", temperature=1,
                                       on_policy={"seq_kd": True, "max_new_tokens": 2})
    step = purekd.make_step(config, teacher, student, *_adaptors(teacher, student, False),
                            compile=False, sampler=recording)
    step(prompt_batch())
    assert seen == [(teacher, False)]
    assert student.training and not teacher.training
    config = config.replace(on_policy=config.on_policy.replace(seq_kd=False))
    step = purekd.make_step(config, teacher, student, *_adaptors(teacher, student, False),
                            compile=False, sampler=recording)
    step(prompt_batch())
    assert seen[-1] == (student, False)
    assert student.training


@pytest.mark.parametrize("kd", ["forward_kl", "sampled_reverse_kl"])
@pytest.mark.parametrize("fused", [False, True])
def test_a_rollout_without_completion_tokens_gives_zero_finite_grads_and_a_counted_warning(
        models, kd, fused):
    teacher, student = models

    def nothing(model, prompt_ids, prompt_mask, *, seed):
        return Sample(torch.full((prompt_ids.size(0), 1), PAD),
                      torch.zeros(prompt_ids.size(0), 1, dtype=torch.int64))

    config = purekd.DistillationConfig(kd_loss_type=kd, temperature=1,
                                       on_policy={"max_new_tokens": 3})
    step = purekd.make_step(config, teacher, student, *_adaptors(teacher, student, fused),
                            compile=False, sampler=nothing)
    for count in (1, 2):
        with pytest.warns(UserWarning, match=rf"on-policy: the rollout has no completion token "
                                             rf".* \({count} such batch\(es\) so far\)"):
            out = step(prompt_batch(), **_args(fused))
        assert out.loss.item() == 0.0 and out.tokens == 0
        out.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in student.parameters()
                   if p.grad is not None)
    assert step.outputs.empty_rollouts == 2


def test_bad_batches(models):
    step = _step(models)
    with pytest.raises(ValueError, match=r"on-policy: the batch has no 'prompts' \(its keys: "
                                         r"\['attention_mask', 'input_ids'\]\)"):
        step({"input_ids": torch.ones(1, 2, dtype=torch.long),
              "attention_mask": torch.ones(1, 2)})
    with pytest.raises(ValueError, match=r"the batch carries a 'teacher_cache' \(a top-k teacher "
                                         r"cache\), but the teacher must score the newly sampled"):
        step({**prompt_batch(), "teacher_cache": {}})
    with pytest.raises(ValueError, match=r"the batch has 'teacher'/'student' parts"):
        step({"teacher": prompt_batch(), "student": prompt_batch()})
    with pytest.raises(ValueError, match=r"key\(s\) \['position_ids'\] that cannot follow the "
                                         r"sampled sequences"):
        step({**prompt_batch(), "position_ids": torch.zeros(3, 5)})
    with pytest.raises(TypeError, match=r"a batch must be a dict with 'prompts'"):
        step((torch.ones(1, 2),))
    with pytest.raises(ValueError, match=r"teacher_outputs \(cached teacher outputs\) cannot "
                                         r"score newly sampled sequences"):
        step(prompt_batch(), teacher_outputs=purekd.stages.Adapted())
    mixed = _step(models, lmbda=0.5)
    with pytest.raises(ValueError, match=r"OnPolicyConfig\(lmbda=0.5\) uses the batch's own "
                                         r"sequences .* but the batch has no 'input_ids'"):
        mixed(prompt_batch())


def test_an_adaptor_with_shifted_rows_is_told_to_return_one_row_per_position(models):
    teacher, student = models

    def shifted(batch, outputs):
        return {"logits": outputs.logits[:, :-1]}

    config = purekd.DistillationConfig(kd_loss_type="forward_kl", temperature=1,
                                       on_policy={"max_new_tokens": 2})
    step = purekd.make_step(config, teacher, student, shifted, shifted, compile=False)
    with pytest.raises(ValueError, match=r"on-policy: the adaptor's logits have shape "
                                         r"\(3, \d+, 24\), but the sampled sequences are "
                                         r"\(3, \d+\): return one row per position"):
        step(prompt_batch())


def test_prompts_longer_than_the_context_raise_before_sampling(models):
    teacher, student = models
    sampler = Recording(2)
    config = purekd.DistillationConfig(kd_loss_type="forward_kl", temperature=1,
                                       on_policy={"max_new_tokens": 30})
    step = purekd.make_step(config, teacher, student, *_adaptors(teacher, student, False),
                            compile=False, sampler=sampler)
    with pytest.raises(ValueError, match=r"^on-policy: the longest prompt \(sample 1, 5 tokens\) "
                                         r"plus max_new_tokens=30 is 35 positions, past the "
                                         r"student's context of 32: truncate the prompts to at "
                                         r"most 2 tokens or lower max_new_tokens$"):
        step(prompt_batch())
    # a prompt longer than the context by itself: the same error, naming it
    long = {"prompts": torch.cat([torch.full((1, 40), PAD), torch.full((1, 40), 5)]),
            "prompt_attention_mask": torch.cat([torch.zeros(1, 40), torch.ones(1, 40)]).long()}
    long["prompt_attention_mask"][0, -3:] = 1
    long["prompts"][0, -3:] = 6
    with pytest.raises(ValueError, match=r"the longest prompt \(sample 1, 40 tokens\) plus "
                                         r"max_new_tokens=30 is 70 positions"):
        step(long)
    assert sampler.calls == 0  # refused before sampling
    # exactly at the context: accepted (2 + 30 = 32 positions)
    fits = {"prompts": torch.tensor([[5, 6]]), "prompt_attention_mask": torch.ones(1, 2).long()}
    step(fits)
    assert sampler.calls == 1


def test_a_sampler_past_max_new_tokens_is_refused(models):
    """The context was checked against max_new_tokens: a sampler returning more is an error."""
    teacher, student = models
    config = purekd.DistillationConfig(kd_loss_type="forward_kl", temperature=1,
                                       on_policy={"max_new_tokens": 2})
    step = purekd.make_step(config, teacher, student, *_adaptors(teacher, student, False),
                            compile=False, sampler=Recording(3, token=4))
    with pytest.raises(ValueError, match=r"^on-policy: the sampler returned a completion of 3 "
                                         r"tokens \(sample 0\), more than "
                                         r"OnPolicyConfig.max_new_tokens=2, which the models' "
                                         r"context was checked against"):
        step(prompt_batch())


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("kd", ["reverse_kl", "sampled_reverse_kl"])
def test_empty_completions_and_an_immediate_eos_on_every_row(models, kd, fused):
    """A sampler with no token at all ((B, 0) completions): loss 0, finite (zero) gradients, a
    counted warning. A sampler whose every completion is the stop token alone: one completion
    token per prompt (the stop token is learned), a finite loss and finite nonzero gradients,
    and no warning."""
    teacher, student = models
    config = purekd.DistillationConfig(kd_loss_type=kd, temperature=1,
                                       on_policy={"max_new_tokens": 3})
    adaptors = _adaptors(teacher, student, fused)
    empty = purekd.make_step(config, teacher, student, *adaptors, compile=False,
                             sampler=Recording(0))
    with pytest.warns(UserWarning, match=r"on-policy: the rollout has no completion token .* "
                                         r"\(1 such batch\(es\) so far\)"):
        out = empty(prompt_batch(), **_args(fused))
    assert out.loss.item() == 0.0 and out.tokens == 0
    assert empty.outputs.last_rollout.completion_lengths.tolist() == [0, 0, 0]
    out.loss.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() and not g.any() for g in grads)
    assert empty.outputs.empty_rollouts == 1
    student.zero_grad()

    eos = purekd.make_step(config, teacher, student, *adaptors, compile=False,
                           sampler=Recording(1, token=EOS))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = eos(prompt_batch(), **_args(fused))
    sampled = eos.outputs.last_rollout
    assert sampled.completion_lengths.tolist() == [1, 1, 1] and out.tokens == 3
    assert torch.equal(sampled.input_ids[torch.arange(3), sampled.prompt_lengths],
                       torch.full((3,), EOS))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads) and any(g.any() for g in grads)
    assert eos.outputs.empty_rollouts == 0


def test_a_teacher_read_from_a_cache_is_refused_at_construction(models, tmp_path):
    _, student = models
    config = purekd.DistillationConfig(kd_loss_type="forward_kl", temperature=1,
                                       on_policy={"max_new_tokens": 2})
    cached = lambda batch, outputs: dict(outputs)  # noqa: E731  (the cache's adaptor)
    with pytest.raises(ValueError, match=r"^DistillationConfig\(on_policy=\.\.\.\) with "
                                         r"model_T=None \(a teacher read from a top-k teacher "
                                         r"cache\): the teacher must score every newly sampled "
                                         r"sequence, which no cache holds"):
        purekd.make_step(config, None, student, cached, hf_adaptor(causal=True))
    dataset, cache = tiny_cache(tmp_path / "cache")
    for thing, name in ((cache, "TeacherCache"), (dataset, "CachedTeacherDataset")):
        with pytest.raises(ValueError, match=rf"^on-policy: the teacher is a {name}, not a "
                                             r"model: the teacher must score every newly "
                                             r"sampled sequence"):
            purekd.make_step(config, thing, student, cached, hf_adaptor(causal=True))


def test_models_of_different_vocabulary_sizes_are_refused_at_construction():
    small, big = tiny_llama(1, 8, seed=0), tiny_llama(1, 8, seed=1, vocab=30)
    adaptors = hf_adaptor(causal=True), hf_adaptor(causal=True)
    config = purekd.DistillationConfig(kd_loss_type="reverse_kl", temperature=1,
                                       on_policy={"max_new_tokens": 2})
    with pytest.raises(ValueError, match=r"^on-policy: the teacher's next-token distribution has "
                                         r"30 entries and the student's 24 \(their output "
                                         r"layers' rows\): .* use cross-tokenizer distillation "
                                         r"\(kd_loss_type 'uld' or 'gold'; "
                                         r"docs/cross-tokenizer.md\); .* set "
                                         r"DistillationConfig\(shared_vocab=True\)$"):
        purekd.make_step(config, big, small, *adaptors)
    # one tokenizer, padded output layers: the student samples ids the teacher has rows for
    shared = config.replace(shared_vocab=True)
    step = purekd.make_step(shared, big, small, *adaptors, compile=False)
    assert torch.isfinite(step(prompt_batch()).loss)
    for kd in ("sampled_reverse_kl", ["jsd", {"beta": 0.5}]):
        purekd.make_step(shared.replace(kd_loss_type=kd), big, small, *adaptors, compile=False)
    with pytest.raises(ValueError, match=r"^on-policy: the student samples from 30 entries but "
                                         r"the teacher's output layer has 24 rows "
                                         r"\(shared_vocab=True\): a sampled id >= 24 has no row"):
        purekd.make_step(shared, small, big, *adaptors)
    seq_kd = shared.replace(on_policy=shared.on_policy.replace(seq_kd=True))
    with pytest.raises(ValueError, match=r"^on-policy: the teacher samples from 30 entries but "
                                         r"the student's output layer has 24 rows"):
        purekd.make_step(seq_kd, big, small, *adaptors)


def test_construction_errors(models):
    teacher, student = models
    adaptors = _adaptors(teacher, student, False)
    config = purekd.DistillationConfig(kd_loss_type="reverse_kl", temperature=1,
                                       on_policy={"max_new_tokens": 2})
    with pytest.raises(ValueError, match=r"on_policy=\.\.\.\) with a list of teachers: "
                                         r"on-policy distillation scores the rollouts with one"):
        purekd.make_step(config, [teacher, teacher], student, adaptors[0], adaptors[1])
    with pytest.raises(ValueError, match=r"make_step\(sampler=\.\.\., tokenizers=\.\.\.\) are "
                                         r"for on-policy distillation"):
        purekd.make_step(config.replace(on_policy=None), teacher, student, *adaptors,
                         sampler=lambda *a, **k: None)
    models_stage = purekd.combinators.models_stage(
        purekd.combinators.single_teacher(teacher, adaptors[0]), student, adaptors[1])
    with pytest.raises(ValueError, match=r"OnPolicyConfig\(seq_kd=True\): the teacher samples, "
                                         r"so give OnPolicyStage\(teacher=model_T\)"):
        OnPolicyStage(purekd.OnPolicyConfig(seq_kd=True), models_stage)

    class Tokenizer:
        def __init__(self, size):
            self.size = size

        def __len__(self):
            return self.size

    with pytest.raises(ValueError, match=r"the teacher's tokenizer has 30 tokens and the "
                                         r"student's 24: .*cross-tokenizer distillation"):
        purekd.make_step(config, teacher, student, *adaptors,
                         tokenizers=(Tokenizer(30), Tokenizer(24)))


def test_sampled_reverse_kl_without_the_on_policy_stage_says_what_to_do(models):
    from purekd.terms import sampled_token_kd

    term = sampled_token_kd()
    adapted = purekd.stages.Adapted(logits=torch.zeros(1, 2, 24))
    with pytest.raises(ValueError, match=r"scores sampled tokens, but these outputs carry none: "
                                         r"it runs on rollouts"):
        term.check(adapted, adapted)
    with pytest.raises(ValueError, match=r"with a teacher top-k cache"):
        term.check(adapted, purekd.stages.Adapted(topk_ids=torch.zeros(1, 2, 3, dtype=torch.long),
                                                  topk_logprobs=torch.zeros(1, 2, 3)))


def test_a_compiled_sampled_token_loss_path_equals_the_eager_one(models):
    teacher, student = models
    config = purekd.DistillationConfig(kd_loss_type=["sampled_reverse_kl", {"gamma": 0.5}],
                                       temperature=1,
                                       on_policy={"max_new_tokens": 4})
    adaptors = _adaptors(teacher, student, True)
    eager = purekd.make_step(config, teacher, student, *adaptors, compile=False)
    compiled = purekd.make_step(config, teacher, student, *adaptors, compile=True)
    torch.testing.assert_close(compiled(prompt_batch(), **_args(True)).loss,
                               eager(prompt_batch(), **_args(True)).loss, rtol=1e-10, atol=1e-12)


def test_each_rank_samples_with_its_own_seed_but_takes_the_same_decision(models, monkeypatch):
    from purekd.combinators import _on_policy

    draws = {}
    for rank in (0, 1):
        monkeypatch.setattr(_on_policy, "_rank", lambda rank=rank: rank)
        step = _step(models, lmbda=0.5, seed=11)
        draws[rank] = [step.outputs.draw() for _ in range(6)]
    assert [d for d, _ in draws[0]] == [d for d, _ in draws[1]]
    assert all(s0 != s1 for (_, s0), (_, s1) in zip(draws[0], draws[1], strict=True))
    assert all(s1 == (s0 + _on_policy._RANK_STRIDE) % 2**62
               for (_, s0), (_, s1) in zip(draws[0], draws[1], strict=True))


def test_an_immediate_stop_token_is_the_one_completion_token_learned(models):
    """Every id a stop token: each completion is its first sampled token, which is kept (the
    student learns where to stop), so the loss is over exactly one token per prompt."""
    _, student = models
    step = _step(models, "reverse_kl", stop_token_ids=list(range(24)))
    out = step(prompt_batch())
    out.loss.backward()
    sampled = step.outputs.last_rollout
    assert sampled.completion_lengths.tolist() == [1, 1, 1]
    assert out.tokens == 3 and torch.isfinite(out.loss) and out.loss > 0
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
