"""What every purekd config shares: field validators, ``from_dict`` / ``to_dict`` / JSON,
immutability, and the one ``cattrs`` converter (unknown keys are refused)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, TypeVar

import attrs
import cattrs

C = TypeVar("C", bound="_ConfigIO")


def _field_error(instance: Any, attribute: attrs.Attribute, value: Any, problem: str) -> ValueError:
    return ValueError(f"{type(instance).__name__}.{attribute.name}={value!r}: {problem}")


def _positive(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise _field_error(instance, attribute, value, "must be a number > 0")


def _positive_int(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _field_error(instance, attribute, value, "must be an int >= 1")


def _optional_positive_int(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None:
        _positive_int(instance, attribute, value)


def _number(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _field_error(instance, attribute, value, "must be a number")


def _boolean(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, bool):
        raise _field_error(instance, attribute, value, "must be True or False")


def _tuple_if_list(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


class _ConfigIO:
    """``from_dict`` / ``from_json_file`` / ``to_dict`` / ``to_json`` for the attrs configs."""

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        """Build from a dict; an unknown key or a bad value raises ``ValueError`` naming it."""
        if not isinstance(data, Mapping):
            raise TypeError(f"{cls.__name__}.from_dict needs a dict, got {type(data).__name__}")
        known = {a.name for a in attrs.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"{cls.__name__}: unknown key(s) {unknown}; valid keys: {sorted(known)}"
            )
        return _converter.structure(dict(data), cls)

    @classmethod
    def from_json_file(cls: type[C], path: str | os.PathLike[str]) -> C:
        """Build from a JSON file holding one object."""
        with open(path, encoding="utf-8") as file:
            return cls.from_dict(json.load(file))

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (lists, dicts, numbers, strings) that ``from_dict`` turns back into an
        equal config."""
        return dict(_converter.unstructure(self))

    def to_json(self, **json_kwargs: Any) -> str:
        """``to_dict`` as JSON text."""
        return json.dumps(self.to_dict(), **json_kwargs)

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes`` applied and validated (:func:`attrs.evolve`); configs are
        immutable, so this is how one is changed: ``config.replace(temperature=8)``."""
        known = {a.name for a in attrs.fields(type(self))}  # type: ignore[arg-type]
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"{type(self).__name__}.replace: unknown field(s) {unknown}; "
                             f"valid fields: {sorted(known)}")
        return attrs.evolve(self, **changes)  # type: ignore[misc]


class ImmutableConfigError(attrs.exceptions.FrozenInstanceError):
    """Assigning to (or deleting) a field of a config: configs are immutable."""

    def __init__(self, message: str):
        super().__init__()
        self.args = (message,)

    def __str__(self) -> str:
        return str(self.args[0])


def _refuse_setattr(self: Any, name: str, value: Any) -> None:
    raise ImmutableConfigError(
        f"configs are immutable: use attrs.evolve(config, {name}={value!r}) or "
        f"config.replace({name}={value!r}), which return a new, validated "
        f"{type(self).__name__}")


def _refuse_delattr(self: Any, name: str) -> None:
    raise ImmutableConfigError(
        f"configs are immutable: {type(self).__name__}.{name} cannot be deleted; build a new "
        f"config with config.replace({name}=...)")



_converter = cattrs.Converter(forbid_extra_keys=True)
_converter.register_unstructure_hook(
    tuple, lambda value: [_converter.unstructure(v) for v in value])

T = TypeVar("T")


def immutable_config(cls: type[T]) -> type[T]:
    """Make an attrs config class refuse assignment and deletion with a message that shows the
    fix, and let the converter build it from a dict (an instance passes through as it is)."""
    cls.__setattr__ = _refuse_setattr  # type: ignore[method-assign]
    cls.__delattr__ = _refuse_delattr  # type: ignore[method-assign]
    _converter.register_structure_hook(
        cls, lambda data, kind: kind(**data) if isinstance(data, Mapping) else data)
    return cls
