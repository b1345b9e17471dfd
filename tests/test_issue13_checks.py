"""Issue 13's smaller checks: progress in [0, 1], the width check of intermediate_match with or
without ``loss_name``, the eager-attention hint for an empty ``attention`` list, a list-of-dicts
batch, immutable configs and TextBrewer's positional arguments, ``display_parameters``, and the
test script's summary line."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
import textbrewer
import textbrewer.utils
import torch
from torch.utils.data import DataLoader

import purekd
from purekd import losses
from purekd.stages import Adapted, forward
from purekd.terms import intermediate_match, make_context
from purekd.utils import display_parameters
from tests._toys import ToyEncoder, make_step, toy_adaptor, toy_batch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("progress", [3.0, -0.1, 1.0001, float("nan"), torch.tensor(2.0)])
def test_progress_outside_zero_one_is_an_error(progress):
    with pytest.raises(ValueError, match=r"outside \[0, 1\].*global_step / total_steps"):
        make_context(progress)
    torch.manual_seed(0)
    step = make_step({"kd_loss_weight_scheduler": "linear_decay"}, ToyEncoder(8, 3),
                     ToyEncoder(6), toy_adaptor(), toy_adaptor())
    with pytest.raises(ValueError, match=r"progress=.* is outside \[0, 1\]"):
        step(toy_batch(0), progress=progress)


@pytest.mark.parametrize("progress", [0, 0.0, 0.5, 1, 1.0, torch.tensor(0.25)])
def test_progress_inside_zero_one_is_fine(progress):
    assert float(make_context(progress).progress) == float(progress)


def test_progress_of_a_wrong_type_is_a_type_error():
    with pytest.raises(TypeError, match="progress must be a number"):
        make_context("0.5")  # type: ignore[arg-type]


def features(width_S=16, width_T=32, layers=2):
    gen = torch.Generator().manual_seed(0)
    s = Adapted(hidden=[torch.randn(2, 5, width_S, generator=gen) for _ in range(layers)])
    t = Adapted(hidden=[torch.randn(2, 5, width_T, generator=gen) for _ in range(layers)])
    return s, t


@pytest.mark.parametrize("loss_name", [None, "hidden_mse"])
def test_the_width_check_runs_with_or_without_loss_name(loss_name):
    term = intermediate_match("hidden", 1, 1, losses.hidden_mse, loss_name=loss_name)
    with pytest.raises(ValueError, match=r"width 16 .* width 32.*'proj': \['linear', 16, 32\]"):
        term.check(*features())
    term.check(*features(32, 32))  # equal widths pass


def test_width_free_losses_and_user_losses_are_not_width_checked():
    intermediate_match("hidden", [0, 1], [0, 1], losses.mmd).check(*features())

    def my_loss(a, b, mask=None):  # a user's loss may compare different widths
        return a.mean() - b.mean()

    intermediate_match("hidden", 1, 1, my_loss).check(*features())


def test_an_empty_attention_list_gets_the_eager_attention_hint():
    term = intermediate_match("attention", 0, 0, losses.attention_ce)
    s, t = Adapted(attention=()), Adapted(attention=[torch.rand(2, 2, 5, 5)])
    with pytest.raises(ValueError, match=r"return 'attention' from the adaptor.*sdpa.*"
                                         r"attn_implementation=\"eager\""):
        term.check(s, t)


def test_a_list_of_dicts_batch_points_at_collate_fn():
    samples = [{"x": torch.randn(3, 4), "mask": torch.ones(3)} for _ in range(4)]
    batch = next(iter(DataLoader(samples, batch_size=2, collate_fn=lambda items: items)))
    with pytest.raises(TypeError, match=r"list of 2 dicts.*collate_fn=lambda items: items"):
        forward(ToyEncoder(6), batch)
    torch.manual_seed(0)
    step = make_step({}, ToyEncoder(8, 3), ToyEncoder(6), toy_adaptor(), toy_adaptor())
    with pytest.raises(TypeError, match="collate_fn"):
        step(batch)


def test_assigning_a_config_field_says_how_to_change_it():
    config = purekd.DistillationConfig()
    with pytest.raises(attrs.exceptions.FrozenInstanceError,
                       match=re.escape("configs are immutable: use attrs.evolve(config, "
                                       "temperature=4)")):
        config.temperature = 4  # type: ignore[misc]
    with pytest.raises(AttributeError, match=r"config.replace\(output_dir='x'\)"):
        purekd.TrainingConfig(device="cpu").output_dir = "x"  # type: ignore[misc]
    with pytest.raises(AttributeError, match="immutable"):
        del config.temperature
    assert config.replace(temperature=8).temperature == 8 and config.temperature == 4
    assert attrs.evolve(config, temperature=2).temperature == 2
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['temprature'\]"):
        config.replace(temprature=8)
    with pytest.raises(ValueError, match="temperature"):
        config.replace(temperature=-1)  # validated like a new config


def _parameters(cls):
    return [p.name for p in inspect.signature(cls.__init__).parameters.values()
            if p.name != "self"]


@pytest.mark.parametrize("ours, theirs", [(purekd.DistillationConfig, textbrewer.DistillationConfig),
                                          (purekd.TrainingConfig, textbrewer.TrainingConfig)])
def test_positional_arguments_follow_textbrewers_order(ours, theirs):
    names = _parameters(theirs)
    positional = [p.name for p in inspect.signature(ours.__init__).parameters.values()
                  if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.name != "self"]
    assert positional == names  # and nothing else (bf16 is keyword-only)
    defaults = {p.name: p.default for p in inspect.signature(theirs.__init__).parameters.values()}
    values = {"temperature": 8, "hard_label_weight": 0.5, "kd_loss_type": "mse",
              "gradient_accumulation_steps": 2, "ckpt_steps": 10, "output_dir": "out",
              "device": "cpu", "local_rank": -1, "intermediate_matches": None}
    args = [values.get(name, defaults[name]) for name in names]
    built = ours(*args)
    for name, value in zip(names, args, strict=True):
        expected = () if name == "intermediate_matches" and value is None else value
        assert getattr(built, name) == expected, name


def test_distillation_config_8_is_temperature_8():
    assert purekd.DistillationConfig(8).temperature == 8
    assert purekd.TrainingConfig(4, device="cpu").gradient_accumulation_steps == 4


def test_display_parameters_prints_textbrewers_table():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     tie_word_embeddings=True)
    torch.manual_seed(0)
    models = [transformers.BertForSequenceClassification(config),
              transformers.BertForMaskedLM(config),  # tied weights: "(shared)"
              ToyEncoder(6)]
    for model in models:
        for max_level in (None, 0, 1, 2, 3):
            ours, root = display_parameters(model, max_level=max_level)
            theirs, node = textbrewer.utils.display_parameters(model, max_level=max_level)
            assert ours == theirs, (type(model).__name__, max_level)
            assert root.value == node.value
    assert "(shared)" in display_parameters(models[1])[0]
    assert purekd.utils.display_parameters is display_parameters
    state = models[2].state_dict()
    assert display_parameters(state)[0] == textbrewer.utils.display_parameters(state)[0]
    with pytest.raises(TypeError, match=r"nn\.Module or a state dict"):
        display_parameters([1, 2])  # type: ignore[arg-type]


def test_pytest_quiet_flag_still_prints_the_summary(tmp_path):
    (tmp_path / "test_one.py").write_text("def test_one():\n    assert True\n")
    run = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-c",
                          str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path),
                          "-p", "no:cacheprovider", str(tmp_path / "test_one.py")],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"\b1 passed\b", run.stdout), run.stdout


def test_the_quickstart_lists_the_extras_test_sh_installs():
    script = (ROOT / "scripts" / "test.sh").read_text()
    extras = re.search(r"setup-env\.sh ([\w,]+)", script).group(1).split(",")
    line = next(line for line in (ROOT / "docs" / "quickstart.md").read_text().splitlines()
                if line.startswith("scripts/test.sh"))
    described = re.findall(r"\b(test|dev|demo|integrations|docs|logging)\b", line.split("#")[1])
    assert sorted(described) == sorted(extras), line
