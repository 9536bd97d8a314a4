"""The end of a run on the console (foldsoup.report.console, the Snakefile's onsuccess and
onerror): the warnings that matter, from tables/models.csv."""

from __future__ import annotations

import pandas as pd

from foldsoup.report.console import end_of_run, warning_lines

ROWS = [  # hp, fold, val_acc, lp_val_acc, diverged, at_chance, started_far
    ("a", 0, 0.90, 0.80, False, False, False),
    ("a", 1, 0.10, 0.80, True, True, True),  # diverged: named once, as diverged
    ("b", 0, 0.12, 0.80, False, True, False),  # at chance, and below its probe
    ("b", 1, 0.85, 0.85, False, False, True),  # started far; equal to its probe is not below it
]


def _models_csv(tmp_path, rows=ROWS):
    path = tmp_path / "tables" / "models.csv"
    path.parent.mkdir(parents=True)
    pd.DataFrame(rows, columns=["hp", "fold", "val_acc", "lp_val_acc", "diverged", "at_chance", "started_far"]).to_csv(
        path, index=False)
    return path


def test_each_kind_of_trouble_is_one_line_naming_the_models(tmp_path):
    lines = warning_lines(_models_csv(tmp_path))
    assert [line.split(": ")[2] for line in lines] == [
        "1 of 4 fine-tunes diverged and are left out of every soup",
        "1 of 4 models are at chance (they learned nothing, yet stay in the soups)",
        "1 of 4 fine-tunes started far from their linear probe (first-epoch loss; finetune.batchnorm, grid.lr)",
        "1 of 3 fine-tunes end below their linear probe's val accuracy",
    ]
    assert [line.split(": ")[3].split(";")[0] for line in lines] == ["a/fold1", "b/fold0", "b/fold1", "b/fold0"]
    assert all(line.startswith("foldsoup: warning: ") for line in lines)


def test_a_calm_run_has_no_warnings_and_long_lists_are_cut(tmp_path):
    assert warning_lines(_models_csv(tmp_path, [("a", 0, 0.9, 0.8, False, False, False)])) == []
    many = [(f"h{i}", 0, 0.1, 0.8, False, False, False) for i in range(7)]
    (line,) = warning_lines(_models_csv(tmp_path / "many", many))
    assert "7 of 7 fine-tunes end below" in line and "h0/fold0, h1/fold0, h2/fold0, h3/fold0 and 3 more" in line


def test_after_a_failure_how_to_go_on_and_no_table_no_warnings(tmp_path):
    assert warning_lines(tmp_path / "tables" / "models.csv") == []
    (line,) = end_of_run(tmp_path, "gsgs", failed=True)
    assert "a job failed" in line and "the same command resumes" in line
    assert end_of_run(tmp_path, "gsgs") == [f"foldsoup: summary: {tmp_path / 'summary.md'}"]
    _models_csv(tmp_path)
    assert len(end_of_run(tmp_path, "gsgs", failed=True)) == 5
