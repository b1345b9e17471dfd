"""``KVCacheSampler``, purekd's own decode loop, against ``HFGenerateSampler`` (``generate``), the
reference: the same tokens, masks and log-probabilities under one seed — greedy, sampled with a
temperature, with top-k, with top-p, with rows that stop early, on Llama (rotary positions,
left-padded prompts) and GPT-2 (absolute positions) — the global random state untouched, the
number of forward calls, and bad input."""

from __future__ import annotations

import pytest
import torch

from purekd.stages import HFGenerateSampler, KVCacheSampler, rollout
from purekd.stages._packed_linears import onednn_packing
from tests._on_policy import EOS, PAD, prompt_batch, tiny_gpt2, tiny_llama

pytest.importorskip("transformers")

SETTINGS = [
    {"top_k": 1},                                    # greedy
    {},                                              # plain ancestral sampling
    {"temperature": 0.6},
    {"temperature": 1.4, "top_k": 5},
    {"top_p": 0.8},
    {"temperature": 0.8, "top_k": 7, "top_p": 0.9},
    {"stop_token_ids": (EOS, 3, 4, 5, 6, 7, 8), "pad_token_id": PAD},   # rows stop early
]


@pytest.fixture(scope="module")
def models():
    return {"llama": tiny_llama(2, 16, seed=3).eval(), "gpt2": tiny_gpt2(4).eval()}


def _both(model, seed, options, logprobs=True, **ours):
    batch = prompt_batch()
    out = []
    for kind in (HFGenerateSampler, KVCacheSampler):
        extra = ours if kind is KVCacheSampler else {}
        sampler = kind(**{"max_new_tokens": 8, **options}, logprobs=logprobs, **extra)
        with torch.no_grad():
            out.append(sampler(model.eval(), batch["prompts"], batch["prompt_attention_mask"],
                               seed=seed))
    return out


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("options", SETTINGS)
def test_the_same_draws_as_generate(models, name, options):
    for seed in (0, 11, 12345):
        reference, ours = _both(models[name], seed, options)
        assert torch.equal(ours.completions, reference.completions), (seed, options)
        assert torch.equal(ours.completion_mask, reference.completion_mask)
        assert ours.logprobs is not None and reference.logprobs is not None
        torch.testing.assert_close(ours.logprobs, reference.logprobs, rtol=0, atol=0)


def test_rows_that_stop_early_are_padded_and_masked_like_generate(models):
    reference, ours = _both(models["llama"], 5, SETTINGS[-1])
    lengths = ours.completion_mask.sum(-1)
    assert int(lengths.min()) < ours.completions.size(1)  # some row did stop early
    assert torch.equal(ours.completions, reference.completions)
    assert bool((ours.completions[ours.completion_mask == 0] == PAD).all())


def test_without_logprobs_the_same_tokens(models):
    with_scores, = _both(models["llama"], 9, {"temperature": 0.7}, logprobs=True)[1:]
    without, = _both(models["llama"], 9, {"temperature": 0.7}, logprobs=False)[1:]
    assert without.logprobs is None
    assert torch.equal(with_scores.completions, without.completions)


def test_greedy_logprobs_are_zero_and_the_global_random_state_is_untouched(models):
    state = torch.random.get_rng_state()
    _, ours = _both(models["llama"], 3, {"top_k": 1})
    assert torch.equal(torch.random.get_rng_state(), state)
    assert ours.logprobs is not None and bool((ours.logprobs == 0).all())


def test_one_prefill_then_one_forward_per_further_token(models):
    model = models["llama"]
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        batch = prompt_batch()
        sampler = KVCacheSampler(max_new_tokens=5, stop_token_ids=(), pad_token_id=PAD)
        sample = sampler(model, batch["prompts"], batch["prompt_attention_mask"], seed=0)
    finally:
        handle.remove()
    assert sample.completions.shape == (3, 5) and len(calls) == 5


def test_the_rollout_stage_lays_out_its_sample_as_generate_s(models):
    batch = prompt_batch()
    laid = [rollout(kind(max_new_tokens=6, temperature=0.9), models["llama"], batch["prompts"],
                    batch["prompt_attention_mask"], seed=4, pad_token_id=PAD)
            for kind in (HFGenerateSampler, KVCacheSampler)]
    for a, b in zip(*laid, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize(("options", "message"), [
    ({"max_new_tokens": 0}, r"max_new_tokens=0\): give an int >= 1"),
    ({"temperature": 0.0}, r"temperature=0.0\): give a finite number > 0 \(greedy decoding: "
                           r"top_k=1\)"),
    ({"temperature": float("nan")}, "temperature=nan"),
    ({"top_p": 0.0}, r"top_p=0.0\): give a number in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p=1.5\)"),
    ({"top_k": -1}, r"top_k=-1\): give an int >= 0"),
    ({"top_k": 2.0}, r"top_k=2.0\)"),
])
def test_bad_settings(options, message):
    with pytest.raises(ValueError, match=message):
        KVCacheSampler(**{"max_new_tokens": 4, **options})


def test_a_model_without_a_kv_cache_points_to_generate():
    class NoCache(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, **kwargs):
            return {"logits": torch.zeros(*input_ids.shape, 5)}

    batch = prompt_batch()
    with pytest.raises(ValueError, match=r"KV cache.*use HFGenerateSampler"):
        KVCacheSampler(max_new_tokens=2, stop_token_ids=(EOS,), pad_token_id=PAD)(
            NoCache(), batch["prompts"], batch["prompt_attention_mask"], seed=0)


# -- oneDNN-packed weights (float32 on a CPU) ---------------------------------------------------
@pytest.fixture(scope="module")
def float_llama():
    return tiny_llama(2, 16, seed=3).float().eval()


def _packing_seen(model):
    """Whether each forward of the output layer ran with a packed ``forward`` of its own."""
    seen: list[bool] = []
    layer = model.get_output_embeddings()
    handle = layer.register_forward_pre_hook(
        lambda module, _args: seen.append("forward" in module.__dict__))
    return seen, handle


ONEDNN = onednn_packing()


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("options", SETTINGS)
def test_packed_weights_draw_what_generate_draws(float_llama, options, packed):
    seen, handle = _packing_seen(float_llama)
    try:
        for seed in (0, 11):
            reference, ours = _both(float_llama, seed, options, packed_weights=packed)
            assert torch.equal(ours.completions, reference.completions), (seed, options)
            assert torch.equal(ours.completion_mask, reference.completion_mask)
            torch.testing.assert_close(ours.logprobs, reference.logprobs, rtol=0,
                                       atol=1e-5 if packed else 0)
    finally:
        handle.remove()
    assert any(seen) == (packed and ONEDNN)  # generate's calls are never packed
    assert not any("forward" in m.__dict__ for m in float_llama.modules())  # all restored


@pytest.mark.parametrize("threads", [1, 2])
def test_packed_weights_on_any_thread_count(float_llama, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        reference, ours = _both(float_llama, 3, {"temperature": 1.2})
    finally:
        torch.set_num_threads(before)
    assert torch.equal(ours.completions, reference.completions)


def test_a_model_that_rescales_its_logits_keeps_its_scaling(float_llama):
    # a change after the output layer (as Gemma's soft-capping or Granite's scaling) stays: only
    # the linear layers' products are swapped
    def rescale(_module, _args, outputs):
        outputs.logits = 3.0 * outputs.logits
        return outputs

    scaled = float_llama.register_forward_hook(rescale)
    try:
        for seed in (0, 11):
            reference, ours = _both(float_llama, seed, {"temperature": 1.3})
            assert torch.equal(ours.completions, reference.completions)
            torch.testing.assert_close(ours.logprobs, reference.logprobs, rtol=0, atol=1e-5)
    finally:
        scaled.remove()


def test_a_float64_model_keeps_its_own_products():
    model = tiny_llama(2, 16, seed=3).double().eval()
    seen, handle = _packing_seen(model)
    try:
        reference, ours = _both(model, 0, {})
    finally:
        handle.remove()
    assert torch.equal(ours.completions, reference.completions)
    torch.testing.assert_close(ours.logprobs, reference.logprobs, rtol=0, atol=0)
    assert not any(seen)
