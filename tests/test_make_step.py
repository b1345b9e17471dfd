"""``make_step`` equals TextBrewer 0.2.1.

Each case builds purekd's step and a fresh TextBrewer distiller on the same models (projections
drawn under the same seed) and compares, at progress 0, the total loss, every unweighted term
(TextBrewer's ``'unweighted_X'`` is ``out.terms['X']``) and the gradients of the student's and
the projections' parameters. A plain PyTorch loop driven by the step then reproduces the
weights ``GeneralDistiller.train`` reaches.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import purekd
from purekd.schedules import linear_decay, linear_growth
from tests._toys import (
    ATOL,
    BrokenTeacher,
    TBCustomMatch,
    ToyEncoder,
    assert_matches_textbrewer,
    make_step,
    textbrewer_distiller,
    toy_adaptor,
    toy_batch,
)

WIDTH_T, WIDTH_S = 8, 6


def toy_models(width_S: int = WIDTH_S, *, seed: int = 0, **kwargs):
    """A 3-layer teacher of width 8 and a 2-layer student (hidden lists of 4 and 3 layers)."""
    torch.manual_seed(seed)
    return (ToyEncoder(WIDTH_T, layers=3, **kwargs),
            ToyEncoder(width_S, layers=2, **kwargs))


# --- every match loss, masked and not, with every projection ---------------------------------

SINGLE_LOSSES = ["hidden_mse", "cos", "pkd"]
PAIR_LOSSES = ["fsp", "gram", "mmd", "nst"]
ATTENTION_LOSSES = ["attention_mse", "attention_mse_sum", "attention_ce", "attention_ce_mean"]
PROJECTIONS = [None, "linear", "relu", "tanh"]


@pytest.mark.parametrize("masked", [True, False], ids=["masked", "unmasked"])
@pytest.mark.parametrize("proj", PROJECTIONS, ids=lambda p: f"proj={p}")
@pytest.mark.parametrize("loss", SINGLE_LOSSES + PAIR_LOSSES)
def test_hidden_match_losses(loss, proj, masked):
    width_free = loss in ("mmd", "nst")
    width_S = WIDTH_S if proj is not None or width_free else WIDTH_T
    teacher, student = toy_models(width_S)
    pair = loss in PAIR_LOSSES
    match = {"layer_T": [1, 3] if pair else 3, "layer_S": [0, 2] if pair else 2,
             "feature": "hidden", "loss": loss, "weight": 0.7}
    if proj is not None:
        match["proj"] = [proj, width_S, WIDTH_T]
    adaptor = toy_adaptor(inputs_mask=masked)
    out = assert_matches_textbrewer({"intermediate_matches": [match]}, teacher, student,
                                    adaptor, adaptor, toy_batch())
    name = f"hidden_{loss}_{'0-2' if pair else 2}_{'1-3' if pair else 3}"
    assert set(out.terms) == {"kd_loss", name, "hard_label_loss"}


@pytest.mark.parametrize("masked", [True, False], ids=["masked", "unmasked"])
@pytest.mark.parametrize("loss", ATTENTION_LOSSES)
def test_attention_match_losses(loss, masked):
    teacher, student = toy_models()
    adaptor = toy_adaptor(inputs_mask=masked)
    matches = [{"layer_T": 2, "layer_S": 1, "feature": "attention", "loss": loss, "weight": 0.3},
               {"layer_T": 0, "layer_S": 0, "feature": "attention", "loss": loss, "weight": 2}]
    out = assert_matches_textbrewer({"intermediate_matches": matches}, teacher, student,
                                    adaptor, adaptor, toy_batch())
    assert f"attention_{loss}_1_2" in out.terms and f"attention_{loss}_0_0" in out.terms


def test_many_matches_at_once():
    teacher, student = toy_models()
    adaptor = toy_adaptor()
    matches = [
        {"layer_T": 3, "layer_S": 2, "feature": "hidden", "loss": "hidden_mse", "weight": 1,
         "proj": ["linear", WIDTH_S, WIDTH_T, {"lr": 0.1}]},
        {"layer_T": 1, "layer_S": 1, "feature": "attention", "loss": "attention_ce", "weight": 0.3},
        {"layer_T": [0, 1], "layer_S": [0, 1], "feature": "hidden", "loss": "mmd", "weight": 0.7},
        {"layer_T": [0, 1], "layer_S": [0, 1], "feature": "hidden", "loss": "fsp", "weight": 0.7,
         "proj": ["tanh", WIDTH_S, WIDTH_T]},
        {"layer_T": 2, "layer_S": 1, "feature": "hidden", "loss": "cos", "weight": 1,
         "proj": ["relu", WIDTH_S, WIDTH_T]},
    ]
    config = {"temperature": 3, "hard_label_weight": 0.5, "temperature_scheduler": ["flsw", 1, 2],
              "probability_shift": True, "intermediate_matches": matches}
    out = assert_matches_textbrewer(config, teacher, student, adaptor, adaptor, toy_batch())
    assert len(out.terms) == 7


# --- logits KD: loss type x temperature schedule x logits layout ------------------------------

TEMPERATURE_SCHEDULERS = ["none", "constant", ["flsw", 1, 2], ["cwsm", 1]]
LOGITS_LAYOUTS = {
    # name: (ToyEncoder kwargs, adaptor kwargs)
    "sequence": ({}, {}),
    "sequence-2-heads": ({"n_logits": 2}, {}),
    "single-tensor": ({}, {"logits": 0}),
    "token-masked": ({"token_level": True}, {"logits_mask": True}),
    "token-unmasked": ({"token_level": True}, {}),
    "token-2-heads-masked": ({"token_level": True, "n_logits": 2}, {"logits_mask": True}),
}


@pytest.mark.parametrize("layout", list(LOGITS_LAYOUTS))
@pytest.mark.parametrize("scheduler", TEMPERATURE_SCHEDULERS, ids=str)
@pytest.mark.parametrize("kd_loss_type", ["ce", "mse"])
def test_logits_kd(kd_loss_type, scheduler, layout):
    model_kwargs, adaptor_kwargs = LOGITS_LAYOUTS[layout]
    teacher, student = toy_models(**model_kwargs)
    adaptor = toy_adaptor(hidden=False, attention=False, **adaptor_kwargs)
    config = {"kd_loss_type": kd_loss_type, "temperature": 2.5,
              "temperature_scheduler": scheduler, "kd_loss_weight": 0.8,
              "hard_label_weight": 0.4}
    batch = toy_batch(token_level=model_kwargs.get("token_level", False))
    assert_matches_textbrewer(config, teacher, student, adaptor, adaptor, batch)


@pytest.mark.parametrize("scheduler", ["none", ["flsw", 2, 1], ["cwsm", 0.5]], ids=str)
@pytest.mark.parametrize("kd_loss_type", ["ce", "mse"])
@pytest.mark.parametrize("n_logits", [1, 2])
def test_probability_shift(kd_loss_type, scheduler, n_logits):
    teacher, student = toy_models(n_logits=n_logits)
    adaptor = toy_adaptor()
    config = {"kd_loss_type": kd_loss_type, "temperature_scheduler": scheduler,
              "probability_shift": True}
    batch = toy_batch(seed=3)
    assert_matches_textbrewer(config, teacher, student, adaptor, adaptor, batch)


# --- weights: fixed at the first step, scheduled after ------------------------------------------

WEIGHT_SCHEDULES = {"none": None, "linear_decay": linear_decay, "linear_growth": linear_growth}


@pytest.mark.parametrize("hl_scheduler", list(WEIGHT_SCHEDULES))
@pytest.mark.parametrize("kd_scheduler", list(WEIGHT_SCHEDULES))
def test_weight_schedulers(kd_scheduler, hl_scheduler):
    teacher, student = toy_models()
    adaptor = toy_adaptor()
    match = {"layer_T": 3, "layer_S": 2, "feature": "hidden", "loss": "hidden_mse", "weight": 0.6,
             "proj": ["linear", WIDTH_S, WIDTH_T]}
    config = {"kd_loss_weight": 0.9, "kd_loss_weight_scheduler": kd_scheduler,
              "hard_label_weight": 0.7, "hard_label_weight_scheduler": hl_scheduler,
              "intermediate_matches": [match]}
    batch = toy_batch()
    # progress 0: TextBrewer's first step uses the fixed weights
    assert_matches_textbrewer(config, teacher, student, adaptor, adaptor, batch, grads=False)
    # progress p > 0: the scheduled weight is schedule(p) (TextBrewer overwrites the weight)
    step = make_step(config, teacher, student, adaptor, adaptor)
    for progress in (0.25, 0.6, 1.0):
        out = step(batch, progress=progress)
        w_kd = (0.9 if kd_scheduler == "none" else WEIGHT_SCHEDULES[kd_scheduler](progress))
        w_hl = (0.7 if hl_scheduler == "none" else WEIGHT_SCHEDULES[hl_scheduler](progress))
        expected = (w_kd * out.terms["kd_loss"] + 0.6 * out.terms["hidden_hidden_mse_2_3"]
                    + w_hl * out.terms["hard_label_loss"])
        torch.testing.assert_close(out.loss, expected, atol=ATOL, rtol=0)


# --- hard labels ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n_losses", [1, 3])
def test_hard_label_losses(n_losses):
    teacher, student = toy_models()
    base = toy_adaptor(hidden=False, attention=False)

    def adaptor_S(batch, outputs):
        result = base(batch, outputs)
        loss = result["losses"]
        result["losses"] = loss if n_losses == 1 else [loss, loss * 0.5, loss.reshape(1) ** 2]
        return result

    config = {"hard_label_weight": 0.5, "kd_loss_weight": 0.25}
    out = assert_matches_textbrewer(config, teacher, student, base, adaptor_S, toy_batch())
    assert "hard_label_loss" in out.terms


def test_only_hard_labels_when_the_teacher_has_no_logits():
    teacher, student = toy_models()
    adaptor_T = toy_adaptor(logits=False)
    adaptor_S = toy_adaptor()
    config = {"hard_label_weight": 1.0, "intermediate_matches": [
        {"layer_T": 2, "layer_S": 1, "feature": "attention", "loss": "attention_mse", "weight": 1}]}
    out = assert_matches_textbrewer(config, teacher, student, adaptor_T, adaptor_S, toy_batch())
    assert "kd_loss" not in out.terms


# --- batches: tuple, dict, separate teacher / student batches, cached teacher outputs, args ----


MATCHES = [
    {"layer_T": 3, "layer_S": 2, "feature": "hidden", "loss": "hidden_mse", "weight": 1,
     "proj": ["linear", WIDTH_S, WIDTH_T]},
    {"layer_T": 1, "layer_S": 0, "feature": "attention", "loss": "attention_mse", "weight": 0.5},
]
CONFIG = {"temperature": 2, "hard_label_weight": 0.3, "intermediate_matches": MATCHES}


@pytest.mark.parametrize("as_dict", [False, True], ids=["tuple", "dict"])
def test_tuple_and_dict_batches(as_dict):
    teacher, student = toy_models()
    adaptor = toy_adaptor()
    assert_matches_textbrewer(CONFIG, teacher, student, adaptor, adaptor,
                              toy_batch(as_dict=as_dict))


def test_model_args_reach_both_models():
    teacher, student = toy_models()
    adaptor = toy_adaptor()
    out = assert_matches_textbrewer(CONFIG, teacher, student, adaptor, adaptor, toy_batch(),
                                    args={"scale": 0.5})
    plain = make_step(CONFIG, teacher, student, adaptor, adaptor)(toy_batch())
    assert not torch.allclose(out.loss, plain.loss)


@pytest.mark.parametrize("inner", ["tuple", "dict"])
def test_different_teacher_and_student_batches(inner):
    torch.manual_seed(0)
    teacher = ToyEncoder(WIDTH_T, layers=3, in_dim=5)
    student = ToyEncoder(WIDTH_S, layers=2, in_dim=4)
    as_dict = inner == "dict"
    batch_T = toy_batch(seed=1, in_dim=5, as_dict=as_dict, with_labels=False)
    batch_S = toy_batch(seed=2, in_dim=4, as_dict=as_dict)
    batch_T["mask" if as_dict else 1].copy_(batch_S["mask" if as_dict else 1])
    adaptor = toy_adaptor()
    out = assert_matches_textbrewer(CONFIG, teacher, student, adaptor, adaptor,
                                    {"teacher": batch_T, "student": batch_S})
    same = make_step(CONFIG, teacher, student, adaptor, adaptor)(
        {"teacher": toy_batch(seed=2, in_dim=5), "student": batch_S})
    assert not torch.allclose(out.loss, same.loss)


def test_teacher_cache_replaces_the_teacher():
    real_teacher, student = toy_models()
    adaptor = toy_adaptor()
    batch = toy_batch()
    with torch.no_grad():
        cached = real_teacher(*batch[:2])
    cached_batch = {"teacher": batch, "student": batch, "teacher_cache": cached}
    out = assert_matches_textbrewer(CONFIG, BrokenTeacher(), student, adaptor, adaptor,
                                    cached_batch)
    live = make_step(CONFIG, real_teacher, student, adaptor, adaptor)(batch)
    torch.testing.assert_close(out.loss, live.loss, atol=ATOL, rtol=0)


# --- several teachers, several tasks -------------------------------------------------------------


MULTI_TEACHER_CONFIGS = {
    "plain": ({}, {}, {"temperature": 3, "hard_label_weight": 0.2}),
    "shift-flsw": ({}, {}, {"probability_shift": True, "temperature_scheduler": ["flsw", 1, 1]}),
    "mse-decay": ({}, {}, {"kd_loss_type": "mse", "kd_loss_weight_scheduler": "linear_decay"}),
    "token-masked": ({"token_level": True}, {"logits_mask": True},
                     {"temperature_scheduler": ["cwsm", 1], "hard_label_weight": 1}),
    "two-heads": ({"n_logits": 2}, {}, {"temperature": 2}),
}


@pytest.mark.parametrize("per_teacher_adaptors", [False, True], ids=["one-adaptor", "adaptors"])
@pytest.mark.parametrize("case", list(MULTI_TEACHER_CONFIGS))
def test_multi_teacher(case, per_teacher_adaptors):
    model_kwargs, adaptor_kwargs, config = MULTI_TEACHER_CONFIGS[case]
    torch.manual_seed(0)
    teachers = [ToyEncoder(WIDTH_T, layers=3, **model_kwargs) for _ in range(3)]
    student = ToyEncoder(WIDTH_S, **model_kwargs)
    adaptor = toy_adaptor(hidden=False, attention=False, **adaptor_kwargs)
    adaptor_T = [toy_adaptor(**adaptor_kwargs) for _ in teachers] if per_teacher_adaptors else adaptor
    batch = toy_batch(token_level=model_kwargs.get("token_level", False))
    assert_matches_textbrewer(config, teachers, student, adaptor_T, adaptor, batch,
                              kind="multiteacher")


def test_multi_teacher_with_cached_outputs():
    torch.manual_seed(0)
    teachers = [ToyEncoder(WIDTH_T, layers=3) for _ in range(2)]
    student = ToyEncoder(WIDTH_S)
    adaptor = toy_adaptor()
    batch = toy_batch()
    with torch.no_grad():
        cached = [t(*batch[:2]) for t in teachers]
    config = {"probability_shift": True, "hard_label_weight": 0.5}
    out = assert_matches_textbrewer(
        config, [BrokenTeacher(), BrokenTeacher()], student, adaptor, adaptor,
        {"teacher": batch, "student": batch, "teacher_cache": cached}, kind="multiteacher")
    live = make_step(config, teachers, student, adaptor, adaptor)(batch)
    torch.testing.assert_close(out.loss, live.loss, atol=ATOL, rtol=0)


@pytest.mark.parametrize("task", ["a", "b"])
def test_multitask(task):
    torch.manual_seed(0)
    teachers = {"a": ToyEncoder(WIDTH_T, layers=3), "b": ToyEncoder(WIDTH_T, layers=3, classes=3)}
    student = ToyEncoder(WIDTH_S, n_logits=2)
    student.outs[1] = nn.Linear(WIDTH_S, 3)
    adaptor_T = {"a": toy_adaptor(), "b": toy_adaptor()}
    adaptor_S = {"a": toy_adaptor(logits=[0]), "b": toy_adaptor(logits=[1])}
    batches = {"a": toy_batch(seed=5, classes=3), "b": toy_batch(seed=6, classes=3)}
    config = {"hard_label_weight": 0.5, "temperature_scheduler": ["flsw", 1, 2],
              "intermediate_matches": MATCHES}
    step = make_step(config, teachers, student, adaptor_T, adaptor_S)
    assert sorted(step.tasks) == ["a", "b"]
    assert_matches_textbrewer(config, teachers, student, adaptor_T, adaptor_S, batches[task],
                              kind="multitask", task=task)


# --- custom matches: TextBrewer 0.2.1 crashes, so compare with a hand computation -------------


def _custom_loss(out_S, out_T, mask_S, mask_T):
    weights = mask_S.unsqueeze(-1).to(out_S.dtype) * mask_T.unsqueeze(-1).to(out_S.dtype)
    return ((out_S - out_T) ** 2 * weights).sum() / weights.sum()


@pytest.mark.parametrize("form", ["dict", "purekd", "textbrewer"])
def test_custom_matches_add_their_weighted_loss(form):
    teacher, student = toy_models()
    adaptor = toy_adaptor()
    batch = toy_batch()
    torch.manual_seed(3)
    proj = nn.Linear(WIDTH_S, WIDTH_T)
    fields = {"module_T": teacher.blocks[1], "module_S": student.blocks[0], "weight": 0.25,
              "loss": _custom_loss, "proj_func": proj}
    match = {"dict": lambda: fields, "purekd": lambda: purekd.CustomMatch(**fields),
             "textbrewer": lambda: TBCustomMatch(**fields)}[form]()
    second = {"module_T": teacher.embed, "module_S": student.embed, "weight": 2.0,
              "loss": lambda s, t, ms, mt: (s[..., :1] - t[..., :1]).pow(2).mean()}
    step = make_step(CONFIG, teacher, student, adaptor, adaptor, custom_matches=[match, second])
    out = step(batch)

    # by hand: the step without custom matches, plus each match on hooked module outputs
    base = make_step(CONFIG, teacher, student, adaptor, adaptor)(batch)
    with torch.no_grad():
        emb_T = teacher.embed(batch[0])
        out_T = teacher.blocks[1](torch.tanh(teacher.blocks[0](emb_T)))
    emb_S = student.embed(batch[0])
    out_S = student.blocks[0](emb_S)
    first_value = _custom_loss(proj(out_S), out_T, batch[1], batch[1])
    second_value = (emb_S[..., :1] - emb_T[..., :1]).pow(2).mean()
    torch.testing.assert_close(out.terms["custom_match_0"], first_value, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.terms["custom_match_1"], second_value, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.loss, base.loss + 0.25 * first_value + 2.0 * second_value,
                               atol=ATOL, rtol=0)
    assert {id(p) for p in proj.parameters()} <= {id(p) for p in step.parameters()}
    # no hook stays attached to the models
    assert not teacher.blocks[1]._forward_hooks and not student.blocks[0]._forward_hooks


def test_textbrewer_custom_matches_crash():
    """Why custom matches are checked by hand: TextBrewer 0.2.1 reads a misspelt cache key."""
    teacher, student = toy_models()
    adaptor = toy_adaptor()
    match = TBCustomMatch(teacher.blocks[0], student.blocks[0], 1.0, _custom_loss,
                          nn.Linear(WIDTH_S, WIDTH_T))
    distiller = textbrewer_distiller(CONFIG, teacher, student, adaptor, adaptor,
                                     custom_matches=[match])
    with pytest.raises(KeyError, match="match_weghts"):
        distiller.train_on_batch(toy_batch(), {})


# --- a plain PyTorch loop driven by the step reproduces GeneralDistiller.train ----------------


def test_plain_loop_reproduces_textbrewer_training():
    teacher, student = toy_models()
    adaptor = toy_adaptor()
    matches = [
        {"layer_T": 3, "layer_S": 2, "feature": "hidden", "loss": "hidden_mse", "weight": 1,
         "proj": ["linear", WIDTH_S, WIDTH_T]},
        {"layer_T": 2, "layer_S": 1, "feature": "attention", "loss": "attention_ce", "weight": 0.5},
    ]
    config = {"temperature": 2, "hard_label_weight": 0.5,
              "kd_loss_weight_scheduler": "linear_decay", "intermediate_matches": matches}
    batches = [toy_batch(seed=100 + i) for i in range(10)]

    student_TB = copy.deepcopy(student)
    distiller = textbrewer_distiller(config, teacher, student_TB, adaptor, adaptor)
    optimizer_TB = torch.optim.SGD(student_TB.parameters(), lr=0.2, momentum=0.9)
    distiller.train(optimizer_TB, batches, num_epochs=1)

    student_PK = copy.deepcopy(student)
    step = make_step(config, teacher, student_PK, adaptor, adaptor)
    optimizer = torch.optim.SGD(step.parameters(), lr=0.2, momentum=0.9)
    for global_step, batch in enumerate(batches):
        out = step(batch, progress=global_step / len(batches))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    moved = sum((a - b).abs().sum() for a, b in zip(student_PK.parameters(), student.parameters(),
                                                    strict=True))
    assert moved > 1e-2  # training did change the weights
    for (name, ours), theirs in zip(student_PK.named_parameters(), student_TB.parameters(),
                                    strict=True):
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    projection_TB = distiller.projs[0]
    for ours, theirs in zip(step.projections[0].parameters(), projection_TB.parameters(),
                            strict=True):
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


# --- a few more layouts TextBrewer accepts ------------------------------------------------------


@pytest.mark.parametrize("kd_loss_type", ["ce", "mse"])
def test_probability_shift_on_unmasked_token_logits(kd_loss_type):
    """3-d logits, labels (B, L) with -100 on padding: ignored rows keep the teacher's logits."""
    teacher, student = toy_models(token_level=True)
    adaptor = toy_adaptor(hidden=False, attention=False)
    config = {"kd_loss_type": kd_loss_type, "probability_shift": True,
              "temperature_scheduler": ["flsw", 1, 1]}
    assert_matches_textbrewer(config, teacher, student, adaptor, adaptor,
                              toy_batch(token_level=True))


@pytest.mark.parametrize("masked", [True, False], ids=["masked", "unmasked"])
@pytest.mark.parametrize("loss", ["attention_mse_sum", "attention_ce_mean"])
def test_attention_losses_on_3d_attention(loss, masked):
    """Attention given as (B, L, L) (heads already reduced), which these two losses accept."""
    teacher, student = toy_models()
    base = toy_adaptor(inputs_mask=masked)

    def adaptor(batch, outputs):
        result = base(batch, outputs)
        result["attention"] = [a.mean(dim=1) for a in result["attention"]]
        return result

    match = {"layer_T": 2, "layer_S": 1, "feature": "attention", "loss": loss, "weight": 0.5}
    assert_matches_textbrewer({"intermediate_matches": [match]}, teacher, student, adaptor,
                              adaptor, toy_batch())


@pytest.mark.parametrize("scheduler", ["none", ["flsw", 1, 2]], ids=str)
def test_each_side_selects_rows_with_its_own_logits_mask(scheduler):
    """Different teacher and student masks with the same number of kept rows: TextBrewer pairs
    the k-th kept teacher row with the k-th kept student row."""
    torch.manual_seed(0)
    teacher = ToyEncoder(WIDTH_T, layers=3, token_level=True)
    student = ToyEncoder(WIDTH_S, token_level=True)
    batch_S = toy_batch(seed=1, token_level=True)
    x_T = toy_batch(seed=2, token_level=True)[0]
    mask_T = batch_S[1].flip(0)  # other rows padded, same count of kept rows
    adaptor = toy_adaptor(logits_mask=True, hidden=False, attention=False)
    config = {"temperature_scheduler": scheduler, "hard_label_weight": 0.5}
    assert_matches_textbrewer(config, teacher, student, adaptor, adaptor,
                              {"teacher": (x_T, mask_T), "student": batch_S})
