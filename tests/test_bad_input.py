"""Bad input fails with a clear exception before any weight changes: the student's weights are
what they were, and no checkpoint was written (DESIGN.md, "Behaviour on bad input")."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import purekd
from purekd.presets import ADAPTOR_KEYS
from tests.runner._helpers import Tiny, adaptor


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _loader(with_labels: bool = True) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x, labels = torch.randn(8, 5, 4, generator=gen), torch.randint(3, (8,), generator=gen)
    data = TensorDataset(x, labels) if with_labels else TensorDataset(x)
    return DataLoader(data, batch_size=2)


def _config(out: Path, **overrides: Any) -> purekd.TrainingConfig:
    return purekd.TrainingConfig(device="cpu", output_dir=str(out), ckpt_steps=1, **overrides)


def _assert_rejected(distiller: Any, student: nn.Module, out: Path, error: type[Exception],
                     texts: list[str], loader: DataLoader | None = None,
                     **train_kwargs: Any) -> str:
    """``train`` raises ``error`` whose message holds every text; nothing was trained or saved."""
    before = {k: v.clone() for k, v in student.state_dict().items()}
    projections = [p for p in getattr(distiller, "projs", []) if p is not None]
    projections_before = [{k: v.clone() for k, v in p.state_dict().items()} for p in projections]
    train_kwargs.setdefault("num_epochs", 1)
    with distiller, pytest.raises(error) as info:
        distiller.train(torch.optim.SGD(student.parameters(), lr=0.5),
                        _loader() if loader is None else loader, **train_kwargs)
    message = str(info.value)
    for text in texts:
        assert text in message, (text, message)
    after = student.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items()), "the student was updated"
    for projection, saved in zip(projections, projections_before, strict=True):
        assert all(torch.equal(projection.state_dict()[k], v) for k, v in saved.items())
    assert not list(out.glob("gs*")), "a checkpoint was written"
    return message


def _general(out: Path, distill: dict[str, Any] | None = None, *, adaptor_T: Callable = adaptor,
             adaptor_S: Callable = adaptor, teacher: nn.Module | None = None,
             **training: Any) -> tuple[Any, nn.Module]:
    torch.manual_seed(0)
    teacher = Tiny(8, 3) if teacher is None else teacher
    student = Tiny(6, 2)
    distiller = purekd.GeneralDistiller(_config(out, **training), distill or {}, teacher,
                                        student, adaptor_T, adaptor_S, compile=False)
    return distiller, student


# -- adaptors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["teacher", "student"])
def test_adaptor_returning_a_non_dict(side: str, tmp_path: Path) -> None:
    def bad(batch: Any, outputs: Any) -> Any:
        return outputs["logits"], outputs["hidden"]

    kwargs = {"adaptor_T": bad} if side == "teacher" else {"adaptor_S": bad}
    distiller, student = _general(tmp_path, **kwargs)
    _assert_rejected(distiller, student, tmp_path, ValueError,
                     ["dict", "tuple", *(repr(k) for k in ADAPTOR_KEYS)])


@pytest.mark.parametrize("side", ["teacher", "student"])
def test_adaptor_returning_an_unknown_key(side: str, tmp_path: Path) -> None:
    def bad(batch: Any, outputs: Any) -> dict[str, Any]:
        return {**adaptor(batch, outputs), "hidden_states": outputs["hidden"]}

    kwargs = {"adaptor_T": bad} if side == "teacher" else {"adaptor_S": bad}
    distiller, student = _general(tmp_path, **kwargs)
    _assert_rejected(distiller, student, tmp_path, ValueError,
                     ["'hidden_states'", "valid keys", *(repr(k) for k in ADAPTOR_KEYS)])


def test_adaptor_error_while_caching_teacher_logits(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher, student = Tiny(8, 3), Tiny(6, 2)
    distiller = purekd.BasicDistiller(
        _config(tmp_path), {"is_caching_logits": True}, teacher, student,
        lambda batch, outputs: {"logit": outputs["logits"]}, adaptor, compile=False)
    _assert_rejected(distiller, student, tmp_path, ValueError, ["'logit'", "valid keys"])


# -- logits --------------------------------------------------------------------------------------


def test_logits_differ_in_class_dimension(tmp_path: Path) -> None:
    distiller, student = _general(tmp_path, teacher=Tiny(8, 3, classes=5))
    message = _assert_rejected(distiller, student, tmp_path, ValueError,
                               ["class dimension", "(2, 3)", "(2, 5)"])
    assert message.index("(2, 3)") < message.index("(2, 5)")  # student, then teacher


def test_logits_differ_in_count(tmp_path: Path) -> None:
    def two_heads(batch: Any, outputs: Any) -> dict[str, Any]:
        return {"logits": [outputs["logits"], outputs["logits"]]}

    distiller, student = _general(tmp_path, adaptor_S=two_heads)
    _assert_rejected(distiller, student, tmp_path, ValueError,
                     ["2 logits", "1", "(2, 3)", "same number"])


def _multi_teacher(out: Path) -> tuple[Any, nn.Module]:
    torch.manual_seed(0)
    teachers, student = [Tiny(8, 3), Tiny(8, 3, classes=4)], Tiny(6, 2)
    distiller = purekd.MultiTeacherDistiller(_config(out), {}, teachers, student, adaptor,
                                             adaptor, compile=False)
    return distiller, student


def test_multi_teacher_logits_mismatch_names_both_shapes(tmp_path: Path) -> None:
    distiller, student = _multi_teacher(tmp_path)
    _assert_rejected(distiller, student, tmp_path, ValueError, ["(2, 3)", "(2, 4)", "teacher"])


# -- intermediate matches ------------------------------------------------------------------------


def _hidden_match(**overrides: Any) -> dict[str, Any]:
    match = {"layer_T": 3, "layer_S": 2, "feature": "hidden", "loss": "hidden_mse", "weight": 1,
             "proj": ["linear", 6, 8]}
    match.update(overrides)
    return {"intermediate_matches": [match]}


@pytest.mark.parametrize(("side", "index", "available"), [("S", 3, 3), ("S", 7, 3), ("T", 4, 4),
                                                          ("T", -5, 4)])
def test_match_layer_out_of_range(side: str, index: int, available: int,
                                  tmp_path: Path) -> None:
    distiller, student = _general(tmp_path, _hidden_match(**{f"layer_{side}": index}))
    message = _assert_rejected(distiller, student, tmp_path, ValueError,
                               [f"layer_{side}={index}", "'hidden'", f"{available} 'hidden' layer",
                                f"0..{available - 1}"])
    assert "intermediate match" in message and "hidden_mse" in message


def test_match_of_a_pair_with_a_layer_out_of_range(tmp_path: Path) -> None:
    config = {"intermediate_matches": [{"layer_T": [0, 1], "layer_S": [1, 3], "feature": "hidden",
                                        "loss": "fsp", "weight": 1, "proj": ["linear", 6, 8]}]}
    distiller, student = _general(tmp_path, config)
    _assert_rejected(distiller, student, tmp_path, ValueError,
                     ["layer_S=3", "3 'hidden' layer", "fsp"])


def test_match_on_a_feature_the_adaptor_did_not_return(tmp_path: Path) -> None:
    config = {"intermediate_matches": [{"layer_T": 0, "layer_S": 0, "feature": "attention",
                                        "loss": "attention_mse", "weight": 1}]}
    distiller, student = _general(tmp_path, config)
    _assert_rejected(distiller, student, tmp_path, ValueError,
                     ["layer_S=0", "0 'attention' layer", "return 'attention' from the adaptor"])


def test_feature_widths_differ_without_proj(tmp_path: Path) -> None:
    config = _hidden_match()
    del config["intermediate_matches"][0]["proj"]
    distiller, student = _general(tmp_path, config)
    _assert_rejected(distiller, student, tmp_path, ValueError,
                     ["width 6", "width 8", "'proj': ['linear', 6, 8]"])


def test_projection_of_the_wrong_width_is_named(tmp_path: Path) -> None:
    distiller, student = _general(tmp_path, _hidden_match(proj=["linear", 5, 8]))
    _assert_rejected(distiller, student, tmp_path, ValueError,
                     ["hidden_mse", "width 5", "width 6", "'proj': [kind, 6, 8]"])


# -- labels, caching, train() arguments -----------------------------------------------------------


def test_probability_shift_without_labels(tmp_path: Path) -> None:
    distiller, student = _general(tmp_path, {"probability_shift": True})
    _assert_rejected(distiller, student, tmp_path, ValueError,
                     ["probability_shift=True", "'labels'"], loader=_loader(with_labels=False))


def test_caching_logits_with_num_steps(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher, student = Tiny(8, 3), Tiny(6, 2)
    distiller = purekd.BasicDistiller(_config(tmp_path), {"is_caching_logits": True}, teacher,
                                      student, adaptor, adaptor, compile=False)
    _assert_rejected(distiller, student, tmp_path, ValueError,
                     ["is_caching_logits", "num_epochs", "num_steps"], num_epochs=None,
                     num_steps=4)


def test_train_needs_num_epochs_or_num_steps(tmp_path: Path) -> None:
    distiller, student = _general(tmp_path)
    _assert_rejected(distiller, student, tmp_path, ValueError, ["num_epochs", "num_steps"],
                     num_epochs=None)


@pytest.mark.parametrize(("kwargs", "texts"), [
    ({"num_epochs": None, "num_steps": 0}, ["num_steps=0"]),
    ({"num_epochs": 0}, ["num_epochs=0"]),
])
def test_train_with_bad_lengths(kwargs: dict[str, Any], texts: list[str],
                                tmp_path: Path) -> None:
    distiller, student = _general(tmp_path)
    _assert_rejected(distiller, student, tmp_path, ValueError, texts, **kwargs)


def test_num_epochs_needs_a_sized_loader(tmp_path: Path) -> None:
    distiller, student = _general(tmp_path)
    batches = _loader()

    def generator() -> Any:
        yield from batches

    with distiller, pytest.raises(ValueError, match="num_steps"):
        distiller.train(torch.optim.SGD(student.parameters(), lr=0.5), generator(), num_epochs=1)
    assert not list(tmp_path.glob("gs*"))


def test_optimizer_of_the_wrong_type(tmp_path: Path) -> None:
    distiller, _ = _general(tmp_path)
    with distiller, pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        distiller.train(object(), _loader(), num_epochs=1)


# -- bad config values fail when the distiller is built -----------------------------------------


@pytest.mark.parametrize(("distill", "training", "texts"), [
    ({"temperature": 0}, {}, ["temperature=0"]),
    ({"kd_loss_type": "kl"}, {}, ["kd_loss_type", "'kl'", "'ce'"]),
    (_hidden_match(loss="hidden_mae"), {}, ["'hidden_mae'", "'hidden_mse'"]),
    (_hidden_match(proj=["conv", 6, 8]), {}, ["'conv'", "'linear'"]),
    ({}, {"gradient_accumulation_steps": 0}, ["gradient_accumulation_steps=0"]),
    ({}, {"fp16": True, "bf16": True}, ["fp16", "bf16"]),
])
def test_bad_config_values(distill: dict[str, Any], training: dict[str, Any], texts: list[str],
                           tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher, student = Tiny(8, 3), Tiny(6, 2)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(ValueError) as info:
        purekd.GeneralDistiller({"device": "cpu", "output_dir": str(tmp_path), **training},
                                distill, teacher, student, adaptor, adaptor, compile=False)
    for text in texts:
        assert text in str(info.value), (text, str(info.value))
    assert all(torch.equal(student.state_dict()[k], v) for k, v in before.items())
    assert list(tmp_path.iterdir()) == []


def test_config_of_the_wrong_type(tmp_path: Path) -> None:
    torch.manual_seed(0)
    with pytest.raises(TypeError, match="train_config"):
        purekd.GeneralDistiller("cpu", {}, Tiny(8, 3), Tiny(6, 2), adaptor, adaptor,
                                compile=False)
