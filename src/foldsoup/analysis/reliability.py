"""Section 3.1 analysis: fold subsets, and the reliability of val accuracy (Tables 1 and 2).

Pure pandas/numpy/itertools (scipy inside `chance_ceiling`) so that the Snakefile and light jobs can
import it cheaply.
Accuracies are fractions in [0, 1] throughout; the summary turns them into percentages.

Tables 1-2 and the threshold follow the run's `soups.metric` (`metric`: accuracy or
balanced_accuracy, see `foldsoup.soups.select.METRICS`): they read the columns with that metric's
suffix (avg_bacc, min_bacc, test_bacc, val_bacc, ...). The output columns keep their names
(rmse_avg_acc, ... describe the statistic, MinAcc/AvgAcc under the metric) and a `metric` column
says which metric they hold.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from foldsoup.soups.select import metric_suffix

RELIABILITY_COLUMNS: tuple[str, ...] = (
    "n",
    "n_soups",
    "rmse_avg_acc",
    "rmse_min_acc",
    "mean_gap_avg_acc",
    "mean_gap_min_acc",
    "corr_all",
    "threshold",
    "corr_over_threshold",
    "n_over_threshold",
    # The same statistics for the outer holdout (NaN without one) and AvgAcc's correlation.
    "rmse_holdout_acc",
    "mean_gap_holdout_acc",
    "corr_holdout_acc",
    "corr_avg_acc",
    # The single model whose val accuracy is the threshold ("hp/fold<i>"), and whether it is at
    # chance (empty when models.csv predates the at_chance column).
    "threshold_model",
    "threshold_at_chance",
    # soups.metric: what every score above is (accuracy or balanced_accuracy).
    "metric",
)

# Significance level of the at-chance test (see `chance_ceiling`).
CHANCE_ALPHA = 0.01


# --------------------------------------------------------------------------- fold subsets


def format_folds(subset: Iterable[int]) -> str:
    """Fold numbers as written in CSVs: (0, 2, 3) -> "0-2-3"."""
    return "-".join(str(int(f)) for f in subset)


def subsets_sampled(k: int, max_per_n: int | None) -> bool:
    """True when a cap of `max_per_n` drops some subsets of at least one size n."""
    if max_per_n is None:
        return False
    return any(math.comb(k, n) > max_per_n for n in range(1, k + 1))


def fold_subsets(k: int, max_per_n: int | None = None, seed: int = 0) -> list[tuple[int, ...]]:
    """Non-empty subsets of range(k), ordered by size then lexicographically.

    With `max_per_n`, each size n keeps at most that many subsets, drawn without replacement
    by one numpy Generator(seed) walked through n = 1..k in order (deterministic for a seed).
    Sizes with C(k, n) <= max_per_n keep all their subsets and draw nothing.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if max_per_n is not None and max_per_n < 1:
        raise ValueError(f"max_per_n must be >= 1 or None, got {max_per_n}")
    rng = np.random.default_rng(seed)
    out: list[tuple[int, ...]] = []
    for n in range(1, k + 1):
        combos = list(itertools.combinations(range(k), n))
        if max_per_n is not None and len(combos) > max_per_n:
            keep = np.sort(rng.choice(len(combos), size=max_per_n, replace=False))
            combos = [combos[i] for i in keep]
        out.extend(combos)
    return out


# --------------------------------------------------------------------------- statistics


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation of the finite (x, y) pairs.

    Returns NaN rather than raising when there are fewer than 2 pairs or either side has zero
    variance: a table cell must stay fillable when, say, only one soup clears the threshold.
    """
    xa = np.asarray(x, dtype=np.float64)
    ya = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[ok], ya[ok]
    if xa.size < 2:
        return float("nan")
    dx, dy = xa - xa.mean(), ya - ya.mean()
    sxx, syy = float(dx @ dx), float(dy @ dy)
    # Exact zero is what constant inputs give; a relative tolerance guards against rounding.
    if sxx <= 1e-24 * max(1.0, float(xa @ xa)) or syy <= 1e-24 * max(1.0, float(ya @ ya)):
        return float("nan")
    r = float(dx @ dy) / math.sqrt(sxx * syy)
    return max(-1.0, min(1.0, r))


def rmse(val: Sequence[float], test: Sequence[float]) -> float:
    """sqrt(mean((val - test)^2)) over finite pairs (Eq. 4); NaN when there are none."""
    gap = _finite_gap(val, test)
    return float(np.sqrt(np.mean(gap**2))) if gap.size else float("nan")


def mean_gap(val: Sequence[float], test: Sequence[float]) -> float:
    """mean(val - test) over finite pairs: > 0 means val accuracy is optimistic."""
    gap = _finite_gap(val, test)
    return float(gap.mean()) if gap.size else float("nan")


def _finite_gap(val: Sequence[float], test: Sequence[float]) -> np.ndarray:
    gap = np.asarray(val, dtype=np.float64) - np.asarray(test, dtype=np.float64)
    return gap[np.isfinite(gap)]


# --------------------------------------------------------------------------- models at chance


def majority_rate(labels: Sequence[int]) -> float:
    """Share of the most frequent class: the accuracy of always predicting it. NaN when empty."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64))
    return float(counts.max() / counts.sum()) if counts.sum() else float("nan")


def chance_ceiling(n: int, rate: float, alpha: float = CHANCE_ALPHA) -> float:
    """The highest accuracy on `n` images that a model with no information about the images can
    reach with probability above `alpha`, as a fraction: (c - 1) / n for the smallest count c
    with P(X >= c) <= alpha, X ~ Binomial(n, rate). `rate` is the majority-class rate of those
    images, the best a model blind to its input can expect (always predict the largest class).

    An accuracy at or below the ceiling is "at chance": a one-sided exact binomial test at level
    `alpha` cannot tell it from a blind model's. E.g. n = 10, rate = 0.5, alpha = 0.01: P(X >= 10)
    = 1/1024, P(X >= 9) = 11/1024 > 0.01, so the ceiling is 9/10.
    """
    if n <= 0 or not math.isfinite(rate):
        return float("nan")
    if rate <= 0.0 or rate >= 1.0:
        return float(rate)
    from scipy.stats import binom  # ~0.3 s: only the jobs that test for chance pay it

    # isf: the smallest k with P(X > k) <= alpha, so c = k + 1 and the ceiling is k / n.
    return int(binom.isf(alpha, n, rate)) / n


def at_chance(val_acc: float, n: int, rate: float, alpha: float = CHANCE_ALPHA) -> bool:
    """True when `val_acc` on `n` images is not significantly above the majority-class `rate`
    (see `chance_ceiling`); counts are compared, so float rounding of `val_acc` cannot flip it."""
    ceiling = chance_ceiling(n, rate, alpha)
    if not (math.isfinite(ceiling) and math.isfinite(val_acc)):
        return False  # no val images: nothing to tell
    return round(val_acc * n) <= round(ceiling * n)


def flag_mask(models: pd.DataFrame, column: str) -> pd.Series:
    """Boolean mask of a yes/no column of models.csv (diverged, at_chance, started_far); all False
    without the column. Tolerates bools, "True"/"False" strings from CSV, 0/1 and empty cells."""
    if column not in models.columns:
        return pd.Series(False, index=models.index)
    return models[column].map(lambda v: str(v).strip().lower() in ("true", "1", "yes")).astype(bool)


# --------------------------------------------------------------------------- Tables 1 and 2


def signal_name(kind: str, metric: str) -> str:
    """The paper's name of a cross-fold score under `metric` (`kind` "Avg" or "Min"): AvgAcc /
    MinAcc for accuracy, AvgBAcc / MinBAcc for balanced accuracy."""
    return f"{kind}{'Acc' if metric_suffix(metric) == 'acc' else 'BAcc'}"


def val_threshold(models: pd.DataFrame, metric: str = "accuracy") -> float:
    """Lowest val score (under `metric`) among the single models that did not diverge (Table 2,
    Fig. 4).

    Diverged models are left out because one collapsed run would otherwise drag the threshold
    to chance level and make "corr over thre" the same as "corr for all". NaN if none is left.
    """
    model = threshold_model(models, metric)
    return float(model[f"val_{metric_suffix(metric)}"]) if model is not None else float("nan")


def threshold_model(models: pd.DataFrame, metric: str = "accuracy") -> pd.Series | None:
    """The row of the single model that sets the threshold (`val_threshold`): the lowest val
    score under `metric` among those that did not diverge, the first in table order on ties;
    None if none."""
    val = models[f"val_{metric_suffix(metric)}"].astype(float)
    kept = val[~flag_mask(models, "diverged") & np.isfinite(val)]
    return models.loc[kept.idxmin()] if len(kept) else None


def model_name(row: pd.Series) -> str:
    """"hp/fold<i>", the name a model has in logs, soups and summaries."""
    return f"{row['hp']}/fold{int(row['fold'])}"


@dataclass(frozen=True)
class FlaggedModels:
    """The models a run warns about ("hp/fold<i>", in table order). Those that did not diverge:
    at chance, started far from their LP init (training.guard), ending below the val accuracy of
    the linear probe they started from (of `with_probe` that have one on record)."""

    diverged: list[str]
    at_chance: list[str]
    started_far: list[str]
    below_probe: list[str]
    with_probe: int


def flagged_models(models: pd.DataFrame) -> FlaggedModels:
    """What tables/models.csv says is wrong; the models-table log, summary.md and the end of a
    run all say it from here."""
    def names(rows: pd.DataFrame) -> list[str]:
        return [model_name(r) for _, r in rows.iterrows()]

    diverged = flag_mask(models, "diverged")
    kept = models.loc[~diverged]
    lp_val = pd.to_numeric(kept["lp_val_acc"], errors="coerce") if "lp_val_acc" in kept else pd.Series(float("nan"), kept.index)
    return FlaggedModels(names(models.loc[diverged]), names(kept.loc[flag_mask(kept, "at_chance")]),
                         names(kept.loc[flag_mask(kept, "started_far")]),
                         names(kept.loc[lp_val.notna() & (kept["val_acc"] < lp_val)]), int(lp_val.notna().sum()))


def reliability_table(subsets: pd.DataFrame, models: pd.DataFrame, k: int | None = None,
                      metric: str = "accuracy") -> pd.DataFrame:
    """Tables 1 and 2 (plus mean gaps): one row per soup size n = 1..k, under `metric`.

    `subsets`: hp, folds, n, avg_<s>, min_<s>, test_<s>[, holdout_<s>] (one uniform soup per
    grid point and fold subset), <s> the metric's suffix ("acc", "bacc"). `models`: hp, fold,
    val_<s>, test_<s>[, diverged]. The output's column names do not change with the metric (its
    `metric` column names it). All statistics for size n
    are over every (hp, subset) row of that size, diverged or not ("for all"); only the
    threshold ignores diverged models. `k` defaults to the larger of the number of folds seen
    in `models` and the largest n in `subsets`. Sizes without rows get n_soups 0 and NaN.
    Correlations are NaN for fewer than 2 rows or zero variance (see `pearson`).
    """
    suffix = metric_suffix(metric)
    threshold = val_threshold(models, metric)
    setter = threshold_model(models, metric)
    who = {"threshold_model": model_name(setter) if setter is not None and {"hp", "fold"} <= set(setter.index) else None,
           "threshold_at_chance": bool(flag_mask(models, "at_chance")[setter.name]) if setter is not None and "at_chance" in models else None,
           "metric": metric}
    k = k or _infer_k(subsets, models)
    rows = [{**_reliability_row(subsets[subsets["n"].astype(int) == n], n, threshold, suffix), **who} for n in range(1, k + 1)]
    return pd.DataFrame(rows, columns=list(RELIABILITY_COLUMNS))


def _infer_k(subsets: pd.DataFrame, models: pd.DataFrame) -> int:
    n_folds = int(models["fold"].nunique()) if "fold" in models.columns and len(models) else 0
    max_n = int(subsets["n"].max()) if len(subsets) else 0
    return max(n_folds, max_n, 1)


def _reliability_row(group: pd.DataFrame, n: int, threshold: float, suffix: str = "acc") -> dict:
    avg, mn, test = (group[f"{c}_{suffix}"].astype(float).to_numpy() for c in ("avg", "min", "test"))
    holdout_col = f"holdout_{suffix}"
    holdout = group[holdout_col].astype(float).to_numpy() if holdout_col in group else np.full(len(group), np.nan)
    # NaN threshold (every model diverged) selects nothing, as comparisons with NaN are False.
    over = mn >= threshold
    return {
        "n": n,
        "n_soups": int(len(group)),
        "rmse_avg_acc": rmse(avg, test),
        "rmse_min_acc": rmse(mn, test),
        "mean_gap_avg_acc": mean_gap(avg, test),
        "mean_gap_min_acc": mean_gap(mn, test),
        "corr_all": pearson(mn, test),
        "threshold": threshold,
        "corr_over_threshold": pearson(mn[over], test[over]),
        "n_over_threshold": int(over.sum()),
        "rmse_holdout_acc": rmse(holdout, test),
        "mean_gap_holdout_acc": mean_gap(holdout, test),
        "corr_holdout_acc": pearson(holdout, test),
        "corr_avg_acc": pearson(avg, test),
    }
