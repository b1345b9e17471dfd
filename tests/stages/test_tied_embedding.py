"""The tied input embedding's sparse gradient on the fused path (purekd.stages._tied_embedding):
the same gradients as the dense path, no second (V, H) gradient buffer, nothing changed where a
condition fails."""

from __future__ import annotations

import pytest
import torch

import purekd
from purekd.integrations import hf_adaptor
from purekd.stages import _tied_embedding, sparse_tied_embedding, tied_input_embedding
from tests._on_policy import BOS, EOS, PAD


def _llama(seed: int, *, tied: bool, vocab: int = 40, width: int = 8) -> object:
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
        tie_word_embeddings=tied, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=BOS)
    return transformers.LlamaForCausalLM(config).double()


def _batch() -> dict[str, torch.Tensor]:
    # token 5 three times and token 7 twice: rows of the embedding's gradient that add up
    input_ids = torch.tensor([[5, 6, 7, 5, 9], [3, 5, 7, 8, PAD]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _step(teacher: object, student: object) -> purekd.Step:
    return purekd.make_step(
        purekd.DistillationConfig(kd_loss_type="forward_kl", temperature=2.0),
        teacher, student,
        hf_adaptor(causal=True, lm_head=teacher.get_output_embeddings()),  # type: ignore[attr-defined]
        hf_adaptor(causal=True, lm_head=student.get_output_embeddings()),  # type: ignore[attr-defined]
        compile=False)


def _gradients(student: object, teacher: object, *, sparse: bool,
               monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    with monkeypatch.context() as patch:
        if not sparse:
            patch.setattr(_tied_embedding, "tied_input_embedding", lambda *_: None)
        student.zero_grad(set_to_none=True)  # type: ignore[attr-defined]
        _step(teacher, student)(_batch(), output_hidden_states=True).loss.backward()
    return {n: p.grad.clone() for n, p in student.named_parameters()}  # type: ignore[attr-defined]


def test_a_tied_student_gets_the_dense_paths_gradients(monkeypatch):
    teacher, student = _llama(0, tied=False), _llama(1, tied=True)
    embedding = student.get_input_embeddings()
    assert embedding.weight is student.get_output_embeddings().weight
    dense = _gradients(student, teacher, sparse=False, monkeypatch=monkeypatch)
    sparse = _gradients(student, teacher, sparse=True, monkeypatch=monkeypatch)
    assert dense.keys() == sparse.keys()
    for name in dense:
        assert sparse[name].layout == torch.strided, name
        torch.testing.assert_close(sparse[name], dense[name], rtol=1e-12, atol=1e-14)
    assert embedding.sparse is False  # restored after the forward


def test_the_sum_of_the_two_gradients_is_built_in_the_output_layers_buffer():
    # the gradient reaching the alias (the output layer's, from the fused loss) is the buffer
    # W.grad ends in: the lookup's sparse rows were added into it, no (V, H) sum allocated
    teacher, student = _llama(0, tied=False), _llama(1, tied=True)
    weight = student.get_output_embeddings().weight
    step = _step(teacher, student)
    seen: list[int] = []
    original = _tied_embedding._Alias.backward

    def backward(ctx, grad):
        seen.append(grad.data_ptr())
        return original(ctx, grad)

    _tied_embedding._Alias.backward = staticmethod(backward)  # type: ignore[method-assign]
    try:
        step(_batch(), output_hidden_states=True).loss.backward()
    finally:
        _tied_embedding._Alias.backward = staticmethod(original)  # type: ignore[method-assign]
    assert len(seen) == 1
    assert weight.grad is not None and weight.grad.layout == torch.strided
    assert weight.grad.data_ptr() == seen[0]


def test_a_loss_that_never_reads_the_alias_still_leaves_a_dense_gradient():
    student = _llama(1, tied=True)
    weight = student.get_output_embeddings().weight
    with sparse_tied_embedding(student, weight) as alias:
        assert alias is not None
        hidden = student.model(**_batch()).last_hidden_state
    hidden.pow(2).sum().backward()  # the lookup's sparse gradient alone reaches the weight
    assert weight.grad is not None and weight.grad.layout == torch.strided
    student.zero_grad(set_to_none=True)
    student.model(**_batch()).last_hidden_state.pow(2).sum().backward()  # the plain lookup
    reference = weight.grad.clone()
    torch.testing.assert_close(reference, reference)  # dense as usual
    student.zero_grad(set_to_none=True)
    with sparse_tied_embedding(student, weight):
        hidden = student.model(**_batch()).last_hidden_state
    hidden.pow(2).sum().backward()
    torch.testing.assert_close(weight.grad, reference, rtol=1e-12, atol=1e-14)
    assert not _tied_embedding._DENSE_HOOKS  # each hook removed itself once it ran


def test_nothing_changes_where_a_condition_fails():
    tied, untied = _llama(1, tied=True), _llama(2, tied=False)
    weight = tied.get_output_embeddings().weight
    assert tied_input_embedding(tied, weight) is tied.get_input_embeddings()
    assert tied_input_embedding(untied, untied.get_output_embeddings().weight) is None
    assert tied_input_embedding(tied, None) is None
    assert tied_input_embedding(torch.nn.Linear(2, 2), weight) is None  # no input embedding
    with torch.no_grad():
        assert tied_input_embedding(tied, weight) is None
    weight.requires_grad_(False)
    try:
        assert tied_input_embedding(tied, weight) is None
    finally:
        weight.requires_grad_(True)
    with sparse_tied_embedding(untied, untied.get_output_embeddings().weight) as alias:
        assert alias is None
        assert untied.get_input_embeddings().sparse is False


def test_the_embeddings_setting_is_restored_when_the_forward_raises():
    student = _llama(1, tied=True)
    embedding = student.get_input_embeddings()
    with pytest.raises(RuntimeError, match="boom"), \
            sparse_tied_embedding(student, embedding.weight):
        assert embedding.sparse is True
        raise RuntimeError("boom")
    assert embedding.sparse is False


def test_inside_torch_func_transforms_nothing_changes():
    # torch.func takes gradients its own way (no autograd node order to rely on)
    student = _llama(1, tied=True)
    weight = student.get_output_embeddings().weight
    seen = []

    def f(x):
        seen.append(tied_input_embedding(student, weight))
        return (x * x).sum()

    torch.func.grad(f)(torch.ones(2))
    assert seen == [None]
    assert tied_input_embedding(student, weight) is not None  # outside: on
