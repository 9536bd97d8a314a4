"""Figures 2-4 of the paper plus a methods comparison, as 150 dpi PNGs.

matplotlib is imported inside the functions (it costs ~0.5 s) and used through the Figure /
Agg canvas API, never pyplot, so no global backend or figure state is touched. Every file is
written to a temporary name in the target folder, then renamed, so a killed job never leaves a
truncated PNG under the final name.

Figures 2-4, the validation signals and the methods figure follow the run's `soups.metric`
(`metric`: accuracy or balanced_accuracy): they plot the columns with its suffix (val_bacc,
min_bacc, test_bacc, ...) and name it on their axes; with the default they are accuracies.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from foldsoup.analysis.reliability import flag_mask, pearson, signal_name
from foldsoup.config import methods as method_table
from foldsoup.soups.select import METRIC_LABELS, metric_suffix
from foldsoup.storage.weights import atomic_path

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 150
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "*", "p")


# --------------------------------------------------------------------------- helpers


def _new_figure(width: float = 6.4, height: float = 5.6) -> tuple[Figure, Axes]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig: Figure, path: str | os.PathLike) -> Figure:
    """Write `fig` as PNG atomically (storage.weights.atomic_path); returns it, so that every
    plot function returns what it drew (tests read the plotted points back)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return fig


def _colors(count: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"] if count <= 10 else colormaps["viridis"]
    return [cmap(i) if count <= 10 else cmap(i / max(count - 1, 1)) for i in range(count)]


def _pct(values) -> np.ndarray:
    return 100.0 * np.asarray(values, dtype=np.float64)


def _square_limits(ax: Axes, x: np.ndarray, y: np.ndarray, extra: list[float] | None = None) -> None:
    """Same range on both axes and a y = x line, so distance from the line reads as val - test."""
    vals = np.concatenate([x, y, np.asarray(extra or [], dtype=np.float64)])
    vals = vals[np.isfinite(vals)]
    lo, hi = (float(vals.min()), float(vals.max())) if vals.size else (0.0, 100.0)
    pad = max(0.05 * (hi - lo), 0.05)
    lo, hi = lo - pad, hi + pad
    ax.plot([lo, hi], [lo, hi], color="0.4", linestyle="--", linewidth=1, label="y = x", zorder=1)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal", adjustable="box")
    ax.grid(True, color="0.9", zorder=0)


def _fmt_r(r: float) -> str:
    return "n/a" if not np.isfinite(r) else f"{r:.3f}"


def _label(metric: str) -> str:
    """The metric in words: "accuracy", "balanced accuracy"."""
    metric_suffix(metric)  # an unknown metric fails here, with the list of known ones
    return METRIC_LABELS[metric]


# --------------------------------------------------------------------------- Figure 2


def plot_models_val_test(models_df: pd.DataFrame, path: str | os.PathLike, metric: str = "accuracy") -> Figure:
    """Figure 2: own-fold val score vs test score (under `metric`) of every fine-tuned model.

    Colour = learning rate (grid point's `lr`, or `hp` when there is no lr column); marker =
    fold. Diverged models are left off the axes (they would squash the rest) and counted in the
    title. The best-on-val model is ringed.
    """
    val_col, test_col, label = f"val_{metric_suffix(metric)}", f"test_{metric_suffix(metric)}", _label(metric)
    fig, ax = _new_figure(6.8, 6.0)
    diverged = flag_mask(models_df, "diverged")
    df = models_df.loc[~diverged]
    x, y = _pct(df[val_col]), _pct(df[test_col])
    _square_limits(ax, x, y)

    # Imported models (models_from) have no learning rate: coloured by their config (hp) instead.
    colour_key = "lr" if "lr" in df.columns and df["lr"].notna().all() else "hp"
    levels = sorted(df[colour_key].unique(), reverse=colour_key == "lr")
    folds = sorted(df["fold"].unique()) if "fold" in df.columns else [None]
    colours = dict(zip(levels, _colors(len(levels))))
    markers = {f: MARKERS[i % len(MARKERS)] for i, f in enumerate(folds)}
    for level in levels:
        for fold in folds:
            sel = (df[colour_key] == level) & ((df["fold"] == fold) if fold is not None else True)
            if sel.any():
                ax.scatter(_pct(df.loc[sel, val_col]), _pct(df.loc[sel, test_col]), s=36,
                           color=colours[level], marker=markers[fold], edgecolor="black",
                           linewidth=0.4, alpha=0.85, zorder=3)
    if len(df):
        best = df[val_col].astype(float).idxmax()
        ax.scatter(_pct([df.at[best, val_col]]), _pct([df.at[best, test_col]]), s=180,
                   facecolor="none", edgecolor="red", linewidth=1.5, zorder=4, label="best on val")
    _legends_colour_marker(ax, colours, markers, "learning rate" if colour_key == "lr" else "grid point")

    ax.set_xlabel(f"validation {label} on own fold (%)")
    ax.set_ylabel(f"test {label} (%)")
    title = f"Figure 2: single fine-tuned models ({len(df)} models)"
    if diverged.any():
        title += f"\n{int(diverged.sum())} diverged model(s) not shown"
    ax.set_title(title)
    return _save(fig, path)


def _legends_colour_marker(ax: Axes, colours: dict, markers: dict, colour_title: str) -> None:
    """Two legends: colour for `colour_title`, marker for fold (plus y = x and best on val)."""
    from matplotlib.lines import Line2D

    fmt = (lambda v: f"{v:g}") if colour_title == "learning rate" else str
    colour_handles = [Line2D([], [], linestyle="", marker="o", markersize=7, color=c,
                             markeredgecolor="black", label=fmt(v)) for v, c in colours.items()]
    first = ax.legend(handles=colour_handles, title=colour_title, loc="upper left", fontsize=8,
                      title_fontsize=8, framealpha=0.9)
    ax.add_artist(first)
    marker_handles = [Line2D([], [], linestyle="", marker=m, markersize=7, color="0.6",
                             markeredgecolor="black", label=f"fold {f}") for f, m in markers.items() if f is not None]
    extra, extra_labels = ax.get_legend_handles_labels()
    ax.legend(handles=marker_handles + extra, labels=[h.get_label() for h in marker_handles] + extra_labels,
              loc="lower right", fontsize=8, framealpha=0.9)


# --------------------------------------------------------------------------- Figures 3 and 4


def plot_subsets_val_test(subsets_df: pd.DataFrame, path: str | os.PathLike, threshold: float | None = None,
                          metric: str = "accuracy") -> Figure:
    """Figure 3 (threshold None): MinAcc vs test accuracy of every uniform soup, by size n
    (under `metric`: MinBAcc vs test balanced accuracy for balanced_accuracy).

    Figure 4 (threshold given): only soups with min_<s> >= threshold, with the threshold drawn.
    n is shown by colour and marker; the legend gives each n's soup count and Pearson r (the
    numbers of Table 2).
    """
    min_col, test_col = f"min_{metric_suffix(metric)}", f"test_{metric_suffix(metric)}"
    min_name = signal_name("Min", metric)
    fig, ax = _new_figure(6.8, 6.0)
    df = subsets_df
    if threshold is not None:
        df = df[df[min_col].astype(float) >= threshold]
    extra = [100.0 * threshold] if threshold is not None and np.isfinite(threshold) else None
    _square_limits(ax, _pct(df[min_col]), _pct(df[test_col]), extra)

    sizes = sorted(int(n) for n in subsets_df["n"].unique())
    colours = dict(zip(sizes, _colors(len(sizes))))
    for i, n in enumerate(sizes):
        part = df[df["n"].astype(int) == n]
        r = pearson(part[min_col], part[test_col])
        ax.scatter(_pct(part[min_col]), _pct(part[test_col]), s=30, color=colours[n],
                   marker=MARKERS[i % len(MARKERS)], edgecolor="black", linewidth=0.4, alpha=0.8,
                   zorder=3 + i * 0.01, label=f"n = {n} ({len(part)} soups, r = {_fmt_r(r)})")
    if extra:
        ax.axvline(extra[0], color="red", linestyle=":", linewidth=1.2,
                   label=f"threshold = {extra[0]:.2f}% (lowest single-model val)")
    ax.legend(loc="upper left", fontsize=8, framealpha=0.9)
    ax.set_xlabel(f"{min_name} over the soup's validation folds (%)" if metric_suffix(metric) == "acc"
                  else f"{min_name}: min {_label(metric)} over the soup's validation folds (%)")
    ax.set_ylabel(f"test {_label(metric)} (%)")
    sampled = "sampled" in subsets_df.columns and bool(subsets_df["sampled"].astype(str).str.lower().eq("true").any())
    note = " (fold subsets sampled)" if sampled else ""
    if threshold is None:
        ax.set_title(f"Figure 3: uniform soups of n folds per grid point{note}")
    else:
        ax.set_title(f"Figure 4: uniform soups with {min_name} \u2265 threshold{note}")
    return _save(fig, path)


# --------------------------------------------------------------------------- validation signals


def validation_signals(metric: str = "accuracy") -> dict[str, str]:
    """The validation signals under `metric`: their columns (avg_<s>, min_<s>, holdout_<s>) ->
    names (AvgAcc (Eq. 2), MinAcc (Eq. 3), outer holdout for accuracy)."""
    s = metric_suffix(metric)
    return {f"avg_{s}": f"{signal_name('Avg', metric)} (Eq. 2)", f"min_{s}": f"{signal_name('Min', metric)} (Eq. 3)",
            f"holdout_{s}": "outer holdout"}


def plot_validation_signals(subsets_df: pd.DataFrame, path: str | os.PathLike, metric: str = "accuracy") -> Figure:
    """The uniform soups of Figure 3 scored by AvgAcc, MinAcc and (when the run has one) the
    outer holdout, against test accuracy (all under `metric`): one panel per signal, colour =
    soup size n (all n shown),
    and each panel's RMSE averaged over the sizes n >= 2 (the mean of Table 1's per-n RMSEs, as the
    summary's validation-signals section averages them: at n = 1 AvgAcc and MinAcc are the same
    number) and Pearson r over all soups, so the three estimates compare at a glance."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from foldsoup.analysis.reliability import rmse

    names, label = validation_signals(metric), _label(metric)
    signals = [c for c in names
               if c in subsets_df.columns and np.isfinite(subsets_df[c].astype(float)).any()]
    fig = Figure(figsize=(4.6 * len(signals), 5.6), layout="constrained")
    FigureCanvasAgg(fig)
    sizes = sorted(int(n) for n in subsets_df["n"].unique())
    colours = dict(zip(sizes, _colors(len(sizes))))
    test = subsets_df[f"test_{metric_suffix(metric)}"].astype(float)
    size = subsets_df["n"].astype(int)
    for j, col in enumerate(signals):
        ax = fig.add_subplot(1, len(signals), j + 1)
        val = subsets_df[col].astype(float)
        _square_limits(ax, _pct(subsets_df[signals].to_numpy().ravel()), _pct(test))
        for i, n in enumerate(sizes):
            part = subsets_df["n"].astype(int) == n
            ax.scatter(_pct(val[part]), _pct(test[part]), s=22, color=colours[n], marker=MARKERS[i % len(MARKERS)],
                       edgecolor="black", linewidth=0.3, alpha=0.8, zorder=3, label=f"n = {n}")
        per_n = [rmse(val[size == n], test[size == n]) for n in sizes if n >= 2]
        mean_rmse = float(np.nanmean(per_n)) if per_n and np.isfinite(per_n).any() else float("nan")
        ax.set_title(f"{names[col]}\nRMSE {100 * mean_rmse:.2f} pts (mean over n ≥ 2), "
                     f"r = {_fmt_r(pearson(val, test))} (all n)", fontsize=10)
        ax.set_xlabel(f"{names[col]} (%)")
        if j == 0:
            ax.set_ylabel(f"test {label} (%)")
            ax.legend(loc="upper left", fontsize=8, framealpha=0.9)
    fig.suptitle(f"Uniform soups of n folds: which validation signal tracks test {label}?")
    return _save(fig, path)


# --------------------------------------------------------------------------- methods figure


def plot_methods(methods_df: pd.DataFrame, models_df: pd.DataFrame, path: str | os.PathLike,
                 metric: str = "accuracy") -> Figure:
    """Test (filled) and val (hollow) score (under `metric`) of every method, over the single
    models' spread.

    The leftmost column shows every non-diverged single model's test accuracy (box + jittered
    points); its min-max range is shaded across the whole plot and its median dashed, so each
    method reads against what one fine-tune gives.
    """
    names = method_table.order(methods_df["method"])
    fig, ax = _new_figure(max(8.0, 1.5 + 1.1 * (len(names) + 1)), 5.8)  # room for every method's label
    suffix, label = metric_suffix(metric), _label(metric)
    diverged = flag_mask(models_df, "diverged")
    singles = models_df.loc[~diverged, f"test_{suffix}"].astype(float).to_numpy()
    singles = 100.0 * singles[np.isfinite(singles)]
    methods = methods_df.set_index("method")
    positions = np.arange(1, len(names) + 1)

    if singles.size:
        ax.axhspan(singles.min(), singles.max(), color="0.85", alpha=0.6, zorder=0,
                   label="single models: test range")
        ax.axhline(np.median(singles), color="0.5", linestyle="--", linewidth=1, zorder=1,
                   label="single models: median test")
        ax.boxplot([singles], positions=[0], widths=0.5, showfliers=False, zorder=2,
                   medianprops={"color": "0.3"})
        jitter = np.random.default_rng(0).uniform(-0.18, 0.18, singles.size)  # fixed: stable images
        ax.scatter(jitter, singles, s=10, color="0.35", alpha=0.6, zorder=3)

    val = _pct([methods.at[m, f"val_{suffix}"] for m in names])
    test = _pct([methods.at[m, f"test_{suffix}"] for m in names])
    ax.vlines(positions, np.minimum(val, test), np.maximum(val, test), color="0.6", linewidth=1, zorder=3)
    ax.scatter(positions, val, s=70, marker="^", facecolor="white", edgecolor="tab:blue", linewidth=1.5,
               zorder=4, label=f"val {label} ({signal_name('Min', metric)} for soups spanning folds)")
    ax.scatter(positions, test, s=70, marker="o", color="tab:orange", edgecolor="black", linewidth=0.6,
               zorder=5, label=f"test {label}")
    for x, t in zip(positions, test):
        if np.isfinite(t):
            ax.annotate(f"{t:.2f}", (x, t), xytext=(8, -3), textcoords="offset points", fontsize=7)

    single_label = f"single models\n({singles.size}" + (f", {int(diverged.sum())} diverged\nnot shown)" if diverged.any() else ")")
    ax.set_xticks(np.concatenate([[0], positions]), [single_label]
                  + [_method_label(m, methods) for m in names], fontsize=8)
    ax.set_xlim(-0.6, len(names) + 0.8)
    ax.set_ylabel(f"{label} (%)")
    ax.grid(True, axis="y", color="0.9", zorder=0)
    # Below the axes, so the legend never hides a marker whatever the accuracies are.
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize=8)
    ax.set_title(f"Methods: test and val {label} against single fine-tuned models")
    return _save(fig, path)


def _method_label(method: str, methods: pd.DataFrame) -> str:
    label = method_table.label(method)
    if "n_ingredients" in methods.columns and pd.notna(methods.at[method, "n_ingredients"]):
        count = int(methods.at[method, "n_ingredients"])
        label += f"\n({count} ingredient{'' if count == 1 else 's'})"
    return label


# --------------------------------------------------------------------------- confusion matrices

# The methods of the paper's Table 3 (config.methods): best on val and the soups.
CONFUSION_METHODS = tuple(m.name for m in method_table.METHODS if 3 in m.paper_tables)


def confusion_of(per_class_df: pd.DataFrame, method: str) -> tuple[list[str], np.ndarray]:
    """(class names, int [C, C] matrix: row = true, column = predicted) of one method's rows of
    tables/per_class.csv."""
    rows = per_class_df[per_class_df["method"] == method]
    classes = [str(c) for c in rows["class"]]
    return classes, rows[[f"predicted_{c}" for c in rows["class"]]].to_numpy(dtype=np.int64)


def plot_confusion(per_class_df: pd.DataFrame, path: str | os.PathLike, methods: tuple[str, ...] = CONFUSION_METHODS) -> Figure:
    """Test-set confusion matrices of best on val and the soups, each row divided by its class's
    images (the diagonal is per-class recall); counts written in the cells of small matrices."""
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    names = [m for m in methods if m in set(per_class_df["method"])]
    n_classes = per_class_df["class"].nunique()
    side = min(2.2 + 0.35 * n_classes, 6.0)
    fig = Figure(figsize=(side * max(len(names), 1), side + 0.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(len(names), 1), squeeze=False)[0]
    image = None
    for ax, method in zip(axes, names):
        classes, matrix = confusion_of(per_class_df, method)
        share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
        image = ax.imshow(share, vmin=0, vmax=1, cmap="Blues")
        if len(classes) <= 12:
            for i, j in np.ndindex(matrix.shape):
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if share[i, j] > 0.5 else "black")
        recall = np.diag(share)[matrix.sum(axis=1) > 0]
        ax.set_title(f"{method_table.label(method).replace(chr(10), ' ')}\nbalanced acc {100 * recall.mean():.2f}%", fontsize=9)
        ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
        ax.set_xlabel("predicted", fontsize=8)
    axes[0].set_ylabel("true class", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=list(axes), shrink=0.8, label="share of the class's test images")
    fig.suptitle("Test set: where each class's images go (rows sum to 1; diagonal = recall)", fontsize=10)
    return _save(fig, path)


# --------------------------------------------------------------------------- budget figure


def plot_budget(budget_df: pd.DataFrame, path: str | os.PathLike) -> Figure:
    """Per method: mean test accuracy over (grid points x folds) as an annotated heatmap, and the
    same means against the number of fine-tunes g*f, one line per fold count (points above one
    another used the same budget). One colour scale for every heatmap."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from foldsoup.analysis.budget import mean_table

    means = mean_table(budget_df)
    names = list(dict.fromkeys(means["method"]))
    # The table's test_acc holds the run's soups.metric (its `metric` column; absent: accuracy).
    metrics = set(budget_df["metric"]) if "metric" in budget_df and len(budget_df) else {"accuracy"}
    short = {"accuracy": "acc", "balanced_accuracy": "balanced acc"}[metrics.pop() if len(metrics) == 1 else "accuracy"]
    gs, fs = sorted(means.grid_points.unique()), sorted(means.n_folds.unique())
    ncols = 2 if len(names) > 1 else 1
    nrows = -(-len(names) // ncols)
    fig = Figure(figsize=(7.0 * ncols, 3.6 * nrows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, 2 * ncols, squeeze=False)
    values = _pct(means.test_acc)
    finite = values[np.isfinite(values)]
    vmin, vmax = (finite.min(), finite.max()) if finite.size else (0.0, 100.0)
    colours = dict(zip(fs, _colors(len(fs))))
    image = None
    for i, method in enumerate(names):
        heat, lines = axes[i // ncols, 2 * (i % ncols)], axes[i // ncols, 2 * (i % ncols) + 1]
        m = means[means.method == method]
        grid = np.full((len(gs), len(fs)), np.nan)
        for r in m.itertuples():
            grid[gs.index(r.grid_points), fs.index(r.n_folds)] = 100.0 * r.test_acc
        image = heat.imshow(grid, origin="lower", aspect="auto", cmap="viridis", vmin=vmin, vmax=max(vmax, vmin + 1e-6))
        for (y, x), v in np.ndenumerate(grid):
            if np.isfinite(v):
                light = (v - vmin) / max(vmax - vmin, 1e-9) < 0.6
                heat.text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if light else "black")
        heat.set_xticks(range(len(fs)), [str(f) for f in fs])
        heat.set_yticks(range(len(gs)), [str(g) for g in gs])
        heat.set_xlabel("folds f")
        heat.set_ylabel("grid points g")
        heat.set_title(f"{method_table.label(method).replace(chr(10), ' ')}: mean test {short} (%)", fontsize=9)
        for f in fs:
            line = m[m.n_folds == f].sort_values("grid_points")
            lines.plot(line.budget, _pct(line.test_acc), marker="o", markersize=3, color=colours[f], label=f"f = {f}")
        lines.set_xscale("log", base=2)
        lines.set_xlabel("fine-tunes g·f")
        lines.set_ylabel(f"mean test {short} (%)")
        lines.grid(True, color="0.9")
        lines.set_title("same x = same budget", fontsize=9)
    for j in range(len(names), nrows * ncols):
        axes[j // ncols, 2 * (j % ncols)].set_visible(False)
        axes[j // ncols, 2 * (j % ncols) + 1].set_visible(False)
    if names:
        handles, labels = axes[0, 1].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=len(fs), fontsize=8, title="folds used")
        fig.colorbar(image, ax=axes.ravel().tolist(), location="right", shrink=0.5, label=f"heatmaps: mean test {short} (%)")
    draws = int(budget_df.groupby(["method", "grid_points", "n_folds"]).draw.count().max()) if len(budget_df) else 0
    fig.suptitle(f"Budget: test {short.replace('acc', 'accuracy')} from g of {max(gs, default=0)} grid points and f of {max(fs, default=0)} folds "
                 f"(up to {draws} draws per cell, no retraining)")
    return _save(fig, path)
