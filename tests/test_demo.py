"""`purekd demo`: the command line and a short run of the whole demo."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from purekd.__main__ import main
from purekd.demo import run, table


def test_short_demo_writes_its_table_results_and_plot(tmp_path, capsys):
    results = run(tmp_path, num_labels=30, teacher_epochs=4, student_epochs=4, seed=1)
    names = [r.name for r in results]
    assert names == ["teacher", "student, labels only", "student, distilled"]
    teacher, label_only, distilled = results
    assert teacher.parameters > 50 * distilled.parameters
    assert label_only.parameters == distilled.parameters
    assert teacher.accuracy > 0.9  # a real classifier on real data
    assert all(0.0 <= r.accuracy <= 1.0 and r.ms_per_batch > 0 for r in results)
    printed = capsys.readouterr().out
    assert table(results, 256) in printed
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["model"] for r in saved] == names
    assert (tmp_path / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for folder in ("teacher", "label_only", "distilled"):
        assert (tmp_path / folder / "metrics.jsonl").stat().st_size > 0


def test_distillation_beats_the_label_only_student_at_the_default_setting(tmp_path):
    results = run(tmp_path, plot=False)  # the README's claim, at the demo's defaults
    _, label_only, distilled = results
    assert distilled.accuracy > label_only.accuracy + 0.05


@pytest.mark.parametrize("argument", ["--epochs", "--labels", "--teacher-epochs"])
def test_command_line_rejects_non_positive_counts(argument, capsys):
    with pytest.raises(SystemExit):
        main(["demo", argument, "0"])
    assert argument in capsys.readouterr().err


def test_command_line_needs_a_command(capsys):
    with pytest.raises(SystemExit):
        main([])
