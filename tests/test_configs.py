"""TrainingConfig, DistillationConfig and IntermediateMatch: TextBrewer's names and defaults,
dict / JSON round trips, unknown keys and bad values rejected with the field named, frozen
instances that training never mutates."""

from __future__ import annotations

import copy
import inspect
import json
import re
from pathlib import Path
from typing import Any

import attrs
import pytest
import textbrewer
import torch

import purekd
from purekd import DistillationConfig, IntermediateMatch, TrainingConfig


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _textbrewer_defaults(cls: type) -> dict[str, Any]:
    """TextBrewer's constructor defaults, read from its signature (building a TextBrewer
    TrainingConfig would create ./saved_models)."""
    parameters = inspect.signature(cls.__init__).parameters
    return {name: p.default for name, p in parameters.items() if name != "self"}


# -- TextBrewer's names and defaults --------------------------------------------------------------


def test_training_config_defaults_equal_textbrewer() -> None:
    ours = TrainingConfig()
    expected = _textbrewer_defaults(textbrewer.TrainingConfig)
    assert set(expected) <= {a.name for a in attrs.fields(TrainingConfig)}
    assert {a.name for a in attrs.fields(TrainingConfig)} - set(expected) == {"bf16", "fsdp"}
    assert ours.bf16 is False and ours.fsdp is None
    for name, default in expected.items():
        if name == "device":  # the one deliberate difference
            assert ours.device == ("cuda" if torch.cuda.is_available() else "cpu")
        else:
            assert getattr(ours, name) == default, name


def test_distillation_config_defaults_equal_textbrewer() -> None:
    ours = DistillationConfig()
    expected = _textbrewer_defaults(textbrewer.DistillationConfig)
    # beyond TextBrewer: the token-level options and on-policy distillation, whose defaults
    # keep TextBrewer's behaviour
    assert {a.name for a in attrs.fields(DistillationConfig)} - set(expected) == {
        "shared_vocab", "loss_normalisation", "on_policy"}
    assert ours.on_policy is None
    assert set(expected) <= {a.name for a in attrs.fields(DistillationConfig)}
    assert ours.shared_vocab is False and not ours.normalises_by_tokens
    for name, default in expected.items():
        if name == "intermediate_matches":  # None in TextBrewer means no matches
            assert default is None and ours.intermediate_matches == ()
        else:
            assert getattr(ours, name) == default, name


def test_intermediate_match_arguments_equal_textbrewer() -> None:
    from textbrewer.configurations import IntermediateMatch as TBIntermediateMatch

    expected = _textbrewer_defaults(TBIntermediateMatch)
    assert set(expected) == {a.name for a in attrs.fields(IntermediateMatch)}
    required = {n for n, d in expected.items() if d is inspect.Parameter.empty}
    assert required == {a.name for a in attrs.fields(IntermediateMatch)
                        if a.default is attrs.NOTHING}
    match = IntermediateMatch(layer_T=1, layer_S=0, weight=1, loss="hidden_mse",
                              feature="hidden")
    assert match.proj is None and expected["proj"] is None


def test_textbrewer_style_config_dicts_are_accepted() -> None:
    """The very dicts users pass to TextBrewer build equal configs through from_dict."""
    distill = {
        "temperature": 8, "temperature_scheduler": ["flsw", 1, 2], "hard_label_weight": 0.5,
        "kd_loss_type": "mse", "kd_loss_weight_scheduler": "linear_decay",
        "intermediate_matches": [
            {"layer_T": 8, "layer_S": 2, "feature": "hidden", "loss": "hidden_mse", "weight": 1,
             "proj": ["linear", 384, 768]},
            {"layer_T": [0, 0], "layer_S": [0, 0], "feature": "hidden", "loss": "nst",
             "weight": 1},
        ],
    }
    config = DistillationConfig.from_dict(distill)
    assert config == DistillationConfig(**distill)
    assert config.intermediate_matches[0].proj == ("linear", 384, 768, {})
    assert config.intermediate_matches[1].layer_T == (0, 0)
    training = {"gradient_accumulation_steps": 2, "ckpt_steps": 100, "output_dir": "out",
                "device": "cpu", "fp16": False}
    assert TrainingConfig.from_dict(training) == TrainingConfig(**training)


# -- round trips ---------------------------------------------------------------------------------

DISTILL = {
    "temperature": 3.5,
    "temperature_scheduler": ["flsw", 1, 2],
    "hard_label_weight": 0.5,
    "hard_label_weight_scheduler": "linear_growth",
    "kd_loss_type": "ce",
    "kd_loss_weight": 2,
    "kd_loss_weight_scheduler": "linear_decay",
    "probability_shift": True,
    "intermediate_matches": [
        {"layer_T": 3, "layer_S": 2, "feature": "hidden", "loss": "hidden_mse", "weight": 1,
         "proj": ["linear", 6, 8]},
        {"layer_T": [0, 1], "layer_S": [0, 1], "feature": "hidden", "loss": "fsp",
         "weight": 0.7, "proj": ["tanh", 6, 8, {"lr": 0.01}]},
        {"layer_T": 1, "layer_S": 1, "feature": "attention", "loss": "attention_ce",
         "weight": 0.3},
    ],
    "is_caching_logits": False,
}
TRAINING = {"gradient_accumulation_steps": 4, "ckpt_frequency": 2, "ckpt_epoch_frequency": 3,
            "ckpt_steps": 50, "log_dir": "logs", "output_dir": "out", "device": "cpu",
            "fp16": False, "fp16_opt_level": "O2", "data_parallel": False, "local_rank": -1,
            "bf16": True}


@pytest.mark.parametrize(("cls", "data"), [
    (DistillationConfig, DISTILL),
    (DistillationConfig, {}),
    (TrainingConfig, TRAINING),
    (TrainingConfig, {"device": "cpu"}),
    (IntermediateMatch, DISTILL["intermediate_matches"][1]),
])
def test_dict_and_json_round_trips(cls: type, data: dict[str, Any], tmp_path: Path) -> None:
    config = cls.from_dict(data)
    as_dict = config.to_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict  # plain JSON values only
    assert cls.from_dict(as_dict) == config
    assert json.loads(config.to_json()) == as_dict
    path = tmp_path / "config.json"
    path.write_text(config.to_json(indent=2))
    assert cls.from_json_file(path) == config
    assert cls.from_json_file(str(path)) == config
    for key, value in data.items():  # what was given comes back (3-element projs get their {})
        if key != "intermediate_matches" and key != "proj":
            assert as_dict[key] == value, key


def test_to_dict_of_matches() -> None:
    matches = DistillationConfig.from_dict(DISTILL).to_dict()["intermediate_matches"]
    assert matches[0]["proj"] == ["linear", 6, 8, {}]
    assert matches[1]["proj"] == ["tanh", 6, 8, {"lr": 0.01}]
    assert matches[1]["layer_T"] == [0, 1]
    assert matches[2]["proj"] is None


# -- unknown keys --------------------------------------------------------------------------------


@pytest.mark.parametrize(("cls", "data", "key"), [
    (DistillationConfig, {"temprature": 3}, "temprature"),
    (DistillationConfig, {"temperature": 3, "kd_loss": "ce"}, "kd_loss"),
    (TrainingConfig, {"gradient_accumulation": 2}, "gradient_accumulation"),
    (IntermediateMatch, {"layer_T": 0, "layer_S": 0, "feature": "hidden", "weight": 1,
                         "loss": "hidden_mse", "projection": ["linear", 1, 2]}, "projection"),
])
def test_unknown_keys_are_rejected_by_name(cls: type, data: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(key))) as info:
        cls.from_dict(data)
    assert "valid keys" in str(info.value)


def test_unknown_key_in_a_match_names_the_match(tmp_path: Path) -> None:
    bad = copy.deepcopy(DISTILL)
    bad["intermediate_matches"][2]["lose"] = "mse"
    with pytest.raises(ValueError, match=r"intermediate_matches\[2\].*'lose'"):
        DistillationConfig.from_dict(bad)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="'lose'"):
        DistillationConfig.from_json_file(path)


def test_unknown_keyword_to_the_constructor() -> None:
    with pytest.raises(TypeError, match="temprature"):
        DistillationConfig(temprature=3)


# -- bad values ----------------------------------------------------------------------------------


def _match(**overrides: Any) -> dict[str, Any]:
    match = {"layer_T": 1, "layer_S": 1, "feature": "hidden", "loss": "hidden_mse", "weight": 1}
    match.update(overrides)
    return match


BAD_DISTILL = [
    # (overrides, texts the message must contain)
    ({"temperature": 0}, ["temperature", "0"]),
    ({"temperature": -2.5}, ["temperature", "-2.5"]),
    ({"temperature": "4"}, ["temperature", "'4'"]),
    ({"kd_loss_type": "kl"}, ["kd_loss_type", "'kl'", "'ce'", "'mse'"]),
    ({"kd_loss_weight_scheduler": "cosine"},
     ["kd_loss_weight_scheduler", "'cosine'", "'linear_decay'", "'linear_growth'"]),
    ({"hard_label_weight_scheduler": "step"},
     ["hard_label_weight_scheduler", "'step'", "'linear_decay'", "'linear_growth'"]),
    ({"temperature_scheduler": "exp"},
     ["temperature_scheduler", "'exp'", "'constant'", "'flsw'", "'cwsm'"]),
    ({"temperature_scheduler": "flsw"}, ["temperature_scheduler", "'flsw'", "beta, gamma"]),
    ({"probability_shift": "yes"}, ["probability_shift", "'yes'"]),
    ({"kd_loss_weight": "1"}, ["kd_loss_weight", "'1'"]),
    ({"intermediate_matches": [_match(loss="hidden_mae")]},
     ["intermediate_matches[0]", "loss", "'hidden_mae'", "'hidden_mse'", "'attention_ce'"]),
    ({"intermediate_matches": [_match(), _match(feature="embeddings")]},
     ["intermediate_matches[1]", "feature", "'embeddings'", "'hidden'", "'attention'"]),
    ({"intermediate_matches": [_match(loss="fsp")]},
     ["intermediate_matches[0]", "layer_T", "'fsp'", "two"]),
    ({"intermediate_matches": [_match(loss="mmd", layer_T=[0, 1])]},
     ["intermediate_matches[0]", "layer_S", "'mmd'", "two"]),
    ({"intermediate_matches": [_match(loss="mmd", layer_T=[0, 1], layer_S=[0, 1.0])]},
     ["layer_S", "'mmd'"]),
    ({"intermediate_matches": [_match(layer_S=[0, 1])]}, ["layer_S", "'hidden_mse'", "one"]),
    ({"intermediate_matches": [_match(proj=["conv", 6, 8])]},
     ["intermediate_matches[0]", "proj", "'conv'", "'linear'", "'relu'", "'tanh'"]),
    ({"intermediate_matches": [_match(proj=["linear", 6])]}, ["proj", "'linear', 6", "dim_S"]),
    ({"intermediate_matches": [_match(proj=["linear", 6, 8, {}, 1])]}, ["proj", "dim_S"]),
    ({"intermediate_matches": [_match(proj=["linear", 6, 8.0])]}, ["proj", "8.0", "ints"]),
    ({"intermediate_matches": [_match(proj=["linear", "6", 8])]}, ["proj", "'6'", "ints"]),
    ({"intermediate_matches": [_match(proj=["linear", 6, 8, 0.1])]},
     ["proj", "0.1", "4th element must be a dict"]),
    ({"intermediate_matches": [_match(proj="linear")]}, ["proj", "'linear'"]),
]


@pytest.mark.parametrize(("overrides", "texts"), BAD_DISTILL,
                         ids=[str(i) for i in range(len(BAD_DISTILL))])
def test_bad_distillation_values_name_the_field_and_value(overrides: dict[str, Any],
                                                          texts: list[str]) -> None:
    for build in (DistillationConfig.from_dict, lambda d: DistillationConfig(**d)):
        with pytest.raises(ValueError) as info:
            build(overrides)
        message = str(info.value)
        for text in texts:
            assert text in message, (text, message)


BAD_TRAINING = [
    ({"gradient_accumulation_steps": 0}, ["gradient_accumulation_steps", "0"]),
    ({"gradient_accumulation_steps": 1.5}, ["gradient_accumulation_steps", "1.5"]),
    ({"ckpt_frequency": 0}, ["ckpt_frequency", "0"]),
    ({"ckpt_epoch_frequency": -1}, ["ckpt_epoch_frequency", "-1"]),
    ({"ckpt_steps": 0}, ["ckpt_steps", "0"]),
    ({"fp16": True, "bf16": True}, ["fp16", "bf16"]),
    ({"fp16": 1}, ["fp16", "1"]),
    ({"fp16_opt_level": "O4"}, ["fp16_opt_level", "'O4'", "'O1'"]),
    ({"device": "gpu"}, ["device", "'gpu'"]),
    ({"local_rank": -2}, ["local_rank", "-2"]),
    ({"data_parallel": True, "local_rank": 0}, ["data_parallel", "local_rank"]),
]


@pytest.mark.parametrize(("overrides", "texts"), BAD_TRAINING,
                         ids=[str(i) for i in range(len(BAD_TRAINING))])
def test_bad_training_values_name_the_field_and_value(overrides: dict[str, Any],
                                                      texts: list[str]) -> None:
    for build in (TrainingConfig.from_dict, lambda d: TrainingConfig(**d)):
        with pytest.raises(ValueError) as info:
            build(overrides)
        for text in texts:
            assert text in str(info.value), (text, str(info.value))


def test_wrong_types_of_containers() -> None:
    with pytest.raises(TypeError, match="intermediate_matches"):
        DistillationConfig(intermediate_matches={"layer_T": 0})
    with pytest.raises(TypeError, match=r"intermediate_matches\[0\]"):
        DistillationConfig(intermediate_matches=["hidden_mse"])
    with pytest.raises(TypeError, match="from_dict needs a dict"):
        TrainingConfig.from_dict([("device", "cpu")])
    with pytest.raises(TypeError, match="weight"):
        DistillationConfig.from_dict({"intermediate_matches": [
            {"layer_T": 0, "layer_S": 0, "feature": "hidden", "loss": "hidden_mse"}]})


def test_configs_are_built_lazily_on_disk(tmp_path: Path, monkeypatch) -> None:
    """Unlike TextBrewer, building a TrainingConfig creates no directory."""
    monkeypatch.chdir(tmp_path)
    TrainingConfig(output_dir="somewhere/deep")
    assert list(tmp_path.iterdir()) == []


# -- frozen, never mutated -----------------------------------------------------------------------


@pytest.mark.parametrize(("config", "field", "value"), [
    (TrainingConfig(), "gradient_accumulation_steps", 2),
    (TrainingConfig(), "device", "cpu"),
    (DistillationConfig(), "temperature", 1),
    (DistillationConfig(), "kd_loss_weight", 0.5),
    (DistillationConfig.from_dict(DISTILL).intermediate_matches[0], "weight", 2),
])
def test_configs_are_frozen(config: Any, field: str, value: Any) -> None:
    before = config.to_dict()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        setattr(config, field, value)
    assert config.to_dict() == before


def test_matches_are_immutable_tuples() -> None:
    config = DistillationConfig.from_dict(DISTILL)
    assert isinstance(config.intermediate_matches, tuple)
    assert isinstance(config.intermediate_matches[1].layer_T, tuple)
    assert isinstance(config.intermediate_matches[0].proj, tuple)


class _Tiny(torch.nn.Module):
    def __init__(self, width: int, layers: int):
        super().__init__()
        self.embed = torch.nn.Linear(4, width)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(layers))
        self.out = torch.nn.Linear(width, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        h = self.embed(x)
        hidden = [h]
        for block in self.blocks:
            h = torch.tanh(block(h))
            hidden.append(h)
        logits = self.out(h[:, 0])
        return {"logits": logits, "hidden": hidden,
                "loss": torch.nn.functional.cross_entropy(logits, labels)}


def _adaptor(batch: Any, outputs: dict[str, Any]) -> dict[str, Any]:
    return {"logits": outputs["logits"], "hidden": outputs["hidden"], "labels": batch[1],
            "losses": outputs["loss"]}


def test_training_never_mutates_the_configs_or_the_user_dicts(tmp_path: Path) -> None:
    """Weight schedules (which TextBrewer implemented by overwriting kd_loss_weight) leave the
    configs as they were; the user's dicts are not touched either (TextBrewer appended {} to
    3-element projs)."""
    distill_dict = {
        "temperature": 2, "hard_label_weight": 0.5, "kd_loss_weight": 1.5,
        "kd_loss_weight_scheduler": "linear_decay", "hard_label_weight_scheduler": "linear_growth",
        "temperature_scheduler": ["cwsm", 1.0],
        "intermediate_matches": [
            {"layer_T": 3, "layer_S": 2, "feature": "hidden", "loss": "hidden_mse", "weight": 1,
             "proj": ["linear", 6, 8]},
            {"layer_T": [0, 1], "layer_S": [0, 1], "feature": "hidden", "loss": "fsp",
             "weight": 0.7, "proj": ["linear", 6, 8]},
        ],
    }
    user_dict = copy.deepcopy(distill_dict)
    distill = DistillationConfig.from_dict(user_dict)
    training = TrainingConfig(device="cpu", output_dir=str(tmp_path), ckpt_steps=2,
                              gradient_accumulation_steps=2)
    before = (distill.to_dict(), training.to_dict())

    torch.manual_seed(0)
    teacher, student = _Tiny(8, 3), _Tiny(6, 2)
    data = torch.utils.data.TensorDataset(torch.randn(8, 5, 4), torch.randint(3, (8,)))
    for config in (distill, user_dict):  # the frozen config, and the plain dict
        distiller = purekd.GeneralDistiller(training, config, teacher, student, _adaptor,
                                            _adaptor, compile=False)
        with distiller:
            distiller.train(torch.optim.SGD(student.parameters(), lr=0.1),
                            torch.utils.data.DataLoader(data, batch_size=2), num_steps=4)
        assert distiller.t_config is training
        assert distiller.t_config.to_dict() == before[1]
        assert distiller.d_config.to_dict() == before[0]
    assert (distill.to_dict(), training.to_dict()) == before
    assert user_dict == distill_dict


# --- token-level kd_loss_type, shared_vocab, loss_normalisation --------------------------------

@pytest.mark.parametrize(("value", "expected"), [
    ("tvd", ("tvd", {})),
    (["jsd", 0.9], ("jsd", {"beta": 0.9})),
    (["jsd", {"beta": 0.0}], ("jsd", {"beta": 0.0})),
    (["skew_reverse_kl", {"alpha": 0.3}], ("skew_reverse_kl", {"alpha": 0.3})),
    (["forward_kl", {"tail": True}], ("forward_kl", {"tail": True})),
])
def test_token_level_kd_loss_types(value, expected) -> None:
    config = DistillationConfig(kd_loss_type=value, temperature=1)
    assert config.kd_loss == expected and config.normalises_by_tokens
    assert DistillationConfig.from_dict(config.to_dict()) == config
    assert DistillationConfig.from_dict({"kd_loss_type": value}).kd_loss == expected


@pytest.mark.parametrize(("kwargs", "error", "fragments"), [
    ({"kd_loss_type": ["jsd", 1.5]}, ValueError, ["kd_loss_type", "1.5", "beta must be in [0, 1]"]),
    ({"kd_loss_type": ["skew_forward_kl", {"alpha": 1}]}, ValueError,
     ["kd_loss_type", "alpha must be in (0, 1)", "{'alpha': 0.1}"]),
    ({"kd_loss_type": ["jsd", {"gamma": 1}]}, ValueError, ["no parameter 'gamma'", "'beta'"]),
    ({"kd_loss_type": ["jsd", 0.5, True, 3]}, ValueError, ["at most 2"]),
    ({"kd_loss_type": ["ce", 2]}, ValueError, ["'ce' takes no parameters"]),
    ({"kd_loss_type": ["forward_kl", {"tail": 1}]}, TypeError, ["tail must be True or False"]),
    ({"kd_loss_type": "kl"}, ValueError, ["kd_loss_type='kl'", "'forward_kl'", "'jsd'"]),
    ({"kd_loss_type": "jsd", "temperature_scheduler": ["flsw", 1, 2]}, ValueError,
     ["temperature_scheduler", "constant temperature"]),
    ({"shared_vocab": True}, ValueError, ["shared_vocab=True", "kd_loss_type='ce'"]),
    ({"loss_normalisation": "sum"}, ValueError, ["loss_normalisation='sum'", "'tokens'"]),
])
def test_token_level_options_are_validated_at_construction(kwargs, error, fragments) -> None:
    with pytest.raises(error) as info:
        DistillationConfig(**kwargs)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


@pytest.mark.parametrize(("scheduler", "error", "fragment"), [
    (["flsw", "x", 2], ValueError, "beta='x' must be a number"),
    (["flsw", 1, float("nan")], ValueError, "gamma=nan must be a finite number"),
    (["cwsm", float("inf")], ValueError, "beta=inf must be a finite number"),
    (["cwsm", None], ValueError, "beta=None must be a number"),
])
def test_temperature_scheduler_arguments_fail_at_construction(scheduler, error, fragment) -> None:
    """Issue 18 item 11: ``['flsw', 'x', 2]`` was accepted and failed (or trained) later."""
    with pytest.raises(error) as info:
        DistillationConfig(temperature_scheduler=scheduler)
    assert "temperature_scheduler" in str(info.value) and fragment in str(info.value)
