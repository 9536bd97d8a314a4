"""Budget: more grid points or more folds? (the paper's future work, section 5.5)

From the models a run already has, no retraining: for g grid points and f folds, draw subsets
of g grid points and f folds (seeded), and compute the methods on the g·f models of each
subset exactly as the workflow computes them on all T·k models:

* best_on_val: the model with the highest own-fold val score (soups.methods.best_on_val);
* uniform_soup: the uniform soup of the subset's models;
* greedy_soup: Alg. 1 over the subset's models, MinAcc (or AvgAcc) over the subset's folds;
* bgss / gsgs: per fold of the subset, Alg. 1 over its g models; then the best of those soups
  on its own val, or Alg. 1 over them (each soup one ingredient);
* ensemble_all: the logit ensemble of the subset's models (from predictions.safetensors).

Every method is the function the workflow's steps call (foldsoup.soups.methods and select, one
tie rule: grid order, then fold), on candidates in the same order, so the full cell
(g = T, f = k) reproduces tables/methods.csv. Every score is the run's `soups.metric` (accuracy
or balanced accuracy, `soups.select.METRICS`): the columns val_acc and test_acc keep their names
and hold that metric, named in each row's `metric` column. Test scores are measured after every
decision, for reporting only. Folds and grid points are numbered from 0; a subset's `grid` column lists
indices into the grid in config order (`config.grid_points`).

Cheap to import: torch only inside the functions that need it.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from foldsoup.analysis.reliability import (
    format_folds as join,  # (0, 3, 7) -> "0-3-7", as fold subsets are written elsewhere
)
from foldsoup.config import methods as method_table
from foldsoup.errors import ConfigError
from foldsoup.soups.methods import ModelResult

# The methods of config.methods marked budget=True, in its order (BudgetRun.cell computes each).
METHODS: tuple[str, ...] = tuple(m.name for m in method_table.METHODS if m.budget)
COLUMNS: tuple[str, ...] = ("method", "grid_points", "n_folds", "budget", "draw", "grid", "folds", "subsets",
                            "n_models", "n_ingredients", "metric", "val_acc", "test_acc", "n_test")


# --------------------------------------------------------------------------- the cells and draws


def grid_ladder(n_grid: int, sizes: Sequence[int] | None = None) -> list[int]:
    """Grid-subset sizes: `sizes` sorted, or by default T, T/2, T/4, ... (rounded down) to 1,
    ascending (T = 18: 1, 2, 4, 9, 18), so that g = T on f folds meets g = T/2 on 2f folds at
    the same number of fine-tunes."""
    if n_grid < 1:
        raise ValueError(f"a grid needs at least one point, got {n_grid}")
    if sizes is not None:
        bad = [g for g in sizes if not 1 <= int(g) <= n_grid]
        if bad:
            raise ConfigError(f"budget.grid_points: {bad} outside the grid's {n_grid} point(s); allowed: 1 <= g <= {n_grid}")
        return sorted({int(g) for g in sizes})
    out, g = [], n_grid
    while g >= 1:
        out.append(g)
        g //= 2
    return sorted(set(out))


def fold_counts(k: int, counts: Sequence[int] | None = None) -> list[int]:
    """Fold-subset sizes: `counts` sorted, or by default 1..k."""
    if counts is not None:
        bad = [f for f in counts if not 1 <= int(f) <= k]
        if bad:
            raise ConfigError(f"budget.fold_counts: {bad} outside the {k} folds; allowed: 1 <= f <= {k}")
        return sorted({int(f) for f in counts})
    return list(range(1, k + 1))


def n_subsets(n_grid: int, k: int, g: int, f: int) -> int:
    """Distinct (grid subset, fold subset) pairs of a cell."""
    return math.comb(n_grid, g) * math.comb(k, f)


@dataclass(frozen=True)
class Subset:
    grid: tuple[int, ...]  # grid-point indices, ascending
    folds: tuple[int, ...]  # fold numbers, ascending


def draw_subsets(n_grid: int, k: int, g: int, f: int, draws: int, seed: int) -> list[Subset]:
    """`draws` distinct subsets of g grid points and f folds, or all of them when the cell has
    no more (in lexicographic order). Seeded by (seed, g, f) alone, so a cell's draws do not
    depend on which other cells are computed, nor in which job."""
    if not (1 <= g <= n_grid and 1 <= f <= k and draws >= 1):
        raise ValueError(f"no subsets of g={g} of {n_grid} grid points and f={f} of {k} folds ({draws} draws)")
    if n_subsets(n_grid, k, g, f) <= draws:
        return [Subset(G, F) for G in itertools.combinations(range(n_grid), g) for F in itertools.combinations(range(k), f)]
    rng = np.random.default_rng([seed, g, f])
    out: list[Subset] = []
    while len(out) < draws:
        sub = Subset(tuple(sorted(int(i) for i in rng.choice(n_grid, g, replace=False))),
                     tuple(sorted(int(i) for i in rng.choice(k, f, replace=False))))
        if sub not in out:
            out.append(sub)
    return out




# --------------------------------------------------------------------------- the methods on one subset


@dataclass(frozen=True, kw_only=True)
class Model(ModelResult):
    """A model of the run as every selection sees it (soups.methods.ModelResult: name, fold,
    exact scores under the run's metric, diverged), plus where the budget finds it;
    `Model.from_record(metrics, metric, grid_index=..., weights=..., predictions=...)`."""

    grid_index: int  # its grid point, in config order
    weights: str
    predictions: str


class BudgetRun:
    """Every model of a run, loaded once, and the methods of `pipeline` on any subset of them.

    Every model file is read once and kept resident (`foldsoup.soups.ingredients`). Greedy and uniform
    soups are memoised by their candidate list, so a soup two cells share (every per-fold greedy
    soup of the full grid, or greedy_soup at f = 1, which is a per-fold greedy soup) is computed
    once per job; the weights of the last few greedy soups (a cell's per-fold soups, its greedy
    soup and GSGS) are cached, older ones averaged again from the resident models when needed.
    """

    def __init__(self, ctx, models: list[Model], pool_labels: np.ndarray, fold_of: np.ndarray, early_exit: bool = True):
        from safetensors.numpy import load_file

        self.ctx, self.ev = ctx, ctx.evaluator()  # scores by the run's metric (ctx.metric)
        self.metric = ctx.metric
        self.models = models  # grid order, then fold: the order of the workflow's model_paths()
        self.by_name = {m.name: m for m in models}
        self.pool_labels, self.fold_of = pool_labels, fold_of
        self.soups_cfg = ctx.cfg["soups"]
        self.cross_fold = self.soups_cfg["cross_fold_val"]
        self.early_exit = early_exit  # the same decisions either way (False: benchmarks of full evaluation)
        usable = [m for m in models if not m.diverged]
        self.soups_kept = ctx.k + 2  # one cell's per-fold soups, greedy soup and GSGS
        self.store = ctx.ingredients([m.weights for m in usable], extra_models=self.soups_kept)
        self.logits = {m.name: load_file(m.predictions) for m in usable}
        self._greedy: dict[tuple, list] = {}  # key -> [GreedyResult, test accuracy or None, loader]
        self._soups: OrderedDict[tuple, dict] = OrderedDict()  # key -> greedy soup weights, least recent first
        self._uniform: dict[tuple, tuple] = {}

    def state(self, name: str):
        return self.store.get(self.by_name[name].weights)

    def _score(self, accs: dict[int, float]) -> float:
        from foldsoup.soups.select import cross_fold_score

        return cross_fold_score(accs, self.cross_fold)

    def greedy(self, cands: list, load):
        """Alg. 1 (`soups.methods.greedy_soup` with a `soup.RunningSoupScorer`) as the workflow's
        steps run it; the GreedyResult, memoised by the candidates' names (single models name
        themselves uniquely)."""
        from foldsoup.soups.methods import greedy_soup

        return self._selected(tuple(c.name for c in cands), load,
                              lambda scorer: greedy_soup(cands, scorer, self.soups_cfg, early_exit=self.early_exit))

    def gsgs(self, per_fold: dict[int, float], load, key: tuple):
        """GSGS (`soups.methods.gsgs`) over per-fold soups (fold -> score) as `steps.gsgs` runs
        it; `load` gives a candidate's soup weights; memoised by `key`."""
        from foldsoup.soups.methods import gsgs

        return self._selected(key, load, lambda scorer: gsgs(per_fold, scorer, self.soups_cfg, early_exit=self.early_exit))

    def _selected(self, key: tuple, load, select):
        """The GreedyResult of `select(scorer)` on a fresh scorer over `load`, memoised by `key`."""
        from foldsoup.soups.evaluation import greedy_scorer

        if key not in self._greedy:
            scorer = greedy_scorer(self.ev, load)
            self._greedy[key] = [select(scorer), None, load]
            self._keep_soup(key, scorer.mean())
        return self._greedy[key][0]

    def _keep_soup(self, key: tuple, state: dict) -> None:
        self._soups[key] = state
        self._soups.move_to_end(key)
        while len(self._soups) > self.soups_kept:
            self._soups.popitem(last=False)

    def greedy_state(self, key: tuple):
        """The weights of a memoised greedy soup: cached, or the mean of its ingredients in
        acceptance order (resident: nothing is read), which is what RunningSoupScorer.mean()
        returned, bit for bit."""
        from foldsoup.soups.average import average

        if key not in self._soups:
            result, _, load = self._greedy[key]
            self._keep_soup(key, average(load(c) for c in result.ingredients))
        self._soups.move_to_end(key)
        return self._soups[key]

    def greedy_test(self, key: tuple) -> float:
        """Test score (the run's metric) of a memoised greedy soup, measured once, and only for a
        reported row."""
        entry = self._greedy[key]
        if entry[1] is None:
            entry[1] = self.ev.test_acc(self.greedy_state(key))  # reporting only, after every choice
        return entry[1]

    def uniform(self, names: list[str], folds: Sequence[int]) -> tuple[float, float]:
        """(val score over `folds`, test score), under the run's metric, of the uniform soup of
        `names`, in order."""
        from foldsoup.soups.average import average

        key = (tuple(names), tuple(folds))
        if key not in self._uniform:
            state = average(self.state(n) for n in names)
            val = self._score(self.ev.fold_accs(state, folds))
            self._uniform[key] = (val, self.ev.test_acc(state))  # reporting only
        return self._uniform[key]

    def methods(self, sub: Subset) -> list[dict]:
        """One row per method on the models of `sub` (diverged ones left out); [] when none is left."""
        from foldsoup.analysis.uncertainty import class_counts, ensemble_logits, fold_accuracies
        from foldsoup.soups import methods, select

        members = [m for m in self.models if m.grid_index in sub.grid and m.fold in sub.folds and not m.diverged]
        if not members:
            return []
        names = [m.name for m in members]
        folds = sorted({m.fold for m in members})  # a fold whose models all diverged is left out
        rows = []

        def row(method: str, n_ingredients: int, val_acc: float, test_acc: float) -> None:
            rows.append({"method": method, "n_ingredients": n_ingredients, "metric": self.metric,
                         "val_acc": float(val_acc), "test_acc": float(test_acc)})

        best = methods.best_on_val(members)
        row("best_on_val", 1, best.val_acc, best.test_acc)

        val, test = self.uniform(names, folds)
        row("uniform_soup", len(names), val, test)

        load = lambda c: self.state(c.name)
        result = self.greedy(methods.candidates(members), load)
        row("greedy_soup", len(result.ingredients), result.score, self.greedy_test(tuple(names)))

        # Per-fold greedy soups (at f = 1 the greedy soup above is one of them: memoised).
        fold_members = {i: [m for m in members if m.fold == i] for i in folds}
        fold_keys = {i: tuple(m.name for m in fold_members[i]) for i in folds}
        per_fold = {i: self.greedy(methods.candidates(fold_members[i]), load) for i in folds}
        best_fold = select.bgss({i: per_fold[i].score for i in folds})
        row("bgss", len(per_fold[best_fold].ingredients), per_fold[best_fold].score, self.greedy_test(fold_keys[best_fold]))

        # GSGS: the per-fold soups in fold order, each one ingredient (as steps.gsgs). The memo
        # key names them by their models: "greedy_fold0" of another grid subset is another soup.
        by_soup = {f"greedy_fold{i}": fold_keys[i] for i in folds}
        key = ("gsgs", *fold_keys.values())
        result = self.gsgs({i: per_fold[i].score for i in folds}, lambda c: self.greedy_state(by_soup[c.name]), key)
        # One accepted soup: GSGS's weights are that soup's (a mean of one ingredient is exact).
        only = by_soup[result.ingredients[0].name] if len(result.ingredients) == 1 else key
        row("gsgs", len(result.ingredients), result.score, self.greedy_test(only))

        # Logit ensemble of the same models, in grid order then fold (as steps.methods), scored
        # from its per-class counts under the run's metric.
        n_classes = self.ctx.data.num_classes
        pool = ensemble_logits([self.logits[n]["pool_logits"] for n in names])
        val = self._score(fold_accuracies(pool, self.pool_labels, self.fold_of, folds, n_classes, self.metric))
        test_logits = ensemble_logits([self.logits[n]["test_logits"] for n in names])
        row("ensemble_all", len(names), val, class_counts(test_logits, self.ctx.data.test_labels, n_classes).score(self.metric))

        common = {"grid": join(sub.grid), "folds": join(sub.folds), "n_models": len(members),
                  "n_test": len(self.ctx.data.test_labels)}
        return [{**common, **r} for r in rows]


# --------------------------------------------------------------------------- summaries (pandas only)


def mean_table(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over draws of val and test score (the run's metric, named in
    the `metric` column where the table has one) per (method, g, f)."""
    grouped = table.groupby(["method", "grid_points", "n_folds"], sort=False)
    metric = {"metric": ("metric", "first")} if "metric" in table else {}
    out = grouped.agg(budget=("budget", "first"), draws=("draw", "count"), **metric, val_acc=("val_acc", "mean"),
                      test_acc=("test_acc", "mean"), test_std=("test_acc", "std")).reset_index()
    order = {m: i for i, m in enumerate(METHODS)}
    return out.sort_values(["method", "grid_points", "n_folds"], key=lambda s: s.map(lambda m: order.get(m, len(order)))
                           if s.name == "method" else s, kind="stable").reset_index(drop=True)


def equal_budgets(table: pd.DataFrame) -> dict[int, list[tuple[int, int]]]:
    """Budgets g·f reached by at least two cells, each with its cells (g, f), most grid points first."""
    cells = table[["grid_points", "n_folds"]].drop_duplicates()
    out: dict[int, list[tuple[int, int]]] = {}
    for g, f in sorted(map(tuple, cells.to_numpy().tolist()), key=lambda c: (-c[0], c[1])):
        out.setdefault(int(g) * int(f), []).append((int(g), int(f)))
    return {b: c for b, c in sorted(out.items()) if len(c) > 1}


def compare_equal_budget(table: pd.DataFrame, budget: int | None = None) -> dict | None:
    """At one budget (default: the largest reached by two or more cells), the mean test accuracy
    of each cell averaged over the methods, and per cell the methods for which it was best."""
    budgets = equal_budgets(table)
    if not budgets:
        return None
    budget = max(budgets) if budget is None else budget
    cells = budgets[budget]
    means = mean_table(table).set_index(["method", "grid_points", "n_folds"])["test_acc"]
    methods = [m for m in dict.fromkeys(table["method"]) if all((m, g, f) in means.index for g, f in cells)]
    per_cell = {c: float(np.mean([means[(m, *c)] for m in methods])) for c in cells}
    wins: dict[tuple[int, int], list[str]] = {c: [] for c in cells}
    ties: list[str] = []
    for m in methods:
        top = max(means[(m, *c)] for c in cells)
        best = [c for c in cells if means[(m, *c)] >= top - 1e-9]
        (wins[best[0]] if len(best) == 1 else ties).append(m)
    return {"budget": budget, "cells": cells, "mean_over_methods": per_cell, "wins": wins, "ties": ties, "methods": methods}
