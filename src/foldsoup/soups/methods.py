"""The paper's methods and their baselines, each computed by one function from the models'
accuracies (and, for soups, a `select.SoupScorer` that owns the weights). The workflow's steps
(`foldsoup.steps.soups`, `foldsoup.steps.methods`) and the budget analysis
(`foldsoup.analysis.budget`) both call these, so what the tests check is what runs.

* best_on_val / best_on_holdout: the single model with the best own-fold val (holdout) accuracy;
* greedy_soup: Alg. 1 (`select.greedy_soup`) with the run's `soups` settings: per fold over that
  fold's models (the per-fold greedy soups) and over all models (MinAcc/AvgAcc, Eq. 2-3);
* gsgs: Alg. 1 over the per-fold greedy soups, each one ingredient (`select.gsgs`);
* BGSS and the best uniform soup per split: `select.bgss`, `select.best_uniform_per_split`.

Tie rule, the same for every selection: the highest score wins, and among equal scores the
first in grid order, that is the grid points in config order (`config.schema.grid_points`:
lr, then augmentation, then mixup, as listed) and then the fold number; per-fold soups go in
fold order. Greedy soups try candidates of equal val accuracy in the same order (a stable sort),
and tables/models.csv lists the models in it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from foldsoup.data.folds import HOLDOUT
from foldsoup.errors import SoupError
from foldsoup.soups import select
from foldsoup.soups.select import Candidate, GreedyResult, SoupScorer


class Scored(Protocol):
    """What a selection needs to know of a model (ModelResult, and the budget's Model, one)."""

    @property
    def name(self) -> str: ...

    fold: int
    val_acc: float
    diverged: bool


M = TypeVar("M", bound=Scored)


@dataclass(frozen=True)
class ModelResult:
    """One fine-tuned model's scores under the run's metric (`soups.metric`: accuracy or
    balanced accuracy) from a row of tables/models.csv, or its metrics.json."""

    hp: str
    fold: int
    val_acc: float  # on its own fold's val part; from a record, exact (select.score_of)
    test_acc: float
    holdout_acc: float | None = None  # None: the split has no outer holdout
    diverged: bool = False
    counts: Mapping = field(default_factory=dict, compare=False)  # the record's *_correct / *_total

    @property
    def name(self) -> str:
        return f"{self.hp}/fold{self.fold}"

    @classmethod
    def from_record(cls, m: Mapping, metric: str = "accuracy", **extra) -> ModelResult:
        """From metrics.json or a models.csv row (NaN in an empty holdout cell): `metric`'s
        scores from the counts, exact, so best_on_val compares what the greedy soups compare
        (metrics from before the counts: their floats). `extra`: a subclass's own fields (the
        budget's analysis.budget.Model: grid index and files)."""
        counts = {key: int(m[key]) for key in COUNT_KEYS if not select.is_missing(m.get(key))}
        test = select.score_of(m, "test", metric)  # None: a record from before this metric was recorded
        return cls(str(m["hp"]), int(m["fold"]), select.score_of(m, "val", metric), math.nan if test is None else float(test),
                   select.score_of(m, "holdout", metric), bool(m["diverged"]), counts, **extra)


COUNT_KEYS = ("val_correct", "val_total", "holdout_correct", "holdout_total", "test_correct", "test_total")


_FOLD_OF_NAME = re.compile(r"fold(\d+)$")


def ingredient_folds(ingredients: Iterable[str]) -> list[int]:
    """F(soup): the folds a soup's ingredients were validated on, from their names ('<hp>/fold<i>'
    for a fine-tune, 'greedy_fold<i>' for GSGS's per-fold soups). Each ingredient trained on
    every other fold, so a val fold of F is clean only when F is that fold alone."""
    folds = set()
    for name in ingredients:
        match = _FOLD_OF_NAME.search(name)
        if match is None:
            raise SoupError(f"ingredient {name!r}: its name does not say its fold (expected '<hp>/fold<i>' or "
                            f"'greedy_fold<i>')")
        folds.add(int(match.group(1)))
    return sorted(folds)


def candidates(models: Iterable[Scored], on_holdout: bool = False) -> list[Candidate]:
    """Single models as greedy candidates, in the given order (grid order, then fold); diverged
    ones left out. `on_holdout`: each validated on the outer holdout instead of its own fold."""
    out = []
    for m in models:
        if m.diverged:
            continue
        if on_holdout:
            out.append(Candidate(name=m.name, folds=frozenset({HOLDOUT}), val_acc=m.holdout_acc))
        else:
            out.append(Candidate(name=m.name, folds=frozenset({m.fold}), val_acc=m.val_acc))
    return out


def _pick(models: Sequence[M], on_holdout: bool, what: str) -> M:
    by_name = {m.name: m for m in models}
    cands = candidates(models, on_holdout)
    if not cands:
        raise SoupError(f"{what}: every model diverged")
    return by_name[select.best_on_val(cands).name]


def best_on_val(models: Sequence[M]) -> M:
    """The model with the best own-fold val score (ties: first in grid order, then fold)."""
    return _pick(models, False, "best_on_val")


def best_on_holdout(models: Sequence[M]) -> M:
    """The model with the best score on the outer holdout (ties as best_on_val)."""
    return _pick(models, True, "best_on_holdout")


def _greedy_settings(soups_cfg: Mapping, early_exit: bool | None) -> dict:
    """greedy_soup's keyword arguments from the run's `soups` settings."""
    exit_early = soups_cfg.get("early_exit", True) if early_exit is None else early_exit
    return {"accept": soups_cfg["greedy_accept"], "cross_fold": soups_cfg["cross_fold_val"], "early_exit": exit_early}


def greedy_soup(cands: Iterable[Candidate], scorer: SoupScorer, soups_cfg: Mapping, early_exit: bool | None = None) -> GreedyResult:
    """Alg. 1 over `cands` with the run's `soups` settings (greedy_accept, cross_fold_val,
    early_exit; `early_exit` overrides the last, for benchmarks of full evaluation)."""
    return select.greedy_soup(cands, scorer, **_greedy_settings(soups_cfg, early_exit))


def gsgs(per_fold: Mapping[int, float], scorer: SoupScorer, soups_cfg: Mapping, early_exit: bool | None = None) -> GreedyResult:
    """GSGS (`select.gsgs`) over the per-fold greedy soups (fold -> its val accuracy) with the
    run's `soups` settings, as greedy_soup; `scorer` loads each candidate as its soup's weights."""
    return select.gsgs(per_fold, scorer, **_greedy_settings(soups_cfg, early_exit))
