"""The recipes shipped inside the package (``purekd/recipes/shipped/*.yaml``): ``purekd
recipes`` lists them, ``purekd recipes show NAME`` prints one, ``purekd distill NAME`` runs
one."""

from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).with_name("shipped")


def names() -> list[str]:
    """The shipped recipes' names (their file names without ``.yaml``)."""
    return sorted(p.stem for p in FOLDER.glob("*.yaml"))


def shipped_path(name: str) -> Path | None:
    """The shipped recipe ``name`` (``demo-lm`` or ``demo-lm.yaml``), or ``None``."""
    stem = name[:-5] if name.endswith(".yaml") else name
    if "/" in stem or stem not in names():
        return None
    return FOLDER / f"{stem}.yaml"


def shipped_text(name: str) -> str:
    """The YAML text of the shipped recipe ``name``; a ``ValueError`` listing the names when
    there is none."""
    path = shipped_path(name)
    if path is None:
        raise ValueError(f"no shipped recipe {name!r}; the shipped recipes: {', '.join(names())}")
    return path.read_text(encoding="utf-8")


def description(name: str) -> str:
    """The first sentence of the recipe's ``description``."""
    import yaml

    data = yaml.safe_load(shipped_text(name)) or {}
    text = " ".join(str(data.get("description") or "").split())
    return text.split(". ", 1)[0].rstrip(".") + "." if text else ""


__all__ = ["FOLDER", "description", "names", "shipped_path", "shipped_text"]
