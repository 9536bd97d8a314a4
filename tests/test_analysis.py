"""Known-answer tests for foldsoup.analysis.reliability, plots and summary.

The reliability numbers below were worked out by hand (in units of 0.01 accuracy) and are
written out as literals, not recomputed with the code's formulas.
"""

from __future__ import annotations

import importlib.util
import math
import struct
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

if importlib.util.find_spec("foldsoup") is None:  # running from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from foldsoup.analysis import reliability as analysis  # noqa: E402
from foldsoup.report import plots, summary  # noqa: E402
from foldsoup.analysis.reliability import fold_subsets, format_folds, reliability_table, subsets_sampled  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- fold subsets


@pytest.mark.parametrize("k, count", [(1, 1), (3, 7), (5, 31), (10, 1023)])
def test_fold_subsets_count_is_2k_minus_1(k, count):
    subsets = fold_subsets(k, None, seed=0)
    assert len(subsets) == count
    assert len(set(subsets)) == count


def test_fold_subsets_order_size_then_lexicographic():
    assert fold_subsets(3, None, 0) == [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]


def test_fold_subsets_cap_per_n():
    subsets = fold_subsets(10, 5, seed=0)
    sizes = pd.Series([len(s) for s in subsets]).value_counts().sort_index()
    # C(10, n) > 5 for n = 1..9, so each keeps 5; n = 10 has a single subset.
    assert sizes.to_dict() == {**{n: 5 for n in range(1, 10)}, 10: 1}
    assert len(subsets) == 46
    assert len(set(subsets)) == 46
    assert all(list(s) == sorted(set(s)) and all(0 <= f < 10 for f in s) for s in subsets)
    for n in range(1, 11):  # still ordered lexicographically within a size
        same = [s for s in subsets if len(s) == n]
        assert same == sorted(same)


def test_fold_subsets_cap_keeps_all_when_not_exceeded():
    assert fold_subsets(5, 10, seed=3) == fold_subsets(5, None, seed=0)  # max C(5, n) is 10
    capped = fold_subsets(5, 9, seed=3)  # C(5,2) = C(5,3) = 10 -> 9 each
    assert len(capped) == 31 - 2
    assert [s for s in capped if len(s) in (1, 4, 5)] == [s for s in fold_subsets(5) if len(s) in (1, 4, 5)]


def test_fold_subsets_deterministic_and_seed_dependent():
    assert fold_subsets(10, 5, seed=7) == fold_subsets(10, 5, seed=7)
    draws = {tuple(fold_subsets(10, 5, seed=s)) for s in range(5)}
    assert len(draws) > 1


def test_fold_subsets_rejects_bad_arguments():
    with pytest.raises(ValueError):
        fold_subsets(0)
    with pytest.raises(ValueError):
        fold_subsets(5, 0)


def test_subsets_sampled_flag():
    assert subsets_sampled(5, None) is False
    assert subsets_sampled(5, 10) is False
    assert subsets_sampled(5, 9) is True
    assert subsets_sampled(10, 252) is False  # C(10, 5) = 252 is the largest
    assert subsets_sampled(10, 251) is True


def test_format_folds():
    assert format_folds((0, 2, 3)) == "0-2-3"
    assert format_folds([4]) == "4"


# --------------------------------------------------------------------------- reliability table

# k = 3 folds, grid points a and b, plus a diverged model of grid point c (val 0.10).
MODELS = pd.DataFrame(
    [
        ("a", 0, 0.78, 0.78, False),
        ("a", 1, 0.79, 0.80, False),
        ("a", 2, 0.80, 0.79, False),
        ("b", 0, 0.80, 0.81, False),
        ("b", 1, 0.81, 0.81, False),
        ("b", 2, 0.82, 0.81, False),
        ("c", 0, 0.10, 0.10, True),
    ],
    columns=["hp", "fold", "val_acc", "test_acc", "diverged"],
)


def _subsets() -> pd.DataFrame:
    rows = [(hp, str(f), 1, v, v, t) for hp, f, v, t, d in MODELS.itertuples(index=False) if not d]
    # n = 2: (hp, folds, n, avg, min, test); two soups fall below the threshold 0.78.
    rows += [
        ("a", "0-1", 2, 0.71, 0.70, 0.72),
        ("a", "0-2", 2, 0.75, 0.74, 0.74),
        ("a", "1-2", 2, 0.81, 0.80, 0.80),
        ("b", "0-1", 2, 0.82, 0.81, 0.82),
        ("b", "0-2", 2, 0.83, 0.82, 0.81),
        ("b", "1-2", 2, 0.84, 0.83, 0.83),
    ]
    rows += [("a", "0-1-2", 3, 0.80, 0.75, 0.76), ("b", "0-1-2", 3, 0.88, 0.85, 0.86)]
    return pd.DataFrame(rows, columns=["hp", "folds", "n", "avg_acc", "min_acc", "test_acc"])


@pytest.fixture
def table() -> pd.DataFrame:
    return reliability_table(_subsets(), MODELS).set_index("n")


def test_reliability_columns_and_sizes(table):
    assert list(table.reset_index().columns) == list(analysis.RELIABILITY_COLUMNS)
    assert list(table.index) == [1, 2, 3]
    assert table["n_soups"].tolist() == [6, 6, 2]


def test_reliability_threshold_excludes_diverged(table):
    # The diverged model's 0.10 would otherwise be the lowest val accuracy.
    assert (table["threshold"] == 0.78).all()


def test_reliability_n1(table):
    row = table.loc[1]
    # val - test in 0.01: 0, -1, 1, -1, 0, 1 -> sum of squares 4 -> sqrt(0.0004 / 6)
    assert row.rmse_min_acc == pytest.approx(0.0081650, abs=1e-7)
    assert row.rmse_avg_acc == pytest.approx(0.0081650, abs=1e-7)
    assert row.mean_gap_min_acc == pytest.approx(0.0, abs=1e-12)
    # deviations x: -2,-1,0,0,1,2; y: -2,0,-1,1,1,1 -> Sxy 7, Sxx 10, Syy 8 -> 7 / sqrt(80)
    assert row.corr_all == pytest.approx(0.7826238, abs=1e-6)
    assert row.n_over_threshold == 6
    assert row.corr_over_threshold == pytest.approx(0.7826238, abs=1e-6)


def test_reliability_n2(table):
    row = table.loc[2]
    # min - test in 0.01: -2, 0, 0, -1, 1, 0 -> squares 6 -> sqrt(0.0006 / 6) = 0.01; mean -2/6
    assert row.rmse_min_acc == pytest.approx(0.01, abs=1e-9)
    assert row.mean_gap_min_acc == pytest.approx(-0.0033333, abs=1e-7)
    # avg - test in 0.01: -1, 1, 1, 0, 2, 1 -> squares 8 -> sqrt(0.0008 / 6); mean 4/6
    assert row.rmse_avg_acc == pytest.approx(0.0115470, abs=1e-7)
    assert row.mean_gap_avg_acc == pytest.approx(0.0066667, abs=1e-7)
    # all six: x 70,74,80,81,82,83; y 72,74,80,82,81,83 -> Sxy 115.667, Sxx 133.333, Syy 103.333
    assert row.corr_all == pytest.approx(0.9854138, abs=1e-6)
    # over 0.78: x 80..83, y 80,82,81,83 -> Sxy 4, Sxx 5, Syy 5 -> 0.8
    assert row.n_over_threshold == 4
    assert row.corr_over_threshold == pytest.approx(0.8, abs=1e-9)


def test_reliability_n3_two_points_and_single_point(table):
    row = table.loc[3]
    assert row.rmse_min_acc == pytest.approx(0.01, abs=1e-9)  # gaps -1, -1
    assert row.rmse_avg_acc == pytest.approx(0.0316228, abs=1e-7)  # gaps 4, 2 -> sqrt(10) * 0.01
    assert row.corr_all == pytest.approx(1.0)  # two points always lie on a line
    assert row.n_over_threshold == 1  # only 0.85 >= 0.78
    assert math.isnan(row.corr_over_threshold)  # one point: NaN, not an exception


def test_reliability_sizes_without_soups_are_nan():
    out = reliability_table(_subsets(), MODELS, k=4).set_index("n")
    assert out.loc[4, "n_soups"] == 0
    assert out.loc[4, "n_over_threshold"] == 0
    assert all(math.isnan(out.loc[4, c]) for c in ("rmse_avg_acc", "rmse_min_acc", "corr_all", "corr_over_threshold"))


def test_threshold_without_diverged_column_and_with_string_flags():
    assert analysis.val_threshold(MODELS.drop(columns="diverged")) == 0.10
    as_csv = MODELS.assign(diverged=MODELS["diverged"].map(str))  # "True"/"False" as read back
    assert analysis.val_threshold(as_csv) == 0.78
    assert math.isnan(analysis.val_threshold(MODELS.assign(diverged=True)))


def test_pearson_degenerate_inputs_are_nan():
    assert math.isnan(analysis.pearson([], []))
    assert math.isnan(analysis.pearson([0.8], [0.9]))
    assert math.isnan(analysis.pearson([0.8, 0.8, 0.8], [0.7, 0.8, 0.9]))  # zero variance
    assert analysis.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_method_order():
    from foldsoup.config import methods

    names = ["gsgs", "zero_shot", "best_uniform_per_split", "best_on_val", "bgss", "uniform_soup", "greedy_soup", "gsgs"]
    assert methods.order(names) == [
        "best_on_val", "uniform_soup", "greedy_soup", "bgss", "gsgs", "best_uniform_per_split", "zero_shot",
    ]


# --------------------------------------------------------------------------- plots

METHODS = pd.DataFrame(
    [
        ("gsgs", 0.8300, 0.8250, 3),
        ("best_on_val", 0.8200, 0.8100, 1),
        ("uniform_soup", 0.7900, 0.7700, 6),
        ("greedy_soup", 0.8600, 0.8150, 4),
        ("bgss", 0.8350, 0.8200, 2),
        ("best_uniform_per_split", 0.8000, 0.7950, 2),
        ("zero_shot", 0.6000, 0.6100, 0),
    ],
    columns=["method", "val_acc", "test_acc", "n_ingredients"],
)


def _models_with_lr() -> pd.DataFrame:
    return MODELS.assign(lr=MODELS["hp"].map({"a": 1e-3, "b": 3e-4, "c": 1e-2}))


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _check_png(path: Path) -> None:
    assert path.is_file()
    assert path.stat().st_size > 10_000  # a blank 150 dpi canvas compresses far below a real plot
    width, height = _png_size(path)
    assert width >= 600 and height >= 500
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left


def _scattered(ax, label: str | None = None) -> np.ndarray:
    """The (x, y) points of the scatter plots on `ax` (those labelled `label`, or all unlabelled
    ones), sorted: what the figure shows, read back from the Axes the plot function built."""
    from matplotlib.collections import PathCollection

    mine = [c for c in ax.collections if isinstance(c, PathCollection)
            and (c.get_label() == label if label is not None else c.get_label().startswith("_"))]
    return np.array(sorted((float(x), float(y)) for c in mine for x, y in c.get_offsets()))


def _pct_points(df: pd.DataFrame, x: str, y: str) -> np.ndarray:
    return np.array(sorted(zip(100.0 * df[x].astype(float), 100.0 * df[y].astype(float))))


def test_plot_models_val_test(tmp_path):
    path = tmp_path / "figure2.png"
    fig = plots.plot_models_val_test(_models_with_lr(), path)
    _check_png(path)
    assert _png_size(path) == (1020, 900)  # 6.8 x 6.0 in at 150 dpi
    (ax,) = fig.axes
    kept = MODELS[~MODELS.diverged]
    # Every model that did not diverge, at (own-fold val, test) in %, and no other point.
    assert _scattered(ax) == pytest.approx(_pct_points(kept, "val_acc", "test_acc"))
    best = kept.loc[kept.val_acc.idxmax()]
    assert _scattered(ax, "best on val") == pytest.approx(np.array([[100 * best.val_acc, 100 * best.test_acc]]))
    assert ax.get_title() == "Figure 2: single fine-tuned models (6 models)\n1 diverged model(s) not shown"


def test_plot_models_without_lr_column(tmp_path):
    path = tmp_path / "figure2.png"
    fig = plots.plot_models_val_test(MODELS, path)
    _check_png(path)
    (ax,) = fig.axes
    kept = MODELS[~MODELS.diverged]
    assert _scattered(ax) == pytest.approx(_pct_points(kept, "val_acc", "test_acc"))
    # Colour by grid point: one colour per hp.
    colour_of = {}
    for c in ax.collections:
        if c.get_label().startswith("_"):
            (x, y), = c.get_offsets()
            hp = kept.loc[(100 * kept.val_acc - x).abs().lt(1e-9) & (100 * kept.test_acc - y).abs().lt(1e-9), "hp"].item()
            colour_of.setdefault(hp, set()).add(tuple(c.get_facecolor()[0]))
    assert sorted(colour_of) == ["a", "b"] and all(len(v) == 1 for v in colour_of.values())
    assert colour_of["a"] != colour_of["b"]


def test_plot_subsets_figure3_and_figure4(tmp_path):
    subsets = _subsets().assign(sampled=False)
    for name, threshold in (("figure3.png", None), ("figure4.png", 0.78)):
        folder = tmp_path / name.removesuffix(".png")
        fig = plots.plot_subsets_val_test(subsets, folder / name, threshold=threshold)
        _check_png(folder / name)
        (ax,) = fig.axes
        shown = subsets if threshold is None else subsets[subsets.min_acc >= threshold]
        for n in sorted(subsets.n.unique()):
            # One series per soup size n: its soups at (MinAcc, test) in %, counted in the legend.
            part = shown[shown.n == n]
            (label,) = [c.get_label() for c in ax.collections if c.get_label().startswith(f"n = {n} ")]
            assert label.startswith(f"n = {n} ({len(part)} soups, r = ")
            assert _scattered(ax, label) == pytest.approx(_pct_points(part, "min_acc", "test_acc"))
        thresholds = [line.get_xdata() for line in ax.lines if line.get_label().startswith("threshold")]
        assert thresholds == ([] if threshold is None else [pytest.approx([78.0, 78.0])])
    assert len(shown) == len(subsets) - 3  # figure 4 leaves out the three soups below the threshold


def test_plot_methods(tmp_path):
    from foldsoup.config import methods as method_table

    path = tmp_path / "nested" / "methods.png"  # the folder is created
    fig = plots.plot_methods(METHODS, _models_with_lr(), path)
    _check_png(path)
    ax = fig.axes[0]
    order = method_table.order(METHODS.method)
    by_name = METHODS.set_index("method").loc[order]
    positions = [float(i) for i in range(1, len(order) + 1)]
    assert _scattered(ax, "test accuracy") == pytest.approx(np.array(sorted(zip(positions, 100 * by_name.test_acc))))
    assert _scattered(ax, "val accuracy (MinAcc for soups spanning folds)") == pytest.approx(
        np.array(sorted(zip(positions, 100 * by_name.val_acc))))
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[0] == "single models\n(6, 1 diverged\nnot shown)"
    assert labels[1:] == [f"{method_table.label(m)}\n({n} ingredient{'' if n == 1 else 's'})"
                          for m, n in zip(order, by_name.n_ingredients)]
    # The single models' column: every non-diverged model's test accuracy (jittered around x = 0).
    singles = [c for c in ax.collections if c.get_label().startswith("_") and len(c.get_offsets()) == 6]
    (points,) = [c.get_offsets() for c in singles]
    assert sorted(points[:, 1]) == pytest.approx(sorted(100 * MODELS[~MODELS.diverged].test_acc))
    assert (abs(points[:, 0]) < 0.2).all()


def test_plot_replaces_existing_file(tmp_path):
    path = tmp_path / "figure2.png"
    path.write_bytes(b"old")
    plots.plot_models_val_test(_models_with_lr(), path)
    _check_png(path)


# --------------------------------------------------------------------------- summary


def _write_summary(tmp_path: Path, ship: dict | None = None, **info) -> str:
    path = tmp_path / "summary.md"
    run_info = {"dataset": "digits", "model": "digits_cnn", "k": 3, "grid_size": 2, "seed": 0, **info}
    subsets = _subsets().assign(sampled=False)
    summary.write_summary(path, reliability_table(subsets, MODELS), METHODS, MODELS, subsets, run_info, ship=ship)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.md"]
    return path.read_text()


def _row(text: str, section: str, first_cell: str) -> list[str]:
    """Cells of the table row starting with `first_cell` inside the section titled `section`."""
    body = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in section {section!r}")


def test_summary_opens_with_the_model_to_ship(tmp_path):
    from foldsoup.report.ship import ship_record

    gsgs = {"method": "gsgs", "ingredients": ["greedy_fold0", "greedy_fold2"], "n_ingredients": 2, "folds": [0, 2],
            "val_metric": "min", "val_acc": 0.83, "test_acc": 0.825}
    ship = ship_record("gsgs", gsgs, "results/ship/model.safetensors", "results/soups/gsgs.safetensors", "0" * 64)
    text = _write_summary(tmp_path, ship=ship)
    title, statement, setup = text.split("\n\n", 3)[:3]
    assert title == "# foldsoup summary" and setup.startswith("- dataset: digits")
    assert statement.startswith("**The model to ship: `results/ship/model.safetensors`** (gsgs, set before the run by "
                                "soups.ship; a copy of results/soups/gsgs.safetensors). Validation estimate: 83.00%, "
                                "MinAcc over folds 0, 2, the folds its ingredients were validated on")
    assert "the estimate is optimistic" in statement and "Test accuracy: 82.50%" in statement
    assert "choosing among the other rows of tables/methods.csv by their test accuracy is not a fair selection" in statement
    assert _write_summary(tmp_path).startswith("# foldsoup summary\n\n- dataset: digits")  # no ship.json: as before


def test_summary_table1_rows(tmp_path):
    text = _write_summary(tmp_path)
    # n, AvgAcc this run, AvgAcc paper, MinAcc this run, MinAcc paper, mean gap, soups
    assert _row(text, "Table 1", "1") == ["1", "0.82%", "—", "0.82%", "0.30%", "0.00%", "6"]
    assert _row(text, "Table 1", "2") == ["2", "1.15%", "0.87%", "1.00%", "0.92%", "-0.33%", "6"]
    assert _row(text, "Table 1", "3") == ["3", "3.16%", "0.98%", "1.00%", "1.06%", "-1.00%", "2"]


def test_summary_table2_rows(tmp_path):
    text = _write_summary(tmp_path)
    assert _row(text, "Table 2", "1") == ["1", "0.783", "—", "0.783", "0.878", "6 / 6"]
    assert _row(text, "Table 2", "2") == ["2", "0.985", "0.934", "0.800", "0.763", "4 / 6"]
    assert _row(text, "Table 2", "3") == ["3", "1.000", "0.978", "n/a", "0.707", "1 / 2"]
    assert "78.00% in this run (set by a/fold0), 97.20% in the paper" in text


def test_summary_table3_rows(tmp_path):
    text = _write_summary(tmp_path)
    # method, val this run, val paper, test this run, test paper, ingredients
    # (without interval columns in methods.csv the two interval cells stay empty)
    assert _row(text, "Table 3", "Best on val") == ["Best on val", "82.00%", "98.44%", "81.00%", "98.09%", "1", "", ""]
    assert _row(text, "Table 3", "Uniform soup")[:6] == ["Uniform soup", "79.00%", "98.14%", "77.00%", "96.88%", "6"]
    assert _row(text, "Table 3", "Greedy soup (all subsets)")[1:5] == ["86.00%", "99.67%", "81.50%", "98.26%"]
    assert _row(text, "Table 3", "BGSS")[1:5] == ["83.50%", "98.66%", "82.00%", "98.27%"]
    assert _row(text, "Table 3", "GSGS")[1:5] == ["83.00%", "98.97%", "82.50%", "98.32%"]
    assert _row(text, "Table 3", "zero_shot")[1:5] == ["60.00%", "—", "61.00%", "—"]
    methods = [line.split("|")[1].strip() for line in text.split("## Table 3", 1)[1].split("## Table 4")[0].splitlines()
               if line.startswith("| ") and "---" not in line][1:]
    assert methods == ["Best on val", "Uniform soup", "Greedy soup (all subsets)", "BGSS", "GSGS", "zero_shot"]


def test_summary_table3_intervals():
    from foldsoup.report.summary import table3_section

    methods = pd.DataFrame([
        {"method": "best_on_val", "val_acc": 0.9, "test_acc": 0.8, "n_ingredients": 1, "test_ci_low": 0.75,
         "test_ci_high": 0.85, "diff_vs_best_on_val": 0.0, "diff_ci_low": 0.0, "diff_ci_high": 0.0, "diff_significant": False},
        {"method": "gsgs", "val_acc": 0.92, "test_acc": 0.83, "n_ingredients": 3, "test_ci_low": 0.78,
         "test_ci_high": 0.88, "diff_vs_best_on_val": 0.03, "diff_ci_low": 0.01, "diff_ci_high": 0.05, "diff_significant": True},
    ])
    text = table3_section(methods)
    gsgs = next(line for line in text.splitlines() if line.startswith("| GSGS"))
    assert gsgs.split("|")[7:9] == [" 78.00%–88.00% ", " +3.00 [+1.00, +5.00]* "]


def test_summary_table4_rows_and_note(tmp_path):
    text = _write_summary(tmp_path)
    assert _row(text, "Table 4", "Best on val") == ["Best on val", "82.00%", "81.00%", "98.44%"]
    assert _row(text, "Table 4", "Uniform soup") == ["Uniform soup", "79.00%", "77.00%", "98.14%"]
    assert _row(text, "Table 4", "Best uniform soup per split on val") == [
        "Best uniform soup per split on val", "80.00%", "79.50%", "96.88%"]
    assert "appear to repeat Table 3's val/test columns" in text


def test_summary_header_and_context(tmp_path):
    text = _write_summary(tmp_path)
    assert "dataset: digits" in text and "folds k: 3" in text and "grid points: 2" in text
    assert "fine-tuned models: 7" in text
    assert "all 2^k - 1 per grid point" in text
    assert "diverged models: 1 (c/fold0)" in text
    assert "context, not a target" in text
    assert _row(text, "Single models", "highest val accuracy: val")[1:] == ["82.00%", "98.44%"]


def test_summary_paper_preset_and_sampled(tmp_path):
    text = _write_summary(tmp_path, preset="paper-cifar10", sampled=True, max_subsets_per_n=4)
    assert "paper column is the target" in text
    assert "context, not a target" not in text
    assert "sampled, at most 4 per size n" in text


def test_summary_recognises_paper_setup_and_key_aliases(tmp_path):
    # grid_size None: the helper's default must not shadow the grid_points alias
    info = {"dataset": "cifar10", "model": "open_clip ViT-B-32 (openai)", "k": 5, "grid_size": None,
            "grid_points": 18, "models": 90}
    text = _write_summary(tmp_path, **info)
    assert "paper column is the target" in text
    assert "grid points: 18" in text and "fine-tuned models: 90" in text
    text = _write_summary(tmp_path, **{**info, "k": 10})
    assert "context, not a target" in text


# The paper's text (Suzuki & Matsuzawa, AI 2022), kept beside the checkout where the project was
# written; summary.PAPER is copied from it by hand, so compare the two where the text is there.
PAPER_TEXT = Path(__file__).resolve().parents[2] / "shared" / "paper-model-soups-kfold.md"


def _paper_table(text: str, caption: str) -> list[list[str]]:
    """The tab-separated rows (header first) that follow the caption starting with `caption`."""
    rows: list[list[str]] = []
    for line in text[text.index(caption):].splitlines()[1:]:
        if "\t" in line:
            rows.append([cell.replace("<b>", "").replace("</b>", "").strip() for cell in line.split("\t")])
        elif rows and line.strip():
            break
    return rows


@pytest.mark.skipif(not PAPER_TEXT.is_file(), reason=f"the paper's text is not at {PAPER_TEXT}")
def test_paper_constants_match_the_papers_text():
    import re

    text = PAPER_TEXT.read_text()

    def num(cell: str) -> float | None:
        return float(cell.rstrip("%")) if cell else None

    t1 = _paper_table(text, "**Table 1.**")
    assert t1[0] == ["$n$", "AvgAcc", "MinAcc"]
    assert {int(n): {"avg_acc": num(a), "min_acc": num(m)} for n, a, m in t1[1:]} == summary.PAPER["table1"]
    t2 = _paper_table(text, "**Table 2.**")
    assert t2[0] == ["$n$", "Corr for All", "Corr over Thre"]
    assert {int(n): {"corr_all": num(a), "corr_over_threshold": num(o)} for n, a, o in t2[1:]} == summary.PAPER["table2"]
    t3_names = {"Best on val": "best_on_val", "Uniform soups": "uniform_soup", "Greedy soups": "greedy_soup",
                "BGSSs": "bgss", "GSGSs": "gsgs"}
    t3 = _paper_table(text, "**Table 3.**")
    assert t3[0] == ["Method", "Val", "Test"]
    assert {t3_names[m]: {"val": num(v), "test": num(t)} for m, v, t in t3[1:]} == summary.PAPER["table3"]
    t4_names = {"Best on val": "best_on_val", "Uniform Soups": "uniform_soup",
                "Best Uniform Soups per split on val": "best_uniform_per_split"}
    t4 = _paper_table(text, "**Table 4.**")
    assert t4[0] == ["Method", "Acc"]
    assert {t4_names[m]: num(a) for m, a in t4[1:]} == summary.PAPER["table4"]
    # Section 4's text about Figure 2, as fractions
    fig2 = re.search(r"highest accuracy \((0\.\d+)\).*?best accuracy \((0\.\d+)\)\. The lowest accuracy of the "
                     r"validation data is (0\.\d+).*?accuracy is (0\.\d+)", text)
    keys = ("best_val", "best_val_test", "lowest_val", "lowest_val_test")
    assert {k: round(100 * float(v), 2) for k, v in zip(keys, fig2.groups())} == summary.PAPER["figure2"]
    setup = summary.PAPER["setup"]
    assert f"trained {setup['n_models']} models based on {setup['grid_size']} hyperparameters and {setup['k']} training" in text