"""On-policy distillation through the distillers: trains on prompts (every parameter moves, the
loss is finite, the teacher stays fixed); the generator state is saved and resumed with the run
state; a teacher that cannot score new sequences raises at construction."""

from __future__ import annotations

import pytest
import torch

import purekd
from purekd.integrations import hf_adaptor
from tests._on_policy import prompt_batch, tiny_llama

pytest.importorskip("transformers")


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


class _Stop(Exception):
    pass


def _run(out, *, resume: bool, stop_at: int | None = None):
    """GeneralDistiller, lmbda=0.5 over 6 steps, Adam, checkpoints (with the run state) every 2
    steps. The resumed run starts from other weights and another global seed: its weights, its
    optimizer and its rollouts can only come from the state file."""
    teacher = tiny_llama(2, 16, seed=0).eval()
    student = tiny_llama(1, 8, seed=5 if resume else 1)
    torch.manual_seed(99 if resume else 0)
    train = purekd.TrainingConfig(device="cpu", output_dir=str(out), ckpt_steps=2)
    config = _config(lmbda=0.5, seed=4).replace(kd_loss_type="reverse_kl")
    distiller = purekd.GeneralDistiller(train, config, teacher, student, hf_adaptor(causal=True),
                                        hf_adaptor(causal=True), compile=False)
    from tests._on_policy import full_batch

    def callback(model, step):
        if step == stop_at:
            raise _Stop(step)

    with distiller:
        distiller.train(torch.optim.Adam(student.parameters(), lr=1e-2), [full_batch()] * 6,
                        num_steps=6, callback=callback, save_state=True,
                        resume_from=out if resume else None)
    return student


def test_an_interrupted_on_policy_run_resumes_to_bit_identical_weights(tmp_path):
    straight = _run(tmp_path / "straight", resume=False)
    with pytest.raises(_Stop):
        _run(tmp_path / "cut", resume=False, stop_at=4)
    resumed = _run(tmp_path / "cut", resume=True)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
