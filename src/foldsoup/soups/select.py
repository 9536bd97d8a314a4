"""Choosing ingredients: greedy soup (Alg. 1) with AvgAcc/MinAcc (Eq. 2-3), BGSS, GSGS,
best on val and best uniform soup per split.

Pure Python on purpose (no torch): the selection logic only sees scores, through a
`SoupScorer` that owns the weights (see `foldsoup.soups.average.RunningSoupScorer`), so it is cheap to
import and can be tested against hand-computed tables.

Scores follow the run's `soups.metric` (`METRICS`): accuracy, or balanced accuracy (the mean
recall over the classes present in the images scored), both exact fractions of per-class counts
(`ClassCounts`). Names that say "acc" (`val_acc`, `fold_accs`, MinAcc, AvgAcc) hold the score
under that metric; with the default they are accuracies.

Exact early exit: a scorer that counts correct answers per class, batch by batch
(`CountingSoupScorer`), lets `greedy_soup` stop evaluating a candidate once it can no longer
reach the soup's score: the current soup's weakest fold first, and on each fold as soon as the
best score still possible (every image not yet evaluated counted right, class by class) cannot
reach the best, so the decisions are those of full evaluation (accepted candidates are always
evaluated in full).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any, Callable, Protocol

ACCEPT_RULES = (">=", ">")
CROSS_FOLD_RULES = ("min", "avg")
# soups.metric -> the suffix of its columns and record keys (val_acc, val_bacc, acc_fold0, ...).
METRICS = {"accuracy": "acc", "balanced_accuracy": "bacc"}
METRIC_LABELS = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy"}


@dataclass(frozen=True)
class Candidate:
    """One greedy-soup candidate: a single model or (GSGS stage 2) a whole soup."""

    name: str  # e.g. "lr0.001_medium_mixup/fold2" or "greedy_fold2"
    folds: frozenset[int]  # F(candidate): folds whose val parts it was validated on
    val_acc: float  # its own val accuracy, used for sorting (a soup: its score); exact: a Fraction

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


def fold_acc(correct: int, total: int) -> Fraction | float:
    """Accuracy from integer counts, the exact fraction: the one formula behind every accuracy
    recorded or compared, so two models tie where their fractions do, wherever they are read,
    and early exit compares counts with exactly what full evaluation computes. Records store
    float(fold_acc(...)), the correctly rounded float of the fraction (NaN without images)."""
    return Fraction(int(correct), int(total)) if total else math.nan


def accuracy_of(record: Mapping, key: str) -> Fraction | float | None:
    """The exact accuracy `key` ("val_acc", "test_acc", "holdout_acc") of a metrics.json, a
    models.csv row or a soup record, from its counts (`<name>_correct`, `<name>_total`). A file
    written before counts were recorded gives its float (compared as read: not exact); None
    where it has no such accuracy (None or NaN)."""
    name = key.removesuffix("_acc")
    correct, total = record.get(f"{name}_correct"), record.get(f"{name}_total")
    if not (is_missing(correct) or is_missing(total)):
        return fold_acc(int(correct), int(total))
    value = record.get(key)
    return None if is_missing(value) else float(value)


def is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


class Score(Fraction):
    """An exact score that keeps the per-class counts it was computed from (`counts`), so a
    record of a selection holds the counts of exactly what was compared. Compares, hashes and
    calculates as the Fraction it is."""

    __slots__ = ("counts",)

    # Fraction's own signature (its methods build instances of the class, e.g. from_float in a
    # comparison with a float); the counts by keyword only.
    def __new__(cls, numerator=0, denominator=None, *, counts: ClassCounts | None = None):
        self = super().__new__(cls, numerator, denominator)
        self.counts = counts
        return self

    def __copy__(self):
        return self  # immutable, as Fraction: a copy keeps its counts

    def __deepcopy__(self, memo):
        return self


@dataclass(frozen=True)
class ClassCounts:
    """Correct answers and images of each class (index = class id) on a set of images."""

    correct: tuple[int, ...]
    total: tuple[int, ...]

    def __post_init__(self) -> None:
        correct, total = tuple(int(c) for c in self.correct), tuple(int(t) for t in self.total)
        if len(correct) != len(total) or any(not 0 <= c <= t for c, t in zip(correct, total)):
            raise ValueError(f"per-class counts {correct} of {total} are no counts")
        object.__setattr__(self, "correct", correct)
        object.__setattr__(self, "total", total)

    @property
    def images(self) -> int:
        return sum(self.total)

    def score(self, metric: str = "accuracy") -> Score | float:
        """The exact score (a `Score`); NaN without images. accuracy: correct / images;
        balanced_accuracy: the mean over the classes with images of each one's recall."""
        _check_option("metric", metric, tuple(METRICS))
        if not self.images:
            return math.nan
        if metric == "accuracy":
            value = Fraction(sum(self.correct), self.images)
        else:
            recalls = [Fraction(c, t) for c, t in zip(self.correct, self.total) if t]
            value = sum(recalls, Fraction(0)) / len(recalls)
        return Score(value, counts=self)

    def as_record(self) -> dict[str, list[int]]:
        return {"correct": list(self.correct), "total": list(self.total)}

    @classmethod
    def from_record(cls, record: Mapping) -> ClassCounts:
        return cls(tuple(record["correct"]), tuple(record["total"]))


def metric_suffix(metric: str) -> str:
    """The suffix of a `soups.metric`'s columns and record keys ("accuracy" -> "acc",
    "balanced_accuracy" -> "bacc"); an unknown metric is refused naming the known ones."""
    _check_option("metric", metric, tuple(METRICS))
    return METRICS[metric]


def score_of(record: Mapping, split: str, metric: str = "accuracy") -> Fraction | float | None:
    """The exact `metric` score on `split` ("val", "test", "holdout") of a metrics.json, a
    models.csv row or a soup record: accuracy from `<split>_correct`/`<split>_total`
    (`accuracy_of`), balanced accuracy from the per-class counts `<split>_class_correct` and
    `<split>_class_total` (lists, or in a CSV cell space-separated integers). A record written
    before those counts gives its float `<split>_<suffix>` (not exact); None where it has no
    such score."""
    suffix = metric_suffix(metric)
    if metric == "accuracy":
        return accuracy_of(record, f"{split}_acc")
    counts = class_counts_of(record, split)
    if counts is not None:
        return counts.score(metric)
    value = record.get(f"{split}_{suffix}")
    return None if is_missing(value) else float(value)


def class_counts_of(record: Mapping, split: str) -> ClassCounts | None:
    """The per-class counts of `split` in a record (lists) or a models.csv row (space-separated
    integers in a cell); None where it has none."""
    correct, total = record.get(f"{split}_class_correct"), record.get(f"{split}_class_total")
    if is_missing(correct) or is_missing(total):
        return None
    return ClassCounts(*(tuple(int(v) for v in (x.split() if isinstance(x, str) else x)) for x in (correct, total)))


def int_cell(values) -> str:
    """Per-class counts in one CSV cell: space-separated integers (`score_of` reads them)."""
    return " ".join(str(int(v)) for v in values)


@dataclass(frozen=True)
class FoldCount:
    """Per-class correct answers of a soup on one fold after `evaluated` of its `total` images
    of each class (images are evaluated in a fixed order, so classes fill up unevenly)."""

    correct: tuple[int, ...]
    evaluated: tuple[int, ...]
    total: tuple[int, ...]
    metric: str = "accuracy"

    @classmethod
    def nothing_evaluated(cls, total: Sequence[int], metric: str) -> FoldCount:
        return cls((0,) * len(total), (0,) * len(total), tuple(total), metric)

    @property
    def images(self) -> int:
        """Images evaluated."""
        return sum(self.evaluated)

    @property
    def complete(self) -> bool:
        return tuple(self.evaluated) == tuple(self.total)

    @property
    def best_possible(self) -> Score | float:
        """The score if every image not evaluated were right (a bound per class, exact)."""
        most = tuple(c + t - e for c, e, t in zip(self.correct, self.evaluated, self.total))
        return ClassCounts(most, self.total).score(self.metric)

    @property
    def score(self) -> Score | float:
        if not self.complete:
            raise ValueError(f"score of a fold evaluated on {self.images} of {sum(self.total)} images")
        return ClassCounts(self.correct, self.total).score(self.metric)


class SoupScorer(Protocol):
    """Evaluates the uniform soup of the accepted ingredients plus one candidate."""

    def fold_accs_with(self, candidate: Candidate) -> Mapping[int, float]:
        """Val accuracy of average(accepted + [candidate]) on every fold in
        F(accepted) | candidate.folds (extra folds are ignored)."""
        ...

    def accept(self, candidate: Candidate) -> None:
        """Add `candidate` to the accepted soup."""
        ...


class CountingSoupScorer(SoupScorer, Protocol):
    """A SoupScorer that also counts correct answers batch by batch (early exit)."""

    counts: bool  # False: this instance cannot count (greedy_soup then evaluates in full)

    metric: str  # the score it counts (a key of METRICS)

    def fold_size(self, fold: int) -> int:
        """Number of val images of `fold`."""
        ...

    def class_sizes(self, fold: int) -> tuple[int, ...]:
        """Val images of each class on `fold`."""
        ...

    def fold_count_with(self, candidate: Candidate, fold: int,
                        reaches: Callable[[FoldCount], bool] | None = None) -> FoldCount:
        """Per-class correct answers of average(accepted + [candidate]) on `fold`, batch by batch
        in a fixed order, stopping after the first batch whose count no longer `reaches` (None:
        the whole fold)."""
        ...


@dataclass
class GreedyStep:
    """One iteration of Alg. 1: the candidate tried and what the soup would score with it.

    With early exit, a rejected candidate may have been evaluated on some folds only: then
    `fold_accs` holds the folds evaluated in full, `score` is None, `images` says how many
    images of each fold were evaluated (in evaluation order) and `reason` why it was rejected.
    """

    candidate: str
    fold_accs: dict[int, float]
    score: float | None
    best_before: float | None  # the soup's score without the candidate (None: empty soup)
    accepted: bool
    images: dict[int, int] = field(default_factory=dict)  # fold -> images evaluated
    reason: str | None = None  # why a candidate was rejected


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

    @property
    def images(self) -> int:
        """Val images evaluated over all steps (forward passes of the selection)."""
        return sum(sum(s.images.values()) for s in self.steps)


def step_record(step: GreedyStep) -> dict[str, Any]:
    """A step as soups/*.json records it (fold keys as strings; `images` in evaluation order)."""
    return {**asdict(step), "fold_accs": {str(f): float(a) for f, a in sorted(step.fold_accs.items())},
            "score": as_float(step.score), "best_before": as_float(step.best_before),
            "images": {str(f): n for f, n in step.images.items()}}


def as_float(value) -> float | None:
    """An exact accuracy as JSON and tables hold it: the fraction's float (None stays None)."""
    return None if value is None else float(value)


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


def _rejection(score: float, best: float, accept: str, cross_fold: str) -> str:
    label = "MinAcc" if cross_fold == "min" else "AvgAcc"
    return f"{label} {float(score):.6g} {'<' if accept == '>=' else '<='} best {float(best):.6g}"


def _accs_over(fold_accs: Mapping[int, float], folds: frozenset[int], name: str) -> dict[int, float]:
    """Restrict the scorer's answer to the soup's folds; every one of them must be present."""
    missing = folds - set(fold_accs)
    if missing:
        raise ValueError(f"scorer gave no accuracy for folds {sorted(missing)} of candidate {name!r}")
    return {f: fold_accs[f] for f in sorted(folds)}  # exact accuracies stay exact


def evaluation_order(soup_accs: Mapping[int, float], cand: Candidate, folds: Iterable[int]) -> list[int]:
    """Folds to evaluate a candidate on, weakest expected first: the current soup's folds at
    the soup's last full accuracy on them, a fold new to the soup at the candidate's own val
    accuracy (the one measurement of that fold we have: the candidate alone, on the fold it was
    validated on; NaN: first); ties by fold number."""
    own = -math.inf if math.isnan(cand.val_acc) else cand.val_acc
    return sorted(folds, key=lambda f: (soup_accs.get(f, own), f))


def _counted_step(cand: Candidate, scorer: CountingSoupScorer, folds: frozenset[int], soup_accs: Mapping[int, float],
                  best: float | None, accept: str, cross_fold: str) -> GreedyStep:
    """One candidate, fold by fold in `evaluation_order`, stopped once it cannot reach `best`:
    a fold's count reaches it while the cross-fold score with that fold at its best possible
    score, the folds evaluated at theirs and the folds not yet evaluated at 1 does. Scores are
    non-decreasing in every class's count, so stopping below it never changes a decision."""
    known: dict[int, float] = {}
    images: dict[int, int] = {}
    metric = getattr(scorer, "metric", "accuracy")
    for fold in evaluation_order(soup_accs, cand, folds):
        def reaches(count: FoldCount, fold: int = fold) -> bool:
            bound = {f: count.best_possible if f == fold else known.get(f, 1) for f in sorted(folds)}
            return _improves(cross_fold_score(bound, cross_fold), best, accept)

        if best is None:
            count = scorer.fold_count_with(cand, fold)
        else:
            empty = FoldCount.nothing_evaluated(scorer.class_sizes(fold), metric)
            count = scorer.fold_count_with(cand, fold, reaches) if reaches(empty) else empty
        images[fold] = count.images
        if best is not None and not reaches(count):
            accs = {f: known[f] for f in sorted(known)}
            reason = (f"fold {fold}: at most {METRIC_LABELS[metric]} {float(count.best_possible):.6g} possible after "
                      f"{count.images} of {sum(count.total)} images, the best is {float(best):.6g}")
            return GreedyStep(cand.name, accs, None, best, False, images, reason)
        known[fold] = count.score
    accs = {f: known[f] for f in sorted(folds)}
    score = cross_fold_score(accs, cross_fold)
    accepted = best is None or _improves(score, best, accept)
    # Every fold's count reached the best, so the score does: full evaluation decides the same.
    assert accepted, f"early exit let {cand.name!r} through with {score!r} against {best!r}"
    return GreedyStep(cand.name, accs, score, best, True, images)


def greedy_soup(
    candidates: Iterable[Candidate],
    scorer: SoupScorer,
    accept: str = ">=",
    cross_fold: str = "min",
    early_exit: bool = True,
) -> GreedyResult:
    """Alg. 1 with MinAcc/AvgAcc over the folds of the soup including the candidate.

    Candidates are sorted by val_acc, descending (stable). The first is always accepted (its
    score still comes from the scorer); each later one is accepted when the soup's score with it
    is `>=` (or `>`) the current soup's score over the current soup's folds. `scorer.accept` is
    called exactly for the accepted candidates, in order.

    `early_exit` (with a scorer whose `counts` is true): each candidate is evaluated fold by fold,
    stopping once it cannot reach the best (`_counted_step`); the decisions are those of full
    evaluation, with fewer images evaluated.
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
    counted = early_exit and getattr(scorer, "counts", False)
    for cand in order:
        folds = soup_folds | cand.folds
        if counted:
            step = _counted_step(cand, scorer, folds, soup_accs, best, accept, cross_fold)
        else:
            accs = _accs_over(scorer.fold_accs_with(cand), folds, cand.name)
            score = cross_fold_score(accs, cross_fold)
            accepted = best is None or _improves(score, best, accept)
            images = {f: scorer.fold_size(f) for f in sorted(folds)} if getattr(scorer, "counts", False) else {}
            step = GreedyStep(cand.name, accs, score, best, accepted, images,
                              None if accepted else _rejection(score, best, accept, cross_fold))
        steps.append(step)
        if step.accepted:
            scorer.accept(cand)
            ingredients.append(cand)
            soup_folds, soup_accs, best = folds, step.fold_accs, step.score
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


def bgss(per_fold: Mapping[int, float]) -> int:
    """Best Greedy Soup per Split: the fold whose greedy soup has the highest score (its val
    accuracy on that fold; ties: first fold in mapping order)."""
    return _argmax_first(per_fold, "bgss")


def gsgs_candidates(per_fold: Mapping[int, float]) -> list[Candidate]:
    """The per-fold soups (fold -> score) as second-stage candidates, named `greedy_fold{i}` (the
    per-fold soups' own method names), in fold order."""
    return [Candidate(name=f"greedy_fold{fold}", folds=frozenset({fold}), val_acc=score) for fold, score in per_fold.items()]


def gsgs(
    per_fold: Mapping[int, float],
    scorer: SoupScorer,
    accept: str = ">=",
    cross_fold: str = "min",
    early_exit: bool = True,
) -> GreedyResult:
    """Greedy Soup of Greedy Soups: Alg. 1 over the per-fold greedy soups, given as fold -> the
    soup's val accuracy on its own fold (their sort key), scored by MinAcc (or AvgAcc) over the
    folds of the soups accepted so far plus the candidate's.

    The scorer must treat each candidate as one ingredient (the soup's averaged weights), so every
    per-fold soup weighs the same whatever its number of models.
    """
    return greedy_soup(gsgs_candidates(per_fold), scorer, accept=accept, cross_fold=cross_fold, early_exit=early_exit)


def best_uniform_per_split(per_fold_uniform: Mapping[int, float]) -> int:
    """Fold whose uniform soup (of its T models) has the best val accuracy (ties: first)."""
    return _argmax_first(per_fold_uniform, "best_uniform_per_split")


def score_fields(split: str, counts: ClassCounts | None) -> dict[str, Any]:
    """A record's fields for `split` ("val", "test", "holdout") from its per-class counts: every
    metric's score as a float (`val_acc`, `val_bacc`, ...), the accuracy's counts
    (`val_correct`, `val_total`) and the per-class ones (`val_class_correct`, `val_class_total`)
    that `score_of` reads back exactly. None: no such split (every score None)."""
    if counts is None:
        return {f"{split}_{suffix}": None for suffix in METRICS.values()}
    return {**{f"{split}_{suffix}": float(counts.score(metric)) for metric, suffix in METRICS.items()},
            f"{split}_correct": sum(counts.correct), f"{split}_total": counts.images,
            f"{split}_class_correct": list(counts.correct), f"{split}_class_total": list(counts.total)}
