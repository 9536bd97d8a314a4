"""Steps `budget` (the cells of one fold count) and `budget-table` (tables/budget.csv, figures/budget.png)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pandas as pd

from foldsoup.analysis.budget import (
    COLUMNS,
    METHODS,
    BudgetRun,
    Model,
    draw_subsets,
    grid_ladder,
    join,
    mean_table,
    n_subsets,
)
from foldsoup.steps.context import Context, log
from foldsoup.steps.soups import log_cost


def load_models(cfg: dict, model_dir: str | os.PathLike) -> list[Model]:
    """Every (grid point, fold) model of the run, in grid order then fold (the workflow's order),
    scored by the run's `soups.metric`; with models_from, the configs of its CSV take the grid
    points' place."""
    import json

    from foldsoup.config.schema import hp_names

    root, out = Path(model_dir), []
    metric = cfg["soups"].get("metric", "accuracy")
    for index, hp in enumerate(hp_names(cfg)):
        for fold in range(cfg["folds"]["k"]):
            folder = root / hp / f"fold{fold}"
            with open(folder / "metrics.json") as f:
                m = json.load(f)
            # Scores exact, from the counts, as best_on_val and the soups read them (ModelResult.from_record).
            out.append(Model.from_record({**m, "hp": hp, "fold": fold}, metric, grid_index=index,
                                         weights=str(folder / "model.safetensors"),
                                         predictions=str(folder / "predictions.safetensors")))
    return out


def budget(cfg: dict, data_path: str, folds_path: str, model_dir: str, n_folds: int, out: str,
           early_exit: bool = True) -> dict:
    """The budget cells of one fold count f: every grid-subset size, `budget.draws` draws each.
    Returns the job's cost (steps.soups.log_cost); `early_exit` False: full evaluation (benchmarks)."""
    from foldsoup.storage.weights import atomic_write_text

    t0 = time.monotonic()
    ctx = Context(cfg, data_path, folds_path)
    models = load_models(cfg, model_dir)
    n_grid, k, b = len({m.hp for m in models}), ctx.k, cfg["budget"]
    run = BudgetRun(ctx, models, ctx.data.pool_labels, ctx.fold_of, early_exit)
    rows = []
    for g in grid_ladder(n_grid, b["grid_points"]):
        subsets = draw_subsets(n_grid, k, g, n_folds, b["draws"], cfg["seed"])
        for draw, sub in enumerate(subsets):
            cell = run.methods(sub)
            rows += [{"grid_points": g, "n_folds": n_folds, "budget": g * n_folds, "draw": draw,
                      "subsets": n_subsets(n_grid, k, g, n_folds), **r} for r in cell]
            log(f"g={g} f={n_folds} draw {draw}: grid {join(sub.grid)}, folds {join(sub.folds)}: "
                + ", ".join(f"{r['method']} {r['test_acc']:.4f}" for r in cell))
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    atomic_write_text(out, table.to_csv(index=False, float_format="%.6g"))
    log(f"f={n_folds}: {len(table)} rows, {run.ev.evaluations} soup evaluations, {time.monotonic() - t0:.1f} s")
    return log_cost(run.store, run.ev)


def budget_table(parts: list[str], out_table: str, out_figure: str) -> None:
    """tables/budget.csv (every method, cell and draw) and figures/budget.png."""
    from foldsoup.report.plots import plot_budget
    from foldsoup.storage.weights import atomic_write_text

    table = pd.concat([pd.read_csv(p, dtype={"grid": str, "folds": str}) for p in parts], ignore_index=True)
    order = {m: i for i, m in enumerate(METHODS)}
    table = table.sort_values(["method", "grid_points", "n_folds", "draw"], key=lambda s: s.map(order) if s.name == "method" else s,
                              kind="stable").reset_index(drop=True)
    atomic_write_text(out_table, table.to_csv(index=False, float_format="%.6g"))
    plot_budget(table, out_figure)
    means = mean_table(table)
    metric = table["metric"].iloc[0] if "metric" in table and len(table) else "accuracy"  # val_acc/test_acc hold it
    pivot = means.pivot_table(index=["method", "grid_points"], columns="n_folds", values="test_acc", sort=False)
    log(f"{len(table)} rows, mean test {metric} (%)\n" + pivot.to_string(float_format=lambda x: f"{100 * x:.2f}"))
