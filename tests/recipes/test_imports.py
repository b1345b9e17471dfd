"""``imports:``: modules (by name or as ``.py`` files) imported before a recipe is checked, so
a divergence they register with ``purekd.losses.register_divergence`` is a ``kd_loss_type`` the
recipe can use, its parameters checked with the recipe's other problems; a module that cannot
be imported is a problem with its key path."""

from __future__ import annotations

import math
import sys
import textwrap

import pytest

from purekd import losses
from purekd.recipes import RecipeError, validate
from purekd.recipes._run import run

MODULE = textwrap.dedent('''
    """Registers the squared Hellinger distance, s/2 sum_v (sqrt p_S - sqrt p_T)^2."""
    from purekd.losses import register_divergence


    def hellinger_rows(log_p_S, log_p_T, *, scale=1.0):
        return 0.5 * scale * ((0.5 * log_p_S).exp() - (0.5 * log_p_T).exp()).pow(2).sum(-1)


    def check(*, scale):
        if not scale > 0:
            raise ValueError(f"scale={scale!r} must be > 0")


    register_divergence("NAME", hellinger_rows, defaults={"scale": 1.0}, check=check)
''')


@pytest.fixture
def registering_file(tmp_path):
    path = tmp_path / "my_divergence.py"
    path.write_text(MODULE.replace("NAME", "recipe_hellinger"))
    before = set(sys.modules)
    yield path
    losses.unregister_divergence("recipe_hellinger")
    for name in set(sys.modules) - before:
        if name.startswith("_purekd_recipe_"):
            del sys.modules[name]


def _recipe(recipe_data, tmp_path, imports, **loss):
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in recipe_data.items()}
    data["imports"] = imports
    data["teacher"] = {**recipe_data["teacher"], "source": "live"}
    data["loss"] = {"kd_loss_type": "recipe_hellinger", "ce_weight": 0.0, **loss}
    data["train"] = {**recipe_data["train"], "steps": 2}
    data["checkpoint"] = {"output_dir": str(tmp_path / "run"), "save_state": False}
    return data


def test_a_divergence_registered_by_an_imported_file_trains(recipe_data, registering_file,
                                                            tmp_path):
    data = _recipe(recipe_data, tmp_path, [str(registering_file)], params={"scale": 2.0})
    recipe = validate(data)
    assert recipe.imports == [str(registering_file)]
    from purekd.losses import _divergences

    assert "recipe_hellinger" in _divergences.names()
    validate(data)  # imported once per process: registering again would raise
    summary = run(recipe, progress_bar=False, echo=lambda _: None)
    assert summary.steps == 2 and math.isfinite(summary.perplexity)


def test_its_parameters_are_checked_with_the_recipe(recipe_data, registering_file, tmp_path):
    data = _recipe(recipe_data, tmp_path, [str(registering_file)], params={"scale": -1.0})
    data["train"]["batch_size"] = 0
    with pytest.raises(RecipeError) as info:
        validate(data)
    problems = info.value.problems
    assert problems[0] == "train.batch_size: 0 is less than 1"
    assert problems[1].startswith("loss: ") and "scale=-1.0 must be > 0" in problems[1]
    assert len(problems) == 2


def test_a_module_by_name(recipe_data, tmp_path, monkeypatch):
    folder = tmp_path / "mods"
    folder.mkdir()
    (folder / "recipe_module_xyz.py").write_text(MODULE.replace("NAME", "recipe_hellinger"))
    monkeypatch.syspath_prepend(str(folder))
    try:
        recipe = validate(_recipe(recipe_data, tmp_path, ["recipe_module_xyz"]))
        assert recipe.loss.kd_loss_type == "recipe_hellinger"
    finally:
        losses.unregister_divergence("recipe_hellinger")
        sys.modules.pop("recipe_module_xyz", None)


def test_a_module_that_cannot_be_imported_is_named_with_its_key_path(recipe_data, tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('not today')\n")
    data = dict(recipe_data, imports=["no_such_module_xyz", str(tmp_path / "nowhere.py"),
                                      str(broken), 3])
    with pytest.raises(RecipeError) as info:
        validate(data)
    assert info.value.problems == [
        "imports[3]: expected a string, got 3 (int)",
        "imports[0]: cannot import 'no_such_module_xyz': No module named 'no_such_module_xyz'; "
        "give an installed module's name or a .py file",
        f"imports[1]: {str(tmp_path / 'nowhere.py')!r} does not exist",
        f"imports[2]: importing {str(broken)!r} raised RuntimeError: not today",
    ]
    assert not [name for name in sys.modules if name.startswith("_purekd_recipe_")
                and getattr(sys.modules[name], "__file__", "") == str(broken)]
