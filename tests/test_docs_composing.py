"""docs/composing.md stays correct: its ```python blocks run, top to bottom, in one namespace."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "composing.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)


def test_composing_md_code_blocks_run(monkeypatch, capsys):
    blocks = python_blocks(DOC.read_text(encoding="utf-8"))
    assert len(blocks) >= 8
    # The doc compiles its loss paths as a user would; Dynamo's "eager" backend still traces
    # them (graph breaks and all) without paying for inductor's code generation.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    namespace: dict = {"__name__": "composing_md"}
    for index, block in enumerate(blocks):
        try:
            exec(compile(block, f"{DOC.name} block #{index}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"{DOC.name}, python block #{index} failed:\n{block}") from error
    printed = capsys.readouterr().out
    assert "'proj': ['linear', 16, 32]" in printed
    assert "epoch 1: loss" in printed
    # the pieces the doc builds did what it says
    assert namespace["my_step"].loss.is_compiled
    assert namespace["extended"].loss.fallback_reason is None
