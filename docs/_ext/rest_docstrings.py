"""A Griffe extension that turns the reST in purekd's docstrings into Markdown for mkdocstrings.

purekd's docstrings are written in a light reST: ``code``, :func:`roles`, :math:`inline math`,
``.. math::`` blocks and ``>>>`` doctest lines. Markdown already reads ``code``; the rest is
rewritten here, once the whole package is loaded, so the source stays as it is:

* ``.. math:: ...`` (with its indented continuation) becomes a ``$$ ... $$`` block, and
  :math:`x` becomes ``$x$`` — both rendered by ``pymdownx.arithmatex`` and MathJax;
* :func:`name`, :class:`~purekd.x.Name`, :meth:`...` and friends become *optional*
  cross-references: a link where the target is documented on the site, plain code otherwise
  (never a build warning). Names are resolved like Python would, from the object outward,
  through imports, to the public path the API pages document;
* the first paragraph is joined into one line, so that summary tables show it whole;
* a paragraph ending in ``::`` followed by an indented block becomes the paragraph and a
  fenced ``python`` block;
* runs of ``>>>`` lines (with their ``...`` continuations and expected output) become fenced
  ``pycon`` blocks, without the ``# doctest:`` directives.

A docstring with Google-style sections (``Args:``, ``Returns:``, ...) is parsed as Google style,
every other one with the handler's ``docstring_style``.

Loaded by the mkdocstrings Python handler (``extensions`` in ``mkdocs.yml``).
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(func|class|meth|data|attr|mod|exc|obj|const):`(~?)([^`]+)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_MATH_DIRECTIVE = re.compile(r"^(\s*)\.\. math::\s*(.*)$")
_DOCTEST_DIRECTIVE = re.compile(r"\s*#\s*doctest:.*$")
_GOOGLE_SECTION = re.compile(
    r"^\s*(Args|Arguments|Parameters|Returns|Yields|Raises|Attributes|Examples?):\s*$", re.M)
_BLOCK_START = re.compile(r"\s*([*+-]\s|\d+\.\s|>>>|\.\. |```|\$\$|:\w+:)|.*::\s*$")
_LITERAL_MARKER = re.compile(r"^(\s*)(.*?)(\s?)::\s*$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _math_blocks(lines: list[str]) -> list[str]:
    """``.. math::`` directives (content on the same line and/or indented below) → ``$$`` blocks."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _MATH_DIRECTIVE.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        prefix, first = match.group(1), match.group(2)
        body = [first] if first.strip() else []
        i += 1
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > len(prefix)):
            body.append(lines[i].strip())
            i += 1
        while body and not body[-1]:
            body.pop()
        while body and not body[0]:
            body.pop(0)
        if out and out[-1].strip():
            out.append("")
        out += [f"{prefix}$$", *(f"{prefix}{b}" for b in body), f"{prefix}$$"]
        if i < len(lines) and lines[i].strip():
            out.append("")
    return out


def _doctests(lines: list[str]) -> list[str]:
    """Runs of ``>>>`` lines and the output after them → fenced ``pycon`` blocks."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        stripped = lines[i].lstrip()
        if not stripped.startswith(">>>"):
            out.append(lines[i])
            i += 1
            continue
        prefix = lines[i][: _indent(lines[i])]
        block = []
        while i < len(lines) and lines[i].strip():
            block.append(_DOCTEST_DIRECTIVE.sub("", lines[i][len(prefix):]).rstrip())
            i += 1
        if out and out[-1].strip():
            out.append("")
        out += [f"{prefix}```pycon", *(f"{prefix}{b}" for b in block), f"{prefix}```"]
        if i < len(lines) and lines[i].strip():
            out.append("")
    return out


def _literal_blocks(lines: list[str]) -> list[str]:
    """A paragraph ending in ``::`` and the indented block after it → the paragraph ending in
    ``:`` (nothing, for a bare ``::``) and a fenced ``python`` block."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _LITERAL_MARKER.match(lines[i])
        following = i + 1
        while following < len(lines) and not lines[following].strip():
            following += 1
        if (not match or following == i + 1 or following == len(lines)
                or _indent(lines[following]) <= len(match.group(1))):
            out.append(lines[i])
            i += 1
            continue
        prefix, text = match.group(1), match.group(2)
        if text:
            out += [f"{prefix}{text}:", ""]
        i = following
        block: list[str] = []
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > len(prefix)):
            block.append(lines[i])
            i += 1
        while block and not block[-1].strip():
            block.pop()
        depth = min(_indent(b) for b in block if b.strip())
        out += [f"{prefix}```python", *(f"{prefix}{b[depth:]}" for b in block), f"{prefix}```"]
        if i < len(lines):
            out.append("")
    return out


def _summary_on_one_line(lines: list[str]) -> list[str]:
    """The first paragraph joined into one line: the summary tables show a docstring's first
    line, and a first sentence that wraps would be cut mid-sentence there."""
    end = next((i for i, line in enumerate(lines) if not line.strip()), len(lines))
    first = lines[:end]
    if len(first) < 2 or any(_BLOCK_START.match(line) for line in first):
        return lines
    return [" ".join(line.strip() for line in first), *lines[end:]]


def _is_private(path: str) -> bool:
    return any(p.startswith("_") and not p.startswith("__") for p in path.split("."))


def _exported_paths(pkg: griffe.Module) -> dict[str, str]:
    """Canonical path → the path the API pages document it under.

    An object is documented where a public module lists it in ``__all__``; with several such
    modules (``purekd`` and ``purekd.combinators`` both export ``Step``), the deepest one wins,
    as the API pages document the subpackages, not the package root.
    """
    index: dict[str, str] = {}
    modules = [pkg]
    while modules:
        module = modules.pop()
        modules += [m for m in module.modules.values() if not m.is_alias]
        if _is_private(module.path):
            continue
        for name in map(str, module.exports or ()):
            member = module.members.get(name)
            if member is None:
                continue
            try:
                canonical = member.final_target.path if member.is_alias else member.path
            except (griffe.AliasResolutionError, griffe.CyclicAliasError):
                continue
            public = f"{module.path}.{name}"
            if canonical not in index or public.count(".") > index[canonical].count("."):
                index[canonical] = public
    return index


def _documented(path: str, exported: dict[str, str]) -> str:
    """``path``'s documented location: its longest exported prefix, with the rest appended
    (``purekd.runner._guard.NonFiniteGuard.observe`` → ``purekd.runner.NonFiniteGuard.observe``)."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in exported:
            return ".".join([exported[prefix], *parts[cut:]])
    return path


def _lookup(obj: griffe.Object, target: str, loader: griffe.GriffeLoader) -> Any:
    first, *rest = target.split(".")
    found: Any = None
    scope: Any = obj
    while scope is not None and found is None:
        members = getattr(scope, "members", {})
        if first in members:
            found = members[first]
        scope = scope.parent
    if found is None:
        try:
            found = loader.modules_collection.get_member(first)
        except (KeyError, ValueError):
            return None
    for name in rest:
        try:
            found = found.get_member(name) if hasattr(found, "get_member") else found.members[name]
        except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            return None
    return found


def _resolve(obj: griffe.Object, target: str, loader: griffe.GriffeLoader,
             exported: dict[str, str]) -> str | None:
    """The documented path of ``target`` as seen from ``obj``, or None (external, unknown)."""
    found = _lookup(obj, target, loader)
    if found is None:
        return None
    try:
        path = found.final_target.path if found.is_alias else found.path
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None
    root = obj.package.name
    if path != root and not path.startswith(root + "."):
        return None
    return _documented(path, exported)


def convert(text: str, obj: griffe.Object, loader: griffe.GriffeLoader,
            exported: dict[str, str]) -> str:
    """The docstring ``text`` of ``obj`` with its reST rewritten as Markdown."""
    lines = _doctests(_literal_blocks(_math_blocks(_summary_on_one_line(text.splitlines()))))
    text = "\n".join(lines)
    text = _MATH_ROLE.sub(lambda m: f"${m.group(1)}$", text)

    def role(match: re.Match[str]) -> str:
        short, target = match.group(2), match.group(3).strip()
        title = target.rsplit(".", 1)[-1] if short else target
        code = f"<code>{html.escape(title)}</code>"
        resolved = _resolve(obj, target, loader, exported)
        if resolved is None:
            return code
        return f'<autoref identifier="{html.escape(resolved)}" optional>{code}</autoref>'

    return _ROLE.sub(role, text)


class RestDocstrings(griffe.Extension):
    """Rewrite every docstring of a loaded package, once, after the package is complete."""

    def __init__(self) -> None:
        self._done: set[int] = set()

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        self._walk(pkg, loader, _exported_paths(pkg))

    def _walk(self, obj: griffe.Object, loader: griffe.GriffeLoader,
              exported: dict[str, str]) -> None:
        docstring = obj.docstring
        if docstring is not None and id(docstring) not in self._done:
            docstring.value = convert(docstring.value, obj, loader, exported)
            if _GOOGLE_SECTION.search(docstring.value):
                docstring.parser = griffe.Parser.google  # a docstring with "Args:" etc.
            self._done.add(id(docstring))
        for member in obj.members.values():
            if not member.is_alias:
                self._walk(member, loader, exported)
