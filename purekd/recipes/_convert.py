"""From plain data (a YAML file's dict) to a :class:`~._schema.Recipe`, every problem at once.

One private ``cattrs.Converter`` structures the sections. Why cattrs: it is already a
dependency of purekd (the configs use it), it builds the nested frozen classes from their type
annotations with no schema written twice, ``forbid_extra_keys=True`` turns a misspelt key into
an error instead of a silently ignored setting, and its ``detailed_validation`` collects every
failure of a structure with the path to it (its default formatter drops messages, so
:func:`_walk` formats them itself). Its default hooks are lenient — ``int("3")``,
``bool("false") is True`` — so strict hooks replace them: a recipe's ``steps: "3"`` or
``bf16: "no"`` is a type error, not a guess.

A type error hides no range error, in its own section or another: when the recipe does not
structure whole, :func:`sections` structures every field on its own (a failed one replaced by
its default and remembered), and :mod:`._checks` checks the rest, skipping any check that reads
a failed field — one error lists every problem.
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Mapping
from typing import Any

import attrs
import cattrs
from cattrs.errors import (
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
    IterableValidationNote,
)
from cattrs.gen import make_dict_structure_fn

from ._schema import OPTIONAL_SECTIONS, SECTIONS, Match, Recipe


class RecipeError(ValueError):
    """A recipe with problems: ``problems`` lists them, one ``key.path: what is wrong`` each;
    the message holds them all."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f"{source}: " if source else ""
        count = len(self.problems)
        head = f"{where}{count} problem{'s' if count != 1 else ''} in the recipe:"
        super().__init__("\n".join([head, *(f"  - {p}" for p in self.problems)]))


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _strict_int(value: Any, _: type) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r} ({_kind(value)})")
    return value


def _strict_float(value: Any, _: type) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {value!r} ({_kind(value)})")
    return float(value)


def _strict_bool(value: Any, _: type) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {value!r} ({_kind(value)})")
    return value


def _strict_str(value: Any, _: type) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r} ({_kind(value)})")
    return value


def _any(value: Any, _: type) -> Any:
    return value


def _layers(value: Any, _: type) -> int | list[int] | None:
    """``Student.layers``: a count, a list of indices, or null."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool)
                                       for v in value):
        return list(value)
    raise TypeError(f"expected a number of layers or a list of layer indices, got {value!r} "
                    f"({_kind(value)})")


def _mapping(value: Any, _: type) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"expected a mapping of names to values, got {value!r} ({_kind(value)})")
    return dict(value)


def _make_converter() -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    converter.register_structure_hook(int, _strict_int)
    converter.register_structure_hook(float, _strict_float)
    converter.register_structure_hook(bool, _strict_bool)
    converter.register_structure_hook(str, _strict_str)
    converter.register_structure_hook(typing.Any, _any)
    converter.register_structure_hook_func(lambda tp: tp == (int | list[int] | None), _layers)
    converter.register_structure_hook_func(lambda tp: typing.get_origin(tp) is dict, _mapping)

    def check_list(value: Any, tp: Any) -> list[Any]:
        if not isinstance(value, list):
            raise TypeError(f"expected a list, got {value!r} ({_kind(value)})")
        (item_type,) = typing.get_args(tp) or (typing.Any,)
        items, errors = [], []
        for index, item in enumerate(value):
            try:
                items.append(converter.structure(item, item_type))
            except Exception as error:
                error.__notes__ = [*getattr(error, "__notes__", []), IterableValidationNote(
                    f"Structuring {tp} @ index {index}", index, item_type)]
                errors.append(error)
        if errors:
            raise IterableValidationError(f"While structuring {tp!r}", errors, tp)
        return items

    converter.register_structure_hook_func(lambda tp: typing.get_origin(tp) is list, check_list)
    for cls in (*SECTIONS.values(), Match):
        attrs.resolve_types(cls)
        hook: Any = make_dict_structure_fn(cls, converter, _cattrs_forbid_extra_keys=True)
        converter.register_structure_hook(cls, _mapping_first(hook))
    return converter


def _mapping_first(hook: Any) -> Any:
    def structure(value: Any, tp: type) -> Any:
        if not isinstance(value, Mapping):
            raise TypeError(f"expected a mapping of keys to values, got {value!r} "
                            f"({_kind(value)})")
        return hook(value, tp)

    return structure


CONVERTER = _make_converter()


def _fields(cls: type) -> list[str]:
    return [f.name for f in attrs.fields(cls)]


def unknown_key(path: str, key: str, valid: list[str]) -> str:
    """``train.stpes: unknown key; did you mean 'steps'? (valid keys: ...)``."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.7)
    hint = f"did you mean {close[0]!r}? " if close else ""
    where = f"{path}.{key}" if path else key
    return f"{where}: unknown key; {hint}(valid keys: {', '.join(valid)})"


def _walk(error: BaseException, path: str) -> list[str]:
    """``key.path: message`` lines for a cattrs error tree."""
    if isinstance(error, ForbiddenExtraKeysError):
        fields = _fields(error.cl)
        return [unknown_key(path, key, fields) for key in sorted(error.extra_fields)]
    if isinstance(error, (ClassValidationError, IterableValidationError)):
        lines: list[str] = []
        with_notes, without = error.group_exceptions()
        for sub, note in with_notes:
            name = getattr(note, "name", None)
            sub_path = (f"{path}.{name}" if path else name) if name is not None else \
                f"{path}[{getattr(note, 'index', '?')}]"
            lines.extend(_walk(sub, sub_path))
        for sub in without:
            lines.extend(_walk(sub, path))
        return lines
    if isinstance(error, KeyError):
        return [f"{path}: missing (required)"]
    return [f"{path}: {error}"]


def structure(data: Any) -> tuple[Recipe | None, list[str]]:
    """The recipe of ``data`` (a YAML document's dict) and the problems of its structure (type
    errors, unknown and missing keys, each with its key path). The recipe is ``None`` when a
    section failed; the sections that structured are still checked by the caller."""
    if not isinstance(data, Mapping):
        return None, [f"the recipe must be a mapping of sections (teacher:, student:, data:, "
                      f"...), got {_kind(data)}"]
    problems: list[str] = []
    top = _fields(Recipe)
    for key in data:
        if key not in top:
            problems.append(unknown_key("", str(key), top))
    values: dict[str, Any] = {}
    for field in attrs.fields(Recipe):
        if field.name not in data:
            if field.default is attrs.NOTHING:
                problems.append(f"{field.name}: missing (required)")
            continue
        value = data[field.name]
        cls = SECTIONS.get(field.name)
        try:
            if field.name == "imports":
                values[field.name] = CONVERTER.structure(value, list[str])
            elif cls is None:  # tokenizer, description: a string or null
                values[field.name] = None if value is None else _strict_str(value, str)
            elif value is None and field.name in OPTIONAL_SECTIONS:
                values[field.name] = None
            else:
                values[field.name] = CONVERTER.structure(value, cls)
        except Exception as error:
            problems.extend(_walk(error, field.name))
    recipe = None
    if not problems:
        recipe = Recipe(**values)
    return recipe, problems


_PLACEHOLDERS: dict[Any, Any] = {str: "", int: 0, float: 0.0, bool: False}


def _default(field: Any) -> Any:
    if isinstance(field.default, attrs.Factory):  # type: ignore[arg-type]
        return field.default.factory()
    if field.default is attrs.NOTHING:  # a required field: a value of its type, never checked
        return _PLACEHOLDERS.get(field.type)
    return field.default


def sections(data: Any) -> tuple[dict[str, Any], set[str]]:
    """What the checks can still look at when the recipe does not structure whole: each
    section of ``data`` that is a mapping, its fields structured one by one, a field that
    fails (or a required one that is missing) replaced by its default; and the key paths
    that failed (``'train.batch_size'``; a whole section, ``'train'``, when it is not a
    mapping). A check that reads a failed path is skipped (:func:`._checks.problems`), so
    a range error in a section with a type error is still reported, with no spurious
    problem from the stand-in value."""
    out: dict[str, Any] = {}
    failed: set[str] = set()
    for key, cls in SECTIONS.items():
        value = data.get(key, {}) if isinstance(data, Mapping) else {}
        if key in OPTIONAL_SECTIONS and (not isinstance(data, Mapping) or data.get(key) is None):
            out[key] = None
            continue
        if not isinstance(value, Mapping):
            failed.add(key)
            continue
        if not (isinstance(data, Mapping) and key in data) and any(
                f.default is attrs.NOTHING for f in attrs.fields(cls)):
            failed.add(key)  # a required section that is missing: all of it stands in
        values: dict[str, Any] = {}
        for field in attrs.fields(cls):
            path = f"{key}.{field.name}"
            if field.name not in value:
                values[field.name] = _default(field)
                if field.default is attrs.NOTHING:
                    failed.add(path)
                continue
            try:
                values[field.name] = CONVERTER.structure(value[field.name], field.type)
            except Exception:
                values[field.name] = _default(field)
                failed.add(path)
        out[key] = cls(**values)
    return out, failed


def unstructure(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain data (for YAML, the run's record)."""
    return CONVERTER.unstructure(recipe)


__all__ = ["CONVERTER", "RecipeError", "sections", "structure", "unknown_key", "unstructure"]
