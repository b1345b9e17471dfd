"""``hf_adaptor``: purekd's adaptor dict from a ``transformers`` ModelOutput, on tiny randomly
initialised BERTs (built from a ``BertConfig``, nothing downloaded)."""

from __future__ import annotations

import os
import pickle
from typing import Any

import pytest
import torch

import purekd
from purekd.combinators import build_projections
from purekd.integrations import HFAdaptor, hf_adaptor
from purekd.stages import normalise

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

VOCAB, LENGTH, BATCH, CLASSES = 50, 7, 3, 3


def tiny_bert(layers: int = 2, width: int = 16, heads: int = 2, *, head: bool = True,
              attn: str = "eager", seed: int = 0, **config: Any) -> Any:
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=2 * width, max_position_embeddings=32, num_labels=CLASSES,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation=attn,
        **config)
    model_class = transformers.BertForSequenceClassification if head else transformers.BertModel
    return model_class(cfg).eval()


def tiny_batch(labels: bool = True) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    mask[0, 5:] = 0
    mask[2, 3:] = 0
    batch = {"input_ids": torch.randint(1, VOCAB, (BATCH, LENGTH), generator=gen) * mask,
             "attention_mask": mask}
    if labels:
        batch["labels"] = torch.randint(CLASSES, (BATCH,), generator=gen)
    return batch


FULL = {"output_hidden_states": True, "output_attentions": True}


def test_extracts_logits_hidden_attention_loss_and_mask() -> None:
    model, batch = tiny_bert(), tiny_batch()
    outputs = model(**batch, **FULL)
    adapted = hf_adaptor(logits=True, hidden=True, attention=True, loss=True)(batch, outputs)
    assert set(adapted) == {"logits", "hidden", "attention", "losses", "inputs_mask"}
    assert adapted["logits"] is outputs.logits and adapted["logits"].shape == (BATCH, CLASSES)
    assert adapted["losses"] is outputs.loss
    assert adapted["inputs_mask"] is batch["attention_mask"]
    assert len(adapted["hidden"]) == 3 and len(adapted["attention"]) == 2  # embeddings + 2 layers
    for got, expected in zip(adapted["hidden"], outputs.hidden_states, strict=True):
        assert got is expected and got.shape == (BATCH, LENGTH, 16)
    for got, expected in zip(adapted["attention"], outputs.attentions, strict=True):
        assert got is expected and got.shape == (BATCH, 2, LENGTH, LENGTH)
    normalised = normalise(adapted)  # a valid adaptor dict
    assert len(normalised.hidden) == 3 and normalised.losses == (outputs.loss,)


def test_defaults_and_optional_keys() -> None:
    model = tiny_bert()
    batch = tiny_batch(labels=False)
    outputs = model(**batch)
    assert hf_adaptor() == HFAdaptor()
    assert set(hf_adaptor()(batch, outputs)) == {"logits", "inputs_mask"}
    # loss=True: 'losses' only when the model computed a loss (the batch has labels)
    assert "losses" not in hf_adaptor(loss=True)(batch, outputs)
    assert "inputs_mask" not in hf_adaptor(mask_key=None)(batch, outputs)
    adapted = hf_adaptor(logits_mask=True)(batch, outputs)
    assert adapted["logits_mask"] is batch["attention_mask"]
    labelled = tiny_batch()
    assert hf_adaptor(labels_key="labels")(labelled, outputs)["labels"] is labelled["labels"]
    assert pickle.loads(pickle.dumps(hf_adaptor(hidden=True))) == hf_adaptor(hidden=True)


def test_tuple_batches_take_positions() -> None:
    model, batch = tiny_bert(), tiny_batch(labels=False)
    outputs = model(**batch)
    as_tuple = (batch["input_ids"], batch["attention_mask"])
    assert hf_adaptor(mask_key=1)(as_tuple, outputs)["inputs_mask"] is batch["attention_mask"]
    with pytest.raises(TypeError, match=r"no keys; pass mask_key= the position"):
        hf_adaptor()(as_tuple, outputs)
    with pytest.raises(ValueError, match=r"only 2 entries"):
        hf_adaptor(mask_key=2)(as_tuple, outputs)


def test_sdpa_attention_raises_naming_eager() -> None:
    model, batch = tiny_bert(attn="sdpa"), tiny_batch()
    assert model.config._attn_implementation == "sdpa"
    outputs = model(**batch, **FULL)
    assert outputs.attentions == ()  # sdpa returns nothing, without an error
    with pytest.raises(ValueError, match=r'attn_implementation="eager"') as error:
        hf_adaptor(attention=True)(batch, outputs)
    assert "sdpa" in str(error.value)
    # hidden states come back under sdpa: only attention needs eager
    assert len(hf_adaptor(hidden=True)(batch, outputs)["hidden"]) == 3


def test_eager_attention_without_output_attentions_raises() -> None:
    model, batch = tiny_bert(), tiny_batch()
    outputs = model(**batch)
    assert outputs.attentions is None
    with pytest.raises(ValueError, match=r"output_attentions=True") as error:
        hf_adaptor(attention=True)(batch, outputs)
    assert 'attn_implementation="eager"' in str(error.value)


def test_missing_hidden_states_raises() -> None:
    model, batch = tiny_bert(), tiny_batch()
    with pytest.raises(ValueError, match=r"hidden=True.*output_hidden_states=True"):
        hf_adaptor(hidden=True)(batch, model(**batch))


def test_missing_logits_raises() -> None:
    model, batch = tiny_bert(head=False), tiny_batch(labels=False)
    with pytest.raises(ValueError, match=r"no logits.*pass logits=False"):
        hf_adaptor()(batch, model(**batch))
    assert "logits" not in hf_adaptor(logits=False, hidden=True)(batch, model(**batch, **FULL))


def test_tuple_outputs_and_bad_batches_raise() -> None:
    model, batch = tiny_bert(), tiny_batch()
    with pytest.raises(TypeError, match=r"return_dict=True"):
        hf_adaptor()(batch, model(**batch, return_dict=False))
    outputs = model(**batch)
    with pytest.raises(ValueError, match=r"no key 'mask'.*'attention_mask'"):
        hf_adaptor(mask_key="mask")(batch, outputs)
    with pytest.raises(ValueError, match=r"mask_key=None"):
        hf_adaptor()({"input_ids": batch["input_ids"]}, outputs)


def test_construction_errors() -> None:
    with pytest.raises(ValueError, match=r"extracts nothing"):
        hf_adaptor(logits=False)
    with pytest.raises(ValueError, match=r"give mask_key"):
        hf_adaptor(logits_mask=True, mask_key=None)


CONFIG = purekd.DistillationConfig(
    temperature=3, hard_label_weight=0.5, kd_loss_weight=1,
    intermediate_matches=[
        {"layer_T": 0, "layer_S": 0, "feature": "hidden", "loss": "hidden_mse", "weight": 1,
         "proj": ["linear", 16, 24]},
        {"layer_T": 4, "layer_S": 2, "feature": "hidden", "loss": "hidden_mse", "weight": 1,
         "proj": ["linear", 16, 24]},
        {"layer_T": 1, "layer_S": 0, "feature": "attention", "loss": "attention_mse", "weight": 1},
        {"layer_T": 3, "layer_S": 1, "feature": "attention", "loss": "attention_ce", "weight": 1},
    ])


def hand_written(batch: Any, outputs: Any) -> dict[str, Any]:
    return {"logits": outputs.logits, "hidden": outputs.hidden_states,
            "attention": outputs.attentions, "losses": outputs.loss,
            "inputs_mask": batch["attention_mask"]}


def test_make_step_with_hf_adaptor_equals_hand_written_adaptor() -> None:
    teacher = tiny_bert(layers=4, width=24, seed=1)
    student = tiny_bert(layers=2, width=16, seed=2)
    torch.manual_seed(3)
    projections = build_projections(CONFIG)
    batch = tiny_batch()
    results = []
    for adaptor in (hf_adaptor(logits=True, hidden=True, attention=True, loss=True),
                    hand_written):
        step = purekd.make_step(CONFIG, teacher, student, adaptor, adaptor, compile=False,
                                projections=projections)
        step.zero_grad()
        out = step(batch, **FULL)
        out.loss.backward()
        results.append((out, [torch.clone(p.grad) for p in step.parameters()]))  # type: ignore[arg-type]
    (via_hf, grads_hf), (via_hand, grads_hand) = results
    assert set(via_hf.terms) == {"kd_loss", "hard_label_loss", "hidden_hidden_mse_0_0",
                                 "hidden_hidden_mse_2_4", "attention_attention_mse_0_1",
                                 "attention_attention_ce_1_3"}
    assert torch.equal(via_hf.loss, via_hand.loss)
    for name in via_hand.terms:
        assert torch.equal(via_hf.terms[name], via_hand.terms[name]), name
    for got, expected in zip(grads_hf, grads_hand, strict=True):
        assert torch.equal(got, expected)
    assert all(p.grad is not None for p in projections[0].parameters())  # type: ignore[union-attr]


def test_make_step_with_sdpa_student_fails_before_training() -> None:
    teacher = tiny_bert(layers=4, width=24, seed=1)
    student = tiny_bert(layers=2, width=16, seed=2, attn="sdpa")
    adaptor = hf_adaptor(hidden=True, attention=True, loss=True)
    step = purekd.make_step(CONFIG, teacher, student, adaptor, adaptor, compile=False)
    with pytest.raises(ValueError, match=r'attn_implementation="eager"'):
        step(tiny_batch(), **FULL)
