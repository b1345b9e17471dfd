"""The sampler and the rollout stage: ``generate`` under a fixed seed gives the same rollout and
leaves the global random state as it was; the layout (left-padded prompts → right-padded
sequences, completion mask with the stop token); the sampler's log-probabilities equal the
model's own on the laid-out sequence (positions line up); modes restored; bad prompts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from purekd.stages import (
    HFGenerateSampler,
    Sample,
    check_context,
    check_prompts,
    check_same_tokenizer,
    completion_mask,
    rollout,
    sampling_mode,
)
from tests._on_policy import EOS, PAD, prompt_batch, tiny_gpt2, tiny_llama

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def student():
    return tiny_llama(1, 8, seed=1)


def _sampler(**options):
    return HFGenerateSampler(**{"max_new_tokens": 6, **options})


def _roll(model, seed, **options):
    batch = prompt_batch()
    return rollout(_sampler(**options), model, batch["prompts"], batch["prompt_attention_mask"],
                   seed=seed, pad_token_id=PAD)


def test_a_fixed_seed_gives_identical_rollouts_and_leaves_the_global_rng_alone(student):
    before = torch.get_rng_state()
    first, second = _roll(student, 11), _roll(student, 11)
    assert torch.equal(torch.get_rng_state(), before)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    others = [_roll(student, seed).input_ids for seed in (12, 13, 14)]
    assert any(not torch.equal(o, first.input_ids) for o in others if o.shape == first.input_ids.shape
               ) or any(o.shape != first.input_ids.shape for o in others)


def test_layout_right_padded_prompt_then_completion(student):
    result = _roll(student, 3)
    batch = prompt_batch()
    for b in range(3):
        p = int(batch["prompt_attention_mask"][b].sum())
        c = int(result.completion_lengths[b])
        assert int(result.prompt_lengths[b]) == p
        real = batch["prompts"][b][batch["prompt_attention_mask"][b] != 0]
        assert torch.equal(result.input_ids[b, :p], real)
        assert result.attention_mask[b].tolist() == [1] * (p + c) + [0] * (
            result.input_ids.size(1) - p - c)
        assert result.completion_mask[b].tolist() == [0] * p + [1] * c + [0] * (
            result.input_ids.size(1) - p - c)
        assert (result.input_ids[b, p + c:] == PAD).all()
        completion = result.input_ids[b, p:p + c]
        assert c == 6 or completion[-1] == EOS  # ends at max_new_tokens or with the stop token
        assert (completion[:-1] != EOS).all()
    assert result.input_ids.size(1) == int((result.prompt_lengths
                                            + result.completion_lengths).max())


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.7, 0), (1.3, 5)])
def test_sampler_logprobs_equal_the_models_own_on_the_laid_out_sequence(student, temperature,
                                                                        top_k):
    """log q(x_t) from generate's processed scores == log_softmax(logits / T) of the model run on
    the right-padded sequence (so the layout keeps each token's position), renormalised over the
    top-k when top_k is set."""
    result = _roll(student, 5, temperature=temperature, top_k=top_k)
    with torch.no_grad():
        logits = student(input_ids=result.input_ids,
                         attention_mask=result.attention_mask).logits / temperature
    if top_k:
        kth = logits.topk(top_k, -1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    own = logits.log_softmax(-1)[:, :-1].gather(-1, result.input_ids[:, 1:, None]).squeeze(-1)
    keep = result.completion_mask[:, 1:] != 0
    assert keep.any()
    # generate's scores are float32 (it casts the logits), the model here float64
    torch.testing.assert_close(result.sampler_logprobs[:, 1:][keep].double(), own[keep],
                               rtol=1e-5, atol=1e-6)
    assert (result.sampler_logprobs[result.completion_mask == 0] == 0).all()


def test_gpt2_absolute_positions_line_up_too():
    model = tiny_gpt2(seed=4).eval()  # GPT-2 has dropout: score without it, as it sampled
    result = _roll(model, 8)
    with torch.no_grad():
        logits = model(input_ids=result.input_ids, attention_mask=result.attention_mask).logits
    own = logits.log_softmax(-1)[:, :-1].gather(-1, result.input_ids[:, 1:, None]).squeeze(-1)
    keep = result.completion_mask[:, 1:] != 0
    # generate's scores are float32 (it casts the logits), the model here float64
    torch.testing.assert_close(result.sampler_logprobs[:, 1:][keep].double(), own[keep],
                               rtol=1e-5, atol=1e-6)


def test_completion_mask_keeps_the_first_stop_token_and_nothing_after():
    completions = torch.tensor([[5, 2, 7, 2], [2, 3, 4, 5], [6, 7, 8, 9]])
    assert completion_mask(completions, [2]).tolist() == [[1, 1, 0, 0], [1, 0, 0, 0],
                                                          [1, 1, 1, 1]]
    assert completion_mask(completions, [2, 8]).tolist()[2] == [1, 1, 1, 0]
    assert completion_mask(completions, []).tolist() == [[1] * 4] * 3


def test_sampling_runs_in_eval_mode_without_grad_and_restores_every_modes():
    model = tiny_llama(1, 8, seed=2, dropout=0.1).train()
    model.model.layers[0].eval()  # a submodule the user keeps in eval
    seen = {}

    def recording(m, prompt_ids, prompt_mask, *, seed):
        seen["training"] = [x.training for x in m.modules()]
        seen["grad"] = torch.is_grad_enabled()
        return Sample(torch.full((prompt_ids.size(0), 1), 4), torch.ones(prompt_ids.size(0), 1))

    batch = prompt_batch()
    rollout(recording, model, batch["prompts"], batch["prompt_attention_mask"], seed=0)
    assert not any(seen["training"]) and seen["grad"] is False
    assert model.training and not model.model.layers[0].training
    assert model.model.layers[0].self_attn.training is False
    assert model.lm_head.training


def test_modes_are_restored_when_sampling_raises():
    model = tiny_llama(1, 8, seed=2).train()

    def failing(*args, **kwargs):
        raise RuntimeError("backend down")

    batch = prompt_batch()
    with pytest.raises(RuntimeError, match="backend down"):
        rollout(failing, model, batch["prompts"], batch["prompt_attention_mask"], seed=0)
    assert model.training
    with sampling_mode(model):
        assert not model.training
    assert model.training


def test_bad_prompts():
    ids = torch.tensor([[5, 6, PAD], [PAD, 3, 4]])
    with pytest.raises(ValueError, match=r"on-policy: prompt\(s\) \[0\] are not left-padded \(a "
                                         r"padding token follows a real one\)"):
        check_prompts(ids, torch.tensor([[1, 1, 0], [0, 1, 1]]))
    with pytest.raises(ValueError, match=r"on-policy: prompt\(s\) \[1\] have no tokens"):
        check_prompts(ids, torch.tensor([[1, 1, 1], [0, 0, 0]]))
    with pytest.raises(ValueError, match=r"prompts \(2, 3\) and prompt_attention_mask \(2, 2\)"):
        check_prompts(ids, torch.ones(2, 2))
    with pytest.raises(TypeError, match="prompts must be token ids"):
        check_prompts(ids.float(), torch.ones(2, 3))


def test_prompts_longer_than_the_context_name_the_longest():
    model = tiny_llama(1, 8, seed=1, context=10)
    lengths = torch.tensor([3, 7, 5])
    with pytest.raises(ValueError, match=r"^on-policy: the longest prompt \(sample 1, 7 tokens\) "
                                         r"plus max_new_tokens=4 is 11 positions, past the "
                                         r"student's context of 10: truncate the prompts to at "
                                         r"most 6 tokens or lower max_new_tokens$"):
        check_context(lengths, 4, [("student", model)])
    check_context(lengths, 3, [("student", model)])
    gpt2 = tiny_gpt2(seed=0, context=8)
    with pytest.raises(ValueError, match="past the teacher's context of 8"):
        check_context(lengths, 2, [("teacher", gpt2)])


class _Tokenizer:
    def __init__(self, size, eos=2, probe=(1, 2, 3)):
        self.size, self.eos_token_id, self.probe = size, eos, probe
        self.bos_token_id = self.pad_token_id = self.unk_token_id = None

    def __len__(self):
        return self.size

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(self.probe)}


def test_tokenizers_that_differ_point_to_cross_tokenizer_distillation():
    fix = r"use cross-tokenizer distillation \(kd_loss_type 'uld' or 'gold'\)"
    check_same_tokenizer(_Tokenizer(10), _Tokenizer(10))
    with pytest.raises(ValueError, match=r"the teacher's tokenizer has 12 tokens and the "
                                         r"student's 10: .*" + fix):
        check_same_tokenizer(_Tokenizer(12), _Tokenizer(10))
    with pytest.raises(ValueError, match=r"the tokenizers' eos_token_id differ \(teacher 3, "
                                         r"student 2\)"):
        check_same_tokenizer(_Tokenizer(10, eos=3), _Tokenizer(10))
    with pytest.raises(ValueError, match=r"encode .* differently \(teacher \[1, 2, 3\], "
                                         r"student \[1, 5\]\): .*" + fix):
        check_same_tokenizer(_Tokenizer(10), _Tokenizer(10, probe=(1, 5)))


def test_sampler_defaults_come_from_the_generation_config():
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[2, 7],
                                                              pad_token_id=None))
    assert HFGenerateSampler(max_new_tokens=1).stops_and_pad(model) == ((2, 7), 2)
    assert HFGenerateSampler(max_new_tokens=1, stop_token_ids=[5],
                             pad_token_id=9).stops_and_pad(model) == ((5,), 9)


def test_without_logprobs_the_same_tokens_are_sampled(student):
    with_scores, without = _roll(student, 21), _roll(student, 21, logprobs=False)
    assert without.sampler_logprobs is None and with_scores.sampler_logprobs is not None
    assert torch.equal(with_scores.input_ids, without.input_ids)
    assert torch.equal(with_scores.completion_mask, without.completion_mask)


def test_the_context_of_a_multimodal_model_is_its_text_configs():
    text = SimpleNamespace(max_position_embeddings=10)
    model = SimpleNamespace(config=SimpleNamespace(get_text_config=lambda: text))
    with pytest.raises(ValueError, match=r"is 11 positions, past the student's context of 10"):
        check_context(torch.tensor([7]), 4, [("student", model)])
    check_context(torch.tensor([6]), 4, [("student", model)])


def test_vocabulary_rows_and_the_vocabulary_check():
    from purekd.stages import check_same_vocabulary, vocabulary_rows

    llama = tiny_llama(1, 8, seed=0, vocab=30)
    assert vocabulary_rows(llama) == 30  # the output layer's rows
    text = SimpleNamespace(vocab_size=40)
    assert vocabulary_rows(SimpleNamespace(config=SimpleNamespace(get_text_config=lambda: text))) == 40
    assert vocabulary_rows(torch.nn.Linear(2, 3)) is None
    check_same_vocabulary(llama, torch.nn.Linear(2, 3))  # a size unknown: nothing to compare
    check_same_vocabulary(llama, tiny_llama(1, 8, seed=1, vocab=30))
    with pytest.raises(ValueError, match=r"has 30 entries and the student's 24"):
        check_same_vocabulary(llama, tiny_llama(1, 8, seed=1))
