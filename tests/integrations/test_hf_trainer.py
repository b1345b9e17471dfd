"""``purekd.integrations.hf_trainer.DistillationTrainer``: a run through it ends with the runner's
weights (gradient accumulation, variable lengths, a scheduled KD weight); ``token_level=True``
gives the gradient of one batch holding every token; ``evaluate()`` works without
``label_names``; ``save_model`` writes the student in ``save_pretrained`` form and resuming
restores student and projections."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import purekd  # noqa: E402
from purekd.integrations import DistillationTrainer  # noqa: E402
from purekd.integrations.hf_trainer import PROJECTIONS_FILE, count_label_tokens  # noqa: E402

VOCAB, LENGTHS = 48, [5, 9, 3, 12, 7, 4, 10, 6, 8, 11, 5, 9]
CONFIG = {"temperature": 2, "hard_label_weight": 0.5, "kd_loss_weight_scheduler": "linear_decay",
          "intermediate_matches": [{"layer_T": 2, "layer_S": 1, "feature": "hidden",
                                    "loss": "hidden_mse", "weight": 1,
                                    "proj": ["linear", 16, 24]}]}


def llama(hidden: int, layers: int) -> Any:
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden,
                                      intermediate_size=2 * hidden, num_hidden_layers=layers,
                                      num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=32, output_hidden_states=True)
    return transformers.LlamaForCausalLM(config)


def adaptor(batch: Any, outputs: Any) -> dict[str, Any]:
    """Position t predicts token t + 1: logits[:, :-1] face labels[:, 1:]."""
    kept = (batch["labels"][:, 1:] != -100).long()
    return {"logits": outputs.logits[:, :-1], "logits_mask": kept, "losses": outputs.loss,
            "hidden": [h[:, :-1] for h in outputs.hidden_states], "inputs_mask": kept}


def samples() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, VOCAB, (n,), generator=gen)} for n in LENGTHS]


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-padded to the longest; labels = input_ids with -100 on the padding."""
    width = max(len(item["input_ids"]) for item in items)
    ids = torch.zeros(len(items), width, dtype=torch.long)
    mask = torch.zeros(len(items), width, dtype=torch.long)
    for row, item in enumerate(items):
        ids[row, :len(item["input_ids"])] = item["input_ids"]
        mask[row, :len(item["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def models() -> tuple[Any, Any]:
    torch.manual_seed(0)
    return llama(24, 2).eval(), llama(16, 1)


def build(teacher: Any, student: Any, config: Any = CONFIG, **kwargs: Any) -> purekd.Step:
    torch.manual_seed(1)  # the projection
    step = purekd.make_step(config, teacher, student, adaptor, adaptor, compile=False, **kwargs)
    assert isinstance(step, purekd.Step)
    return step


def arguments(tmp_path: Path, steps: int, accumulation: int, batch_size: int = 2,
              **overrides: Any) -> Any:
    options = dict(output_dir=str(tmp_path), max_steps=steps,
                   per_device_train_batch_size=batch_size,
                   gradient_accumulation_steps=accumulation,
                   train_sampling_strategy="sequential", lr_scheduler_type="constant",
                   max_grad_norm=0.0, use_cpu=True, seed=0, save_strategy="no",
                   report_to="none", logging_strategy="no", disable_tqdm=True,
                   per_device_eval_batch_size=4)
    options.update(overrides)
    return transformers.TrainingArguments(**options)


def weights(step: purekd.Step) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in step.state_dict().items()}


def test_the_trainer_ends_with_the_runners_weights(tmp_path):
    steps, accumulation, lr = 3, 2, 0.5
    teacher, student0 = models()

    student = copy.deepcopy(student0)
    step = build(teacher, student)
    trainer = DistillationTrainer(step, arguments(tmp_path, steps, accumulation),
                                  train_dataset=samples(), data_collator=collate,
                                  optimizers=(torch.optim.SGD(step.parameters(), lr=lr), None))
    assert trainer.model_accepts_loss_kwargs is False  # after super().__init__
    trainer.train()
    ours = weights(step)
    assert not teacher.training and len(trainer.train_losses) == steps * accumulation

    student = copy.deepcopy(student0)
    distiller = purekd.GeneralDistiller(
        purekd.TrainingConfig(gradient_accumulation_steps=accumulation, device="cpu",
                              output_dir=str(tmp_path / "runner"), ckpt_steps=100),
        CONFIG, teacher, student, adaptor, adaptor, compile=False)
    torch.manual_seed(1)
    distiller.step = build(teacher, student)  # the same projection initialisation
    data = torch.utils.data.DataLoader(samples(), batch_size=2, collate_fn=collate)
    with distiller:
        distiller.train(torch.optim.SGD(distiller.step.parameters(), lr=lr), data,
                        num_steps=steps)
    theirs = weights(distiller.step)
    start = weights(build(teacher, copy.deepcopy(student0)))
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=0, msg=key)
    assert not torch.equal(ours["projections.0.weight"], start["projections.0.weight"])

    # evaluate() without label_names: the distillation loss on the eval set
    metrics = trainer.evaluate(eval_dataset=samples()[:4])
    expected = step(collate(samples()[:4]), progress=1.0).loss
    assert metrics["eval_loss"] == pytest.approx(float(expected.detach()), rel=1e-5)

    # save_model: the student as save_pretrained writes it, the projections beside it
    trainer.save_model(str(tmp_path / "saved"))
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "saved")
    for key, value in student_state(step).items():
        torch.testing.assert_close(loaded.state_dict()[key], value, msg=key)
    assert (tmp_path / "saved" / PROJECTIONS_FILE).is_file()

    # resuming loads both back
    fresh = build(teacher, copy.deepcopy(student0))
    resumed = DistillationTrainer(fresh, arguments(tmp_path, steps, accumulation),
                                  train_dataset=samples(), data_collator=collate)
    resumed._load_from_checkpoint(str(tmp_path / "saved"))
    for key, value in ours.items():
        torch.testing.assert_close(weights(fresh)[key], value, msg=key)

    # checkpoints written while training hold the same, and training resumes from one
    again = build(teacher, copy.deepcopy(student0))
    saving = DistillationTrainer(
        again, arguments(tmp_path / "ckpt", steps, accumulation, save_strategy="steps",
                         save_steps=2),
        train_dataset=samples(), data_collator=collate,
        optimizers=(torch.optim.SGD(again.parameters(), lr=lr), None))
    saving.train()
    checkpoint = tmp_path / "ckpt" / "checkpoint-2"
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / PROJECTIONS_FILE).is_file()
    later = build(teacher, copy.deepcopy(student0))
    DistillationTrainer(later, arguments(tmp_path / "ckpt", steps, accumulation),
                        train_dataset=samples(), data_collator=collate,
                        optimizers=(torch.optim.SGD(later.parameters(), lr=lr), None)
                        ).train(resume_from_checkpoint=str(checkpoint))
    for key, value in ours.items():
        torch.testing.assert_close(weights(later)[key], value, atol=1e-6, rtol=0, msg=key)


def student_state(step: purekd.Step) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in step.student.state_dict().items()}


def test_token_level_gradient_equals_one_batch_holding_every_token(tmp_path):
    """Accumulating 3 micro-batches with different token counts gives the gradient of the one
    batch holding all of them, where each token weighs the same (float64; the model's own
    cross-entropy runs in float32, as transformers upcasts the logits, hence 1e-7)."""
    torch.set_default_dtype(torch.float64)
    try:
        teacher, student0 = models()
        config = {"temperature": 2, "hard_label_weight": 0.5}
        lr, data = 1.0, samples()[:6]

        student = copy.deepcopy(student0)
        step = build(teacher, student, config)
        trainer = DistillationTrainer(step, arguments(tmp_path, 1, 3), token_level=True,
                                      train_dataset=data, data_collator=collate,
                                      optimizers=(torch.optim.SGD(step.parameters(), lr=lr),
                                                  None))
        assert trainer.model_accepts_loss_kwargs is True and trainer.loss_is_scaled_for_ga
        trainer.train()

        reference = copy.deepcopy(student0)
        one = build(teacher, reference, config)
        whole = collate(data)  # one batch: every token, each weighing the same
        one(whole).loss.backward()
        with torch.no_grad():
            for p in reference.parameters():
                p -= lr * p.grad
        for key, value in student_state(one).items():
            torch.testing.assert_close(student_state(step)[key], value, atol=1e-7, rtol=0,
                                       msg=key)
        # and it differs from the per-micro-batch mean (the lengths differ)
        plain = copy.deepcopy(student0)
        per_batch = build(teacher, plain, config)
        DistillationTrainer(per_batch, arguments(tmp_path, 1, 3), train_dataset=data,
                            data_collator=collate,
                            optimizers=(torch.optim.SGD(per_batch.parameters(), lr=lr), None)
                            ).train()
        differs = [not torch.allclose(student_state(per_batch)[k], v, atol=1e-4)
                   for k, v in student_state(one).items()]
        assert any(differs)
    finally:
        torch.set_default_dtype(torch.float32)


def test_count_label_tokens_and_bad_input():
    batch = collate(samples()[:2])
    assert int(count_label_tokens(batch)) == (LENGTHS[0] - 1) + (LENGTHS[1] - 1)
    assert int(count_label_tokens(batch, shift_labels=False)) == LENGTHS[0] + LENGTHS[1]
    with pytest.raises(ValueError, match="'labels'"):
        count_label_tokens({"input_ids": batch["input_ids"]})
    with pytest.raises(TypeError, match="expected a purekd Step"):
        DistillationTrainer(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
    teacher, student = models()
    with pytest.raises(TypeError, match="do not pass model="):
        DistillationTrainer(build(teacher, student), model=student)


def jsd_term(beta: float) -> Any:
    """GKD's token-level loss: the generalized JSD (TRL's convention) on the kept positions."""
    from purekd.terms import Term

    def gkd_jsd(adapted_S: Any, adapted_T: Any, ctx: Any) -> dict[str, torch.Tensor]:
        del ctx
        return {"gkd_jsd": purekd.losses.jsd(adapted_S.logits[0], adapted_T.logits[0],
                                             beta=beta, mask=adapted_S.logits_mask[0])}

    return Term(gkd_jsd)


def test_a_gkd_style_jsd_run_is_token_correct_and_learns(tmp_path):
    from purekd.combinators import Step, compiled, models_stage, objective, single_teacher

    torch.set_default_dtype(torch.float64)
    try:
        teacher, student0 = models()
        data, lr = samples()[:6], 2.0

        def gkd_step(student: Any) -> Step:
            return Step(outputs=models_stage(single_teacher(teacher, adaptor), student, adaptor),
                        loss=compiled(objective(jsd_term(0.5)), enabled=False))

        step = gkd_step(copy.deepcopy(student0))
        before = float(step(collate(data)).loss.detach())
        trainer = DistillationTrainer(step, arguments(tmp_path, 4, 3), token_level=True,
                                      train_dataset=data * 4, data_collator=collate,
                                      optimizers=(torch.optim.SGD(step.parameters(), lr=lr),
                                                  None))
        trainer.train()
        assert float(step(collate(data)).loss.detach()) < 0.9 * before
        assert list(trainer.last_terms) == ["gkd_jsd"]

        # one optimizer step of it is the gradient of one batch holding all the tokens
        one_step = gkd_step(copy.deepcopy(student0))
        DistillationTrainer(one_step, arguments(tmp_path, 1, 3), token_level=True,
                            train_dataset=data, data_collator=collate,
                            optimizers=(torch.optim.SGD(one_step.parameters(), lr=lr), None)
                            ).train()
        reference = gkd_step(copy.deepcopy(student0))
        reference(collate(data)).loss.backward()
        with torch.no_grad():
            for p in reference.parameters():
                p -= lr * p.grad
        for key, value in student_state(reference).items():
            torch.testing.assert_close(student_state(one_step)[key], value, atol=1e-10, rtol=0,
                                       msg=key)
    finally:
        torch.set_default_dtype(torch.float32)


class _Recording:
    """A purekd metric sink that keeps what it is given."""

    def __init__(self) -> None:
        self.records: list[tuple[int, dict[str, float]]] = []
        self.closed = False

    def log(self, step: int, metrics: Any) -> None:
        self.records.append((step, dict(metrics)))

    def close(self) -> None:
        self.closed = True


def test_the_terms_reach_the_logs_and_the_sinks(tmp_path):
    """logging_steps=1 with 2 micro-batches per step: each training log holds the mean of each
    term over the step's micro-batches, beside loss, learning_rate and grad_norm."""
    teacher, student = models()
    step = build(teacher, student)
    sink = _Recording()
    trainer = DistillationTrainer(step, arguments(tmp_path, 3, 2, logging_strategy="steps",
                                                  logging_steps=1),
                                  train_dataset=samples(), data_collator=collate,
                                  metric_sinks=[sink])
    seen: list[dict[str, float]] = []
    observe = trainer._observe
    trainer._observe = lambda loss, terms: (seen.append(terms), observe(loss, terms))[1]
    trainer.train()
    names = {"kd_loss", "hard_label_loss", "hidden_hidden_mse_1_2"}
    assert set(seen[0]) == names
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3
    for index, entry in enumerate(logs):
        for name in names:
            mean = (seen[2 * index][name] + seen[2 * index + 1][name]) / 2
            assert entry[name] == pytest.approx(mean, rel=1e-12)
        assert {"learning_rate", "grad_norm"} <= set(entry)
    assert [s for s, _ in sink.records] == [1, 2, 3, 3]  # the last: the train() summary
    for (_, record), entry in zip(sink.records, logs, strict=False):
        assert {k: record[k] for k in names} == {k: entry[k] for k in names}
    assert sink.closed


def _nan_row(module: Any, args: Any, kwargs: Any, output: Any) -> Any:
    output.logits[0, 1, :] = float("nan")  # one position of the teacher's logits
    return output


def _nan_gradient(module: Any, args: Any, kwargs: Any, output: Any) -> Any:
    output.logits = output.logits + torch.sqrt(output.logits.sum() * 0)  # + 0, gradient NaN
    return output


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_a_non_finite_loss_or_gradient_stops_training(where: str, tmp_path) -> None:
    """A NaN teacher row (a non-finite loss), or a student whose output's gradient is NaN
    while its value is finite: training stops with the runner's NonFiniteLossError before the
    optimizer step, the student as it was, instead of ending with NaN weights."""
    teacher, student = models()
    step = build(teacher, student, {**CONFIG, "intermediate_matches": []})
    if where == "loss":
        teacher.register_forward_hook(_nan_row, with_kwargs=True)
    else:
        student.register_forward_hook(_nan_gradient, with_kwargs=True)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = DistillationTrainer(step, arguments(tmp_path, 3, 1),
                                  train_dataset=samples(), data_collator=collate,
                                  optimizers=(torch.optim.SGD(step.parameters(), lr=0.5), None))
    message = (r"the loss is not finite at global step 1 \(term 'kd_loss'" if where == "loss"
               else r"the gradient is not finite at global step 1 \(parameter 'student\.")
    with pytest.raises(purekd.runner.NonFiniteLossError, match=message):
        trainer.train()
    for key, value in student.state_dict().items():
        assert torch.equal(value, before[key]), key
