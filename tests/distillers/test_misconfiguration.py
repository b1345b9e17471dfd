"""Nothing trains silently wrong (issue 12): each misconfiguration that used to train without a
word now raises a ``ValueError`` / ``TypeError`` naming the culprit before any weight changes,
or warns where it can be intended. (Resume mismatches are in tests/runner/test_integrity.py.)"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import purekd
from tests.runner._helpers import Tiny, adaptor, dataset, general_config


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _without(*keys: str) -> Callable[..., dict[str, Any]]:
    def adapt(batch: Any, outputs: Any) -> dict[str, Any]:
        return {k: v for k, v in adaptor(batch, outputs).items() if k not in keys}
    return adapt


def _changed(key: str, change: Callable[[Any], Any]) -> Callable[..., dict[str, Any]]:
    def adapt(batch: Any, outputs: Any) -> dict[str, Any]:
        result = adaptor(batch, outputs)
        result[key] = change(result[key])
        return result
    return adapt


def _labels(value: int) -> Callable[..., dict[str, Any]]:
    return _changed("labels", lambda labels: torch.full_like(labels, value))


def _setup(tmp_path: Path, *, distill: dict[str, Any] | None = None,
           training: dict[str, Any] | None = None, adaptor_T: Any = adaptor,
           adaptor_S: Any = adaptor, kind: str = "general") -> tuple[Any, torch.nn.Module]:
    torch.manual_seed(0)
    teacher, student = Tiny(8, 3), Tiny(6, 2)
    config = purekd.TrainingConfig(output_dir=str(tmp_path), **{"device": "cpu", **(training or {})})
    if kind == "basic":
        return purekd.BasicDistiller(config, distill or {"temperature": 2}, teacher, student,
                                     adaptor_T, adaptor_S, compile=False), student
    return purekd.GeneralDistiller(config, general_config(**(distill or {})), teacher, student,
                                   adaptor_T, adaptor_S, compile=False), student


def _train(distiller: Any, student: torch.nn.Module, *, data: Any = None, optimizer: Any = None,
           enter: bool = True, **kwargs: Any) -> None:
    kwargs.setdefault("num_steps", 2)
    optimizer = optimizer or torch.optim.SGD(student.parameters(), lr=0.1)
    data = DataLoader(dataset(8), batch_size=2) if data is None else data
    if enter:
        with distiller:
            distiller.train(optimizer, data, **kwargs)
    else:
        distiller.train(optimizer, data, **kwargs)


def _frozen(student: torch.nn.Module) -> torch.optim.Optimizer:
    for p in student.parameters():
        p.requires_grad_(False)
    return torch.optim.SGD(student.parameters(), lr=0.1)


def _other_optimizer_scheduler(student: torch.nn.Module) -> dict[str, Any]:
    other = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    return {"scheduler": torch.optim.lr_scheduler.StepLR(other, step_size=1)}


# name: (setup options, train options (a dict, or a function of the student), error, message)
RAISES: dict[str, tuple[dict[str, Any], Any, type[Exception], str]] = {
    "teacher_adaptor_without_logits": ({"adaptor_T": _without("logits", "labels")}, {}, ValueError,
                                       "teacher's adaptor returned no 'logits'"),
    "student_adaptor_without_logits": ({"adaptor_S": _without("logits", "labels")}, {}, ValueError,
                                       "student's adaptor returned no 'logits'"),
    "hard_label_weight_without_losses": ({"adaptor_S": _without("losses")}, {}, ValueError,
                                         "hard_label_weight=0.5 but the student's adaptor "
                                         "returned no 'losses'"),
    "nothing_to_train": ({"kind": "basic", "distill": {"temperature": 2},
                          "adaptor_T": _without("logits", "labels"), "adaptor_S": _without("logits", "labels", "losses")},
                         {}, ValueError, "nothing to train"),
    "epoch_shorter_than_accumulation": ({"training": {"gradient_accumulation_steps": 6}},
                                        {"num_epochs": 2, "num_steps": None}, ValueError,
                                        "an epoch has 4 micro-batch(es), fewer than"),
    "empty_loader_num_epochs": ({}, {"num_epochs": 1, "num_steps": None,
                                     "data": DataLoader(TensorDataset(torch.zeros(0, 5, 4)))},
                                ValueError, "len(dataloader) == 0"),
    "empty_loader_num_steps": ({}, {"data": DataLoader(TensorDataset(torch.zeros(0, 5, 4)))},
                               ValueError, "len(dataloader) == 0"),
    "integer_teacher_logits": ({"adaptor_T": _changed("logits", lambda t: t.long())}, {},
                               TypeError, "teacher's adaptor returned logits[0] of dtype torch.int64"),
    "float_labels_with_probability_shift": ({"distill": {"probability_shift": True},
                                             "adaptor_S": _changed("labels", lambda t: t.float())},
                                            {}, TypeError, "labels[0] of dtype torch.float32"),
    "labels_out_of_range_with_probability_shift": ({"distill": {"probability_shift": True},
                                                    "adaptor_S": _labels(7)}, {}, ValueError,
                                                   "labels[0] holds class 7 but logits[0] has 3"),
    "scheduler_args_without_scheduler_class": ({}, {"scheduler_args": {"step_size": 1}},
                                               ValueError, "scheduler_args={'step_size': 1} "
                                                           "without scheduler_class"),
    "scheduler_class_missing_its_arguments": ({}, {"scheduler_class": torch.optim.lr_scheduler.StepLR},
                                              TypeError, "scheduler_class=StepLR could not be built"),
    "scheduler_over_another_optimizer": ({}, lambda s: _other_optimizer_scheduler(s), ValueError,
                                         "scheduler was built over another optimizer"),
    "max_grad_norm_nan": ({}, {"max_grad_norm": math.nan}, ValueError, "max_grad_norm=nan"),
    "max_grad_norm_string": ({}, {"max_grad_norm": "1.0"}, ValueError, "max_grad_norm='1.0'"),
    "inputs_mask_length_mismatch": ({"adaptor_S": lambda b, o: {**adaptor(b, o),
                                                               "inputs_mask": torch.ones(2, 7)}},
                                    {}, ValueError, "inputs_mask of shape (2, 7) but hidden[0]"),
    "non_tensor_features": ({"adaptor_S": _changed("hidden", lambda h: [x.detach().numpy() for x in h])},
                            {}, TypeError, "hidden[0] of type ndarray"),
    "all_parameters_frozen": ({}, lambda s: {"optimizer": _frozen(s)}, ValueError,
                              "every parameter of the student (model_S) is frozen"),
    "student_on_another_device": ({}, lambda s: {"_move": s.to("meta")}, ValueError,
                                  "the student (model_S) is on meta but TrainingConfig.device='cpu'"),
    "fractional_num_epochs": ({}, {"num_epochs": 2.5, "num_steps": None}, ValueError,
                              "num_epochs=2.5: must be a whole number"),
    "every_weight_zero": ({"distill": {"kd_loss_weight": 0, "hard_label_weight": 0,
                                       "intermediate_matches": []}}, {}, ValueError,
                          "every term's weight is 0"),
    "callback_not_callable": ({}, {"callback": "print"}, TypeError, "callback='print'"),
    "detached_student_logits": ({"adaptor_S": _changed("logits", lambda t: t.detach())}, {},
                                ValueError, "logits[0] without a gradient"),
    "detached_student_losses": ({"adaptor_S": _changed("losses", lambda t: t.detach())}, {},
                                ValueError, "losses[0] without a gradient"),
    "no_gradient_reaches_the_student": (
        {"distill": {"kd_loss_weight": 0, "hard_label_weight": 0},
         "adaptor_S": _changed("hidden", lambda h: [x.detach() for x in h])}, {}, ValueError,
        "no gradient reached the student's parameters"),
    "logits_mask_of_the_wrong_shape": (
        {"adaptor_S": lambda b, o: {**adaptor(b, o), "logits": o["logits"][:, None].expand(-1, 5, -1),
                                    "logits_mask": torch.ones(2, 4), "labels": b[1][:, None].expand(-1, 5)},
         "adaptor_T": lambda b, o: {**adaptor(b, o), "logits": o["logits"][:, None].expand(-1, 5, -1),
                                    "labels": b[1][:, None].expand(-1, 5)}},
        {}, ValueError, "logits_mask[0] of shape (2, 4) for logits[0] of shape (2, 5, 3)"),
    "resume_and_overwrite": ({}, {"resume_from": "x", "overwrite_output_dir": True}, ValueError,
                             "resume_from with overwrite_output_dir=True"),
}


@pytest.mark.parametrize("name", RAISES)
def test_misconfiguration_raises_before_any_weight_changes(name: str, tmp_path: Path) -> None:
    setup, options, error, message = RAISES[name]
    distiller, student = _setup(tmp_path, **setup)
    options = options(student) if callable(options) else dict(options)
    options.pop("_move", None)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(error) as info:
        _train(distiller, student, **options)
    assert message in str(info.value), str(info.value)
    after = student.state_dict()
    if before[next(iter(before))].device.type != "meta":
        assert all(torch.equal(after[k], v) for k, v in before.items()), "the student changed"
    assert not list(tmp_path.glob("gs*"))


def test_teacher_on_another_device(tmp_path: Path) -> None:
    distiller, student = _setup(tmp_path)
    distiller.model_T.to("meta")
    with pytest.raises(ValueError, match=r"the teacher \(model_T\) is on meta but "
                                         r"TrainingConfig.device='cpu'"):
        _train(distiller, student)


def test_batch_postprocessor_and_early_stopping_of_the_wrong_kind(tmp_path: Path) -> None:
    distiller, student = _setup(tmp_path)
    with pytest.raises(TypeError, match="batch_postprocessor=3"):
        _train(distiller, student, batch_postprocessor=3)
    with pytest.raises(TypeError, match=r"early_stopping must be a purekd\.EarlyStopping"):
        _train(distiller, student, early_stopping={"patience": 2})


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"TrainingConfig.device='cuda' but CUDA is not available"):
        _setup(tmp_path, training={"device": "cuda"})


def test_multitask_tau_nan(tmp_path: Path) -> None:
    torch.manual_seed(0)
    student = Tiny(6, 2)
    distiller = purekd.MultiTaskDistiller(
        purekd.TrainingConfig(device="cpu", output_dir=str(tmp_path)), general_config(),
        {"a": Tiny(8, 3)}, student, {"a": adaptor}, {"a": adaptor}, compile=False)
    with distiller, pytest.raises(ValueError, match="tau=nan: must be a finite number"):
        distiller.train(torch.optim.SGD(student.parameters(), lr=0.1),
                        {"a": DataLoader(dataset(4), batch_size=2)}, num_steps=2, tau=math.nan)


@pytest.mark.parametrize("temperature", [1e-4, 0.0099, 1001, 1e6])
def test_temperature_with_a_vanishing_or_overflowing_gradient(temperature: float) -> None:
    with pytest.raises(ValueError, match=r"DistillationConfig.temperature=.*must be in \[0.01, 1000\]"):
        purekd.DistillationConfig(temperature=temperature)
    purekd.DistillationConfig(temperature=0.01)
    purekd.DistillationConfig(temperature=1000)


# name: (setup options, train options, warning text)
WARNS: dict[str, tuple[dict[str, Any], Any, str]] = {
    "teacher_in_training_mode": ({}, {"enter": False}, "a teacher is in training mode"),
    "no_logits_on_either_side_with_other_terms": (
        {"adaptor_T": _without("logits", "labels"), "adaptor_S": _without("logits", "labels")}, {},
        "neither adaptor returns 'logits'"),
    "ckpt_steps_with_num_epochs": ({"training": {"ckpt_steps": 2}},
                                   {"num_epochs": 1, "num_steps": None},
                                   "ckpt_steps=2 is ignored with num_epochs"),
    "ckpt_frequency_with_num_steps": ({"training": {"ckpt_frequency": 2}}, {},
                                      "ckpt_frequency=2 is ignored with num_steps"),
    "ckpt_frequency_above_steps_per_epoch": ({"training": {"ckpt_frequency": 9}},
                                             {"num_epochs": 1, "num_steps": None},
                                             "at most 4 checkpoint(s) per epoch"),
    "negative_weight": ({"distill": {"kd_loss_weight": -1}}, {},
                        "kd_loss_weight=-1 is negative"),
    "learning_rate_zero": ({}, lambda s: {"optimizer": torch.optim.SGD(s.parameters(), lr=0.0)},
                           "learning rate 0"),
    "keep_last_states_without_save_state": ({}, {"keep_last_states": 2},
                                            "without save_state=True"),
    "scheduler_and_scheduler_class": ({}, lambda s: {
        "scheduler_class": torch.optim.lr_scheduler.StepLR, "scheduler_args": {"step_size": 1},
        "scheduler": object()}, "the scheduler object is ignored"),
    "logits_mask_with_2d_logits": ({"adaptor_S": lambda b, o: {**adaptor(b, o),
                                                              "logits_mask": torch.ones(2, 5)}},
                                   {}, "it is ignored"),
    "optimizer_over_another_model": ({}, lambda s: {"optimizer": torch.optim.SGD(
        Tiny(6, 2).parameters(), lr=0.1)}, "holds none of the student's trainable parameters"),
}


@pytest.mark.parametrize("name", WARNS)
def test_misconfiguration_that_can_be_intended_warns(name: str, tmp_path: Path) -> None:
    setup, options, text = WARNS[name]
    distiller, student = _setup(tmp_path, **setup)
    options = options(student) if callable(options) else dict(options)
    with pytest.warns(UserWarning) as record:
        _train(distiller, student, **options)
    messages = [str(w.message) for w in record]
    assert any(text in m for m in messages), messages


def test_a_clean_run_warns_nothing(tmp_path: Path) -> None:
    distiller, student = _setup(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(distiller, student, num_steps=2, max_grad_norm=1.0,
               scheduler_class=torch.optim.lr_scheduler.StepLR, scheduler_args={"step_size": 1})
