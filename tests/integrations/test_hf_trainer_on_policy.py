"""The Hugging Face Trainer integration with an on-policy step: the Trainer's loop trains the
student on its own samples (the prompts survive ``remove_unused_columns``), the teacher is
untouched, and every micro-batch's loss is finite; ``token_level=True`` is refused."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import purekd  # noqa: E402
from purekd.integrations import DistillationTrainer, hf_adaptor  # noqa: E402
from tests._on_policy import PAD, tiny_llama  # noqa: E402


def collate(items):
    """Left-padded prompts, as the on-policy stage needs them."""
    width = max(len(item["prompt"]) for item in items)
    prompts = torch.full((len(items), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(items), width, dtype=torch.long)
    for row, item in enumerate(items):
        prompts[row, width - len(item["prompt"]):] = item["prompt"]
        mask[row, width - len(item["prompt"]):] = 1
    return {"prompts": prompts, "prompt_attention_mask": mask}


def _on_policy_step():
    teacher, student = tiny_llama(2, 16, seed=0).float().eval(), tiny_llama(1, 8, seed=1).float()
    config = purekd.DistillationConfig(kd_loss_type="reverse_kl", temperature=1,
                                       on_policy={"max_new_tokens": 4, "seed": 2})
    return purekd.make_step(config, teacher, student, hf_adaptor(causal=True),
                            hf_adaptor(causal=True), compile=False)


@pytest.mark.parametrize("remove_unused_columns", [True, False])
def test_the_prompts_reach_the_step_whatever_remove_unused_columns_says(tmp_path,
                                                                       remove_unused_columns):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2,
        remove_unused_columns=remove_unused_columns, report_to=[], use_cpu=True,
        save_strategy="no", disable_tqdm=True)
    # items named as the step reads them: the Trainer drops every other column first
    data = [{"prompts": torch.tensor([3, 4, 5])}, {"prompts": torch.tensor([6, 7])}]
    trainer = DistillationTrainer(
        _on_policy_step(), args, train_dataset=data,
        data_collator=lambda items: collate([{"prompt": i["prompts"]} for i in items]))
    trainer.train()
    assert len(trainer.train_losses) == 1


def test_token_level_is_refused_with_an_on_policy_step(tmp_path):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match=r"token_level=True\) with an on-policy step: the tokens "
                                         r"would be counted from the batch's labels before"):
        DistillationTrainer(_on_policy_step(), args, token_level=True)


def test_the_trainer_trains_an_on_policy_step(tmp_path):
    teacher, student = tiny_llama(2, 16, seed=0).float().eval(), tiny_llama(1, 8, seed=1).float()
    config = purekd.DistillationConfig(kd_loss_type="reverse_kl", temperature=1,
                                       on_policy={"max_new_tokens": 4, "seed": 2})
    step = purekd.make_step(config, teacher, student, hf_adaptor(causal=True),
                            hf_adaptor(causal=True), compile=False)
    gen = torch.Generator().manual_seed(0)
    data = [{"prompt": torch.randint(3, 24, (int(n),), generator=gen)} for n in (2, 4, 3, 5, 1, 3)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=3, learning_rate=1e-2,
        remove_unused_columns=False, report_to=[], use_cpu=True, save_strategy="no",
        logging_steps=1, disable_tqdm=True)
    before_S = [p.clone() for p in student.parameters()]
    before_T = [p.clone() for p in teacher.parameters()]
    trainer = DistillationTrainer(step, args, train_dataset=data, data_collator=collate)
    trainer.train()
    assert len(trainer.train_losses) == 2
    assert all(torch.isfinite(torch.tensor(loss)) for loss in trainer.train_losses)
    assert step.outputs.last_rollout is not None
    assert any(not torch.equal(a, b) for a, b in zip(before_S, student.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(before_T, teacher.parameters(), strict=True))
