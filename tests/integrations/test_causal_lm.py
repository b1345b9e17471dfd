"""Causal-LM distillation through ``hf_adaptor(causal=True)``: tiny random Llama teacher and
student (built from configs, nothing downloaded), each token-level ``kd_loss_type`` equal to a
float64 reference written by hand from the definitions (shift, ``-100`` mask, the divergence);
the fused path (``lm_head=``) equal in loss and gradients; a top-k teacher cache."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

import purekd
from purekd.integrations import hf_adaptor

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

VOCAB, LENGTH, BATCH = 24, 9, 3


def tiny_llama(layers: int, width: int, seed: int, vocab: int = VOCAB) -> Any:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=2 * width,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
        max_position_embeddings=32, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).double()


@pytest.fixture(scope="module")
def models() -> tuple[Any, Any]:
    return tiny_llama(2, 16, seed=0).eval(), tiny_llama(1, 8, seed=1).train()


def lm_batch() -> dict[str, torch.Tensor]:
    """Right padding (sample 1), a prompt whose labels are -100 (sample 2)."""
    gen = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=gen)
    attention_mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    attention_mask[1, 6:] = 0
    labels = input_ids.clone()
    labels[attention_mask == 0] = -100
    labels[2, :4] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def shifted_rows(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The reference alignment, by hand: logits[:, :-1] against labels[:, 1:], rows kept where
    the next label is not -100, as a flat (kept, V) tensor."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    keep = batch["labels"][:, 1:] != -100
    return logits[:, :-1][keep]


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * (p.log() - q.log())).sum(-1)


def reference(name: str, params: dict[str, float], s: torch.Tensor, t: torch.Tensor,
              tau: float) -> torch.Tensor:
    """The divergences from their definitions (DESIGN.md), mean over rows."""
    p_S, p_T = torch.softmax(s / tau, -1), torch.softmax(t / tau, -1)
    if name == "forward_kl":
        rows = kl(p_T, p_S)
    elif name == "reverse_kl":
        rows = kl(p_S, p_T)
    elif name in ("jsd", "scaled_jsd"):
        beta = params["beta"]
        m = beta * p_T + (1 - beta) * p_S
        rows = beta * kl(p_T, m) + (1 - beta) * kl(p_S, m)
        if name == "scaled_jsd":
            rows = rows / (beta * (1 - beta))
    elif name == "skew_forward_kl":
        a = params["alpha"]
        rows = kl(p_T, a * p_T + (1 - a) * p_S)
    elif name == "skew_reverse_kl":
        a = params["alpha"]
        rows = kl(p_S, a * p_S + (1 - a) * p_T)
    else:
        assert name == "tvd"
        rows = 0.5 * (p_T - p_S).abs().sum(-1)
    return rows.mean()


CASES = [("forward_kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.3}),
         ("scaled_jsd", {"beta": 0.7}), ("skew_forward_kl", {"alpha": 0.2}),
         ("skew_reverse_kl", {"alpha": 0.4}), ("tvd", {})]


@pytest.mark.parametrize(("name", "params"), CASES, ids=[c[0] for c in CASES])
def test_each_token_level_loss_equals_the_hand_written_reference(models, name, params):
    teacher, student = models
    batch = lm_batch()
    kd_loss_type: Any = [name, params] if params else name
    config = purekd.DistillationConfig(kd_loss_type=kd_loss_type, temperature=2.0)
    adaptor = hf_adaptor(causal=True)
    step = purekd.make_step(config, teacher, student, adaptor, adaptor, compile=False)
    out = step(batch)

    with torch.no_grad():
        t = shifted_rows(teacher, batch)
    s = shifted_rows(student, batch)
    expected = reference(name, params, s, t, 2.0)
    torch.testing.assert_close(out.terms["kd_loss"], expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.loss, expected, rtol=1e-10, atol=1e-12)
    assert out.tokens is not None and out.tokens.item() == len(s)  # token-normalised: 'auto'
    got = torch.autograd.grad(out.loss, list(student.parameters()))
    want = torch.autograd.grad(expected, list(student.parameters()))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-12)


def test_the_distiller_trains_a_causal_lm_through_hf_adaptor(models, tmp_path):
    """GeneralDistiller + hf_adaptor(causal=True) + jsd: the same weights as a hand loop on the
    reference loss (two optimizer steps)."""
    teacher, _ = models
    batches = [lm_batch(), lm_batch()]
    hand = tiny_llama(1, 8, seed=1)
    ours = tiny_llama(1, 8, seed=1)
    opt_hand = torch.optim.SGD(hand.parameters(), lr=0.5)
    for batch in batches:
        with torch.no_grad():
            t = shifted_rows(teacher, batch)
        loss = reference("jsd", {"beta": 0.5}, shifted_rows(hand, batch), t, 1.0)
        opt_hand.zero_grad()
        loss.backward()
        opt_hand.step()

    config = purekd.DistillationConfig(kd_loss_type="jsd", temperature=1)
    train = purekd.TrainingConfig(device="cpu", output_dir=str(tmp_path), ckpt_frequency=1)
    adaptor = hf_adaptor(causal=True)
    distiller = purekd.GeneralDistiller(train, config, teacher, ours, adaptor, adaptor,
                                        compile=False)
    with distiller:
        distiller.train(torch.optim.SGD(ours.parameters(), lr=0.5), batches, num_epochs=1)
    for p_hand, p_ours in zip(hand.parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(p_ours, p_hand, rtol=1e-7, atol=1e-9)


def test_fused_path_equals_the_logits_path_in_loss_and_gradients(models):
    """lm_head=: the adaptor returns lm_hidden/lm_weight instead of logits; same loss, same
    gradients for every student parameter (the output layer included)."""
    if not hasattr(purekd.losses, "fused_linear_kd"):
        pytest.skip("purekd.losses.fused_linear_kd has not landed")
    teacher, student = models
    batch = lm_batch()
    config = purekd.DistillationConfig(kd_loss_type=["jsd", {"beta": 0.4}], temperature=1.5)
    dense = hf_adaptor(causal=True)
    fused_T = hf_adaptor(causal=True, lm_head=teacher.get_output_embeddings())
    fused_S = hf_adaptor(causal=True, lm_head=student.get_output_embeddings())
    results = []
    for adaptor_T, adaptor_S in ((dense, dense), (fused_T, fused_S)):
        step = purekd.make_step(config, teacher, student, adaptor_T, adaptor_S, compile=False)
        out = step(batch, output_hidden_states=True)
        grads = torch.autograd.grad(out.loss, list(student.parameters()))
        results.append((out.loss, out.tokens, grads))
    (loss_d, tokens_d, grads_d), (loss_f, tokens_f, grads_f) = results
    torch.testing.assert_close(loss_f, loss_d, rtol=1e-10, atol=1e-12)
    assert tokens_f is not None and tokens_d is not None and tokens_f.item() == tokens_d.item()
    for g_f, g_d in zip(grads_f, grads_d, strict=True):
        torch.testing.assert_close(g_f, g_d, rtol=1e-8, atol=1e-12)


def test_the_fused_adaptor_keys():
    student = tiny_llama(1, 8, seed=1)
    adaptor = hf_adaptor(causal=True, lm_head=student.get_output_embeddings())
    batch = lm_batch()
    outputs = student(input_ids=batch["input_ids"], output_hidden_states=True)
    adapted = adaptor(batch, outputs)
    assert set(adapted) == {"lm_hidden", "lm_weight", "logits_mask", "labels", "inputs_mask"}
    assert adapted["lm_weight"] is student.lm_head.weight
    torch.testing.assert_close(adapted["lm_hidden"] @ adapted["lm_weight"].T, outputs.logits)
    with pytest.raises(ValueError, match="output_hidden_states"):
        adaptor(batch, student(input_ids=batch["input_ids"]))
    with_loss = hf_adaptor(causal=True, lm_head=student.get_output_embeddings(), loss=True)
    short = {"loss": torch.tensor(1.0), "logits": outputs.logits[:, -1:],  # logits_to_keep=1
             "hidden_states": outputs.hidden_states}
    with pytest.raises(ValueError, match="logits_to_keep"):
        with_loss(batch, short)


def test_forward_kwargs_run_no_output_layer_row_and_change_nothing_else(models):
    """adaptor.forward_kwargs(): the fused path's model call forms no logits row at all (the
    models' logits are (B, 0, V)), and the step's loss and gradients are those of the call with
    logits_to_keep=1, bit for bit."""
    teacher, student = models
    batch = {k: v for k, v in lm_batch().items() if k != "labels"}  # labels: the model's loss
    config = purekd.DistillationConfig(kd_loss_type=["jsd", {"beta": 0.4}], temperature=1.5)
    fused_T = hf_adaptor(causal=True, lm_head=teacher.get_output_embeddings())
    fused_S = hf_adaptor(causal=True, lm_head=student.get_output_embeddings())
    kwargs = fused_S.forward_kwargs()
    assert set(kwargs) == {"output_hidden_states", "logits_to_keep"}
    assert kwargs["output_hidden_states"] is True and kwargs["logits_to_keep"].numel() == 0
    logits = student(input_ids=batch["input_ids"], **kwargs).logits
    assert tuple(logits.shape) == (BATCH, 0, VOCAB)
    step = purekd.make_step(config, teacher, student, fused_T, fused_S, compile=False)
    results = []
    for call in (kwargs, {"output_hidden_states": True, "logits_to_keep": 1}):
        out = step(batch, **call)
        grads = torch.autograd.grad(out.loss, list(student.parameters()))
        results.append((out.loss, grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert torch.equal(a, b)


def test_forward_kwargs_of_the_other_adaptors():
    student = tiny_llama(1, 8, seed=1)
    assert hf_adaptor(causal=True).forward_kwargs() == {}
    assert hf_adaptor(logits=True, hidden=True).forward_kwargs() == {}
    # the model computes its own loss (loss=True) on every position: no logits_to_keep
    with_loss = hf_adaptor(causal=True, lm_head=student.get_output_embeddings(), loss=True)
    assert with_loss.forward_kwargs() == {"output_hidden_states": True}


def test_next_token_mask_and_labels_from_hf_adaptor():
    batch = lm_batch()
    adapted = hf_adaptor(causal=True)(batch, {"logits": torch.zeros(BATCH, LENGTH, VOCAB)})
    labels, attention = batch["labels"], batch["attention_mask"]
    want = torch.zeros(BATCH, LENGTH, dtype=torch.long)
    want[:, :-1] = ((labels[:, 1:] != -100) & (attention[:, 1:] != 0)).long()
    assert torch.equal(adapted["logits_mask"], want)
    assert torch.equal(adapted["labels"][:, :-1], labels[:, 1:])
    assert (adapted["labels"][:, -1] == -100).all()


def test_top_k_teacher_cache_through_hf_adaptor(models):
    """The teacher's adaptor receives a top-k cache (unshifted rows, topk_mask); the KD term is
    topk_kl on the student's logits, equal to the hand-written renormalised forward KL."""
    if not hasattr(purekd.losses, "topk_kl"):
        pytest.skip("purekd.losses.topk_kl has not landed")
    teacher, student = models
    batch = lm_batch()
    k = 5
    with torch.no_grad():
        logprobs = torch.log_softmax(teacher(input_ids=batch["input_ids"]).logits, -1)
    top = logprobs.topk(k, dim=-1)
    cache = {"topk_ids": top.indices, "topk_logprobs": top.values.float(),
             "topk_mask": batch["attention_mask"].clone()}
    adaptor = hf_adaptor(causal=True)
    config = purekd.DistillationConfig(kd_loss_type="forward_kl", temperature=1)
    step = purekd.make_step(config, teacher, student, adaptor, adaptor, compile=False)
    out = step({"teacher": batch, "student": batch, "teacher_cache": cache})

    keep = batch["labels"][:, 1:] != -100
    log_p_S = torch.log_softmax(student(input_ids=batch["input_ids"]).logits, -1)[:, :-1][keep]
    q = torch.softmax(top.values[:, :-1][keep], -1)
    ids = top.indices[:, :-1][keep]
    expected = (q * (q.log() - log_p_S.gather(-1, ids))).sum(-1).mean()
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
