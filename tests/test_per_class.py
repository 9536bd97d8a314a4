"""Per-class results (issue 20.4): each method's test recall and confusion per class
(tables/per_class.csv from the methods step), the summary's per-class table and the confusion
figure, checked on hand-made logits and on the smoke run."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from foldsoup.analysis.uncertainty import confusion_matrix, per_class_rows
from foldsoup.report.plots import confusion_of, plot_confusion
from foldsoup.report.summary import per_class_section

CLASSES = ["benign", "malignant", "rare"]
LABELS = np.array([0, 0, 0, 0, 1, 1, 2, 2])
PREDICTED = np.array([0, 0, 0, 1, 1, 1, 0, 2])  # benign 3/4, malignant 2/2, rare 1/2


def _logits(predicted: np.ndarray, n_classes: int = 3) -> np.ndarray:
    return np.eye(n_classes, dtype=np.float32)[predicted]


def _table(methods: dict[str, np.ndarray]) -> pd.DataFrame:
    return pd.DataFrame([row for name, predicted in methods.items()
                         for row in per_class_rows(name, confusion_matrix(_logits(predicted), LABELS, 3), CLASSES)])


def test_confusion_rows_count_where_each_class_went():
    matrix = confusion_matrix(_logits(PREDICTED), LABELS, 3)
    assert matrix.tolist() == [[3, 1, 0], [0, 2, 0], [1, 0, 1]]
    rows = per_class_rows("gsgs", matrix, CLASSES)
    assert [(r["class"], r["images"], r["correct"], r["recall"]) for r in rows] == [
        ("benign", 4, 3, 0.75), ("malignant", 2, 2, 1.0), ("rare", 2, 1, 0.5)]
    assert rows[2]["predicted_benign"] == 1 and rows[2]["predicted_rare"] == 1
    empty = per_class_rows("x", confusion_matrix(_logits(PREDICTED), LABELS, 4), [*CLASSES, "absent"])[3]
    assert empty["images"] == 0 and np.isnan(empty["recall"])  # a class without test images


def test_summary_shows_recall_per_class_and_balanced_accuracy():
    majority = np.zeros(8, dtype=np.int64)  # accuracy 50 %, but the rare classes are never found
    text = per_class_section(_table({"best_on_val": majority, "gsgs": PREDICTED}), {"method": "gsgs"})
    lines = text.splitlines()
    assert "| class | test images | Best on val | GSGS (shipped) |" in lines
    assert "| benign | 4 | 100.00% | 75.00% |" in lines
    assert "| rare | 2 | 0.00% | 50.00% |" in lines
    assert "| balanced accuracy |  | 33.33% | 75.00% |" in lines
    assert per_class_section(None) == ""


def test_confusion_figure_draws_each_methods_row_shares(tmp_path):
    table = _table({"best_on_val": np.zeros(8, dtype=np.int64), "gsgs": PREDICTED, "ensemble_all": PREDICTED})
    fig = plot_confusion(table, tmp_path / "confusion.png")
    assert (tmp_path / "confusion.png").stat().st_size > 0
    panels = [ax for ax in fig.axes if ax.get_images()]
    assert [ax.get_title().split("\n")[0] for ax in panels] == ["Best on val", "GSGS"]  # Table 3's methods only
    shown = panels[1].get_images()[0].get_array()
    assert np.allclose(shown, [[0.75, 0.25, 0], [0, 1, 0], [0.5, 0, 0.5]])
    assert panels[1].get_title().endswith("balanced acc 75.00%")
    classes, matrix = confusion_of(table, "gsgs")
    assert classes == CLASSES and matrix.tolist() == [[3, 1, 0], [0, 2, 0], [1, 0, 1]]


@pytest.mark.slow
def test_smoke_run_writes_per_class_results_that_add_up(smoke_run):
    """Every method's rows of tables/per_class.csv hold the test set's class counts and its test
    accuracy's correct answers; summary.md and figures/confusion.png show them."""
    r = smoke_run.results
    per_class = pd.read_csv(r / "tables" / "per_class.csv", dtype={"class": str})
    methods = pd.read_csv(r / "tables" / "methods.csv").set_index("method")
    assert set(per_class["method"]) == set(methods.index)
    n_test = int(per_class[per_class.method == "gsgs"]["images"].sum())
    for method, rows in per_class.groupby("method"):
        assert rows["correct"].sum() / n_test == pytest.approx(methods.at[method, "test_acc"], abs=1e-6), method
        assert (rows[[f"predicted_{c}" for c in rows["class"]]].sum(axis=1) == rows["images"]).all()
    assert "## Per class: test recall" in (r / "summary.md").read_text()
    assert (r / "figures" / "confusion.png").stat().st_size > 0
