"""soups.metric in the reliability step (Tables 1-2) and the figures: with balanced_accuracy they
read the *_bacc columns, with accuracy (the default) the *_acc ones, and say which on their axes.

The tables below carry both metrics' columns with different numbers, as the real tables do; the
expected statistics were worked out by hand and are written out as literals.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

if importlib.util.find_spec("foldsoup") is None:  # running from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from foldsoup import cli  # noqa: E402
from foldsoup.analysis.reliability import RELIABILITY_COLUMNS, reliability_table, val_threshold  # noqa: E402
from foldsoup.report import plots  # noqa: E402

# One grid point's single-fold soups and three grid points' 2-fold soups (k = 2).
# columns: hp, folds, n, then accuracy (avg, min, holdout, test), then balanced accuracy (same).
SUBSETS = pd.DataFrame(
    [
        ("a", "0", 1, 0.80, 0.80, 0.78, 0.78, 0.50, 0.50, 0.45, 0.45),
        ("a", "1", 1, 0.60, 0.60, 0.70, 0.70, 0.40, 0.40, 0.30, 0.30),
        ("a", "0-1", 2, 0.70, 0.60, 0.70, 0.70, 0.40, 0.30, 0.55, 0.50),
        ("b", "0-1", 2, 0.90, 0.80, 0.90, 0.90, 0.60, 0.50, 0.75, 0.70),
        ("c", "0-1", 2, 0.80, 0.70, 0.80, 0.80, 0.50, 0.40, 0.35, 0.30),
    ],
    columns=["hp", "folds", "n", "avg_acc", "min_acc", "holdout_acc", "test_acc",
             "avg_bacc", "min_bacc", "holdout_bacc", "test_bacc"],
)
SUBSETS = SUBSETS.assign(acc_fold0=SUBSETS.avg_acc, bacc_fold0=SUBSETS.avg_bacc)  # present, unused here

# The threshold: lowest val score of the models that did not diverge (b/fold0 diverged).
MODELS = pd.DataFrame(
    [
        ("a", 0, 0.80, 0.78, 0.50, 0.45, False),
        ("a", 1, 0.60, 0.70, 0.40, 0.30, False),
        ("b", 0, 0.10, 0.10, 0.20, 0.20, True),
        ("b", 1, 0.90, 0.85, 0.60, 0.65, False),
    ],
    columns=["hp", "fold", "val_acc", "test_acc", "val_bacc", "test_bacc", "diverged"],
)


def test_reliability_balanced_accuracy_reads_the_bacc_columns():
    table = reliability_table(SUBSETS, MODELS, metric="balanced_accuracy").set_index("n")
    assert list(table.reset_index().columns) == list(RELIABILITY_COLUMNS)
    assert (table.metric == "balanced_accuracy").all()
    # Threshold: min(0.50, 0.40, 0.60) = 0.40 (a/fold1); b/fold0's 0.20 diverged.
    assert table.threshold.tolist() == pytest.approx([0.40, 0.40])
    assert (table.threshold_model == "a/fold1").all()
    # n = 1: val - test = 0.05, 0.10 -> RMSE sqrt((0.0025 + 0.01) / 2); AvgAcc = MinAcc.
    one = table.loc[1]
    assert one.n_soups == 2
    assert one.rmse_avg_acc == pytest.approx(math.sqrt(0.00625))
    assert one.rmse_min_acc == pytest.approx(math.sqrt(0.00625))
    assert one.mean_gap_min_acc == pytest.approx(0.075)
    # n = 2: min (0.3, 0.5, 0.4) vs test (0.5, 0.7, 0.3): gaps -0.2, -0.2, 0.1.
    two = table.loc[2]
    assert two.n_soups == 3
    assert two.rmse_min_acc == pytest.approx(math.sqrt(0.03))
    assert two.mean_gap_min_acc == pytest.approx(-0.1)
    # avg (0.4, 0.6, 0.5): gaps -0.1, -0.1, 0.2.
    assert two.rmse_avg_acc == pytest.approx(math.sqrt(0.02))
    assert two.mean_gap_avg_acc == pytest.approx(0.0, abs=1e-12)
    # Deviations from the means: min (-0.1, 0.1, 0), test (0, 0.2, -0.2) -> r = 0.02 / sqrt(0.02 * 0.08).
    assert two.corr_all == pytest.approx(0.5)
    assert two.corr_avg_acc == pytest.approx(0.5)  # avg has the same deviations as min
    # Over the threshold 0.40: b (0.5, 0.7) and c (0.4, 0.3): two points, r = 1.
    assert two.n_over_threshold == 2
    assert two.corr_over_threshold == pytest.approx(1.0)
    # Holdout = test + 0.05 on every soup.
    assert two.rmse_holdout_acc == pytest.approx(0.05)
    assert two.mean_gap_holdout_acc == pytest.approx(0.05)
    assert two.corr_holdout_acc == pytest.approx(1.0)


def test_reliability_accuracy_reads_the_acc_columns_and_is_the_default():
    table = reliability_table(SUBSETS, MODELS, metric="accuracy").set_index("n")
    assert (table.metric == "accuracy").all()
    assert table.threshold.tolist() == pytest.approx([0.60, 0.60])  # min(0.80, 0.60, 0.90)
    assert (table.threshold_model == "a/fold1").all()
    # n = 1: gaps 0.02, -0.10.
    assert table.loc[1].rmse_min_acc == pytest.approx(math.sqrt((0.0004 + 0.01) / 2))
    two = table.loc[2]
    # n = 2: min (0.6, 0.8, 0.7) = test - 0.1; avg = test = holdout.
    assert two.rmse_min_acc == pytest.approx(0.1)
    assert two.mean_gap_min_acc == pytest.approx(-0.1)
    assert two.rmse_avg_acc == pytest.approx(0.0, abs=1e-12)
    assert two.rmse_holdout_acc == pytest.approx(0.0, abs=1e-12)
    assert two.corr_all == pytest.approx(1.0)
    assert two.n_over_threshold == 3 and two.corr_over_threshold == pytest.approx(1.0)
    pd.testing.assert_frame_equal(reliability_table(SUBSETS, MODELS).set_index("n"), table)


def test_threshold_follows_the_metric_and_unknown_metric_is_refused():
    assert val_threshold(MODELS) == 0.60
    assert val_threshold(MODELS, "balanced_accuracy") == 0.40
    with pytest.raises(ValueError, match="balanced_accuracy"):
        reliability_table(SUBSETS, MODELS, metric="f1")


# --------------------------------------------------------------------------- figures

METHODS = pd.DataFrame(
    [("best_on_val", 0.90, 0.85, 0.60, 0.65, 1), ("uniform_soup", 0.80, 0.82, 0.55, 0.50, 3)],
    columns=["method", "val_acc", "test_acc", "val_bacc", "test_bacc", "n_ingredients"],
)


def _points(ax, label: str | None = None) -> np.ndarray:
    from matplotlib.collections import PathCollection

    mine = [c for c in ax.collections if isinstance(c, PathCollection)
            and (c.get_label() == label if label is not None else c.get_label().startswith("_"))]
    return np.array(sorted((float(x), float(y)) for c in mine for x, y in c.get_offsets()))


def _pct(df: pd.DataFrame, x: str, y: str) -> np.ndarray:
    return np.array(sorted(zip(100.0 * df[x].astype(float), 100.0 * df[y].astype(float))))


def test_figure2_balanced_accuracy(tmp_path):
    fig = plots.plot_models_val_test(MODELS, tmp_path / "fig2.png", metric="balanced_accuracy")
    assert (tmp_path / "fig2.png").stat().st_size > 0
    (ax,) = fig.axes
    kept = MODELS[~MODELS.diverged]
    assert _points(ax) == pytest.approx(_pct(kept, "val_bacc", "test_bacc"))
    assert _points(ax, "best on val") == pytest.approx(np.array([[60.0, 65.0]]))
    assert ax.get_xlabel() == "validation balanced accuracy on own fold (%)"
    assert ax.get_ylabel() == "test balanced accuracy (%)"


def test_figure2_accuracy_labels_unchanged(tmp_path):
    (ax,) = plots.plot_models_val_test(MODELS, tmp_path / "fig2.png").axes
    assert _points(ax) == pytest.approx(_pct(MODELS[~MODELS.diverged], "val_acc", "test_acc"))
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("validation accuracy on own fold (%)", "test accuracy (%)")


def test_figures_3_4_balanced_accuracy(tmp_path):
    (ax,) = plots.plot_subsets_val_test(SUBSETS, tmp_path / "fig3.png", metric="balanced_accuracy").axes
    assert ax.get_xlabel() == "MinBAcc: min balanced accuracy over the soup's validation folds (%)"
    assert ax.get_ylabel() == "test balanced accuracy (%)"
    two = SUBSETS[SUBSETS.n == 2]
    (label,) = [c.get_label() for c in ax.collections if c.get_label().startswith("n = 2 ")]
    assert label == "n = 2 (3 soups, r = 0.500)"
    assert _points(ax, label) == pytest.approx(_pct(two, "min_bacc", "test_bacc"))
    (ax,) = plots.plot_subsets_val_test(SUBSETS, tmp_path / "fig4.png", threshold=0.40, metric="balanced_accuracy").axes
    assert ax.get_title() == "Figure 4: uniform soups with MinBAcc \u2265 threshold"
    assert _points(ax, "n = 2 (2 soups, r = 1.000)") == pytest.approx(np.array([[40.0, 30.0], [50.0, 70.0]]))
    (ax,) = plots.plot_subsets_val_test(SUBSETS, tmp_path / "fig3_acc.png").axes
    assert ax.get_xlabel() == "MinAcc over the soup's validation folds (%)"
    assert ax.get_ylabel() == "test accuracy (%)"


def test_validation_signals_balanced_accuracy(tmp_path):
    fig = plots.plot_validation_signals(SUBSETS, tmp_path / "signals.png", metric="balanced_accuracy")
    assert [ax.get_xlabel() for ax in fig.axes] == ["AvgBAcc (Eq. 2) (%)", "MinBAcc (Eq. 3) (%)", "outer holdout (%)"]
    assert fig.axes[0].get_ylabel() == "test balanced accuracy (%)"
    # MinBAcc panel: RMSE at n = 2 only (n >= 2), sqrt(0.03) = 17.32 points; r over all five soups.
    assert fig.axes[1].get_title().startswith("MinBAcc (Eq. 3)\nRMSE 17.32 pts")
    acc = plots.plot_validation_signals(SUBSETS, tmp_path / "signals_acc.png")
    assert [ax.get_xlabel() for ax in acc.axes] == ["AvgAcc (Eq. 2) (%)", "MinAcc (Eq. 3) (%)", "outer holdout (%)"]
    assert acc.axes[1].get_title().startswith("MinAcc (Eq. 3)\nRMSE 10.00 pts")


def test_methods_figure_balanced_accuracy(tmp_path):
    ax = plots.plot_methods(METHODS, MODELS, tmp_path / "methods.png", metric="balanced_accuracy").axes[0]
    assert ax.get_ylabel() == "balanced accuracy (%)"
    assert ax.get_title() == "Methods: test and val balanced accuracy against single fine-tuned models"
    assert _points(ax, "test balanced accuracy")[:, 1].tolist() == pytest.approx([65.0, 50.0])
    assert _points(ax, "val balanced accuracy (MinBAcc for soups spanning folds)")[:, 1].tolist() == pytest.approx([60.0, 55.0])
    singles = [c for c in ax.collections if c.get_label().startswith("_") and len(c.get_offsets()) == 3]
    (points,) = [c.get_offsets() for c in singles]
    assert sorted(points[:, 1]) == pytest.approx([30.0, 45.0, 65.0])  # test_bacc of the kept models


# --------------------------------------------------------------------------- command line


@pytest.mark.parametrize("command", ["reliability", "figures"])
def test_metric_option(command):
    parser = cli.build_parser()
    required = {"reliability": ["--subsets", "s.csv", "--models-csv", "m.csv", "--out-subsets", "u.csv", "--out", "r.csv"],
                "figures": ["--models-csv", "m.csv", "--subsets", "s.csv", "--reliability", "r.csv",
                            "--methods", "x.csv", "--out", "a.png"]}[command]
    assert parser.parse_args([command, *required]).metric == "accuracy"
    assert parser.parse_args([command, *required, "--metric", "balanced_accuracy"]).metric == "balanced_accuracy"
    with pytest.raises(SystemExit):
        parser.parse_args([command, *required, "--metric", "f1"])


def test_reliability_step_with_metric(tmp_path):
    SUBSETS.to_csv(tmp_path / "a.csv", index=False)
    MODELS.to_csv(tmp_path / "models.csv", index=False)
    out, out_subsets = tmp_path / "reliability.csv", tmp_path / "uniform_subsets.csv"
    args = ["reliability", "--subsets", str(tmp_path / "a.csv"), "--models-csv", str(tmp_path / "models.csv"),
            "--out-subsets", str(out_subsets), "--out", str(out)]
    assert cli.main([*args, "--metric", "balanced_accuracy"]) == 0
    table = pd.read_csv(out)
    assert (table.metric == "balanced_accuracy").all() and table.threshold.iloc[0] == pytest.approx(0.40)
    assert table.set_index("n").loc[2].rmse_min_acc == pytest.approx(math.sqrt(0.03))
    assert {"avg_acc", "avg_bacc", "test_bacc"} <= set(pd.read_csv(out_subsets).columns)  # both metrics kept
    assert cli.main(args) == 0
    assert (pd.read_csv(out).metric == "accuracy").all()


def test_figures_step_with_metric(tmp_path):
    SUBSETS.to_csv(tmp_path / "subsets.csv", index=False)
    MODELS.to_csv(tmp_path / "models.csv", index=False)
    METHODS.to_csv(tmp_path / "methods.csv", index=False)
    reliability_table(SUBSETS, MODELS, metric="balanced_accuracy").to_csv(tmp_path / "reliability.csv", index=False)
    outs = [str(tmp_path / f"{name}.png") for name in ("fig2", "fig3", "fig4", "methods", "signals")]
    assert cli.main(["figures", "--models-csv", str(tmp_path / "models.csv"), "--subsets", str(tmp_path / "subsets.csv"),
                     "--reliability", str(tmp_path / "reliability.csv"), "--methods", str(tmp_path / "methods.csv"),
                     "--metric", "balanced_accuracy", "--out", *outs]) == 0
    assert all(Path(p).read_bytes().startswith(b"\x89PNG") for p in outs)
