"""On-policy distillation through the distillers: trains on prompts (the student moves, the
teacher stays fixed); the generator state is in the step's state; a SIGKILLed run resumes in a
fresh process to bit-identical weights; a teacher that cannot score new sequences raises at
construction."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import purekd
from purekd.integrations import hf_adaptor
from tests._on_policy import EOS, Recording, prompt_batch, tiny_cache, tiny_llama

pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]


def _config(**on_policy):
    return purekd.DistillationConfig(
        kd_loss_type="reverse_kl", temperature=1,
        on_policy=purekd.OnPolicyConfig(**{"max_new_tokens": 4, "seed": 1, **on_policy}))


@pytest.mark.parametrize("distiller_class", [purekd.BasicDistiller, purekd.GeneralDistiller])
def test_distillers_train_on_their_own_samples(tmp_path, distiller_class):
    teacher, student = tiny_llama(2, 16, seed=0).eval(), tiny_llama(1, 8, seed=1)
    train = purekd.TrainingConfig(device="cpu", output_dir=str(tmp_path))
    distiller = distiller_class(train, _config(), teacher, student, hf_adaptor(causal=True),
                                hf_adaptor(causal=True), compile=False)
    before_S = [p.clone() for p in student.parameters()]
    before_T = [p.clone() for p in teacher.parameters()]
    stage = distiller.step.outputs  # train() wraps it in its output checks
    seen = []
    with distiller:
        distiller.train(torch.optim.SGD(student.parameters(), lr=0.1), [prompt_batch()] * 3,
                        num_steps=3,
                        callback=lambda model, step: seen.append(step))
        rollouts = stage.last_rollout
    assert seen == [3] and rollouts is not None and int(rollouts.completion_lengths.sum()) > 0
    assert all(torch.isfinite(p).all() for p in student.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before_S, student.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(before_T, teacher.parameters(), strict=True))
    assert student.training and not teacher.training

def test_the_generator_state_travels_with_the_step_state(tmp_path):
    teacher, student = tiny_llama(2, 16, seed=0).eval(), tiny_llama(1, 8, seed=1)
    train = purekd.TrainingConfig(device="cpu", output_dir=str(tmp_path))
    distiller = purekd.GeneralDistiller(train, _config(lmbda=0.5), teacher, student,
                                        hf_adaptor(causal=True), hf_adaptor(causal=True),
                                        compile=False)
    generator = distiller.step.outputs.generator
    state = distiller.step.state_dict()["outputs_state._extra_state"]
    assert torch.equal(state, generator.get_state())
    torch.rand((), generator=generator)
    distiller.step.load_state_dict({**distiller.step.state_dict(),
                                    "outputs_state._extra_state": state})
    assert torch.equal(generator.get_state(), state)


def test_a_teacher_that_runs_no_forward_cannot_score_rollouts(tmp_path):
    teacher, student = tiny_llama(1, 8, seed=0), tiny_llama(1, 8, seed=1)
    train = purekd.TrainingConfig(device="cpu", output_dir=str(tmp_path),
                                  fsdp=purekd.FSDPConfig(teacher="none"))
    for cls in (purekd.BasicDistiller, purekd.GeneralDistiller):
        with pytest.raises(ValueError, match=r"DistillationConfig\(on_policy=\.\.\.\) with "
                                             r"TrainingConfig\(fsdp=FSDPConfig\(teacher='none'\)\)"
                                             r": the teacher must score every newly sampled "
                                             r"sequence"):
            cls(train, _config(), teacher, student, hf_adaptor(causal=True),
                hf_adaptor(causal=True), compile=False)



class _Tokenizer:
    def __init__(self, size, eos=EOS):
        self.size, self.eos_token_id = size, eos
        self.bos_token_id = self.pad_token_id = self.unk_token_id = None

    def __len__(self):
        return self.size

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [5, 6, 7]}


def test_tokenizers_and_vocabularies_are_checked_when_the_distiller_is_built(tmp_path):
    teacher, student = tiny_llama(1, 8, seed=0), tiny_llama(1, 8, seed=1)
    train = purekd.TrainingConfig(device="cpu", output_dir=str(tmp_path))
    adaptors = hf_adaptor(causal=True), hf_adaptor(causal=True)
    fix = r".*use cross-tokenizer distillation \(kd_loss_type 'uld' or 'gold'\)"
    for cls in (purekd.BasicDistiller, purekd.GeneralDistiller):
        cls(train, _config(), teacher, student, *adaptors, compile=False,
            tokenizers=(_Tokenizer(24), _Tokenizer(24)))
        with pytest.raises(ValueError, match=r"^on-policy: the tokenizers' eos_token_id differ "
                                             r"\(teacher 3, student 2\)" + fix):
            cls(train, _config(), teacher, student, *adaptors, compile=False,
                tokenizers=(_Tokenizer(24, eos=3), _Tokenizer(24)))
        with pytest.raises(ValueError, match=r"^on-policy: the teacher's next-token distribution "
                                             r"has 30 entries and the student's 24"):
            cls(train, _config(), tiny_llama(1, 8, seed=0, vocab=30), student, *adaptors,
                compile=False)
    with pytest.raises(ValueError, match=r"the teacher's tokenizer has 30 tokens and the "
                                         r"student's 24" + fix):
        purekd.MultiTaskDistiller(train, _config(), {"a": teacher}, student,
                                  {"a": adaptors[0]}, {"a": adaptors[1]}, compile=False,
                                  tokenizers=(_Tokenizer(30), _Tokenizer(24)))
    # the TextBrewer signature still works, positionally
    purekd.GeneralDistiller(train, _config(), teacher, student, *adaptors, None)


def test_a_cached_teacher_is_refused_at_construction(tmp_path):
    student = tiny_llama(1, 8, seed=1)
    train = purekd.TrainingConfig(device="cpu", output_dir=str(tmp_path))
    cached = lambda batch, outputs: dict(outputs)  # noqa: E731
    with pytest.raises(ValueError, match=r"with model_T=None \(a teacher read from a top-k "
                                         r"teacher cache\)"):
        purekd.GeneralDistiller(train, _config(), None, student, cached, hf_adaptor(causal=True),
                                compile=False)


def test_a_top_k_cache_loader_is_refused_when_train_starts(tmp_path):
    """Before any sampling and any weight change: a loader over a CachedTeacherDataset, one
    batched by CachedCollate, and a list of batches carrying a 'teacher_cache'."""
    from torch.utils.data import DataLoader

    from purekd.teacher_cache import CachedCollate
    from tests.teacher_cache._helpers import pad

    dataset, _ = tiny_cache(tmp_path / "cache")
    teacher, student = tiny_llama(1, 8, seed=0), tiny_llama(1, 8, seed=1)
    sampler = Recording(2, token=4)
    distiller = purekd.GeneralDistiller(
        purekd.TrainingConfig(device="cpu", output_dir=str(tmp_path / "out")), _config(),
        teacher, student, hf_adaptor(causal=True), hf_adaptor(causal=True), compile=False,
        sampler=sampler)
    before = [p.clone() for p in student.parameters()]
    loaders = [
        (DataLoader(dataset, batch_size=2, collate_fn=CachedCollate(pad)),
         "its dataset is a CachedTeacherDataset"),
        (DataLoader(list(range(4)), batch_size=2, collate_fn=CachedCollate(pad)),
         "its collate_fn is a CachedCollate"),
        ([{**prompt_batch(), "teacher_cache": {}}], "its first batch carries a 'teacher_cache'"),
    ]
    for loader, found in loaders:
        with distiller, pytest.raises(ValueError, match=rf"^on-policy: the dataloader reads a "
                                                        rf"top-k teacher cache \({found}\), "
                                                        r"but the teacher must score every "
                                                        r"newly sampled sequence"):
            distiller.train(torch.optim.SGD(student.parameters(), lr=0.1), loader, num_steps=1)
    with distiller, pytest.raises(ValueError, match=r"the dataloader of task 'a' reads a top-k "
                                                    r"teacher cache"):
        task = purekd.MultiTaskDistiller(
            purekd.TrainingConfig(device="cpu", output_dir=str(tmp_path / "task")), _config(),
            {"a": teacher}, student, {"a": hf_adaptor(causal=True)},
            {"a": hf_adaptor(causal=True)}, compile=False, sampler=sampler)
        task.train(torch.optim.SGD(student.parameters(), lr=0.1), {"a": loaders[0][0]},
                   num_steps=1)
    assert sampler.calls == 0
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))


def test_the_runner_refuses_an_on_policy_step_without_a_teacher(tmp_path):
    teacher, student = tiny_llama(1, 8, seed=0), tiny_llama(1, 8, seed=1)
    step = purekd.make_step(_config(), teacher, student, hf_adaptor(causal=True),
                            hf_adaptor(causal=True), compile=False)
    train = purekd.TrainingConfig(device="cpu", output_dir=str(tmp_path),
                                  fsdp=purekd.FSDPConfig(teacher="none"))
    with pytest.raises(ValueError, match=r"^an on-policy step with TrainingConfig\(fsdp="
                                         r"FSDPConfig\(teacher='none'\)\): the teacher must "
                                         r"score every newly sampled sequence"):
        purekd.runner.Runner(step, train, student=student)


def test_an_empty_rollout_mid_run_is_a_counted_warning_and_changes_nothing(tmp_path):
    """Step 1 samples one token per prompt, step 2 none: a counted warning, finite weights, and
    (plain SGD) step 2 leaves the weights as step 1 left them."""
    teacher, student = tiny_llama(2, 16, seed=0).eval(), tiny_llama(1, 8, seed=1)
    samplers = iter([Recording(1, token=4), Recording(0)])

    def sampler(model, prompt_ids, prompt_mask, *, seed):
        return next(samplers)(model, prompt_ids, prompt_mask, seed=seed)

    train = purekd.TrainingConfig(device="cpu", output_dir=str(tmp_path), ckpt_steps=1)
    distiller = purekd.GeneralDistiller(train, _config(), teacher, student,
                                        hf_adaptor(causal=True), hf_adaptor(causal=True),
                                        compile=False, sampler=sampler)
    stage = distiller.step.outputs
    weights = []
    with distiller, pytest.warns(UserWarning, match=r"on-policy: the rollout has no completion "
                                                    r"token .* \(1 such batch\(es\) so far\)"):
        distiller.train(torch.optim.SGD(student.parameters(), lr=0.5), [prompt_batch()] * 2,
                        num_steps=2, callback=lambda model, step: weights.append(
                            [p.detach().clone() for p in model.parameters()]))
    assert stage.empty_rollouts == 1 and len(weights) == 2
    assert all(torch.isfinite(p).all() for p in weights[1])
    assert all(torch.equal(a, b) for a, b in zip(weights[0], weights[1], strict=True))


SCRIPT = textwrap.dedent('''
    import os, random, signal, sys
    import numpy as np
    import torch
    import purekd
    from purekd.integrations import hf_adaptor
    from tests._on_policy import full_batch, tiny_llama

    # argv: output dir, result file, "resume" or "fresh", the step to SIGKILL at (0: never)
    out, result, start, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    resume = start == "resume"
    torch.set_num_threads(1)
    seed = 99 if resume else 7  # other seeds when resuming: the state restores the generators
    torch.manual_seed(seed); random.seed(seed); np.random.seed(seed)
    teacher = tiny_llama(2, 16, seed=0).eval()
    student = tiny_llama(1, 8, seed=5 if resume else 1, dropout=0.2)  # resumed: other weights
    train = purekd.TrainingConfig(device="cpu", output_dir=out, ckpt_steps=2)
    config = purekd.DistillationConfig(
        kd_loss_type="reverse_kl", temperature=1,
        on_policy=purekd.OnPolicyConfig(lmbda=0.5, max_new_tokens=4, seed=4, temperature=0.9))
    distiller = purekd.GeneralDistiller(train, config, teacher, student, hf_adaptor(causal=True),
                                        hf_adaptor(causal=True), compile=False)

    def callback(model, step):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    with distiller:
        distiller.train(torch.optim.Adam(student.parameters(), lr=1e-2), [full_batch()] * 6,
                        num_steps=6, callback=callback, save_state=True,
                        resume_from=out if resume else None)
    torch.save(student.state_dict(), result)
''')


def _launch(script, out, result, start, kill_at):
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(script), str(out), str(result), start,
                           str(kill_at)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_a_sigkilled_on_policy_run_resumes_to_bit_identical_weights(tmp_path):
    """lmbda=0.5 (on- and off-policy batches), sampling at 0.9 with dropout in the student:
    killed at step 4 (its state is never written), resumed in a fresh process with other
    weights and other global seeds from the state of step 2, the run ends with the weights of
    the uninterrupted run: the rollouts after the resume are the same."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    full = _launch(script, tmp_path / "full", tmp_path / "full.pt", "fresh", 0)
    assert full.returncode == 0, full.stderr[-3000:]
    out, result = tmp_path / "out", tmp_path / "resumed.pt"
    killed = _launch(script, out, result, "fresh", 4)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert sorted(p.name for p in out.glob("gs*.state.pt")) == ["gs2.state.pt"]
    done = _launch(script, out, result, "resume", 0)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = torch.load(tmp_path / "full.pt", weights_only=True)
    got = torch.load(result, weights_only=True)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
