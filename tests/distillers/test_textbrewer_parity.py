"""purekd's distillers train exactly like TextBrewer 0.2.1's.

Each test trains one teacher/student pair with both libraries, side by side, from the same
weights and on the same data, and compares the final student and projection weights, the
callback steps and the checkpoints (see ``_parity.py``). purekd runs eagerly
(``compile=False``) except in :func:`test_compiled_general_distiller_matches_textbrewer`.
"""

from __future__ import annotations

from typing import Any

import pytest
import textbrewer
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, StepLR
from torch.utils.data import DataLoader, Dataset

import purekd

from ._parity import (
    BrokenTeacher,
    Encoder,
    KeywordEncoder,
    both,
    dict_data,
    distiller_class,
    loader,
    make_adaptor,
    run,
    tensors,
    tuple_data,
)

LIBS = [pytest.param(textbrewer, id="textbrewer"), pytest.param(purekd, id="purekd")]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is several times faster (and immune to a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pair(teacher_width: int = 8, student_width: int = 6, *, student_dropout: float = 0.0,
         teacher_cls: type[Encoder] = Encoder, student_cls: type[Encoder] = Encoder,
         teacher_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> tuple[nn.Module, nn.Module]:
    """A 3-layer teacher and a 2-layer student of different widths, seeded."""
    torch.manual_seed(0)
    teacher = teacher_cls(teacher_width, layers=3, **{**kwargs, **(teacher_kwargs or {})})
    student = student_cls(student_width, layers=2, dropout=student_dropout, **kwargs)
    return teacher, student


def teachers(count: int, **kwargs: Any) -> list[nn.Module]:
    torch.manual_seed(10)
    return [Encoder(width, layers=3, **kwargs) for width in (8, 7, 5)[:count]]


HIDDEN_PROJ = {"layer_T": 3, "layer_S": 2, "feature": "hidden", "loss": "hidden_mse",
               "weight": 1, "proj": ["linear", 6, 8, {"lr": 0.05}]}
ATTENTION = {"layer_T": 2, "layer_S": 1, "feature": "attention", "loss": "attention_ce",
             "weight": 0.5}
MATCHES = [HIDDEN_PROJ, ATTENTION]


# -- the training loop: accumulation, clipping, LR schedules, checkpoints ---------------------

SCHEDULES = {
    "StepLR-class": lambda optimizer: {"scheduler_class": StepLR,
                                       "scheduler_args": {"step_size": 2, "gamma": 0.5}},
    "LambdaLR-class": lambda optimizer: {"scheduler_class": LambdaLR,
                                         "scheduler_args": {"lr_lambda": lambda s: 1 / (1 + s)}},
    # deprecated: built before the projections' group is added, so a LambdaLR would crash on
    # it (in TextBrewer too, with this torch); a StepLR decays every group it finds
    "deprecated-scheduler": lambda optimizer: {"scheduler": StepLR(optimizer, 3, gamma=0.6)},
}


@pytest.mark.parametrize("mode", ["epochs", "steps"])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("accumulation", [2, 3])
def test_accumulation_clipping_and_lr_schedule(tmp_path, accumulation, schedule, mode):
    # 26 examples in batches of 4: 7 micro-batches per pass, a remainder for 2 and for 3
    length = {"num_epochs": 2} if mode == "epochs" else {"num_steps": 5}

    def train(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return {**SCHEDULES[schedule](optimizer), **length, "max_grad_norm": 0.3}

    teacher, student = pair()
    both("general", teacher, student, tmp_path=tmp_path, data=loader(tuple_data(26)),
         training={"gradient_accumulation_steps": accumulation, "ckpt_steps": 2},
         distillation={"intermediate_matches": MATCHES, "hard_label_weight": 0.5},
         train=train)


@pytest.mark.parametrize("training, train", [
    ({}, {"num_epochs": 2}),
    ({"ckpt_frequency": 2, "ckpt_epoch_frequency": 2}, {"num_epochs": 3}),
    ({"ckpt_frequency": 3, "gradient_accumulation_steps": 2}, {"num_epochs": 2}),
    ({"ckpt_frequency": 5, "gradient_accumulation_steps": 3}, {"num_epochs": 2}),
    ({"ckpt_steps": 3}, {"num_steps": 7}),
    ({"ckpt_steps": 3}, {"num_steps": 6}),
    ({"ckpt_steps": 10}, {"num_steps": 4}),
    ({"ckpt_steps": 2, "gradient_accumulation_steps": 3}, {"num_steps": 5}),
], ids=["epochs", "ckpt_frequency2-epoch_frequency2", "ckpt_frequency3-accumulation2",
        "ckpt_frequency5-accumulation3",
        "steps7-every3", "steps6-every3", "steps4-every10", "steps5-every2-accumulation3"])
@pytest.mark.parametrize("kind", ["basic", "general"])
def test_checkpoint_schedule(tmp_path, kind, training, train):
    teacher, student = pair()
    distillation = {"intermediate_matches": MATCHES} if kind == "general" else {}
    tb, _ = both(kind, teacher, student, tmp_path=tmp_path, data=loader(tuple_data(26)),
                 training=training, distillation=distillation, train=train)
    if training == {"ckpt_frequency": 2, "ckpt_epoch_frequency": 2}:
        assert tb.steps == [10, 14, 17, 21]  # 7 steps an epoch; epochs 2 and 3 (the last)
    if train == {"num_steps": 7}:
        assert tb.steps == [3, 6, 7]


def test_dropout_draws_and_callback_leaving_eval_mode(tmp_path):
    """A student with dropout: the same random draws in the same order; a callback that puts
    the student in eval mode does not stop dropout for the rest of training."""
    teacher, student = pair(student_dropout=0.3)
    both("general", teacher, student, tmp_path=tmp_path, data=loader(tuple_data(18)),
         training={"ckpt_frequency": 2}, callback_eval=True,
         distillation={"intermediate_matches": MATCHES}, train={"num_epochs": 2})


# -- what the loss is made of ------------------------------------------------------------------

# weights large enough that masking the loss or not moves the weights by more than 1e-4
LOSS_MATCHES = {
    "attention_mse": {"feature": "attention", "layer_T": 2, "layer_S": 1, "weight": 1},
    "attention_mse_sum": {"feature": "attention", "layer_T": 1, "layer_S": 1, "weight": 1},
    "attention_ce": {"feature": "attention", "layer_T": 2, "layer_S": 1, "weight": 3},
    "attention_ce_mean": {"feature": "attention", "layer_T": 0, "layer_S": 0, "weight": 3},
    "hidden_mse": {"feature": "hidden", "layer_T": 3, "layer_S": 2, "weight": 5,
                   "proj": ["linear", 6, 8]},
    "cos": {"feature": "hidden", "layer_T": 2, "layer_S": 1, "weight": 1, "proj": ["relu", 6, 8]},
    "pkd": {"feature": "hidden", "layer_T": 3, "layer_S": 2, "weight": 1, "proj": ["tanh", 6, 8]},
    "fsp": {"feature": "hidden", "layer_T": [1, 3], "layer_S": [1, 2], "weight": 200,
            "proj": ["linear", 6, 8]},
    "gram": {"feature": "hidden", "layer_T": [0, 2], "layer_S": [0, 1], "weight": 50,
             "proj": ["tanh", 6, 8]},
    "mmd": {"feature": "hidden", "layer_T": [0, 3], "layer_S": [0, 2], "weight": 1},
    "nst": {"feature": "hidden", "layer_T": [1, 2], "layer_S": [1, 2], "weight": 200,
            "proj": ["relu", 6, 8]},
}


@pytest.mark.parametrize("masked", [True, False], ids=["inputs_mask", "no-mask"])
@pytest.mark.parametrize("loss", list(LOSS_MATCHES))
def test_intermediate_loss(tmp_path, loss, masked):
    match = {**LOSS_MATCHES[loss], "loss": loss}
    teacher, student = pair()
    adaptor = make_adaptor(inputs_mask=masked)
    both("general", teacher, student, adaptor, adaptor, tmp_path=tmp_path,
         data=loader(tuple_data(14)), distillation={"intermediate_matches": [match]},
         train={"num_epochs": 2})


@pytest.mark.parametrize("projection", ["linear", "relu", "tanh"])
def test_projection_with_its_own_optimizer_group(tmp_path, projection):
    matches = [
        {"layer_T": 3, "layer_S": 2, "feature": "hidden", "loss": "hidden_mse", "weight": 1,
         "proj": [projection, 6, 8, {"lr": 0.05, "momentum": 0.5}]},
        {"layer_T": 1, "layer_S": 1, "feature": "hidden", "loss": "cos", "weight": 0.5,
         "proj": [projection, 6, 8, {"lr": 0.2, "weight_decay": 0.01}]},
        {"layer_T": [0, 3], "layer_S": [0, 2], "feature": "hidden", "loss": "mmd", "weight": 2},
    ]
    teacher, student = pair()
    _, ours = both("general", teacher, student, tmp_path=tmp_path, data=loader(tuple_data(14)),
                   training={"gradient_accumulation_steps": 2},
                   distillation={"intermediate_matches": matches},
                   train={"num_epochs": 3, "max_grad_norm": 0.5})
    assert [p is None for p in ours.projections] == [False, False, True]


@pytest.mark.parametrize("kd_loss_type, temperature_scheduler", [
    ("ce", "constant"), ("ce", ["flsw", 1, 2]), ("ce", ["cwsm", 1]), ("mse", ["flsw", 1, 2]),
    ("mse", "none"),
])
def test_temperature_scheduler(tmp_path, kd_loss_type, temperature_scheduler):
    teacher, student = pair()
    both("general", teacher, student, tmp_path=tmp_path, data=loader(tuple_data(14)),
         distillation={"temperature": 3, "temperature_scheduler": temperature_scheduler,
                       "kd_loss_type": kd_loss_type, "hard_label_weight": 0.5,
                       "intermediate_matches": [ATTENTION]},
         train={"num_epochs": 2})


@pytest.mark.parametrize("kind, kd_scheduler, hl_scheduler, train", [
    ("general", "linear_decay", "linear_growth", {"num_epochs": 3}),
    ("general", "linear_growth", "linear_decay", {"num_steps": 7}),
    ("basic", "linear_growth", "none", {"num_epochs": 2}),
    ("basic", "none", "linear_decay", {"num_steps": 5}),
])
def test_weight_schedulers(tmp_path, kind, kd_scheduler, hl_scheduler, train):
    # kd_loss_weight=2: TextBrewer's first step uses it unscheduled, later ones the schedule
    teacher, student = pair()
    both(kind, teacher, student, tmp_path=tmp_path, data=loader(tuple_data(14)),
         training={"ckpt_steps": 3, "ckpt_frequency": 2},
         distillation={"kd_loss_weight": 2, "kd_loss_weight_scheduler": kd_scheduler,
                       "hard_label_weight": 0.5, "hard_label_weight_scheduler": hl_scheduler,
                       "intermediate_matches": MATCHES if kind == "general" else None},
         train=train)


@pytest.mark.parametrize("kind, is_caching_logits", [
    ("basic", False), ("basic", True), ("general", False), ("multiteacher", False),
    ("multiteacher", True),
])
def test_probability_shift(tmp_path, kind, is_caching_logits):
    # with cached logits TextBrewer's BasicDistiller shifts the cached tensors in place
    teacher, student = pair()
    model_T = teachers(2) if kind == "multiteacher" else teacher
    both(kind, model_T, student, tmp_path=tmp_path, data=loader(tuple_data(14)),
         distillation={"probability_shift": True, "temperature": 2, "hard_label_weight": 0.3,
                       "temperature_scheduler": ["flsw", 1, 1],
                       "is_caching_logits": is_caching_logits},
         train={"num_epochs": 3})


def two_heads_adaptor(batch: Any, outputs: Any) -> dict[str, Any]:
    """Two logits heads (each with the labels) and two hard-label losses."""
    result = make_adaptor()(batch, outputs)
    result["labels"] = [result["labels"]] * 2
    result["losses"] = [outputs["loss"], 0.5 * outputs["loss"]]
    return result


@pytest.mark.parametrize("kind, is_caching_logits", [
    ("basic", False), ("basic", True), ("general", False), ("multiteacher", True),
])
def test_several_logits_heads_and_losses(tmp_path, kind, is_caching_logits):
    teacher, student = pair(n_logits=2)
    model_T = teachers(2, n_logits=2) if kind == "multiteacher" else teacher
    both(kind, model_T, student, two_heads_adaptor, two_heads_adaptor, tmp_path=tmp_path,
         data=loader(tuple_data(14)),
         distillation={"probability_shift": True, "hard_label_weight": 0.5,
                       "temperature_scheduler": ["cwsm", 1],
                       "is_caching_logits": is_caching_logits,
                       "intermediate_matches": MATCHES if kind == "general" else None},
         train={"num_epochs": 2})


def test_general_distiller_without_logits(tmp_path):
    """Adaptors without logits: intermediate matches (and hard labels) only."""
    teacher, student = pair()
    adaptor = make_adaptor(logits=False)
    both("general", teacher, student, adaptor, adaptor, tmp_path=tmp_path,
         data=loader(tuple_data(14)),
         distillation={"intermediate_matches": MATCHES, "hard_label_weight": 0.5},
         train={"num_epochs": 2})


def test_probability_shift_token_level(tmp_path):
    # (B, L, C) logits, labels -100 at padding (TextBrewer leaves those rows unshifted)
    teacher, student = pair(token_level=True)
    both("general", teacher, student, tmp_path=tmp_path,
         data=loader(tuple_data(14, token_level=True)),
         distillation={"probability_shift": True, "hard_label_weight": 0.3},
         train={"num_epochs": 2})


@pytest.mark.parametrize("kind, is_caching_logits", [
    ("basic", False), ("basic", True), ("general", False), ("multiteacher", True),
])
def test_token_level_logits_with_logits_mask(tmp_path, kind, is_caching_logits):
    teacher, student = pair(token_level=True)
    model_T = teachers(2, token_level=True) if kind == "multiteacher" else teacher
    adaptor = make_adaptor(logits_mask=True)
    both(kind, model_T, student, adaptor, adaptor, tmp_path=tmp_path,
         data=loader(tuple_data(14, token_level=True)),
         distillation={"temperature_scheduler": ["cwsm", 1], "hard_label_weight": 0.5,
                       "is_caching_logits": is_caching_logits,
                       "intermediate_matches": MATCHES if kind == "general" else None},
         train={"num_epochs": 3})


def flipped_mask_adaptor(batch: Any, outputs: Any) -> dict[str, Any]:
    """The teacher's own logits_mask: the student's, reversed along the sequence (the same
    number of rows is kept, at other positions)."""
    result = make_adaptor(logits_mask=True)(batch, outputs)
    result["logits_mask"] = result["logits_mask"].flip(-1)
    return result


@pytest.mark.parametrize("kind", ["basic", "multiteacher"])
def test_cached_teacher_logits_use_the_student_logits_mask(tmp_path, kind):
    # TextBrewer: with is_caching_logits the cached teacher logits take the student's mask
    teacher, student = pair(token_level=True)
    model_T = teachers(2, token_level=True) if kind == "multiteacher" else teacher
    both(kind, model_T, student, flipped_mask_adaptor, make_adaptor(logits_mask=True),
         tmp_path=tmp_path, data=loader(tuple_data(14, token_level=True)),
         distillation={"is_caching_logits": True}, train={"num_epochs": 2})


@pytest.mark.parametrize("kind", ["basic", "general", "multiteacher"])
def test_teacher_logits_selected_with_the_teacher_logits_mask(tmp_path, kind):
    teacher, student = pair(token_level=True)
    model_T = teachers(2, token_level=True) if kind == "multiteacher" else teacher
    both(kind, model_T, student, flipped_mask_adaptor, make_adaptor(logits_mask=True),
         tmp_path=tmp_path, data=loader(tuple_data(14, token_level=True)),
         distillation={"temperature": 1, "kd_loss_weight": 20,
                       "intermediate_matches": [ATTENTION] if kind == "general" else None},
         train={"num_epochs": 3})


def longer_teacher_items(size: int) -> list[dict[str, Any]]:
    """Token-level items whose teacher input has one extra, masked-out token at position 1
    (another tokenisation): teacher logits ``(B, 6, C)``, student ``(B, 5, C)``, each side's
    ``logits_mask`` keeping the same tokens."""
    x, mask, labels = tensors(size, token_level=True)
    gap = torch.zeros(size, 1, dtype=torch.long)
    x_T = torch.cat([x[:, :1], torch.randn(size, 1, 4, generator=torch.Generator().manual_seed(5)),
                     x[:, 1:]], 1)
    mask_T = torch.cat([mask[:, :1], gap, mask[:, 1:]], 1)
    labels_T = torch.cat([labels[:, :1], gap - 100, labels[:, 1:]], 1)
    return [{"teacher": (x_T[i], mask_T[i], labels_T[i]), "student": (x[i], mask[i], labels[i])}
            for i in range(size)]


def test_token_level_teacher_longer_than_student(tmp_path):
    teacher, student = pair(token_level=True)
    adaptor = make_adaptor(logits_mask=True)
    both("basic", teacher, student, adaptor, adaptor, tmp_path=tmp_path,
         data=loader(longer_teacher_items(14)), distillation={"hard_label_weight": 0.5},
         train={"num_epochs": 2})


# -- batches -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, is_caching_logits", [
    ("basic", False), ("basic", True), ("general", False), ("multiteacher", True),
])
def test_dict_batches(tmp_path, kind, is_caching_logits):
    teacher, student = pair(teacher_cls=KeywordEncoder, student_cls=KeywordEncoder)
    model_T = [teacher, pair(7, teacher_cls=KeywordEncoder)[0]] if kind == "multiteacher" else teacher
    both(kind, model_T, student, tmp_path=tmp_path, data=loader(dict_data(14)),
         training={"gradient_accumulation_steps": 2},
         distillation={"is_caching_logits": is_caching_logits, "hard_label_weight": 0.5,
                       "intermediate_matches": MATCHES if kind == "general" else None},
         train={"num_epochs": 3})


class Unsized:
    """A re-iterable loader without ``__len__`` (only ``num_steps`` training can use it)."""

    def __init__(self, loader: DataLoader):
        self.loader = loader

    def __iter__(self):
        return iter(self.loader)


@pytest.mark.parametrize("kind", ["basic", "general", "trainer"])
def test_num_steps_over_a_loader_without_length(tmp_path, kind):
    teacher, student = pair()
    model_T, model_S = (None, teacher) if kind == "trainer" else (teacher, student)
    both(kind, model_T, model_S, tmp_path=tmp_path,
         data=lambda: Unsized(DataLoader(tuple_data(14), batch_size=4, shuffle=True)),
         training={"ckpt_steps": 4, "gradient_accumulation_steps": 2},
         distillation={"hard_label_weight": 0.5,
                       "intermediate_matches": MATCHES if kind == "general" else None},
         train={"num_steps": 9, **({"num_epochs": None} if kind == "trainer" else {})})


def to_dict_doubled(batch: Any) -> dict[str, Any]:
    x, mask, labels = batch
    return {"x": 2 * x, "mask": mask, "labels": labels}


def doubled(batch: Any) -> tuple[Any, ...]:
    x, mask, labels = batch
    return (2 * x, mask, labels)


@pytest.mark.parametrize("kind, is_caching_logits, keyword, train", [
    ("general", False, False, {"num_epochs": 2}),
    ("general", False, True, {"num_steps": 5}),
    ("basic", True, True, {"num_epochs": 3}),
    ("basic", False, False, {"num_steps": 5}),
    ("multiteacher", True, False, {"num_epochs": 2}),
])
def test_batch_postprocessor(tmp_path, kind, is_caching_logits, keyword, train):
    """Tuple batches post-processed into tuples, or into dicts for keyword-only models (with
    cached logits, TextBrewer post-processes once, before caching)."""
    cls = KeywordEncoder if keyword else Encoder
    teacher, student = pair(teacher_cls=cls, student_cls=cls)
    model_T = [teacher, pair(7, teacher_cls=cls)[0]] if kind == "multiteacher" else teacher
    both(kind, model_T, student, tmp_path=tmp_path, data=loader(tuple_data(14)),
         training={"ckpt_steps": 2},
         distillation={"is_caching_logits": is_caching_logits, "hard_label_weight": 0.5,
                       "intermediate_matches": MATCHES if kind == "general" else None},
         train={**train, "batch_postprocessor": to_dict_doubled if keyword else doubled})


@pytest.mark.parametrize("kind, is_caching_logits, batches", [
    ("general", False, "tuple"), ("general", False, "dict"), ("basic", True, "tuple"),
    ("multiteacher", False, "dict"), ("multiteacher", True, "tuple"),
])
def test_extra_args_reach_the_models(tmp_path, kind, is_caching_logits, batches):
    cls = KeywordEncoder if batches == "dict" else Encoder
    teacher, student = pair(teacher_cls=cls, student_cls=cls)
    model_T = [teacher, pair(7, teacher_cls=cls)[0]] if kind == "multiteacher" else teacher
    data = dict_data(14) if batches == "dict" else tuple_data(14)
    distillation = {"is_caching_logits": is_caching_logits, "hard_label_weight": 0.5,
                    "intermediate_matches": MATCHES if kind == "general" else None}
    tb, _ = both(kind, model_T, student, tmp_path=tmp_path, data=loader(data),
                 distillation=distillation, train={"num_epochs": 2, "scale": 0.5})
    # and the argument matters: without it TextBrewer ends elsewhere
    adaptor = make_adaptor()
    baseline = run(textbrewer, kind, model_T, student, adaptor, adaptor,
                   output_dir=tmp_path / "baseline", data=loader(data),
                   distillation=distillation, train={"num_epochs": 2})
    assert not torch.allclose(tb.student.embed.weight, baseline.student.embed.weight)


class TeacherStudentDataset(Dataset):
    """Items ``{'teacher': (x_T, mask, labels), 'student': (x, mask, labels)}`` (the teacher
    reads 5 features per token, the student 4), optionally with ``'teacher_cache'``."""

    def __init__(self, size: int, teacher_cache: list[Any] | None = None):
        self.student = tensors(size, seed=1)
        x_T = tensors(size, seed=2, in_dim=5)[0]
        self.teacher = (x_T, *self.student[1:])
        self.cache = teacher_cache

    def __len__(self) -> int:
        return len(self.student[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        item: dict[str, Any] = {"teacher": tuple(t[index] for t in self.teacher),
                                "student": tuple(t[index] for t in self.student)}
        if self.cache is not None:
            item["teacher_cache"] = self.cache[index]
        return item


@pytest.mark.parametrize("kind", ["basic", "general", "multiteacher"])
def test_different_teacher_and_student_batches(tmp_path, kind):
    teacher, student = pair(teacher_kwargs={"in_dim": 5})
    model_T = ([teacher, pair(7, teacher_kwargs={"in_dim": 5})[0]] if kind == "multiteacher"
               else teacher)
    both(kind, model_T, student, tmp_path=tmp_path, data=loader(TeacherStudentDataset(14)),
         training={"gradient_accumulation_steps": 2, "ckpt_frequency": 2},
         distillation={"hard_label_weight": 0.5, "temperature_scheduler": ["flsw", 1, 2],
                       "intermediate_matches": MATCHES if kind == "general" else None},
         train={"num_epochs": 3, "scale": 0.7})


def cached_teacher_outputs(teacher: nn.Module, size: int) -> list[dict[str, Any]]:
    """The teacher's outputs on :class:`TeacherStudentDataset`'s teacher inputs, per item."""
    x_T, mask, _ = TeacherStudentDataset(size).teacher
    with torch.no_grad():
        out = teacher.eval()(x_T, mask)
    return [{"logits": [z[i] for z in out["logits"]], "hidden": [h[i] for h in out["hidden"]],
             "attention": [a[i] for a in out["attention"]]} for i in range(size)]


@pytest.mark.parametrize("kind, probability_shift", [
    ("general", False), ("general", True), ("basic", True),
])
def test_teacher_cache_in_the_batch(tmp_path, kind, probability_shift):
    teacher, student = pair(teacher_kwargs={"in_dim": 5})
    data = TeacherStudentDataset(14, cached_teacher_outputs(teacher, 14))
    both(kind, BrokenTeacher(), student, tmp_path=tmp_path, data=loader(data),
         training={"ckpt_steps": 2},
         distillation={"hard_label_weight": 0.5, "probability_shift": probability_shift,
                       "intermediate_matches": MATCHES if kind == "general" else None},
         train={"num_steps": 6})


# -- caching teacher logits, several teachers, several tasks -----------------------------------


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("is_caching_logits", [True, False])
def test_basic_distiller_caching_logits(tmp_path, is_caching_logits, accumulation):
    # TextBrewer shuffles the cache with Python's random every epoch; both runs seed it alike
    teacher, student = pair()
    both("basic", teacher, student, tmp_path=tmp_path, data=loader(tuple_data(18)),
         training={"gradient_accumulation_steps": accumulation, "ckpt_frequency": 2},
         distillation={"is_caching_logits": is_caching_logits, "hard_label_weight": 0.5,
                       "temperature_scheduler": ["flsw", 1, 2]},
         train={"num_epochs": 4, "max_grad_norm": 0.5})


def test_general_distiller_ignores_is_caching_logits(tmp_path):
    teacher, student = pair()
    both("general", teacher, student, tmp_path=tmp_path, data=loader(tuple_data(14)),
         distillation={"is_caching_logits": True, "intermediate_matches": MATCHES},
         train={"num_epochs": 3})


@pytest.mark.parametrize("is_caching_logits", [False, True])
@pytest.mark.parametrize("count", [2, 3])
def test_multi_teacher_distiller(tmp_path, count, is_caching_logits):
    _, student = pair()
    # three teachers: one adaptor each (a list); two teachers: one adaptor for both
    adaptor_T = [make_adaptor() for _ in range(count)] if count == 3 else make_adaptor()
    both("multiteacher", teachers(count), student, adaptor_T, make_adaptor(),
         tmp_path=tmp_path, data=loader(tuple_data(18)),
         training={"gradient_accumulation_steps": 2},
         distillation={"is_caching_logits": is_caching_logits, "hard_label_weight": 0.5,
                       "kd_loss_weight_scheduler": "linear_decay"},
         train={"num_epochs": 3, "max_grad_norm": 0.5})


def with_noise(batch: Any) -> tuple[Any, ...]:
    x, mask, labels = batch
    return (x + 0.1, mask, labels)


@pytest.mark.parametrize("tau", [1, 0.5, "unsized"])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_multi_task_distiller(tmp_path, tau, accumulation):
    # TextBrewer samples tasks with np.random.choice; both runs seed NumPy alike
    torch.manual_seed(3)
    model_T = {"a": Encoder(8, layers=3), "b": Encoder(8, layers=3)}
    _, student = pair(n_logits=2)
    adaptor_T = {"a": make_adaptor(), "b": make_adaptor()}
    adaptor_S = {"a": make_adaptor(head=0), "b": make_adaptor(head=1)}
    sizes = {"a": 18, "b": 7}  # 5 and 2 batches of 4

    def loaders() -> dict[str, Any]:
        built = {task: DataLoader(tuple_data(size, seed=ord(task)), batch_size=4, shuffle=True)
                 for task, size in sizes.items()}
        if tau == "unsized":  # a loader without a length: tasks drawn uniformly
            built["b"] = Unsized(built["b"])
        return built

    def train(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return {"num_steps": 7, "tau": 0.7 if tau == "unsized" else tau, "max_grad_norm": 0.5,
                "batch_postprocessors": {"a": with_noise, "b": doubled},
                "scheduler_class": StepLR, "scheduler_args": {"step_size": 3, "gamma": 0.5},
                "scale": 0.8}

    both("multitask", model_T, student, adaptor_T, adaptor_S, tmp_path=tmp_path, data=loaders,
         training={"gradient_accumulation_steps": accumulation, "ckpt_steps": 3},
         distillation={"hard_label_weight": 0.5, "kd_loss_weight_scheduler": "linear_decay",
                       "intermediate_matches": MATCHES},
         train=train)


def trainer_adaptor(batch: Any, outputs: Any) -> dict[str, Any]:
    return {"losses": outputs["loss"], "logits": outputs["logits"]}


@pytest.mark.parametrize("train, batches", [
    ({"num_epochs": 3}, "tuple"), ({"num_epochs": 2, "scale": 0.5}, "tuple"),
    ({"num_epochs": None, "num_steps": 7}, "tuple"), ({"num_epochs": None, "num_steps": 4}, "tuple"),
    ({"num_epochs": 2, "batch_postprocessor": to_dict_doubled}, "tuple"),
    ({"num_epochs": 2, "scale": 0.5}, "dict"),
], ids=["epochs", "epochs-args", "steps7", "steps4", "postprocessor", "dict"])
def test_basic_trainer(tmp_path, train, batches):
    cls = Encoder if batches == "tuple" and "batch_postprocessor" not in train else KeywordEncoder
    teacher, _ = pair(teacher_cls=cls)
    data = dict_data(22) if batches == "dict" else tuple_data(22)
    both("trainer", None, teacher, None, trainer_adaptor, tmp_path=tmp_path, data=loader(data),
         training={"gradient_accumulation_steps": 2, "ckpt_steps": 3, "ckpt_frequency": 2},
         train={**train, "max_grad_norm": 0.5, "scheduler_class": StepLR,
                "scheduler_args": {"step_size": 2, "gamma": 0.7}})


# -- compiled training -------------------------------------------------------------------------


@pytest.mark.filterwarnings("error:torch.compile failed:RuntimeWarning")
def test_compiled_general_distiller_matches_textbrewer(tmp_path):
    """compile=True: the loss path runs compiled (no eager fallback) and trains alike."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    teacher, student = pair()
    # 16 examples in batches of 4: one batch shape, one compiled graph
    both("general", teacher, student, tmp_path=tmp_path, data=loader(tuple_data(16)),
         compile=True, training={"gradient_accumulation_steps": 2},
         distillation={"temperature_scheduler": ["flsw", 1, 2], "hard_label_weight": 0.5,
                       "kd_loss_weight_scheduler": "linear_decay",
                       "intermediate_matches": MATCHES},
         train={"num_epochs": 2, "max_grad_norm": 0.5})
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1


# -- modes -------------------------------------------------------------------------------------


def models_for(kind: str) -> tuple[Any, nn.Module, Any, Any]:
    teacher, student = pair()
    if kind == "multiteacher":
        return teachers(2), student, make_adaptor(), make_adaptor()
    if kind == "multitask":
        return ({"a": teacher, "b": teachers(1)[0]}, student, {"a": make_adaptor(), "b": make_adaptor()},
                {"a": make_adaptor(), "b": make_adaptor()})
    return teacher, student, make_adaptor(), make_adaptor()


def teacher_modules(model_T: Any) -> list[nn.Module]:
    if isinstance(model_T, dict):
        return list(model_T.values())
    return list(model_T) if isinstance(model_T, list) else [model_T]


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("kind", ["basic", "general", "multiteacher", "multitask"])
def test_with_distiller_sets_and_restores_modes(tmp_path, lib, kind):
    model_T, student, adaptor_T, adaptor_S = models_for(kind)
    modules = teacher_modules(model_T)
    for index, teacher in enumerate(modules):
        teacher.train(index % 2 == 0)  # mixed modes: each is restored to its own
    student.eval()
    before = [t.training for t in modules]
    t_config = lib.TrainingConfig(device="cpu", output_dir=str(tmp_path))
    distiller = distiller_class(lib, kind)(t_config, lib.DistillationConfig(), model_T, student,
                                           adaptor_T, adaptor_S)
    with distiller:
        assert not any(t.training for t in modules)
        assert all(not m.training for t in modules for m in t.modules())
        assert student.training and all(m.training for m in student.modules())
    assert [t.training for t in modules] == before
    assert not student.training


@pytest.mark.parametrize("lib", LIBS)
def test_with_trainer_sets_and_restores_mode(tmp_path, lib):
    _, model = pair()
    model.eval()
    trainer = lib.BasicTrainer(lib.TrainingConfig(device="cpu", output_dir=str(tmp_path)), model,
                               trainer_adaptor)
    with trainer:
        assert model.training
    assert not model.training
    model.train()
    with trainer:
        assert model.training
    assert model.training
