"""The Hugging Face Trainer integration with an on-policy step: the Trainer's loop trains the
student on its own samples (the prompts survive ``remove_unused_columns``), the teacher is
untouched, and every micro-batch's loss is finite; ``token_level=True`` normalises by the
sampled tokens of the whole optimizer step (accumulation 2 equals one batch of double size);
tokenizers, vocabularies and a top-k teacher cache are checked at construction."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import purekd  # noqa: E402
from purekd.integrations import DistillationTrainer, hf_adaptor  # noqa: E402
from purekd.stages import HFGenerateSampler  # noqa: E402
from tests._on_policy import EOS, PAD, tiny_cache, tiny_llama  # noqa: E402


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


def greedy_run(tmp_path, batch, accumulation, token_level, **config):
    """One optimizer step (SGD, constant learning rate) over four prompts in order, greedy
    sampling: the weights after it, and the trainer."""
    teacher, student = tiny_llama(2, 16, seed=0).eval(), tiny_llama(1, 8, seed=1)
    on_policy = purekd.OnPolicyConfig(max_new_tokens=6, seed=2, top_k=1, stop_token_ids=[EOS])
    config = purekd.DistillationConfig(kd_loss_type="reverse_kl", temperature=1, **config,
                                       on_policy=on_policy)
    greedy = HFGenerateSampler(max_new_tokens=6, top_k=1, stop_token_ids=[EOS])
    lengths = []

    def sampler(model, prompt_ids, prompt_mask, *, seed):
        sample = greedy(model, prompt_ids, prompt_mask, seed=seed)
        lengths.append(sample.completion_mask.sum(-1).tolist())
        return sample

    step = purekd.make_step(config, teacher, student, hf_adaptor(causal=True),
                            hf_adaptor(causal=True), compile=False, sampler=sampler)
    gen = torch.Generator().manual_seed(0)
    data = [{"prompt": torch.randint(3, 24, (int(n),), generator=gen)} for n in (2, 4, 3, 5)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, learning_rate=0.5, optim="sgd",
        lr_scheduler_type="constant", remove_unused_columns=False, report_to=[], use_cpu=True,
        save_strategy="no", logging_steps=1, disable_tqdm=True)
    trainer = DistillationTrainer(step, args, token_level=token_level, train_dataset=data,
                                  data_collator=collate)
    # in order (under DDP, accelerate deals batch i of the loader to process i % world)
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(data)
    trainer.train()
    return [p.detach().clone() for p in student.parameters()], trainer, lengths


def test_token_level_with_accumulation_equals_one_batch_of_double_size(tmp_path):
    """Two micro-batches of two prompts with token_level=True: the weights after the step
    equal those of one batch of the four prompts (greedy sampling: the same completions), to
    1e-10; the per-micro-batch mean (token_level=False) does not. The logged loss is the
    step's mean over its sampled tokens."""
    one, single, _ = greedy_run(tmp_path / "one", 4, 1, True)
    two, accumulated, lengths = greedy_run(tmp_path / "two", 2, 2, True)
    means, _, _ = greedy_run(tmp_path / "means", 2, 2, False)
    # the micro-batches hold different numbers of sampled tokens: the test can tell
    assert len(lengths) == 2 and sum(lengths[0]) != sum(lengths[1])
    for got, want in zip(two, one, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    assert max(float((a - b).abs().max()) for a, b in zip(means, one, strict=True)) > 1e-5
    # the Trainer sums the logged loss in a float32 tensor: float32's precision
    logged = [log["loss"] for log in accumulated.state.log_history if "loss" in log]
    assert logged == pytest.approx([single.train_losses[0]], rel=1e-6)
    counts = [sum(n) for n in lengths]
    micro = accumulated.train_losses
    token_mean = (micro[0] * counts[0] + micro[1] * counts[1]) / sum(counts)
    assert token_mean == pytest.approx(single.train_losses[0], rel=1e-12)
    assert logged[0] == pytest.approx(token_mean, rel=1e-6)
    assert abs(token_mean - (micro[0] + micro[1]) / 2) > 1e-3 * token_mean


@pytest.mark.skipif(not (torch.distributed.is_available()
                         and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with the gloo backend is unavailable")
def test_token_level_over_two_ddp_processes_equals_one_batch(tmp_path):
    """Two processes (gloo DDP), two prompts each, token_level=True: the weights equal one
    process on the four prompts (to 1e-10), although the processes sampled different numbers
    of tokens; the logged loss is the step's mean over every sampled token."""
    from pathlib import Path

    from tests._torchrun import torchrun

    from . import _hf_trainer_on_policy_ddp_worker as worker

    torchrun(Path(worker.__file__), str(tmp_path), timeout=400)
    one, single, _ = greedy_run(tmp_path / "one", 4, 1, True)
    got = torch.load(tmp_path / "weights.pt", weights_only=True)
    lengths = torch.load(tmp_path / "lengths.pt", weights_only=True)
    tokens = [sum(rank[0]) for rank in lengths]  # each rank's one micro-batch
    assert len(tokens) == 2 and tokens[0] != tokens[1]
    for a, b in zip(got, one, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    logged = torch.load(tmp_path / "loss.pt", weights_only=True)
    assert logged == pytest.approx([single.train_losses[0]], rel=1e-6)


def test_token_level_refusals_and_construction_checks(tmp_path, monkeypatch):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match=r"^DistillationTrainer\(token_level=True, "
                                         r"count_tokens=\.\.\.\) with an on-policy step: the "
                                         r"tokens are the sampled completion tokens"):
        DistillationTrainer(_on_policy_step(), args, token_level=True,
                            count_tokens=lambda batch: 1)
    teacher, student = tiny_llama(2, 16, seed=0).float(), tiny_llama(1, 8, seed=1).float()
    per_batch = purekd.DistillationConfig(kd_loss_type="reverse_kl", temperature=1,
                                          loss_normalisation="batch",
                                          on_policy={"max_new_tokens": 4})
    step = purekd.make_step(per_batch, teacher, student, hf_adaptor(causal=True),
                            hf_adaptor(causal=True), compile=False)
    with pytest.raises(ValueError, match=r"^DistillationTrainer\(token_level=True\) with an "
                                         r"on-policy step whose loss is a per-batch mean"):
        DistillationTrainer(step, args, token_level=True)

    class Tokenizer:
        def __init__(self, size, eos=EOS):
            self.size, self.eos_token_id = size, eos
            self.bos_token_id = self.pad_token_id = self.unk_token_id = None

        def __len__(self):
            return self.size

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [5, 6]}

        def save_pretrained(self, folder):
            pass

    DistillationTrainer(_on_policy_step(), args, tokenizers=(Tokenizer(24), Tokenizer(24)))
    with pytest.raises(ValueError, match=r"^on-policy: the teacher's tokenizer has 30 tokens "
                                         r"and the student's 24: .*use cross-tokenizer "
                                         r"distillation"):
        DistillationTrainer(_on_policy_step(), args, tokenizers=(Tokenizer(30), Tokenizer(24)))
    with pytest.raises(ValueError, match=r"^on-policy: processing_class has 30 tokens but the "
                                         r"student's next-token distribution has 24 entries"):
        DistillationTrainer(_on_policy_step(), args, processing_class=Tokenizer(30))
    plain = purekd.make_step(purekd.DistillationConfig(kd_loss_type="reverse_kl", temperature=1),
                             teacher, student, hf_adaptor(causal=True), hf_adaptor(causal=True),
                             compile=False)
    with pytest.raises(ValueError, match=r"^DistillationTrainer\(tokenizers=\.\.\.\) is for "
                                         r"an on-policy step"):
        DistillationTrainer(plain, args, tokenizers=(Tokenizer(24), Tokenizer(24)))
    accumulating = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[],
                                                  use_cpu=True, gradient_accumulation_steps=2)
    trainer = DistillationTrainer(_on_policy_step(), accumulating, token_level=True)
    batch = collate([{"prompt": torch.tensor([3, 4])}, {"prompt": torch.tensor([5])}])
    with pytest.raises(RuntimeError, match=r"this micro-batch did not come through "
                                           r"Trainer.get_batch_samples"):
        trainer.compute_loss(trainer.model.train(), batch)



def test_a_top_k_teacher_cache_is_refused_at_construction(tmp_path):
    from purekd.teacher_cache import CachedCollate
    from tests.teacher_cache._helpers import pad

    dataset, _ = tiny_cache(tmp_path / "cache")
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[],
                                          use_cpu=True)
    for name in ("train_dataset", "eval_dataset"):
        with pytest.raises(ValueError, match=rf"^on-policy: {name} is a CachedTeacherDataset \(a "
                                             r"top-k teacher cache\), but the teacher must "
                                             r"score every newly sampled sequence"):
            DistillationTrainer(_on_policy_step(), args, **{name: dataset})
    with pytest.raises(ValueError, match=r"^on-policy: data_collator is a CachedCollate"):
        DistillationTrainer(_on_policy_step(), args, data_collator=CachedCollate(pad))


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
