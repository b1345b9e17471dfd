"""Reading a recipe: the YAML file (or a shipped recipe's name), the command line's dotted
``key=value`` overrides typed by the schema, structuring and every check — one
:class:`RecipeError` listing all problems, before anything heavy is imported."""

from __future__ import annotations

import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from . import _checks, _convert
from ._convert import RecipeError, unknown_key
from ._schema import SECTIONS, Recipe

_NULLS = ("null", "none", "~")
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def read_yaml(path: str | Path) -> Any:
    """The YAML document of ``path`` (``RecipeError`` for unreadable or malformed YAML)."""
    import yaml

    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as error:
        raise RecipeError([f"cannot read the recipe: {error}"], str(path)) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise RecipeError([f"not valid YAML: {error}"], str(path)) from None


def _field_type(path: list[str]) -> tuple[Any, str | None]:
    """The schema's type at ``path`` (``['loss', 'beta']``), or ``(None, problem)``."""
    cls: Any = Recipe
    for depth, key in enumerate(path):
        where = ".".join(path[:depth])
        if not attrs.has(cls):
            return None, f"{'.'.join(path)}: {where} is not a section (it has no keys)"
        fields = {f.name: f for f in attrs.fields(attrs.resolve_types(cls))}
        if key not in fields:
            return None, unknown_key(where, key, list(fields))
        cls = SECTIONS.get(key, fields[key].type) if depth == 0 else fields[key].type
    return cls, None


def _scalar(text: str, tp: Any, key: str) -> Any:
    """``text`` as a value of type ``tp`` (the override's typing)."""
    import types

    import yaml

    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and text.strip().lower() in _NULLS:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            tp = inner[0]
    if tp is bool:
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"{key}={text}: expected true or false")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{key}={text}: expected an integer") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{key}={text}: expected a number") from None
    if tp is str:
        return text
    try:  # lists, mappings, unions: YAML's flow syntax ([1, 2], {beta: 0.5})
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"{key}={text}: not a value YAML can read ({error})") from None


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``data`` with each ``dotted.key=value`` set, the value typed by the schema: integers,
    numbers, booleans (true/false, yes/no, on/off, 1/0), strings as written, ``null``, lists and
    mappings in YAML's flow syntax (``student.layers=[0,3,5]``). Every bad override is listed in
    one :class:`RecipeError`."""
    result, problems = _overridden(data, overrides)
    if problems:
        raise RecipeError(problems, "command line")
    return result


def _overridden(data: Mapping[str, Any],
                overrides: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    result: dict[str, Any] = _copy(data) if isinstance(data, Mapping) else {}
    problems: list[str] = []
    for override in overrides:
        key, sep, text = override.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"{override!r}: an override is key=value, e.g. train.steps=100")
            continue
        path = key.split(".")
        tp, problem = _field_type(path)
        if problem is not None:
            problems.append(problem)
            continue
        if attrs.has(tp):
            problems.append(f"{key}: a section; set one of its keys ({key}.<key>=value)")
            continue
        try:
            value = _scalar(text, tp, key)
        except ValueError as error:
            problems.append(str(error))
            continue
        node = result
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
    return result, problems


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def import_modules(names: Any) -> list[str]:
    """Import each of ``names`` (the recipe's ``imports``: module names, or ``.py`` files, a
    path relative to the working directory as every path of a recipe); the problems, one
    ``imports[i]: ...`` line each. A file is imported once per process (under a name made of
    its resolved path), so a module that registers a divergence registers it once."""
    import hashlib
    import importlib
    import importlib.util
    import sys

    if not isinstance(names, list):
        return []  # not a list: structure() says so
    problems: list[str] = []
    for index, name in enumerate(names):
        if not isinstance(name, str):
            continue
        where = f"imports[{index}]"
        try:
            if name.endswith(".py") or "/" in name or "\\" in name:
                path = Path(name).expanduser()
                if not path.is_file():
                    problems.append(f"{where}: {name!r} does not exist"
                                    + (" (a file)" if path.exists() else ""))
                    continue
                resolved = str(path.resolve())
                module = "_purekd_recipe_" + hashlib.sha1(resolved.encode()).hexdigest()[:12]
                if module in sys.modules:
                    continue
                spec = importlib.util.spec_from_file_location(module, resolved)
                assert spec is not None and spec.loader is not None
                loaded = importlib.util.module_from_spec(spec)
                sys.modules[module] = loaded
                try:
                    spec.loader.exec_module(loaded)
                except BaseException:
                    del sys.modules[module]
                    raise
            else:
                importlib.import_module(name)
        except ModuleNotFoundError as error:
            problems.append(f"{where}: cannot import {name!r}: {error}; give an installed "
                            "module's name or a .py file")
        except Exception as error:
            problems.append(f"{where}: importing {name!r} raised {type(error).__name__}: "
                            f"{error}")
    return problems


def _registered_loss(loss: Any) -> list[str]:
    """A ``kd_loss_type`` the built-in table does not know, checked by ``DistillationConfig``
    now when a module of ``imports`` has loaded purekd's losses (a registered divergence and
    its parameters), else when the run starts (:func:`._run.check_loss`)."""
    import sys

    if loss is None or loss.kd_loss_type in _checks.DIVERGENCES \
            or loss.kd_loss_type in _checks.SAMPLED \
            or "purekd.losses" not in sys.modules:
        return []
    from ._train import distill_config_of

    try:
        distill_config_of(loss)
    except (ValueError, TypeError) as error:
        return [f"loss: {error}"]
    return []


def validate(data: Any, source: str | None = None, *, earlier: Sequence[str] = ()) -> Recipe:
    """The :class:`Recipe` of ``data``, or one :class:`RecipeError` listing every problem:
    type errors, unknown keys (with the closest valid one), missing keys, values out of range,
    files that do not exist (after the ``earlier`` problems, the overrides'). The modules of
    ``imports`` are imported first (a divergence they register is then known to the
    checks)."""
    imported = import_modules(data.get("imports")) if isinstance(data, Mapping) else []
    recipe, problems = _convert.structure(data)
    problems = [*earlier, *problems, *imported]
    if recipe is not None:
        sections = {key: getattr(recipe, key) for key in SECTIONS}
        tokenizer = recipe.tokenizer
        failed: set[str] = set()
    else:
        sections, failed = _convert.sections(data) if isinstance(data, Mapping) else ({}, set())
        tokenizer = data.get("tokenizer") if isinstance(data, Mapping) else None
        if tokenizer is not None and not isinstance(tokenizer, str):
            failed.add("tokenizer")
            tokenizer = None
    problems.extend(_checks.problems(sections, tokenizer, failed=failed))
    if not any(_covers_loss(path) for path in failed):
        problems.extend(_registered_loss(sections.get("loss")))
    if problems:
        raise RecipeError(problems, source)
    assert recipe is not None
    return recipe


def _covers_loss(path: str) -> bool:
    return path == "loss" or path.startswith("loss.")


def load(recipe: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """The recipe of a YAML file or a shipped recipe's name (``purekd recipes``), with the
    command line's ``overrides`` applied, validated."""
    from ._shipped import shipped_path

    path = Path(recipe)
    if not path.exists():
        found = shipped_path(str(recipe))
        if found is None:
            from ._shipped import names

            raise RecipeError([f"{str(recipe)!r} is neither a file nor a shipped recipe (the "
                               f"shipped ones: {', '.join(names())})"])
        path = found
    data = read_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        return validate(data, str(path))
    data, problems = _overridden(data, overrides)
    return validate(data, str(path), earlier=problems)


def dump(recipe: Recipe) -> str:
    """The recipe as YAML (every key, defaults included)."""
    import yaml

    return yaml.safe_dump(_convert.unstructure(recipe), sort_keys=False)


__all__ = ["RecipeError", "apply_overrides", "dump", "load", "read_yaml", "validate"]
