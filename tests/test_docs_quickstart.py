"""docs/quickstart.md stays correct: its ```python blocks run, top to bottom, in one namespace."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from tests.test_docs_composing import python_blocks

DOC = Path(__file__).resolve().parents[1] / "docs" / "quickstart.md"


def test_quickstart_code_blocks_run(monkeypatch, tmp_path, capsys):
    blocks = python_blocks(DOC.read_text(encoding="utf-8"))
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)  # the quickstart writes checkpoints under ./runs
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    namespace: dict = {"__name__": "quickstart_md"}
    for index, block in enumerate(blocks):
        try:
            exec(compile(block, f"{DOC.name} block #{index}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"{DOC.name}, python block #{index} failed:\n{block}") from error
    printed = capsys.readouterr().out
    accuracies = [float(line.rsplit(" ", 1)[1].rstrip("%")) for line in printed.splitlines()
                  if "accuracy" in line]
    assert accuracies and accuracies[-1] > 50  # four topics: well above chance
    assert sorted(p.name for p in (tmp_path / "runs" / "student").glob("gs*.pkl"))
