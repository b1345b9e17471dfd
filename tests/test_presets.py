"""Preset maps: the same names as TextBrewer's, errors that list the valid names, register_new."""

from __future__ import annotations

import pytest
import torch
from textbrewer import presets as tb

from purekd import losses, presets, schedules
from tests.conftest import generator, randn


@pytest.fixture
def registered():
    """Names registered during a test, removed afterwards: append ``(map_name, name)``."""
    added: list[tuple[str, str]] = []
    yield added
    for map_name, name in added:
        presets.MAPS[map_name].pop(name, None)


# ---------------------------------------------------------------- map contents
def test_kd_loss_map():
    assert set(tb.KD_LOSS_MAP) == {"ce", "mse"}
    assert set(presets.KD_LOSS_MAP) == {"ce", "mse", *presets.TOKEN_KD_LOSSES,
                                        *presets.SAMPLED_KD_LOSSES}
    for name in [*presets.TOKEN_KD_LOSSES, *presets.SAMPLED_KD_LOSSES]:
        assert presets.KD_LOSS_MAP[name] is getattr(losses, name)
    assert presets.KD_LOSS_MAP["ce"] is losses.kd_ce
    assert presets.KD_LOSS_MAP["mse"] is losses.kd_mse


def test_match_loss_map_has_textbrewers_eleven_names():
    expected = {
        "attention_mse_sum": losses.attention_mse_sum,
        "attention_mse": losses.attention_mse,
        "attention_ce_mean": losses.attention_ce_mean,
        "attention_ce": losses.attention_ce,
        "hidden_mse": losses.hidden_mse,
        "cos": losses.cos,
        "pkd": losses.pkd,
        "gram": losses.fsp,
        "fsp": losses.fsp,
        "mmd": losses.mmd,
        "nst": losses.mmd,
    }
    assert len(presets.MATCH_LOSS_MAP) == 11
    assert set(presets.MATCH_LOSS_MAP) == set(tb.MATCH_LOSS_MAP) == set(expected)
    for name, func in expected.items():
        assert presets.MATCH_LOSS_MAP[name] is func


@pytest.mark.parametrize("name", sorted(tb.MATCH_LOSS_MAP))
def test_match_losses_agree_with_textbrewer_by_name(name):
    gen = generator(0)
    if name.startswith("attention"):
        s, t = randn(gen, 2, 2, 4, 4), randn(gen, 2, 2, 4, 4)
    elif name in presets.PAIR_LOSSES:
        s = (randn(gen, 2, 4, 3), randn(gen, 2, 4, 3))
        t = (randn(gen, 2, 4, 3), randn(gen, 2, 4, 3))
    else:
        s, t = randn(gen, 2, 4, 3), randn(gen, 2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 0]])
    torch.testing.assert_close(presets.MATCH_LOSS_MAP[name](s, t, mask),
                               tb.MATCH_LOSS_MAP[name](s, t, mask), atol=1e-5, rtol=0)


def test_features_and_adaptor_keys_equal_textbrewers():
    assert presets.FEATURES == tb.FEATURES
    # TextBrewer's keys first, in its order; then the language-model keys purekd adds
    assert presets.ADAPTOR_KEYS[:len(tb.ADAPTOR_KEYS)] == tb.ADAPTOR_KEYS
    assert presets.ADAPTOR_KEYS[len(tb.ADAPTOR_KEYS):] == [*presets.LM_KEYS, *presets.TOPK_KEYS]


def test_weight_scheduler():
    assert set(presets.WEIGHT_SCHEDULER) == set(tb.WEIGHT_SCHEDULER)
    assert presets.WEIGHT_SCHEDULER["linear_decay"] is schedules.linear_decay
    assert presets.WEIGHT_SCHEDULER["linear_growth"] is schedules.linear_growth
    for p in (0.0, 0.4, 1.0):
        for name in tb.WEIGHT_SCHEDULER:
            assert presets.WEIGHT_SCHEDULER[name](p) == tb.WEIGHT_SCHEDULER[name](p)


# ---------------------------------------------------------------- projections
@pytest.mark.parametrize("name", ["linear", "relu", "tanh"])
def test_proj_map_matches_textbrewer_under_the_same_seed(name):
    assert set(presets.PROJ_MAP) == set(tb.PROJ_MAP)
    torch.manual_seed(1234)
    ours = presets.PROJ_MAP[name](3, 5)
    after_ours = torch.rand(1)
    torch.manual_seed(1234)
    theirs = tb.PROJ_MAP[name](3, 5)
    after_theirs = torch.rand(1)
    assert torch.equal(after_ours, after_theirs)  # the same number of random draws
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert ours_state.keys() == theirs_state.keys()
    for key in theirs_state:
        assert torch.equal(ours_state[key], theirs_state[key]), key
    x = torch.randn(4, 3)
    assert torch.equal(ours(x), theirs(x))


@pytest.mark.parametrize(
    ("name", "activation"),
    [("linear", lambda y: y), ("relu", torch.relu), ("tanh", torch.tanh)],
)
def test_proj_map_structure(name, activation):
    proj = presets.PROJ_MAP[name](3, 5)
    linear = proj if isinstance(proj, torch.nn.Linear) else proj[0]
    assert isinstance(linear, torch.nn.Linear)
    assert linear.weight.shape == (5, 3)
    assert torch.equal(linear.bias, torch.zeros(5))
    x = torch.randn(6, 3) * 50
    torch.testing.assert_close(proj(x), activation(x @ linear.weight.T))
    out = proj(x)
    if name == "relu":
        assert (out >= 0).all() and (out == 0).any()
    if name == "tanh":
        assert (out.abs() <= 1).all()


# ---------------------------------------------------------------- temperature scheduler
def test_temperature_scheduler_names():
    ts = presets.TEMPERATURE_SCHEDULER
    assert set(ts) == {"constant", "flsw", "cwsm"}
    assert ts["constant"] is schedules.constant_temperature
    assert "constant" in ts and ["flsw", 1, 2] in ts and ("cwsm", 1) in ts
    assert "nope" not in ts and ["nope", 1] not in ts


@pytest.mark.parametrize(
    ("key", "tb_key"),
    [
        (["flsw", 1, 2], ["flsw", 1, 2]),
        (("flsw", 0.5, 1.5), ("flsw", 0.5, 1.5)),
        (["flsw", {"beta": 2, "gamma": 1}], ["flsw", {"beta": 2, "gamma": 1}]),
        (["cwsm", 1], ["cwsm", 1]),
        (["cwsm", {"beta": 0.5}], ["cwsm", {"beta": 0.5}]),
    ],
)
def test_temperature_scheduler_builders_match_textbrewer(key, tb_key):
    gen = generator(3)
    logits_S, logits_T = randn(gen, 4, 5), randn(gen, 4, 5)
    schedule = presets.TEMPERATURE_SCHEDULER[key]
    tb_schedule = tb.TEMPERATURE_SCHEDULER[tb_key]
    torch.testing.assert_close(schedule(logits_S, logits_T, 4.0),
                               tb_schedule(logits_S, logits_T, 4.0), atol=1e-6, rtol=0)


@pytest.mark.parametrize("key", ["flsw", "cwsm", ["flsw"], ["flsw", 1], ["cwsm"]])
def test_temperature_scheduler_builder_without_arguments_raises(key):
    name = key[0] if isinstance(key, list) else key
    with pytest.raises(ValueError, match=name) as info:
        presets.TEMPERATURE_SCHEDULER[key]
    assert "beta" in str(info.value)


def test_temperature_scheduler_constant_takes_no_arguments():
    with pytest.raises(ValueError, match="constant"):
        presets.TEMPERATURE_SCHEDULER[["constant", 1]]
    assert presets.TEMPERATURE_SCHEDULER[["constant"]] is schedules.constant_temperature


@pytest.mark.parametrize("key", ["nope", ["nope", 1], []])
def test_temperature_scheduler_unknown_lists_valid_names(key):
    with pytest.raises(ValueError) as info:
        presets.TEMPERATURE_SCHEDULER[key]
    for valid in ("constant", "flsw", "cwsm"):
        assert valid in str(info.value)


# ---------------------------------------------------------------- unknown names
@pytest.mark.parametrize(
    ("preset", "valid"),
    [
        (presets.KD_LOSS_MAP, ["ce", "mse"]),
        (presets.MATCH_LOSS_MAP, sorted(tb.MATCH_LOSS_MAP)),
        (presets.PROJ_MAP, ["linear", "relu", "tanh"]),
        (presets.WEIGHT_SCHEDULER, ["linear_decay", "linear_growth"]),
    ],
)
def test_unknown_name_raises_value_error_listing_valid_names(preset, valid):
    with pytest.raises(ValueError) as info:
        preset["no_such_name"]
    message = str(info.value)
    assert "no_such_name" in message
    for name in valid:
        assert repr(name) in message
    assert isinstance(info.value, KeyError)  # dict-style lookups keep working
    assert "no_such_name" not in preset
    assert preset.get("no_such_name") is None


# ---------------------------------------------------------------- register_new
@pytest.mark.parametrize(
    ("map_name", "preset"),
    [
        ("kd_loss", presets.KD_LOSS_MAP),
        ("match_loss", presets.MATCH_LOSS_MAP),
        ("match_Loss", presets.MATCH_LOSS_MAP),  # TextBrewer's spelling
        ("projection", presets.PROJ_MAP),
        ("weight_scheduler", presets.WEIGHT_SCHEDULER),
        ("temperature_scheduler", presets.TEMPERATURE_SCHEDULER),
    ],
)
def test_register_new_adds_to_the_map(registered, map_name, preset):
    def custom(*args, **kwargs):
        return "custom"

    name = f"test_custom_{map_name}"
    assert name not in preset
    registered.append((map_name, name))
    presets.register_new(map_name, name, custom)
    assert name in preset
    assert preset[name] is custom
    assert name in presets.MAPS[map_name]


def test_registered_match_loss_is_usable(registered):
    def l1(feature_S, feature_T, mask=None):
        return (feature_S - feature_T).abs().mean()

    registered.append(("match_loss", "test_l1"))
    presets.register_new("match_loss", "test_l1", l1)
    s, t = torch.ones(2, 3), torch.zeros(2, 3)
    assert presets.MATCH_LOSS_MAP["test_l1"](s, t).item() == 1.0


def test_register_new_unknown_map_lists_valid_maps():
    with pytest.raises(ValueError, match="no_such_map") as info:
        presets.register_new("no_such_map", "x", lambda: None)
    for valid in ("kd_loss", "match_loss", "projection", "weight_scheduler",
                  "temperature_scheduler"):
        assert valid in str(info.value)
    assert "x" not in presets.KD_LOSS_MAP


def test_register_new_rejects_non_callables():
    with pytest.raises(TypeError, match="callable"):
        presets.register_new("kd_loss", "test_not_callable", 42)
    assert "test_not_callable" not in presets.KD_LOSS_MAP
    with pytest.raises(TypeError):
        presets.register_new("kd_loss", 3, lambda: None)
    assert 3 not in presets.KD_LOSS_MAP


def test_direct_assignment_as_in_textbrewers_docs(registered):
    def my_l1_loss(feature_S, feature_T, mask=None):
        return (feature_S - feature_T).abs().mean()

    registered.append(("match_loss", "test_my_l1_loss"))
    presets.MATCH_LOSS_MAP["test_my_l1_loss"] = my_l1_loss
    assert presets.MATCH_LOSS_MAP["test_my_l1_loss"] is my_l1_loss
    del presets.MATCH_LOSS_MAP["test_my_l1_loss"]
    assert "test_my_l1_loss" not in presets.MATCH_LOSS_MAP


def test_registered_temperature_scheduler_builder_takes_arguments(registered):
    def my_builder(beta):
        def schedule(logits_S, logits_T, base_temperature):
            return base_temperature * beta

        return schedule

    registered.append(("temperature_scheduler", "test_my_scheduler"))
    presets.register_new("temperature_scheduler", "test_my_scheduler", my_builder)
    key = ["test_my_scheduler", 0.5]
    logits = torch.zeros(2, 3)
    tb.TEMPERATURE_SCHEDULER["test_my_scheduler"] = my_builder
    try:
        assert tb.TEMPERATURE_SCHEDULER[key](logits, logits, 4.0) == 2.0
    finally:
        del tb.TEMPERATURE_SCHEDULER.store["test_my_scheduler"]
    assert presets.TEMPERATURE_SCHEDULER[key](logits, logits, 4.0) == 2.0
