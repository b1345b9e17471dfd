"""docs/testing-a-term.md stays correct: its ```python blocks run, top to bottom, in one
namespace (each block calls the test it defines)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from tests.test_docs_composing import python_blocks

DOC = Path(__file__).resolve().parents[1] / "docs" / "testing-a-term.md"


def test_testing_a_term_md_code_blocks_run(monkeypatch):
    blocks = python_blocks(DOC.read_text(encoding="utf-8"))
    assert len(blocks) == 3
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    namespace: dict = {"__name__": "testing_a_term_md"}
    for index, block in enumerate(blocks):
        try:
            exec(compile(block, f"{DOC.name} block #{index}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"{DOC.name}, python block #{index} failed:\n{block}") from error
    for name in ("test_probability_l1", "test_probability_l1_in_an_objective",
                 "test_probability_l1_compiles_without_graph_breaks"):
        assert callable(namespace[name])
