"""summary.md: this run's Tables 1-4 beside the numbers the paper publishes.

Cheap to import (pandas/numpy only). Accuracies in the tables are fractions; they are shown
as percentages with 2 decimals, RMSE as percentage points, correlations with 3 decimals.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import pandas as pd

from foldsoup.analysis.reliability import (
    CHANCE_ALPHA,
    flag_mask,
    flagged_models,
    model_name,
    signal_name,
    threshold_model,
    val_threshold,
)
from foldsoup.config import methods as method_table
from foldsoup.report.formats import NOT_AVAILABLE, fmt_pct, is_missing
from foldsoup.report.ship import statement
from foldsoup.soups.select import METRIC_LABELS, metric_suffix
from foldsoup.storage.weights import atomic_write_text
from foldsoup.training.guard import FAR_RULE

# The paper's published numbers, copied as printed (Suzuki & Matsuzawa, AI 2022, 3, 796-808).
# Accuracies and RMSEs are in percent (percentage points), correlations are plain numbers;
# None marks a cell the paper leaves blank.
PAPER: dict[str, Any] = {
    "setup": {"dataset": "cifar10", "model": "CLIP ViT-B/32", "k": 5, "grid_size": 18, "n_models": 90},
    # Section 4 text about Figure 2 (given there as fractions 0.9844 etc.).
    "figure2": {"best_val": 98.44, "best_val_test": 98.09, "lowest_val": 97.20, "lowest_val_test": 97.21},
    "table1": {  # RMSE of (ValAcc - test accuracy), Eq. 4
        1: {"avg_acc": None, "min_acc": 0.30},
        2: {"avg_acc": 0.87, "min_acc": 0.92},
        3: {"avg_acc": 0.98, "min_acc": 1.06},
        4: {"avg_acc": 1.02, "min_acc": 1.11},
        5: {"avg_acc": 1.03, "min_acc": 1.14},
    },
    "table2": {  # Pearson correlation of MinAcc vs test accuracy
        1: {"corr_all": None, "corr_over_threshold": 0.878},
        2: {"corr_all": 0.934, "corr_over_threshold": 0.763},
        3: {"corr_all": 0.978, "corr_over_threshold": 0.707},
        4: {"corr_all": 0.985, "corr_over_threshold": 0.673},
        5: {"corr_all": 0.989, "corr_over_threshold": 0.685},
    },
    "table3": {  # val (MinAcc except Best on val) and test accuracy
        "best_on_val": {"val": 98.44, "test": 98.09},
        "uniform_soup": {"val": 98.14, "test": 96.88},
        "greedy_soup": {"val": 99.67, "test": 98.26},
        "bgss": {"val": 98.66, "test": 98.27},
        "gsgs": {"val": 98.97, "test": 98.32},
    },
    "table4": {  # a single "Acc" column, as printed
        "best_on_val": 98.44,
        "uniform_soup": 98.14,
        "best_uniform_per_split": 96.88,
    },
}

TABLE4_METHODS: tuple[str, ...] = tuple(m.name for m in method_table.METHODS if 4 in m.paper_tables)
CHANCE_RULE = (f"at chance = own-fold val accuracy not significantly above the share of that fold's largest class "
               f"(one-sided exact binomial test, p > {CHANCE_ALPHA})")
NOT_REPORTED = "—"  # a cell the paper leaves blank or a method it does not have


# --------------------------------------------------------------------------- formatting


def fmt_paper_pct(percent: float | None) -> str:
    """Paper numbers are stored in percent already."""
    return NOT_REPORTED if percent is None else f"{percent:.2f}%"


def fmt_corr(r: Any) -> str:
    return NOT_AVAILABLE if is_missing(r) else f"{float(r):.3f}"


def fmt_paper_corr(r: float | None) -> str:
    return NOT_REPORTED if r is None else f"{r:.3f}"


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table; first column left-aligned, the others right."""
    align = [":---"] + ["---:"] * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- sections


def _info(run_info: dict, *keys: str, default: Any = None) -> Any:
    """First present key among aliases (callers name things differently: grid_size/grid_points)."""
    return next((run_info[k] for k in keys if run_info.get(k) is not None), default)


def _is_paper_preset(run_info: dict) -> bool:
    """Explicit flag, else a preset named "paper...", else the paper's setup recognised by value."""
    if "paper_preset" in run_info:
        return bool(run_info["paper_preset"])
    if run_info.get("preset"):
        return str(run_info["preset"]).startswith("paper")
    model = str(run_info.get("model", "")).lower().replace("/", "-")
    return (str(run_info.get("dataset", "")).lower() == "cifar10" and "vit-b-32" in model
            and _info(run_info, "k") == PAPER["setup"]["k"]
            and _info(run_info, "grid_size", "grid_points") == PAPER["setup"]["grid_size"])


def _sampled(run_info: dict, subsets_df: pd.DataFrame) -> bool:
    if "sampled" in run_info:
        return bool(run_info["sampled"])
    if "sampled" in subsets_df.columns:
        return bool(subsets_df["sampled"].astype(str).str.lower().eq("true").any())
    return False


def _flag_lines(models_df: pd.DataFrame) -> list[str]:
    """The header's lines on models that went wrong (analysis.reliability.flagged_models); a
    column missing from an old models.csv: its line is left out."""
    flagged = flagged_models(models_df)

    def line(what: str, names: list[str], rule: str, consequence: str) -> str:
        if not names:
            return f"- {what}: none" + (f" ({rule})" if rule else "")
        return f"- {what}: {len(names)} ({', '.join(names)})" + (f"; {rule}" if rule else "") + f"; {consequence}"

    lines = [line("diverged models", flagged.diverged, "", "left out of every soup (and of the uniform soups of "
                  "Tables 1-2 that would hold them), of the threshold and of the figures' single-model points")]
    if "at_chance" in models_df.columns:
        lines.append(line("models at chance", flagged.at_chance, CHANCE_RULE,
                          "they learned nothing, yet they are not diverged and stay in the soups and in Table 2's threshold"))
    if "started_far" in models_df.columns and models_df["started_far"].notna().any():  # imported models have no guard
        lines.append(line("fine-tunes that started far from their LP init", flagged.started_far, FAR_RULE,
                          "see their fine-tune logs (finetune.batchnorm, grid.lr)"))
    if flagged.with_probe:
        lines.append(f"- fine-tunes ending below their linear probe's val accuracy: {len(flagged.below_probe)} of "
                     f"{flagged.with_probe}")
    return lines


def header_section(run_info: dict, models_df: pd.DataFrame, subsets_df: pd.DataFrame) -> str:
    k = _info(run_info, "k", default=models_df["fold"].nunique() if "fold" in models_df.columns else "?")
    grid = _info(run_info, "grid_size", "grid_points",
                 default=models_df["hp"].nunique() if "hp" in models_df.columns else "?")
    cap = run_info.get("max_subsets_per_n")
    n_models = _info(run_info, "n_models", "models", default=len(models_df))
    if not isinstance(n_models, (int, np.integer)):  # e.g. a list of model names
        n_models = len(models_df)
    sampled = _sampled(run_info, subsets_df)
    lines = [
        "# foldsoup summary",
        "",
        f"- dataset: {run_info.get('dataset', '?')}",
        f"- model: {run_info.get('model', '?')}",
    ]
    if run_info.get("preset"):
        lines.append(f"- preset: {run_info['preset']}")
    lines += [
        f"- folds k: {k}",
        f"- grid points: {grid}",
        f"- {'imported models (trained outside foldsoup)' if run_info.get('imported') else 'fine-tuned models'}: {n_models}",
        f"- uniform soups analysed (Section 3.1): {len(subsets_df)}; fold subsets "
        + (("sampled" + (f", at most {cap} per size n per grid point" if cap else " per size n"))
           if sampled else "all 2^k - 1 per grid point"),
    ]
    if run_info.get("metric", "accuracy") != "accuracy":
        lines.append(f"- score of every selection and table: {METRIC_LABELS[run_info['metric']]} (soups.metric; the mean "
                     "recall over the classes present), accuracy kept in tables/*.csv")
    if "seed" in run_info:
        lines.append(f"- seed: {run_info['seed']}")
    lines += _flag_lines(models_df)
    lines += ["", _context_note(run_info), ""]
    return "\n".join(lines)


def _context_note(run_info: dict) -> str:
    units = ("Accuracies are percentages with 2 decimals; RMSE is in percentage points; "
             f"'{NOT_REPORTED}' marks a cell the paper leaves blank, '{NOT_AVAILABLE}' a value this run cannot compute.")
    if _is_paper_preset(run_info):
        return ("This run uses the paper preset (CIFAR-10, CLIP ViT-B/32, k = 5, 18 grid points), so the paper "
                "column is the target; details the paper does not state (epochs, batch size, augmentation "
                "definitions) are our choices, so expect differences of a few tenths of a percent. " + units)
    return ("This run is not the paper preset: its dataset, model, grid or k differ from the paper's, so the "
            "paper column is context, not a target. Compare trends (e.g. RMSE growing with n, the ranking of "
            "methods), not values. " + units)


def figure2_section(models_df: pd.DataFrame, metric: str = "accuracy") -> str:
    df = models_df.loc[~flag_mask(models_df, "diverged")]
    p = PAPER["figure2"]
    if not len(df):
        return "## Single models (Figure 2)\n\nNo non-diverged models.\n"
    s, label = metric_suffix(metric), METRIC_LABELS[metric]
    best, low = df.loc[df[f"val_{s}"].astype(float).idxmax()], df.loc[df[f"val_{s}"].astype(float).idxmin()]
    rows = [
        [f"highest val {label}: val", fmt_pct(best[f"val_{s}"]), fmt_paper_pct(p["best_val"])],
        [f"highest val {label}: its test", fmt_pct(best[f"test_{s}"]), fmt_paper_pct(p["best_val_test"])],
        [f"lowest val {label} (threshold): val", fmt_pct(low[f"val_{s}"]), fmt_paper_pct(p["lowest_val"])],
        [f"lowest val {label}: its test", fmt_pct(low[f"test_{s}"]), fmt_paper_pct(p["lowest_val_test"])],
    ]
    return "## Single models (Figure 2)\n\n" + md_table(["", "this run", "paper"], rows) + "\n"


def table1_section(reliability_df: pd.DataFrame, metric: str = "accuracy") -> str:
    label, avg, mn = METRIC_LABELS[metric], signal_name("Avg", metric), signal_name("Min", metric)
    rows = []
    for r in reliability_df.itertuples():
        paper = PAPER["table1"].get(int(r.n), {"avg_acc": None, "min_acc": None})
        rows.append([int(r.n), fmt_pct(r.rmse_avg_acc), fmt_paper_pct(paper["avg_acc"]),
                     fmt_pct(r.rmse_min_acc), fmt_paper_pct(paper["min_acc"]),
                     fmt_pct(getattr(r, "mean_gap_min_acc", float("nan"))), int(r.n_soups)])
    headers = ["n", f"{avg} RMSE (this run)", "AvgAcc RMSE (paper)", f"{mn} RMSE (this run)",
               "MinAcc RMSE (paper)", f"mean {mn} − test (this run)", "soups"]
    text = (f"## Table 1: RMSE of val vs test {label} of uniform soups of n folds\n\n"
            f"RMSE over every grid point and fold subset of size n of (ValAcc − test {label}), Eq. 4, with "
            f"ValAcc = {avg} (Eq. 2) or {mn} (Eq. 3). For n = 1 both equal the model's own val {label} "
            f"(the paper prints only MinAcc). A positive mean gap means val {label} is optimistic. Note: the "
            "paper's text says MinAcc's RMSE is smaller than AvgAcc's, but its printed numbers show the opposite."
            + ("" if metric == "accuracy" else f" The paper's columns are accuracies (soups.metric: {metric} here).")
            + "\n\n")
    return text + md_table(headers, rows) + "\n"


def table2_section(reliability_df: pd.DataFrame, models_df: pd.DataFrame, metric: str = "accuracy") -> str:
    label, mn = METRIC_LABELS[metric], signal_name("Min", metric)
    rows = []
    for r in reliability_df.itertuples():
        paper = PAPER["table2"].get(int(r.n), {"corr_all": None, "corr_over_threshold": None})
        rows.append([int(r.n), fmt_corr(r.corr_all), fmt_paper_corr(paper["corr_all"]),
                     fmt_corr(r.corr_over_threshold), fmt_paper_corr(paper["corr_over_threshold"]),
                     f"{int(r.n_over_threshold)} / {int(r.n_soups)}"])
    threshold = reliability_df["threshold"].iloc[0] if len(reliability_df) else val_threshold(models_df, metric)
    headers = ["n", "corr for all (this run)", "corr for all (paper)", "corr over thre (this run)",
               "corr over thre (paper)", "soups over thre"]
    setter, chance_note = _threshold_setter(models_df, metric)
    text = (f"## Table 2: Pearson correlation of {mn} and test {label}\n\n"
            f"Over all uniform soups of n folds ('corr for all') and over those with {mn} ≥ threshold "
            f"('corr over thre'). Threshold = lowest val {label} among the single (non-diverged) models: "
            f"{fmt_pct(threshold)} in this run{setter}, {fmt_paper_pct(PAPER['figure2']['lowest_val'])} in the paper. "
            f"{chance_note}A correlation needs at least 2 soups with varying scores, else n/a.\n\n")
    return text + md_table(headers, rows) + "\n"


def _threshold_setter(models_df: pd.DataFrame, metric: str = "accuracy") -> tuple[str, str]:
    """(' (set by <model>)', a note when that model is at chance): what that does to 'corr over
    thre', and the lowest val score among the models above chance. The threshold is not changed."""
    s, label = metric_suffix(metric), METRIC_LABELS[metric]
    setter = threshold_model(models_df, metric)
    if setter is None or not {"hp", "fold"} <= set(setter.index):
        return "", ""
    name = model_name(setter)
    if not flag_mask(models_df, "at_chance")[setter.name]:
        return f" (set by {name})", ""
    above = models_df.loc[~flag_mask(models_df, "at_chance")]
    other = threshold_model(above, metric) if len(above) else None
    lowest = f"{fmt_pct(other[f'val_{s}'])} ({model_name(other)})" if other is not None else "undefined (every model is at chance)"
    return (f" (set by {name})",
            f"**The threshold is set by a model at chance**: {name}'s val accuracy is not significantly above its fold's "
            f"largest-class share (binomial test, p > {CHANCE_ALPHA}), so 'corr over thre' keeps nearly "
            f"every soup and tells little beyond 'corr for all'. The paper's definition is kept; without the models at "
            f"chance the lowest val {label} would be {lowest}. ")


def holdout_section(reliability_df: pd.DataFrame, metric: str = "accuracy") -> str:
    """AvgAcc, MinAcc and the outer holdout side by side as estimates of test accuracy (only
    for runs with folds.holdout_fraction > 0)."""
    if "rmse_holdout_acc" not in reliability_df or not np.isfinite(reliability_df["rmse_holdout_acc"].astype(float)).any():
        return ""
    rows = [[int(r.n), fmt_pct(r.rmse_avg_acc), fmt_pct(r.rmse_min_acc), fmt_pct(r.rmse_holdout_acc),
             fmt_pct(r.mean_gap_avg_acc), fmt_pct(r.mean_gap_min_acc), fmt_pct(r.mean_gap_holdout_acc),
             fmt_corr(r.corr_avg_acc), fmt_corr(r.corr_all), fmt_corr(r.corr_holdout_acc)] for r in reliability_df.itertuples()]
    label, avg, mn = METRIC_LABELS[metric], signal_name("Avg", metric), signal_name("Min", metric)
    headers = ["n", f"RMSE {avg}", f"RMSE {mn}", "RMSE holdout", f"gap {avg}", f"gap {mn}", "gap holdout",
               f"corr {avg}", f"corr {mn}", "corr holdout"]
    cross = reliability_df[reliability_df["n"].astype(int) >= 2]  # where the signals differ
    signals = {avg: "rmse_avg_acc", mn: "rmse_min_acc", "holdout": "rmse_holdout_acc"}
    means = {name: float(cross[col].astype(float).mean()) for name, col in signals.items()} if len(cross) else {}
    finding = ""
    if means and all(math.isfinite(v) for v in means.values()):
        best = min(means, key=means.get)
        finding = ("Averaged over n ≥ 2, the RMSE is " + ", ".join(f"{name} {fmt_pct(v)}" for name, v in means.items())
                   + f": {best} estimates test {label} best in this run. ")
    text = (f"## Validation signals: {avg}, {mn} and the outer holdout\n\n"
            f"The uniform soups of Table 1 scored three ways: {avg} and {mn} over their folds' val parts "
            f"(images that the other folds' models trained on) and {label} on the outer holdout (images no "
            "model trained on). RMSE and mean gap (val − test) as in Table 1; corr = Pearson correlation with "
            f"test {label} over the same soups. " + finding
            + "Methods selected on the holdout (best_on_holdout, greedy_soup_holdout) are in Table 3.\n\n")
    return text + md_table(headers, rows) + "\n"


def _method_row(methods: pd.DataFrame, method: str) -> pd.Series | None:
    hit = methods[methods["method"] == method]
    return hit.iloc[0] if len(hit) else None


def table3_section(methods_df: pd.DataFrame, metric: str = "accuracy") -> str:
    s, label, mn = metric_suffix(metric), METRIC_LABELS[metric], signal_name("Min", metric)
    only_table4 = {m.name for m in method_table.METHODS if m.paper_tables == (4,)}  # Table 4's baselines
    names = [m for m in method_table.order(list(methods_df["method"]) + list(PAPER["table3"])) if m not in only_table4]
    rows = []
    for m in names:
        row, paper = _method_row(methods_df, m), PAPER["table3"].get(m, {"val": None, "test": None})
        ours = ("—", "—", "") if row is None else (fmt_pct(row[f"val_{s}"]), fmt_pct(row[f"test_{s}"]), _ingredients(row))
        rows.append([method_table.title(m), ours[0], fmt_paper_pct(paper["val"]), ours[1],
                     fmt_paper_pct(paper["test"]), ours[2], *_intervals(row)])
    headers = ["method", "val (this run)", "val (paper)", "test (this run)", "test (paper)", "ingredients",
               "test interval", "test − best on val [interval]"]
    also = "" if metric == "accuracy" else " (every selection compared it; tables/methods.csv keeps accuracy too)"
    text = ("## Table 3: methods\n\n"
            f"Scores are {label}{also}. Val {label} is {mn} over the folds of the soup's ingredients (own-fold val "
            f"{label} for single-fold entries such as Best on val and BGSS; {label} on the outer holdout for the "
            f"*holdout* entries); test {label} never takes part in a decision. "
            "'—' in the this-run columns marks a method this run did not produce. Intervals are paired "
            "bootstrap percentile intervals over the test images (the same resamples for every method); a "
            "difference marked * has its whole interval on one side of zero, any other is not a win. "
            "The ensemble rows average the logits of the same ingredients, weighted as the soup weighs them "
            "(GSGS's: each per-fold soup's models, then the folds equally): the accuracy a single model gives up.\n\n")
    return text + md_table(headers, rows) + "\n"


def _intervals(row: pd.Series | None) -> list[str]:
    if row is None or is_missing(row.get("test_ci_low")):
        return ["", ""]
    diff = row.get("diff_vs_best_on_val")
    mark = "*" if bool(row.get("diff_significant")) else ""
    return [f"{fmt_pct(row['test_ci_low'])}–{fmt_pct(row['test_ci_high'])}",
            f"{diff * 100:+.2f} [{row['diff_ci_low'] * 100:+.2f}, {row['diff_ci_high'] * 100:+.2f}]{mark}"]


def _ingredients(row: pd.Series) -> str:
    value = row.get("n_ingredients")
    return "" if is_missing(value) or value is None else str(int(value))


def table4_section(methods_df: pd.DataFrame, metric: str = "accuracy") -> str:
    s, label = metric_suffix(metric), METRIC_LABELS[metric]
    rows = []
    for m in TABLE4_METHODS:
        row = _method_row(methods_df, m)
        val, test = ("—", "—") if row is None else (fmt_pct(row[f"val_{s}"]), fmt_pct(row[f"test_{s}"]))
        rows.append([method_table.title(m), val, test, fmt_paper_pct(PAPER["table4"][m])])
    text = ("## Table 4: uniform soups and Best on val\n\n"
            "Best uniform soup per split: per fold, the uniform soup of its grid points' models, then the one "
            f"with the highest val {label}. The paper prints a single 'Acc' column (98.44%, 98.14%, 96.88%). "
            "These numbers appear to repeat Table 3's val/test columns (Best on val val, Uniform soups val, "
            "Uniform soups test) rather than report new measurements, so read that column with care.\n\n")
    return text + md_table(["method", "val (this run)", "test (this run)", "Acc (paper)"], rows) + "\n"


def figures_section(run_info: dict) -> str:
    figures = run_info.get("figures") or {}
    if not figures:
        return ""
    lines = ["## Figures", ""] + [f"- [{title}]({rel})" for title, rel in figures.items()]
    return "\n".join(lines) + "\n"


def budget_section(budget_df: pd.DataFrame | None, metric: str = "accuracy") -> str:
    """Budget: mean test accuracy per method over (grid points g x folds f), and the equal-budget
    comparison (same number of fine-tunes g·f) computed from it."""
    from foldsoup.analysis.budget import compare_equal_budget, equal_budgets, mean_table

    if budget_df is None or not len(budget_df):
        return ""
    label = METRIC_LABELS[metric]  # the budget table's test_acc holds the run's metric
    means = mean_table(budget_df)
    fs = sorted(means["n_folds"].unique())
    gs = sorted(means["grid_points"].unique())
    lookup = means.set_index(["method", "grid_points", "n_folds"])["test_acc"]
    names = list(dict.fromkeys(means["method"]))
    rows = []
    for m in names:
        for j, g in enumerate(gs):
            label = method_table.title(m)
            rows.append([label if j == 0 else "", int(g)]
                        + [fmt_pct(lookup.get((m, g, f), float("nan"))) for f in fs])
    draws = int(means["draws"].max())
    n_test = int(budget_df["n_test"].iloc[0]) if "n_test" in budget_df else 0
    image = f" One test image is {100 / n_test:.2f} points." if n_test else ""
    std = means.loc[means["draws"] > 1, "test_std"].mean()
    spread = "" if is_missing(std) else f" Between draws of one cell, test {label} varies by {100 * std:.2f} points (mean standard deviation)."
    text = ("## Budget: more grid points or more folds?\n\n"
            "The paper's open question (section 5.5), from the models already trained: for g of the grid points "
            "and f of the folds, up to "
            f"{draws} seeded draws of g grid points and f folds per cell; every method on the g·f models of a draw, "
            "exactly as on all of them (the cell with every grid point and every fold is Table 3's run). Mean test "
            f"{label} over the draws (rows: g grid points, columns: f folds); per draw in tables/budget.csv, drawn in "
            f"figures/budget.png.{image}{spread}\n\n")
    text += md_table(["method", "g", *(f"f = {f}" for f in fs)], rows) + "\n"
    budgets = equal_budgets(budget_df)
    if not budgets:
        return text
    overall = means.groupby(["grid_points", "n_folds"])["test_acc"].mean()
    same = [[str(b), "; ".join(f"{g} × {f}: {fmt_pct(overall[(g, f)])}" for g, f in cells)] for b, cells in budgets.items()]
    text += (f"\nThe same number of fine-tunes g·f spent two or more ways (grid points × folds), mean test {label} "
             "over the methods:\n\n" + md_table(["fine-tunes", f"grid points × folds: mean test {label}"], same) + "\n")
    c = compare_equal_budget(budget_df)
    best = max(c["cells"], key=lambda cell: c["mean_over_methods"][cell])
    most_folds, most_grid = max(c["cells"], key=lambda cell: cell[1]), max(c["cells"], key=lambda cell: cell[0])
    what = "more folds" if best == most_folds else "more grid points" if best == most_grid else "a middle split"
    wins = ", ".join(f"{len(w)} of {len(c['methods'])} for {g} × {f}" for (g, f), w in c["wins"].items())
    tied = f", {len(c['ties'])} tied" if c["ties"] else ""
    gap = c["mean_over_methods"][best] - max(v for cell, v in c["mean_over_methods"].items() if cell != best)
    noise = ("" if is_missing(std) or gap >= std else
             f" The lead, {100 * gap:.2f} points, is within the spread between draws: not a clear answer.")
    text += (f"\nAt the largest budget reached two ways, {c['budget']} fine-tunes, {what} did best on average "
             f"({best[0]} grid points × {best[1]} folds: {fmt_pct(c['mean_over_methods'][best])}); best per method: "
             f"{wins}{tied}.{noise}\n")
    return text


def groups_section(folds: pd.DataFrame | None, classes: list[str] | None = None) -> str:
    """Groups (patients, subjects) per fold from folds.csv, when the data has them: each fold's
    images and groups and its largest group's share, with a warning where one group holds more
    than data.folds.LARGE_GROUP_SHARE of a fold (its val accuracy then mostly measures one group)
    and, with `classes` (label order), one where a fold has no image of a class."""
    from foldsoup.data.folds import HOLDOUT, LARGE_GROUP_SHARE, missing_classes

    if folds is None or "group" not in folds or folds["group"].isna().all():
        return ""
    rows, large = [], []
    for fold, part in sorted(folds.groupby("fold"), key=lambda item: (item[0] == HOLDOUT, item[0])):
        counts = part["group"].astype(str).value_counts()
        share = counts.iloc[0] / counts.sum()
        name = "outer holdout" if fold == HOLDOUT else str(fold)
        rows.append([name, str(int(counts.sum())), str(len(counts)), f"{counts.index[0]} ({int(counts.iloc[0])}, {share:.0%})"])
        if share > LARGE_GROUP_SHARE:
            large.append(f"{name} ({counts.index[0]}: {share:.0%})")
    warning = (f"\n**Warning**: in fold(s) {', '.join(large)} one group holds more than {LARGE_GROUP_SHARE:.0%} of the "
               "images, so that fold's val accuracy mostly measures one group.\n" if large else "")
    if classes:
        absent = missing_classes(folds["label"].to_numpy(dtype=np.int64), folds["fold"].to_numpy(dtype=np.int64), len(classes))
        if absent:
            where = "; ".join(f"{'outer holdout' if f == HOLDOUT else f'fold {f}'}: {', '.join(classes[c] for c in cs)}"
                              for f, cs in absent.items())
            warning += (f"\n**Warning**: some folds have no image of a class ({where}): too few groups of it to "
                        "reach every fold, so those folds' val scores say nothing about it.\n")
    text = ("## Groups per fold\n\n"
            "The folds, the test split and the outer holdout are group-disjoint: no group (patient, subject) is in two "
            "of them, so a fold's val accuracy is measured on groups its models never trained on.\n\n")
    return text + md_table(["fold", "images", "groups", "largest group (images, share)"], rows) + warning + "\n"


def per_class_section(per_class: pd.DataFrame | None, ship: dict | None = None) -> str:
    """Per class: the test recall of best on val, the soups of Table 3 and the shipped method
    (tables/per_class.csv, figures/confusion.png), and their balanced accuracy."""
    if per_class is None or not len(per_class):
        return ""
    shipped = ship["method"] if ship else None
    wanted = [m.name for m in method_table.METHODS if 3 in m.paper_tables] + ([shipped] if shipped else [])
    names = [m for m in dict.fromkeys(wanted) if m in set(per_class["method"])]
    classes = list(dict.fromkeys(per_class["class"]))  # the dataset's class order
    recall = per_class.pivot(index="class", columns="method", values="recall").reindex(classes)
    images = per_class.drop_duplicates("class").set_index("class")["images"]
    rows = [[str(c), str(int(images[c]))] + [fmt_pct(recall.at[c, m]) for m in names] for c in recall.index]
    rows.append(["balanced accuracy", ""] + [fmt_pct(recall[m].dropna().mean()) for m in names])
    headers = ["class", "test images"] + [method_table.title(m) + (" (shipped)" if m == shipped else "") for m in names]
    text = ("## Per class: test recall\n\n"
            "The share of each class's test images the method gets right (its recall, or sensitivity); balanced "
            "accuracy is their mean over the classes with test images. An accuracy that looks fine can hide a "
            "rare class the model misses. Confusion matrices: figures/confusion.png; every method's counts: "
            "tables/per_class.csv.\n\n")
    return text + md_table(headers, rows) + "\n"


# --------------------------------------------------------------------------- entry point


def ship_section(ship: dict | None) -> str:
    """The statement at the top: the file to ship (ship/ship.json), chosen before the run."""
    return "" if ship is None else statement(ship)


def render_summary(reliability_df: pd.DataFrame, methods_df: pd.DataFrame, models_df: pd.DataFrame,
                   subsets_df: pd.DataFrame, run_info: dict, budget: pd.DataFrame | None = None,
                   ship: dict | None = None, per_class: pd.DataFrame | None = None,
                   folds: pd.DataFrame | None = None) -> str:
    """The Markdown text of summary.md (see `write_summary`)."""
    metric = run_info.get("metric") or "accuracy"
    title, _, header = header_section(run_info, models_df, subsets_df).partition("\n\n")
    parts = [
        title + "\n",
        ship_section(ship),
        header,
        groups_section(folds, None if per_class is None else list(dict.fromkeys(per_class["class"].astype(str)))),
        figure2_section(models_df, metric),
        table1_section(reliability_df, metric),
        table2_section(reliability_df, models_df, metric),
        holdout_section(reliability_df, metric),
        table3_section(methods_df, metric),
        table4_section(methods_df, metric),
        per_class_section(per_class, ship),
        budget_section(budget, metric),
        figures_section(run_info),
    ]
    return "\n".join(p for p in parts if p).rstrip() + "\n"


def write_summary(path: str | os.PathLike, reliability_df: pd.DataFrame, methods_df: pd.DataFrame,
                  models_df: pd.DataFrame, subsets_df: pd.DataFrame, run_info: dict,
                  budget: pd.DataFrame | None = None, ship: dict | None = None,
                  per_class: pd.DataFrame | None = None, folds: pd.DataFrame | None = None) -> None:
    """Write summary.md atomically (storage.weights.atomic_write_text).

    run_info keys, all optional: dataset, model, preset (name; "paper..." marks the paper
    preset), paper_preset (bool, overrides the name test; without either, a cifar10 +
    ViT-B-32 run with k = 5 and 18 grid points counts as the paper preset), k, grid_size
    (alias grid_points), n_models (alias models), metric (soups.metric: the score of every
    table; default accuracy), seed, max_subsets_per_n, sampled (bool;
    default from subsets_df["sampled"]), figures ({title: path relative to the summary}).
    Diverged models are read from models_df["diverged"], not from run_info. `budget`:
    tables/budget.csv, for the Budget section (left out when None). `ship`: ship/ship.json, for
    the statement at the top (left out when None). `per_class`: tables/per_class.csv, for the
    per-class recall section; `folds`: folds.csv, for the groups per fold (data with groups).
    """
    atomic_write_text(path, render_summary(reliability_df, methods_df, models_df, subsets_df, run_info, budget, ship,
                                           per_class, folds))
