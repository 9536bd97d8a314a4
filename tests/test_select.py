"""Greedy soup (Alg. 1) with MinAcc/AvgAcc, BGSS, GSGS, best on val, best uniform per split.

Most tests drive `greedy_soup` with a table-driven scorer whose answers are written by hand,
so every expected result below can be checked with pencil and paper.
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

try:
    import foldsoup.soups.select  # noqa: F401
except ImportError:  # running from a checkout without an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from foldsoup.soups.select import (
    Candidate,
    avg_acc,
    best_on_val,
    best_uniform_per_split,
    bgss,
    greedy_soup,
    gsgs,
    min_acc,
)


class TableScorer:
    """Fold accuracies looked up by the set of names in the soup (accepted + candidate)."""

    def __init__(
        self,
        table: Mapping[frozenset[str], Mapping[int, float]] | None = None,
        default: Callable[[frozenset[str]], Mapping[int, float]] | None = None,
    ) -> None:
        self.table = table or {}
        self.default = default
        self.accepted: list[str] = []
        self.asked: list[frozenset[str]] = []
        self.candidates: list[Candidate] = []

    def fold_accs_with(self, candidate: Candidate) -> Mapping[int, float]:
        key = frozenset(self.accepted) | {candidate.name}
        self.asked.append(key)
        self.candidates.append(candidate)
        if key in self.table:
            return self.table[key]
        assert self.default is not None, f"table has no entry for {sorted(key)}"
        return self.default(key)

    def accept(self, candidate: Candidate) -> None:
        self.accepted.append(candidate.name)


def fs(*names: str) -> frozenset[str]:
    return frozenset(names)


def cand(name: str, fold: int, val_acc: float) -> Candidate:
    return Candidate(name, frozenset({fold}), val_acc)


def test_select_does_not_import_torch():
    # Selection runs in light jobs (tables, methods) where a 2+ s torch import matters.
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    code = "import sys, foldsoup.soups.select; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# ------------------------------------------------------------------------------------------
# Eq. 2 and 3
# ------------------------------------------------------------------------------------------


def test_avg_and_min_acc():
    accs = {0: 0.9, 1: 0.8, 2: 0.7}
    assert avg_acc(accs) == pytest.approx(0.8)
    assert min_acc(accs) == 0.7
    # A single model: both equal its own val accuracy.
    assert avg_acc({3: 0.85}) == min_acc({3: 0.85}) == 0.85
    with pytest.raises(ValueError):
        avg_acc({})
    with pytest.raises(ValueError):
        min_acc({})


# ------------------------------------------------------------------------------------------
# Alg. 1
# ------------------------------------------------------------------------------------------


def test_candidates_are_tried_in_decreasing_val_acc():
    a, b, c = cand("a", 0, 0.80), cand("b", 0, 0.90), cand("c", 0, 0.85)
    scorer = TableScorer(
        {
            fs("b"): {0: 0.90},
            fs("b", "c"): {0: 0.91},  # 0.91 >= 0.90: accept c
            fs("b", "c", "a"): {0: 0.89},  # 0.89 < 0.91: reject a
        }
    )
    result = greedy_soup([a, b, c], scorer)
    assert [s.candidate for s in result.steps] == ["b", "c", "a"]
    assert [s.accepted for s in result.steps] == [True, True, False]
    assert [s.best_before for s in result.steps] == [None, 0.90, 0.91]
    assert scorer.asked == [fs("b"), fs("b", "c"), fs("b", "c", "a")]
    assert scorer.accepted == ["b", "c"]
    assert [c.name for c in result.ingredients] == ["b", "c"]
    assert result.score == 0.91 and result.fold_accs == {0: 0.91}
    assert result.folds == {0}


def test_first_candidate_is_always_accepted_and_scored_by_the_scorer():
    scorer = TableScorer({fs("a"): {0: 0.10}})  # far below its own val_acc: still accepted
    result = greedy_soup([cand("a", 0, 0.90)], scorer)
    assert scorer.accepted == ["a"]
    assert result.score == 0.10
    step = result.steps[0]
    assert step.accepted and step.best_before is None and step.fold_accs == {0: 0.10}


@pytest.mark.parametrize(("accept", "expected"), [(">=", ["a", "b"]), (">", ["a"])])
def test_ties_follow_the_accept_rule(accept, expected):
    scorer = TableScorer({fs("a"): {0: 0.90}, fs("a", "b"): {0: 0.90}})
    result = greedy_soup([cand("a", 0, 0.9), cand("b", 0, 0.8)], scorer, accept=accept)
    assert scorer.accepted == expected
    assert [c.name for c in result.ingredients] == expected
    assert result.score == 0.90


@pytest.mark.parametrize(("cross_fold", "accepted"), [("min", False), ("avg", True)])
def test_higher_avg_but_lower_min(cross_fold, accepted):
    # Soup {a} scores 0.90 on fold 0. With b: fold 0 0.96, fold 1 0.86.
    # AvgAcc = 0.91 >= 0.90 (accept); MinAcc = 0.86 < 0.90 (reject).
    table = {fs("a"): {0: 0.90}, fs("a", "b"): {0: 0.96, 1: 0.86}}
    scorer = TableScorer(table)
    result = greedy_soup([cand("a", 0, 0.9), cand("b", 1, 0.85)], scorer, cross_fold=cross_fold)
    assert result.steps[1].accepted is accepted
    assert ("b" in scorer.accepted) is accepted
    if accepted:
        assert result.score == pytest.approx(0.91)
        assert result.folds == {0, 1}
    else:
        assert result.score == 0.90 and result.folds == {0}


def test_new_fold_judged_by_min_over_enlarged_fold_set():
    # a: fold 0. b (fold 1) improves fold 0 but its own fold 1 drags MinAcc below 0.90.
    # c (fold 1) keeps both folds >= 0.90. Fold 2 is not in any soup: its number is ignored.
    table = {
        fs("a"): {0: 0.90, 1: 0.50, 2: 0.00},
        fs("a", "b"): {0: 0.93, 1: 0.87, 2: 0.00},  # MinAcc over {0, 1} = 0.87 < 0.90
        fs("a", "c"): {0: 0.91, 1: 0.90, 2: 0.00},  # MinAcc over {0, 1} = 0.90 >= 0.90
    }
    scorer = TableScorer(table)
    result = greedy_soup([cand("a", 0, 0.9), cand("b", 1, 0.88), cand("c", 1, 0.87)], scorer)
    assert [s.accepted for s in result.steps] == [True, False, True]
    assert result.steps[0].fold_accs == {0: 0.90}  # fold 1 was not part of {a}
    assert result.steps[1].score == 0.87
    assert scorer.accepted == ["a", "c"]
    assert result.fold_accs == {0: 0.91, 1: 0.90} and result.score == 0.90


def test_three_fold_walkthrough():
    # Sorted: p(0.95, f0) q(0.93, f1) r(0.92, f2) s(0.90, f0) t(0.89, f1)
    c = [
        cand("t", 1, 0.89),
        cand("r", 2, 0.92),
        cand("p", 0, 0.95),
        cand("s", 0, 0.90),
        cand("q", 1, 0.93),
    ]
    table = {
        fs("p"): {0: 0.95},  # score 0.95
        fs("p", "q"): {0: 0.95, 1: 0.94},  # 0.94 < 0.95: reject
        fs("p", "r"): {0: 0.96, 2: 0.95},  # 0.95 >= 0.95: accept
        fs("p", "r", "s"): {0: 0.97, 2: 0.96},  # 0.96 >= 0.95: accept
        fs("p", "r", "s", "t"): {0: 0.97, 1: 0.96, 2: 0.95},  # 0.95 < 0.96: reject
    }
    scorer = TableScorer(table)
    result = greedy_soup(c, scorer)
    assert [s.candidate for s in result.steps] == ["p", "q", "r", "s", "t"]
    assert scorer.accepted == ["p", "r", "s"]
    assert result.score == 0.96 and result.fold_accs == {0: 0.97, 2: 0.96}
    assert result.folds == {0, 2}
    # AvgAcc instead: q gives 0.945 < 0.95 (reject); r 0.955 (accept); s 0.965 (accept);
    # t 0.96 < 0.965 (reject): same soup, different scores.
    avg = greedy_soup(c, TableScorer(table), cross_fold="avg")
    assert [x.name for x in avg.ingredients] == ["p", "r", "s"]
    assert avg.score == pytest.approx(0.965)


def test_sort_is_stable_on_equal_val_acc():
    def constant(key: frozenset[str]) -> dict[int, float]:
        return {0: 0.5, 1: 0.5, 2: 0.5}

    x, y, z = cand("x", 0, 0.8), cand("y", 1, 0.8), cand("z", 2, 0.8)
    for order in ([y, x, z], [z, y, x], [x, z, y]):
        scorer = TableScorer(default=constant)
        result = greedy_soup(order, scorer)
        assert [s.candidate for s in result.steps] == [c.name for c in order]
        assert scorer.accepted == [c.name for c in order]


def test_nan_val_acc_goes_last():
    scorer = TableScorer(default=lambda key: {0: 0.5})
    result = greedy_soup([cand("n", 0, math.nan), cand("a", 0, 0.1)], scorer)
    assert [s.candidate for s in result.steps] == ["a", "n"]


def test_bad_inputs():
    scorer = TableScorer(default=lambda key: {0: 0.5})
    with pytest.raises(ValueError, match="at least one"):
        greedy_soup([], scorer)
    with pytest.raises(ValueError, match="accept"):
        greedy_soup([cand("a", 0, 0.5)], scorer, accept="=>")
    with pytest.raises(ValueError, match="cross_fold"):
        greedy_soup([cand("a", 0, 0.5)], scorer, cross_fold="max")
    with pytest.raises(ValueError, match="unique"):
        greedy_soup([cand("a", 0, 0.5), cand("a", 1, 0.4)], scorer)
    with pytest.raises(ValueError, match="no validation folds"):
        Candidate("empty", frozenset(), 0.5)
    # The scorer must answer for every fold of the soup.
    with pytest.raises(ValueError, match=r"folds \[1\].*'b'"):
        greedy_soup([cand("a", 0, 0.5), cand("b", 1, 0.4)], scorer)


# ------------------------------------------------------------------------------------------
# Table 3/4 methods
# ------------------------------------------------------------------------------------------


def test_best_on_val_ties_go_to_the_first():
    cs = [cand("a", 0, 0.90), cand("b", 1, 0.95), cand("c", 2, 0.95), cand("d", 3, 0.93)]
    assert best_on_val(cs).name == "b"
    assert best_on_val(list(reversed(cs))).name == "c"
    with pytest.raises(ValueError):
        best_on_val([])


def test_best_uniform_per_split():
    assert best_uniform_per_split({0: 0.90, 1: 0.95, 2: 0.95, 3: 0.93}) == 1
    assert best_uniform_per_split({4: 0.1}) == 4
    with pytest.raises(ValueError):
        best_uniform_per_split({})


def test_bgss_picks_the_best_per_fold_soup():
    assert bgss({0: 0.90, 1: 0.93, 2: 0.93}) == 1  # tie: the first fold wins


# GSGS on three per-fold soups (fold -> the soup's val accuracy on its fold), sorted g1, g2, g0.
# Dyadic accuracies, so every mean below is exact.
GSGS_SCORES = {0: 0.75, 1: 0.875, 2: 0.8125}
G0, G1, G2 = "greedy_fold0", "greedy_fold1", "greedy_fold2"
GSGS_TABLE = {
    fs(G1): {1: 0.875},
    fs(G1, G2): {1: 0.9375, 2: 0.8125},  # MinAcc 0.8125 < 0.875: reject; AvgAcc 0.875 >= 0.875: accept
    fs(G1, G0): {1: 0.9375, 0: 0.875},  # MinAcc 0.875 >= 0.875: accept
    fs(G1, G2, G0): {0: 0.8125, 1: 0.9375, 2: 0.875},  # AvgAcc 0.875 >= 0.875: accept
}


@pytest.mark.parametrize(("cross_fold", "accept", "expected", "fold_accs"), [
    ("min", ">=", [G1, G0], {0: 0.875, 1: 0.9375}),
    ("min", ">", [G1], {1: 0.875}),  # the tie of g0 is rejected
    ("avg", ">=", [G1, G2, G0], {0: 0.8125, 1: 0.9375, 2: 0.875}),
])
def test_gsgs_is_alg1_over_the_per_fold_soups(cross_fold, accept, expected, fold_accs):
    scorer = TableScorer(GSGS_TABLE)
    result = gsgs(GSGS_SCORES, scorer, accept=accept, cross_fold=cross_fold)
    # Each per-fold soup is one candidate (its models are never seen by the scorer), tried in
    # order of the soups' own val accuracy, and scored over the folds of the soup with it.
    assert [(c.name, c.folds, c.val_acc) for c in scorer.candidates] == [(G1, {1}, 0.875), (G2, {2}, 0.8125),
                                                                         (G0, {0}, 0.75)]
    assert scorer.accepted == expected == [c.name for c in result.ingredients]
    assert result.score == 0.875 and result.fold_accs == fold_accs


def test_gsgs_follows_the_runs_soups_settings():
    from foldsoup.soups import methods

    settings = {"greedy_accept": ">=", "cross_fold_val": "avg", "early_exit": True}
    assert [c.name for c in methods.gsgs(GSGS_SCORES, TableScorer(GSGS_TABLE), settings).ingredients] == [G1, G2, G0]
    strict = {**settings, "greedy_accept": ">", "cross_fold_val": "min"}
    assert [c.name for c in methods.gsgs(GSGS_SCORES, TableScorer(GSGS_TABLE), strict).ingredients] == [G1]


# ------------------------------------------------------------------------------------------
# Composition with real weights
# ------------------------------------------------------------------------------------------


def _tiny_problem():
    """A 3-class linear classifier on 2-D points; 3 folds of val data; 2 models per fold."""
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
    folds = {}
    for f in range(3):
        labels = torch.arange(3).repeat(20)
        points = centers[labels] + 1.2 * torch.randn(60, 2, generator=g)
        folds[f] = (points, labels)
    base = {"fc.weight": centers.clone(), "fc.bias": torch.zeros(3)}
    states = {}
    for f in range(3):
        for h in range(2):
            states[f"h{h}/fold{f}"] = {
                "fc.weight": base["fc.weight"] + 1.5 * torch.randn(3, 2, generator=g),
                "fc.bias": base["fc.bias"] + torch.randn(3, generator=g),
                "steps": torch.tensor(100, dtype=torch.int64),
            }

    def accuracy(state, fold):
        points, labels = folds[fold]
        logits = points @ state["fc.weight"].T + state["fc.bias"]
        return (logits.argmax(1) == labels).float().mean().item()

    return torch, states, accuracy


def test_greedy_with_running_sum_scorer_matches_brute_force():
    torch, states, accuracy = _tiny_problem()
    from foldsoup.soups.average import RunningSoupScorer

    fold_of = {name: int(name[-1]) for name in states}
    candidates = [Candidate(n, frozenset({fold_of[n]}), accuracy(s, fold_of[n])) for n, s in states.items()]
    assert len({c.val_acc for c in candidates}) > 2  # the models really differ

    loads: list[str] = []

    def load(c: Candidate):
        loads.append(c.name)
        return states[c.name]

    def evaluate(state, folds):
        return {f: accuracy(state, f) for f in folds}

    real = RunningSoupScorer(load, evaluate)
    result = greedy_soup(candidates, real)

    # Brute force: every subset's soup computed directly with torch.stack(...).mean.
    table = {}
    for n in range(1, len(states) + 1):
        for subset in itertools.combinations(states, n):
            soup = {k: torch.stack([states[s][k].float() for s in subset]).mean(0) for k in ("fc.weight", "fc.bias")}
            table[frozenset(subset)] = {f: accuracy(soup, f) for f in range(3)}
    brute = greedy_soup(candidates, TableScorer(table))

    assert [(s.candidate, s.accepted) for s in result.steps] == [(s.candidate, s.accepted) for s in brute.steps]
    assert [s.score for s in result.steps] == pytest.approx([s.score for s in brute.steps])
    accepted = [s.accepted for s in result.steps]
    assert any(accepted[1:]) and not all(accepted) and len(result.folds) > 1  # a real contest
    assert sorted(loads) == sorted(states)  # each checkpoint loaded once, not once per step
    soup = real.mean()
    chosen = [c.name for c in result.ingredients]
    expected = torch.stack([states[n]["fc.weight"] for n in chosen]).mean(0)
    torch.testing.assert_close(soup["fc.weight"], expected)
    assert soup["steps"].item() == 100 and soup["steps"].dtype == torch.int64


def test_gsgs_weighs_each_per_fold_soup_equally():
    torch, states, accuracy = _tiny_problem()
    from foldsoup.soups.average import RunningSoupScorer, average

    # Per-fold soups with different numbers of models: fold 0 of two, fold 1 of one.
    members = {0: ["h0/fold0", "h1/fold0"], 1: ["h0/fold1"]}
    soups = {f: average(states[n] for n in names) for f, names in members.items()}
    per_fold = {0: 0.9, 1: 0.8}

    def load(c: Candidate):
        return soups[int(c.name.removeprefix("greedy_fold"))]

    scorer = RunningSoupScorer(load, lambda state, folds: {f: 0.5 for f in folds})
    result = gsgs(per_fold, scorer)
    assert [c.name for c in result.ingredients] == ["greedy_fold0", "greedy_fold1"]

    final = scorer.mean()["fc.weight"]
    equal_soups = (soups[0]["fc.weight"] + soups[1]["fc.weight"]) / 2
    all_models = torch.stack([states[n]["fc.weight"] for n in members[0] + members[1]]).mean(0)
    torch.testing.assert_close(final, equal_soups)
    assert not torch.allclose(final, all_models)
