"""Choosing ingredients: greedy soup (Alg. 1) with AvgAcc/MinAcc (Eq. 2-3), BGSS, GSGS,
best on val and best uniform soup per split.

Pure Python on purpose (no torch): the selection logic only sees accuracies, through a
`SoupScorer` that owns the weights (see `foldsoup.soup.RunningSoupScorer`), so it is cheap to
import and can be tested against hand-computed tables.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

ACCEPT_RULES = (">=", ">")
CROSS_FOLD_RULES = ("min", "avg")


@dataclass(frozen=True)
class Candidate:
    """One greedy-soup candidate: a single model or (GSGS stage 2) a whole soup."""

    name: str  # e.g. "lr0.001_medium_mixup/fold2" or "greedy_fold2"
    folds: frozenset[int]  # F(candidate): folds whose val parts it was validated on
    val_acc: float  # its own val accuracy, used for sorting (a soup: its score)

    def __post_init__(self) -> None:
        folds = frozenset(int(f) for f in self.folds)
        if not folds:
            raise ValueError(f"candidate {self.name!r} has no validation folds")
        object.__setattr__(self, "folds", folds)  # accept any iterable, store a frozenset


def avg_acc(fold_accs: Mapping[int, float]) -> float:
    """Eq. 2: mean over the soup's folds of its val accuracy on each fold."""
    if not fold_accs:
        raise ValueError("avg_acc of an empty set of folds")
    return sum(fold_accs.values()) / len(fold_accs)


def min_acc(fold_accs: Mapping[int, float]) -> float:
    """Eq. 3: the worst val accuracy over the soup's folds."""
    if not fold_accs:
        raise ValueError("min_acc of an empty set of folds")
    return min(fold_accs.values())


def cross_fold_score(fold_accs: Mapping[int, float], cross_fold: str = "min") -> float:
    """MinAcc (`"min"`) or AvgAcc (`"avg"`) of per-fold accuracies."""
    _check_option("cross_fold", cross_fold, CROSS_FOLD_RULES)
    return min_acc(fold_accs) if cross_fold == "min" else avg_acc(fold_accs)


class SoupScorer(Protocol):
    """Evaluates the uniform soup of the accepted ingredients plus one candidate."""

    def fold_accs_with(self, candidate: Candidate) -> Mapping[int, float]:
        """Val accuracy of average(accepted + [candidate]) on every fold in
        F(accepted) | candidate.folds (extra folds are ignored)."""
        ...

    def accept(self, candidate: Candidate) -> None:
        """Add `candidate` to the accepted soup."""
        ...


@dataclass
class GreedyStep:
    """One iteration of Alg. 1: the candidate tried and what the soup would score with it."""

    candidate: str
    fold_accs: dict[int, float]
    score: float
    best_before: float | None  # the soup's score without the candidate (None: empty soup)
    accepted: bool


@dataclass
class GreedyResult:
    """The greedy soup: accepted ingredients (in acceptance order) and their soup's accuracy."""

    ingredients: list[Candidate]
    fold_accs: dict[int, float]
    score: float
    steps: list[GreedyStep] = field(default_factory=list)

    @property
    def folds(self) -> frozenset[int]:
        """F(soup): union of the ingredients' folds."""
        return frozenset().union(*(c.folds for c in self.ingredients))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (soups/{method}.json)."""
        return {
            "ingredients": [c.name for c in self.ingredients],
            "folds": sorted(self.folds),
            "fold_accs": {str(f): a for f, a in sorted(self.fold_accs.items())},
            "score": self.score,
            "steps": [
                {**asdict(s), "fold_accs": {str(f): a for f, a in sorted(s.fold_accs.items())}}
                for s in self.steps
            ],
        }


def _check_option(label: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{label} must be one of {list(allowed)}, got {value!r}")


def sort_candidates(candidates: Iterable[Candidate]) -> list[Candidate]:
    """Alg. 1 order: val_acc descending. Stable: equal val_acc keeps the input order (Python's
    sort is stable, also with reverse=True). NaN accuracies go last."""
    return sorted(
        candidates,
        key=lambda c: -math.inf if math.isnan(c.val_acc) else c.val_acc,
        reverse=True,
    )


def _improves(score: float, best: float, accept: str) -> bool:
    return score >= best if accept == ">=" else score > best


def _accs_over(fold_accs: Mapping[int, float], folds: frozenset[int], name: str) -> dict[int, float]:
    """Restrict the scorer's answer to the soup's folds; every one of them must be present."""
    missing = folds - set(fold_accs)
    if missing:
        raise ValueError(f"scorer gave no accuracy for folds {sorted(missing)} of candidate {name!r}")
    return {f: float(fold_accs[f]) for f in sorted(folds)}


def greedy_soup(
    candidates: Iterable[Candidate],
    scorer: SoupScorer,
    accept: str = ">=",
    cross_fold: str = "min",
) -> GreedyResult:
    """Alg. 1 with MinAcc/AvgAcc over the folds of the soup including the candidate.

    Candidates are sorted by val_acc, descending (stable). The first is always accepted (its
    score still comes from the scorer); each later one is accepted when the soup's score with it
    is `>=` (or `>`) the current soup's score over the current soup's folds. `scorer.accept` is
    called exactly for the accepted candidates, in order.
    """
    _check_option("accept", accept, ACCEPT_RULES)
    _check_option("cross_fold", cross_fold, CROSS_FOLD_RULES)
    order = sort_candidates(candidates)
    if not order:
        raise ValueError("greedy_soup needs at least one candidate")
    names = [c.name for c in order]
    if len(set(names)) != len(names):
        raise ValueError(f"candidate names must be unique, got {sorted(names)}")

    ingredients: list[Candidate] = []
    soup_folds: frozenset[int] = frozenset()
    soup_accs: dict[int, float] = {}
    best: float | None = None
    steps: list[GreedyStep] = []
    for cand in order:
        folds = soup_folds | cand.folds
        accs = _accs_over(scorer.fold_accs_with(cand), folds, cand.name)
        score = cross_fold_score(accs, cross_fold)
        accepted = best is None or _improves(score, best, accept)
        steps.append(GreedyStep(cand.name, accs, score, best, accepted))
        if accepted:
            scorer.accept(cand)
            ingredients.append(cand)
            soup_folds, soup_accs, best = folds, accs, score
    assert best is not None
    return GreedyResult(ingredients, soup_accs, best, steps)


def best_on_val(candidates: Iterable[Candidate]) -> Candidate:
    """The candidate with the highest own val accuracy; ties go to the first in input order."""
    ranked = sort_candidates(candidates)  # stable, so ranked[0] is the first of the best
    if not ranked:
        raise ValueError("best_on_val needs at least one candidate")
    return ranked[0]


def _argmax_first(scores: Mapping[int, float], what: str) -> int:
    """Key of the highest value; ties go to the first key in mapping order."""
    if not scores:
        raise ValueError(f"{what} needs at least one fold")
    best_key = None
    for key, value in scores.items():
        if best_key is None or value > scores[best_key]:
            best_key = key
    return best_key


def bgss(per_fold: Mapping[int, GreedyResult]) -> tuple[int, GreedyResult]:
    """Best Greedy Soup per Split: the per-fold greedy soup with the highest score (ties: first
    fold in mapping order)."""
    fold = _argmax_first({f: r.score for f, r in per_fold.items()}, "bgss")
    return fold, per_fold[fold]


def gsgs_candidates(per_fold: Mapping[int, GreedyResult]) -> list[Candidate]:
    """The per-fold soups as second-stage candidates, named `greedy_fold{i}`."""
    out = []
    for fold, result in per_fold.items():
        if result.folds and result.folds != {fold}:
            raise ValueError(f"per-fold soup of fold {fold} spans folds {sorted(result.folds)}")
        out.append(Candidate(name=f"greedy_fold{fold}", folds=frozenset({fold}), val_acc=result.score))
    return out


def gsgs(
    per_fold: Mapping[int, GreedyResult],
    scorer: SoupScorer,
    accept: str = ">=",
    cross_fold: str = "min",
) -> GreedyResult:
    """Greedy Soup of Greedy Soups: Alg. 1 over the per-fold greedy soups.

    The scorer must treat each candidate as one ingredient (the soup's averaged weights), so every
    per-fold soup weighs the same whatever its number of models.
    """
    return greedy_soup(gsgs_candidates(per_fold), scorer, accept=accept, cross_fold=cross_fold)


def best_uniform_per_split(per_fold_uniform: Mapping[int, float]) -> int:
    """Fold whose uniform soup (of its T models) has the best val accuracy (ties: first)."""
    return _argmax_first(per_fold_uniform, "best_uniform_per_split")
