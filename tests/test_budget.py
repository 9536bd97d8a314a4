"""Budget analysis (more grid points or more folds?): the cells and their seeded draws, the
summaries, the configuration, and, on the tiny real run of the smoke preset, that every method
on a draw is exactly what the workflow's own steps give on that draw's models (the full cell is
tables/methods.csv)."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from conftest import ROOT, SMOKE, snakemake

from foldsoup.analysis.budget import (
    COLUMNS,
    METHODS,
    Subset,
    compare_equal_budget,
    draw_subsets,
    equal_budgets,
    fold_counts,
    grid_ladder,
    mean_table,
    n_subsets,
)
from foldsoup.errors import ConfigError
from foldsoup.config.schema import validate
from foldsoup.config.yaml_files import deep_update, load_yaml_files

# ------------------------------------------------------------------------ cells and draws


def test_grid_ladder_halves_from_the_whole_grid():
    assert grid_ladder(18) == [1, 2, 4, 9, 18]
    assert grid_ladder(2) == [1, 2]
    assert grid_ladder(1) == [1]
    assert grid_ladder(4) == [1, 2, 4]
    assert grid_ladder(18, [9, 1, 9, 18]) == [1, 9, 18]
    with pytest.raises(ValueError, match=r"budget.grid_points: \[19\] outside the grid's 18 point\(s\); allowed: 1 <= g <= 18"):
        grid_ladder(18, [2, 19])


def test_fold_counts():
    assert fold_counts(5) == [1, 2, 3, 4, 5]
    assert fold_counts(5, [5, 2]) == [2, 5]
    with pytest.raises(ValueError, match="budget.fold_counts"):
        fold_counts(3, [4])


def test_n_subsets():
    assert n_subsets(18, 5, 18, 5) == 1
    assert n_subsets(18, 5, 18, 4) == 5
    assert n_subsets(18, 5, 9, 2) == 48620 * 10
    assert n_subsets(2, 2, 1, 1) == 4


def test_the_full_cell_is_one_draw():
    assert draw_subsets(18, 5, 18, 5, draws=3, seed=0) == [Subset(tuple(range(18)), tuple(range(5)))]


def test_a_cell_with_few_subsets_takes_all_of_them_in_order():
    assert draw_subsets(2, 2, 1, 1, draws=5, seed=0) == [
        Subset((0,), (0,)), Subset((0,), (1,)), Subset((1,), (0,)), Subset((1,), (1,))]
    assert draw_subsets(18, 5, 18, 4, draws=5, seed=7) == [
        Subset(tuple(range(18)), F) for F in [(0, 1, 2, 3), (0, 1, 2, 4), (0, 1, 3, 4), (0, 2, 3, 4), (1, 2, 3, 4)]]


@pytest.mark.parametrize("n_grid, k, g, f, draws", [(18, 5, 4, 2, 3), (18, 5, 9, 4, 3), (18, 5, 18, 4, 3),
                                                     (18, 5, 1, 1, 50), (3, 2, 2, 1, 5), (4, 3, 2, 2, 17)])
def test_draws_are_distinct_subsets_of_the_right_sizes(n_grid, k, g, f, draws):
    subs = draw_subsets(n_grid, k, g, f, draws, seed=0)
    assert len(subs) == min(draws, n_subsets(n_grid, k, g, f))
    assert len(set(subs)) == len(subs)
    for s in subs:
        assert len(s.grid) == g and len(s.folds) == f
        assert list(s.grid) == sorted(set(s.grid)) and list(s.folds) == sorted(set(s.folds))
        assert 0 <= s.grid[0] and s.grid[-1] < n_grid and 0 <= s.folds[0] and s.folds[-1] < k


def test_draws_are_fixed_by_the_seed_and_the_cell_alone():
    first = draw_subsets(18, 5, 4, 2, 3, seed=0)
    # The exact draws of seed 0 (they define the published numbers: a change must be deliberate).
    assert first == [Subset((3, 9, 13, 16), (3, 4)), Subset((3, 6, 11, 12), (0, 4)), Subset((0, 2, 5, 17), (0, 3))]
    draw_subsets(18, 5, 9, 2, 3, seed=0)  # another cell drawn in between changes nothing
    assert draw_subsets(18, 5, 4, 2, 3, seed=0) == first
    assert draw_subsets(18, 5, 4, 2, 3, seed=1) != first
    assert draw_subsets(18, 5, 4, 2, 5, seed=0)[:3] == first  # more draws extend the same sequence


# ------------------------------------------------------------------------ summaries


def _synthetic() -> pd.DataFrame:
    """Two methods, g in {1, 2, 4}, f in {1, 2}; test acc = base + 0.01 g + 0.02 f (+ noise per draw)."""
    rows = []
    for method, base in (("best_on_val", 0.90), ("gsgs", 0.91)):
        for g in (1, 2, 4):
            for f in (1, 2):
                for draw, noise in enumerate((-0.001, 0.001)):
                    rows.append({"method": method, "grid_points": g, "n_folds": f, "budget": g * f, "draw": draw,
                                 "grid": "0", "folds": "0", "subsets": 10, "n_models": g * f, "n_ingredients": 1,
                                 "val_acc": 0.95, "test_acc": base + 0.01 * g + 0.02 * f + noise, "n_test": 500})
    return pd.DataFrame(rows, columns=list(COLUMNS))


def test_mean_table():
    means = mean_table(_synthetic())
    assert len(means) == 2 * 3 * 2 and set(means.draws) == {2}
    row = means[(means.method == "gsgs") & (means.grid_points == 4) & (means.n_folds == 2)].iloc[0]
    assert row.test_acc == pytest.approx(0.91 + 0.04 + 0.04) and row.budget == 8
    assert row.test_std == pytest.approx(math.sqrt(2) * 0.001)
    assert list(dict.fromkeys(means.method)) == ["best_on_val", "gsgs"]


def test_equal_budgets_and_the_comparison():
    table = _synthetic()
    assert equal_budgets(table) == {2: [(2, 1), (1, 2)], 4: [(4, 1), (2, 2)]}
    c = compare_equal_budget(table)
    assert c["budget"] == 4 and c["cells"] == [(4, 1), (2, 2)]
    # 4 x 1: +0.04 +0.02; 2 x 2: +0.02 +0.04: a tie for both methods.
    assert c["ties"] == ["best_on_val", "gsgs"] and c["wins"] == {(4, 1): [], (2, 2): []}
    table.loc[(table.grid_points == 1) & (table.n_folds == 2), "test_acc"] += 0.05
    c = compare_equal_budget(table, budget=2)
    assert c["wins"] == {(2, 1): [], (1, 2): ["best_on_val", "gsgs"]}
    assert c["mean_over_methods"][(1, 2)] == pytest.approx(0.905 + 0.01 + 0.04 + 0.05)


def test_summary_section_and_figure(tmp_path):
    from foldsoup.report.plots import plot_budget
    from foldsoup.report.summary import budget_section

    table = _synthetic()
    table.loc[(table.grid_points == 2) & (table.n_folds == 2), "test_acc"] += 0.01  # 2 x 2 beats 4 x 1
    text = budget_section(table)
    assert text.startswith("## Budget: more grid points or more folds?")
    assert "| Best on val | 1 | 93.00% | 95.00% |" in text
    assert "| 4 | 4 × 1: 96.50%; 2 × 2: 97.50% |" in text
    assert "At the largest budget reached two ways, 4 fine-tunes, more folds did best on average" in text
    assert "best per method: 0 of 2 for 4 × 1, 2 of 2 for 2 × 2." in text
    assert budget_section(None) == "" and budget_section(table.iloc[:0]) == ""
    fig = plot_budget(table, tmp_path / "budget.png")
    assert (tmp_path / "budget.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # What is drawn: per method a heatmap (rows g, columns f) and lines against g*f, one per f,
    # of the mean test accuracy over the draws of each cell, in %.
    means = 100 * table.groupby(["method", "grid_points", "n_folds"]).test_acc.mean()
    panels = [ax for ax in fig.axes if ax.images or ax.lines]
    assert [ax.get_title() for ax in panels[::2]] == ["Best on val: mean test acc (%)", "GSGS: mean test acc (%)"]
    for method, heat, lines in zip(("best_on_val", "gsgs"), panels[::2], panels[1::2]):
        grid = heat.images[0].get_array()
        assert grid.shape == (3, 2)  # g = 1, 2, 4 by f = 1, 2
        assert grid.ravel().tolist() == pytest.approx([means[(method, g, f)] for g in (1, 2, 4) for f in (1, 2)])
        assert [line.get_label() for line in lines.lines] == ["f = 1", "f = 2"]
        for f, line in zip((1, 2), lines.lines):
            assert list(line.get_xdata()) == [g * f for g in (1, 2, 4)]
            assert list(line.get_ydata()) == pytest.approx([means[(method, g, f)] for g in (1, 2, 4)])


# ------------------------------------------------------------------------ configuration


@pytest.fixture(scope="module")
def base() -> dict:
    return load_yaml_files(ROOT / "config.yaml")


def test_budget_defaults(base):
    assert validate(base, check_paths=False)["budget"] == {"enabled": True, "grid_points": None, "fold_counts": None,
                                                           "draws": 2}


@pytest.mark.parametrize("override, message", [
    ({"budget": {"grid_points": [1, 19]}},
     "budget.grid_points[1]: 19 is larger than the grid's 18 points (3 lr x 3 aug x 2 mixup); allowed: 1 <= value <= 18"),
    ({"budget": {"fold_counts": [6]}}, "budget.fold_counts[0]: 6 is larger than folds.k = 5; allowed: 1 <= value <= 5"),
    ({"budget": {"draws": 0}}, "budget.draws: 0 is out of range; allowed: an integer >= 1"),
    ({"budget": {"grid_points": [0]}}, "budget.grid_points[0]: 0 is out of range"),
    ({"budget": {"enabled": "yes"}}, "budget.enabled: 'yes' is a string; allowed: true or false"),
    ({"budget": {"draw": 2}}, "budget.draw: unknown key; did you mean 'draws'?"),
])
def test_bad_budget_values_are_refused_naming_the_key(base, override, message):
    with pytest.raises(ConfigError) as info:
        validate(deep_update(base, override), check_paths=False)
    assert message in str(info.value)


@pytest.mark.slow
def test_dry_run_without_the_budget_analysis(tmp_path):
    """budget.enabled: false leaves out the 5 budget jobs and the table (the default config's
    138 jobs, with them, are counted in test_workflow.py)."""
    overlay = tmp_path / "off.yaml"
    overlay.write_text("budget:\n  enabled: false\n")
    off = snakemake("-n", "--cores", "2", "--configfile", str(overlay), "--config", f"results={tmp_path / 'results'}")
    assert off.returncode == 0, off.tail()
    assert "budget" not in off.stats and "budget_table" not in off.stats
    assert off.stats["total"] == 132 and off.stats["summary"] == 1 and off.stats["finetune"] == 90


# ------------------------------------------------------------------------ the tiny real run


def _rows(table: pd.DataFrame, g: int, f: int) -> pd.DataFrame:
    return table[(table.grid_points == g) & (table.n_folds == f)]


@pytest.mark.slow
def test_smoke_budget_table_has_every_cell_and_the_figure(smoke_run):
    r = smoke_run.results
    table = pd.read_csv(r / "tables" / "budget.csv", dtype={"grid": str, "folds": str})
    assert list(table.columns) == list(COLUMNS)
    # 2 grid points x 2 folds, 2 draws: (1, 1) has 4 subsets (2 drawn), (2, 1) and (1, 2) 2 each, (2, 2) one.
    draws = table.groupby(["grid_points", "n_folds"]).draw.nunique().to_dict()
    assert draws == {(1, 1): 2, (1, 2): 2, (2, 1): 2, (2, 2): 1}
    per_draw = table.groupby(["grid_points", "n_folds", "draw"]).method.apply(list)
    assert len(per_draw) == 7 and all(methods == list(METHODS) for methods in per_draw)
    assert table.test_acc.between(0, 1).all() and table.val_acc.between(0, 1).all()
    assert (table.budget == table.grid_points * table.n_folds).all()
    assert (r / "figures" / "budget.png").stat().st_size > 0
    summary = (r / "summary.md").read_text()
    assert "## Budget: more grid points or more folds?" in summary and "| 2 | 2 × 1:" in summary


@pytest.mark.slow
def test_smoke_full_cell_reproduces_methods_csv(smoke_run):
    """The cell with every grid point and every fold is the workflow's own run, exactly: both
    tables hold the float of the same fraction of counts (issue 19.2), written alike."""
    r = smoke_run.results
    table = pd.read_csv(r / "tables" / "budget.csv", dtype={"grid": str, "folds": str})
    methods = pd.read_csv(r / "tables" / "methods.csv").set_index("method")
    full = _rows(table, 2, 2).set_index("method")
    assert list(full.index) == list(METHODS)
    for m in METHODS:
        assert full.at[m, "test_acc"] == methods.at[m, "test_acc"], m
        assert full.at[m, "val_acc"] == methods.at[m, "val_acc"], m
        assert full.at[m, "n_ingredients"] == methods.at[m, "n_ingredients"], m


@pytest.mark.slow
def test_smoke_one_fold_cells_are_the_per_fold_soups(smoke_run):
    """All grid points on one fold: greedy soup, BGSS and GSGS are that fold's greedy soup,
    the uniform soup that fold's uniform soup (soups/greedy_fold<i>.json, uniform_fold<i>.json)."""
    r = smoke_run.results
    table = pd.read_csv(r / "tables" / "budget.csv", dtype={"grid": str, "folds": str})
    cells = _rows(table, 2, 1)
    for fold in (0, 1):
        cell = cells[cells.folds == str(fold)].set_index("method")
        greedy = json.loads((r / "soups" / f"greedy_fold{fold}.json").read_text())
        uniform = json.loads((r / "soups" / f"uniform_fold{fold}.json").read_text())
        for m in ("greedy_soup", "bgss", "gsgs"):
            assert cell.at[m, "test_acc"] == pytest.approx(greedy["test_acc"], abs=1e-6), (fold, m)
            assert cell.at[m, "val_acc"] == pytest.approx(greedy["val_acc"], abs=1e-6), (fold, m)
        assert cell.at["uniform_soup", "test_acc"] == pytest.approx(uniform["test_acc"], abs=1e-6), fold


@pytest.mark.slow
def test_every_draw_of_a_smaller_grid_is_what_the_workflow_steps_give_on_its_models(smoke_run, tmp_path):
    """g = 1 of the 2 grid points on both folds: run the workflow's own soup steps and methods on
    just that grid point's models, in this process, and compare with BudgetRun on the draw."""
    from foldsoup import steps as pl
    from foldsoup.analysis.budget import BudgetRun
    from foldsoup.steps.budget import load_models
    from foldsoup.config.schema import grid_points

    r = smoke_run.results
    cfg = validate(deep_update(load_yaml_files(ROOT / "config.yaml", SMOKE), {"results": str(r)}), check_paths=False)
    data, folds = str(r / "prepared" / "dataset.safetensors"), str(r / "folds.csv")
    models_csv = pd.read_csv(r / "tables" / "models.csv")
    ctx = pl.Context(cfg, data, folds)
    run = BudgetRun(ctx, load_models(cfg, r / "models"), ctx.data.pool_labels, ctx.fold_of)
    hps = [p.name for p in grid_points(cfg)]
    for sub in draw_subsets(len(hps), 2, 1, 2, cfg["budget"]["draws"], cfg["seed"]):
        hp = hps[sub.grid[0]]
        ours = {row["method"]: row for row in run.methods(sub)}
        soups = tmp_path / hp / "soups"
        soups.mkdir(parents=True)
        model = [str(r / "models" / hp / f"fold{i}" / "model.safetensors") for i in (0, 1)]
        metrics = [str(r / "models" / hp / f"fold{i}" / "metrics.json") for i in (0, 1)]
        pl.uniform_all(cfg, data, folds, model, metrics, str(soups / "uniform_soup.safetensors"))
        pl.greedy_all(cfg, data, folds, model, metrics, str(soups / "greedy_soup.safetensors"))
        if cfg["folds"]["holdout_fraction"] > 0:  # methods() then reads the holdout's greedy soup too
            pl.greedy_all(cfg, data, folds, model, metrics, str(soups / "greedy_soup_holdout.safetensors"), on_holdout=True)
        for i in (0, 1):
            pl.greedy_per_fold(cfg, data, folds, i, [model[i]], [metrics[i]], str(soups / f"greedy_fold{i}.safetensors"),
                               str(soups / f"uniform_fold{i}.safetensors"))
        pl.gsgs(cfg, data, folds, [str(soups / f"greedy_fold{i}.safetensors") for i in (0, 1)], str(soups / "gsgs.safetensors"))
        models_csv[models_csv.hp == hp].to_csv(tmp_path / hp / "models.csv", index=False)
        pl.methods(cfg, data, folds, str(tmp_path / hp / "models.csv"), str(r / "models"), str(soups),
                   str(tmp_path / hp / "methods.csv"))
        theirs = pd.read_csv(tmp_path / hp / "methods.csv").set_index("method")
        for m in METHODS:
            assert ours[m]["test_acc"] == pytest.approx(theirs.at[m, "test_acc"], abs=1e-6), (hp, m)
            assert ours[m]["val_acc"] == pytest.approx(theirs.at[m, "val_acc"], abs=1e-6), (hp, m)
            assert ours[m]["n_ingredients"] == theirs.at[m, "n_ingredients"], (hp, m)
