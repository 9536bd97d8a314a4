"""Exact early exit in greedy evaluation (Alg. 1): a candidate stops being evaluated once it can
no longer reach the soup's score, and every decision is the one full evaluation makes.

Three levels: a counting scorer over random tables of right and wrong answers (select.py
alone; many ties, `>=` and `>`, MinAcc and AvgAcc, one fold and several); the real Evaluator
on tiny real models (random digits CNNs on real digits images, 4 images per batch); and the
soups/*.json of a finished smoke run, recomputed in full and with early exit.
"""

from __future__ import annotations

import json
from fractions import Fraction
import random

import pytest

from foldsoup.soups.select import (
    Candidate,
    ClassCounts,
    FoldCount,
    evaluation_order,
    fold_acc,
    greedy_soup,
    step_record,
)

RULES = [(accept, cross_fold) for accept in (">=", ">") for cross_fold in ("min", "avg")]


class AnswerTable:
    """A counting scorer: for each (soup, fold), a fixed random sequence of right and wrong
    answers (few wrong ones, so accuracies tie often), read in full or batch by batch. Each
    fold's images have fixed classes (`classes` of them, unbalanced: class 0 the most), which
    balanced accuracy counts per class."""

    counts = True

    def __init__(self, seed: int, sizes: dict[int, int], batch: int, wrong: list[int], metric: str = "accuracy",
                 classes: int = 3) -> None:
        self.seed, self.sizes, self.batch, self.wrong, self.metric = seed, sizes, batch, wrong, metric
        rng = random.Random(f"labels|{seed}")  # its own stream: the answers are those of any metric
        self.labels = {f: [min(int(rng.expovariate(1.5)), classes - 1) for _ in range(n)] for f, n in sizes.items()}
        self.classes = classes
        self.accepted: list[str] = []
        self.folds: set[int] = set()
        self.images = 0

    def class_sizes(self, fold: int) -> tuple[int, ...]:
        return tuple(self.labels[fold].count(c) for c in range(self.classes))

    def _counts(self, answers: list[bool], fold: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        labels = self.labels[fold][: len(answers)]
        return (tuple(sum(a for a, y in zip(answers, labels) if y == c) for c in range(self.classes)),
                tuple(labels.count(c) for c in range(self.classes)))

    def answers(self, names: frozenset[str], fold: int) -> list[bool]:
        rng = random.Random(f"{self.seed}|{sorted(names)}|{fold}")
        n = self.sizes[fold]
        wrong = min(rng.choice(self.wrong), n)
        out = [True] * (n - wrong) + [False] * wrong
        rng.shuffle(out)
        return out

    def _key(self, candidate: Candidate) -> frozenset[str]:
        return frozenset(self.accepted) | {candidate.name}

    def fold_accs_with(self, candidate: Candidate) -> dict[int, float]:
        out = {}
        for fold in sorted(self.folds | candidate.folds):
            answers = self.answers(self._key(candidate), fold)
            self.images += len(answers)
            out[fold] = ClassCounts(*self._counts(answers, fold)).score(self.metric)
        return out

    def fold_size(self, fold: int) -> int:
        return self.sizes[fold]

    def fold_count_with(self, candidate: Candidate, fold: int, reaches=None) -> FoldCount:
        answers = self.answers(self._key(candidate), fold)
        count = None
        for start in range(0, len(answers), self.batch):
            count = FoldCount(*self._counts(answers[: start + self.batch], fold), self.class_sizes(fold), self.metric)
            if reaches is not None and not reaches(count):
                break
        self.images += count.images
        return count

    def accept(self, candidate: Candidate) -> None:
        self.accepted.append(candidate.name)
        self.folds |= candidate.folds


def assert_same_decisions(early, full) -> None:
    """Early exit decides every step as full evaluation does; accepted steps carry exactly the
    full accuracies, rejected ones exactly those of the folds they finished."""
    assert [(s.candidate, s.accepted) for s in early.steps] == [(s.candidate, s.accepted) for s in full.steps]
    assert [c.name for c in early.ingredients] == [c.name for c in full.ingredients]
    assert early.fold_accs == full.fold_accs and early.score == full.score
    for e, f in zip(early.steps, full.steps):
        assert e.best_before == f.best_before
        if e.accepted:
            assert (e.fold_accs, e.score, e.reason) == (f.fold_accs, f.score, None)
        else:
            assert e.fold_accs == {fold: f.fold_accs[fold] for fold in e.fold_accs}
            assert e.reason and (e.score is None or e.score == f.score)


def random_case(seed: int):
    rng = random.Random(seed)
    k = rng.choice([1, 1, 2, 3, 4])
    sizes = {fold: rng.randint(3, 40) for fold in range(k)}
    cands = [Candidate(f"m{i}", frozenset({rng.randrange(k)}), rng.choice([0.8, 0.85, 0.9, 0.9, 0.95]))
             for i in range(rng.randint(2, 12))]
    return cands, sizes, rng.randint(1, 9), rng.choice([[0, 1, 1, 2, 3], [0, 0, 1], [2, 3, 5, 8], [0, 4, 9, 20]])


@pytest.mark.parametrize("metric", ["accuracy", "balanced_accuracy"])
@pytest.mark.parametrize("accept, cross_fold", RULES)
def test_random_tables_decide_as_full_evaluation(accept, cross_fold, metric):
    """Balanced accuracy too: its bound is per class (every image not yet evaluated counted
    right in its own class), so early exit stays exact on unbalanced classes."""
    totals = {"early": 0, "full": 0, "stopped_in_fold": 0, "rejected": 0, "ties_accepted": 0}
    for seed in range(150):
        cands, sizes, batch, wrong = random_case(seed)
        full_scorer, early_scorer = (AnswerTable(seed, sizes, batch, wrong, metric) for _ in range(2))
        full = greedy_soup(cands, full_scorer, accept, cross_fold, early_exit=False)
        early = greedy_soup(cands, early_scorer, accept, cross_fold)
        assert_same_decisions(early, full)
        assert early_scorer.images <= full_scorer.images and early.images == early_scorer.images
        totals["early"] += early_scorer.images
        totals["full"] += full_scorer.images
        for s in early.steps:
            totals["rejected"] += not s.accepted
            totals["stopped_in_fold"] += any(0 < n < sizes[f] for f, n in s.images.items())
            totals["ties_accepted"] += s.accepted and s.score == s.best_before
    # Not vacuous: rejections, stops inside a fold, accepted ties (with >=) and fewer images.
    assert totals["rejected"] > 100 and totals["stopped_in_fold"] > 20
    assert (totals["ties_accepted"] > 20) if accept == ">=" else totals["ties_accepted"] == 0
    assert totals["early"] < 0.8 * totals["full"]


def test_balanced_accuracy_is_the_mean_recall_over_the_classes_present():
    counts = ClassCounts((9, 1), (9, 3))  # 9 of 9 of the large class, 1 of 3 of the rare one
    assert counts.score("accuracy") == Fraction(10, 12) and counts.score("balanced_accuracy") == Fraction(2, 3)
    assert ClassCounts((5, 0, 1), (5, 0, 2)).score("balanced_accuracy") == Fraction(3, 4)  # class 1 absent: not counted
    assert counts.score("balanced_accuracy").counts == counts  # a score keeps what it came from
    with pytest.raises(ValueError, match="metric must be one of"):
        counts.score("f1")


def test_the_early_exit_bound_is_per_class():
    """4 of 8 images of class 0 right, both images of class 1 wrong: balanced accuracy can at
    most reach (8/8 + 0/2) / 2 whatever the 4 images left are; accuracy at most 8/10."""
    partial = FoldCount((4, 0), (4, 2), (8, 2), "balanced_accuracy")
    assert partial.best_possible == Fraction(1, 2) and not partial.complete
    assert FoldCount((4, 0), (4, 2), (8, 2), "accuracy").best_possible == Fraction(8, 10)
    # The soup "a" misses 4 images of class 0 (accuracy 0.8, balanced 0.875); with "b" it misses
    # the 4 of class 1 instead: accuracy ties at 0.8 (accepted with >=, evaluated in full), balanced
    # accuracy can reach at most 0.75 once the first batch's two class-1 images are wrong.
    labels = [1, 1, 0, 0] + [0] * 14 + [1, 1]

    class Scripted(AnswerTable):
        def answers(self, names, fold):
            if names == {"a"}:
                return [y == 1 or i < 14 for i, y in enumerate(labels)]
            return [y == 0 for y in labels]

    for metric, accepted, images in (("balanced_accuracy", False, 4), ("accuracy", True, 20)):
        table = Scripted(0, {0: 20}, 4, [], metric, classes=2)
        table.labels = {0: labels}
        result = greedy_soup([Candidate("a", {0}, 1.0), Candidate("b", {0}, 0.9)], table, ">=")
        assert float(result.steps[0].score) == (0.875 if metric == "balanced_accuracy" else 0.8)
        step = result.steps[1]
        assert (step.accepted, step.images) == (accepted, {0: images}), metric


def test_ties_are_accepted_with_geq_and_rejected_with_gt():
    # Every soup answers 9 of 10 right on fold 0: each candidate ties with the best.
    class Constant(AnswerTable):
        def answers(self, names, fold):
            return [False] + [True] * 9

    cands = [Candidate(f"m{i}", frozenset({0}), 0.9 - 0.01 * i) for i in range(4)]
    for accept, accepted in ((">=", 4), (">", 1)):
        early = greedy_soup(cands, Constant(0, {0: 10}, 3, []), accept)
        full = greedy_soup(cands, Constant(0, {0: 10}, 3, []), accept, early_exit=False)
        assert_same_decisions(early, full)
        assert len(early.ingredients) == accepted
    # With >, a tie is rejected as soon as the one wrong answer is seen: the first batch of 3.
    strict = greedy_soup(cands, Constant(0, {0: 10}, 3, []), ">")
    assert [s.images for s in strict.steps] == [{0: 10}, {0: 3}, {0: 3}, {0: 3}]
    assert strict.steps[1].reason == "fold 0: at most accuracy 0.9 possible after 3 of 10 images, the best is 0.9"


def test_the_weakest_fold_is_evaluated_first_and_its_stop_is_recorded():
    """The issue's example: the soup scores 1660/2000 on its weakest fold 3; the candidate gives
    380 wrong answers in the first 512 images there, so at most 1620 remain possible."""

    class Scripted(AnswerTable):
        def answers(self, names, fold):
            n = self.sizes[fold]
            if names == {"a"}:  # the first soup: fold 3 is its weakest (1660/2000)
                return [True] * 1660 + [False] * 340 if fold == 3 else [True] * n
            return [False] * 380 + [True] * (n - 380) if fold == 3 else [True] * n

    scorer = Scripted(0, {3: 2000, 5: 100}, 512, [])
    a, b = Candidate("a", {3}, 0.95), Candidate("b", {5}, 0.9)  # b's own 0.9 on fold 5: after fold 3's 0.83
    result = greedy_soup([a, b], scorer)
    step = result.steps[1]
    assert step.images == {3: 512} and not step.accepted and step.fold_accs == {} and step.score is None
    assert step.reason == "fold 3: at most accuracy 0.81 possible after 512 of 2000 images, the best is 0.83"
    record = step_record(step)
    assert json.loads(json.dumps(record))["images"] == {"3": 512}
    assert scorer.images == 2000 + 512  # fold 5 (new to the soup) was never evaluated


def test_exact_fractions_and_the_evaluation_order():
    # Exact fractions decide: 0.9 + 0.94 is 2 * 0.92 (in floats it falls just below).
    assert (0.9 + 94 / 100) / 2 < 0.92 and (fold_acc(90, 100) + fold_acc(94, 100)) / 2 == fold_acc(92, 100)
    # The soup's folds at its accuracies, a new fold (3) at the candidate's own val accuracy.
    assert evaluation_order({0: 0.9, 1: 0.8, 2: 0.8}, Candidate("c", {3}, 0.95), {3, 2, 1, 0}) == [1, 2, 0, 3]
    assert evaluation_order({0: 0.9, 1: 0.8, 2: 0.8}, Candidate("c", {3}, 0.85), {3, 2, 1, 0}) == [1, 2, 3, 0]
    assert evaluation_order({0: 1.0, 1: 1.0}, Candidate("c", {2}, 1.0), {0, 1, 2}) == [0, 1, 2]


def test_a_scorer_without_counts_is_evaluated_in_full():
    class Plain(AnswerTable):
        counts = False

    cands, sizes, batch, wrong = random_case(3)
    result = greedy_soup(cands, Plain(3, sizes, batch, wrong))
    assert all(s.images == {} and s.score is not None for s in result.steps)


# ------------------------------------------------------------------------------------------
# The real Evaluator on tiny real models
# ------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models evaluated batch by batch: one torch thread, as a soup job of the workflow has
    (two threads on a busy 2-core machine wait on each other for most of each 4-image batch)."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits_models():
    """Real digits images (classes 0-4, 3 folds of val images), and 10 digits CNNs around one
    random start whose heads are shifted towards a few classes, so their accuracies differ."""
    return _digits_models(fit=False)


@pytest.fixture(scope="module")
def fitted_digits_models():
    """As digits_models around a start fitted for 40 steps (random CNNs answer one class each,
    so their balanced accuracies are all 1/5): smaller weight noise, so the models keep telling
    the classes apart and their balanced accuracies differ."""
    return _digits_models(fit=True)


def _digits_models(fit: bool):
    torch = pytest.importorskip("torch")
    import numpy as np
    from sklearn.datasets import load_digits

    from foldsoup.models.build import build_classifier

    x, y = load_digits(return_X_y=True)
    keep = y < 5
    images = (x[keep].reshape(-1, 1, 8, 8) * 16).clip(0, 255).astype(np.uint8)[:150]
    labels = y[keep].astype(np.int64)[:150]
    fold_of = np.random.default_rng(0).permutation(np.arange(150) % 3)
    torch.manual_seed(0)
    model = build_classifier({"name": "digits_cnn", "width": 8}, 5)
    if fit:
        opt = torch.optim.Adam(model.parameters(), 1e-2)
        x = (torch.from_numpy(images).float() / 255 - 0.5) / 0.5
        for _ in range(40):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), torch.from_numpy(labels)).backward()
            opt.step()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    states = {}
    for i in range(10):
        state = {k: v + (0.05 if fit else 0.3) * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                 for k, v in base.items()}
        state["head.bias"] = state["head.bias"] + 2.0 * torch.randn(5, generator=gen)
        states[f"m{i}/fold{i % 3}"] = state
    return model, images, labels, fold_of, states


def _evaluator(digits_models, batch: int, metric: str = "accuracy"):
    import torch

    from foldsoup.soups.evaluation import Evaluator
    from foldsoup.training.loop import ImageSpec

    model, images, labels, fold_of, _ = digits_models
    return Evaluator(model, images, labels, fold_of, images[:8], labels[:8], ImageSpec(8, [0.5], [0.5], False), batch,
                     "fp32", torch.device("cpu"), metric=metric)


@pytest.mark.slow
@pytest.mark.parametrize("accept, cross_fold, metric", [*((a, c, "accuracy") for a, c in RULES),
                                                         (">=", "min", "balanced_accuracy"), (">", "avg", "balanced_accuracy")])
def test_real_evaluator_decides_as_full_evaluation(request, accept, cross_fold, metric):
    from foldsoup.soups.evaluation import greedy_scorer

    digits_models = request.getfixturevalue("digits_models" if metric == "accuracy" else "fitted_digits_models")
    states = digits_models[4]
    ev = _evaluator(digits_models, batch=4, metric=metric)
    own = {n: ev.fold_accs(s, {int(n[-1])})[int(n[-1])] for n in states for s in [states[n]]}
    assert len(set(own.values())) > 3  # the models really differ
    images = {"early": 0, "full": 0}
    contested = 0
    for seed in range(4):
        # Random subsets and ties in the sort order (val_acc rounded), as different candidate lists.
        rng = random.Random(seed)
        names = rng.sample(sorted(states), rng.randint(4, 10))
        cands = [Candidate(n, {int(n[-1])}, round(own[n], 1)) for n in names]
        results = {}
        for mode in ("full", "early"):
            before = ev.images_evaluated["val"]
            scorer = greedy_scorer(ev, lambda c: states[c.name])
            results[mode] = greedy_soup(cands, scorer, accept, cross_fold, early_exit=mode == "early")
            images[mode] += ev.images_evaluated["val"] - before
        assert_same_decisions(results["early"], results["full"])
        contested += any(s.accepted for s in results["full"].steps[1:]) and not all(s.accepted for s in results["full"].steps)
    assert contested >= 2
    assert images["early"] < images["full"]


def test_evaluator_counts_match_its_accuracies(digits_models):
    """count() in full is fold_accs(); stopped early, it has evaluated whole batches only."""
    ev = _evaluator(digits_models, batch=4)
    state = digits_models[4]["m0/fold0"]
    accs = ev.fold_accs(state, [0, 1, 2])
    for fold in (0, 1, 2):
        full = ev.count(state, fold)
        assert full.complete and full.score == accs[fold] and sum(full.total) == ev.fold_size(fold)
        assert full.total == ev.class_sizes(fold) and accs[fold].counts.correct == full.correct
        # Asks for one more correct answer than it gets: stops once that is out of reach.
        stopped = ev.count(state, fold, lambda c: sum(c.correct) + sum(c.total) - c.images > sum(full.correct))
        assert stopped.images % 4 == 0 or stopped.complete
        assert sum(stopped.correct) <= sum(full.correct) and stopped.images <= full.images


def test_evaluator_scores_the_weights_each_call_names(digits_models, monkeypatch):
    """Interleaved calls on two models give each model's own answers (no "whatever was loaded
    last"); a state dict already in the model is not copied in again."""
    import foldsoup.soups.evaluation as evaluation

    states = digits_models[4]
    a, b = states["m0/fold0"], states["m1/fold1"]
    alone = {name: (_evaluator(digits_models, 4).test_acc(s), _evaluator(digits_models, 4).fold_accs(s, [0, 1, 2]))
             for name, s in (("a", a), ("b", b))}
    assert alone["a"] != alone["b"]
    ev = _evaluator(digits_models, 4)
    loads = []
    real = evaluation.load_full
    monkeypatch.setattr(evaluation, "load_full", lambda *args: loads.append(args[1]) or real(*args))
    assert ev.fold_accs(a, [0, 1, 2]) == alone["a"][1]  # one load for three folds
    assert ev.test_acc(b) == alone["b"][0]
    assert ev.test_acc(a) == alone["a"][0]
    assert ev.fold_accs(b, [0, 1, 2]) == alone["b"][1]
    assert [s is a for s in loads] == [True, False, True, False]


# ------------------------------------------------------------------------------------------
# The smoke run's recorded steps
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smoke_run_steps_are_those_of_full_evaluation(smoke_run):
    """Every greedy soup of a finished smoke run (recorded with early exit) recomputed through
    the pipeline's own scorer: with early exit it gives the recorded steps exactly, in full the
    same decisions with every accuracy the early steps recorded, and with early exit at 4 images
    per batch (the smoke run's folds fit in one batch of 1,024) the same decisions again."""
    from conftest import ROOT, SMOKE

    from foldsoup import steps as pl
    from foldsoup.soups.evaluation import greedy_scorer
    from foldsoup.config.schema import validate
    from foldsoup.config.yaml_files import deep_update, load_yaml_files
    from foldsoup.data.folds import HOLDOUT
    from foldsoup.soups.select import Candidate as C

    r = smoke_run.results
    cfg = validate(deep_update(load_yaml_files(ROOT / "config.yaml", SMOKE), {"results": str(r)}), check_paths=False)
    data, folds = str(r / "prepared" / "dataset.safetensors"), str(r / "folds.csv")
    ctx = pl.Context(cfg, data, folds)
    ev = ctx.evaluator()
    small = pl.Context({**cfg, "finetune": {**cfg["finetune"], "eval_batch_size": 4}}, data, folds).evaluator()
    soups = cfg["soups"]
    records = {p.stem: json.loads(p.read_text()) for p in (r / "soups").glob("*.json")}
    greedy = [m for m, rec in records.items() if "steps" in rec and m.startswith(("greedy", "gsgs"))]
    assert sorted(greedy) == ["greedy_fold0", "greedy_fold1", "greedy_soup", "greedy_soup_holdout", "gsgs"]
    saved = 0
    for method in greedy:
        rec = records[method]
        if method == "gsgs":  # as steps.gsgs: the per-fold soups, each one candidate
            paths = {f"greedy_fold{i}": str(r / "soups" / f"greedy_fold{i}.safetensors") for i in range(2)}
            cands = [C(n, records[n]["folds"], records[n]["val_acc"]) for n in paths]
        else:
            metrics = [json.loads(p.read_text()) for p in sorted((r / "models").glob("*/fold*/metrics.json"))]
            metrics = [m for m in metrics if not m["diverged"]]
            if method.startswith("greedy_fold"):
                metrics = [m for m in metrics if m["fold"] == int(method[-1])]
            paths = {f"{m['hp']}/fold{m['fold']}": str(r / "models" / m["hp"] / f"fold{m['fold']}" / "model.safetensors")
                     for m in metrics}
            cands = [C(f"{m['hp']}/fold{m['fold']}", {HOLDOUT} if method.endswith("holdout") else {m["fold"]},
                       m["holdout_acc"] if method.endswith("holdout") else m["val_acc"]) for m in metrics]
        # The workflow's candidate order for ties: recorded candidates in the recorded order.
        order = {s["candidate"]: i for i, s in enumerate(rec["steps"])}
        cands.sort(key=lambda c: order[c.name])
        store = ctx.ingredients(paths.values())
        modes = {"early": (ev, True), "full": (ev, False), "early_batch4": (small, True)}
        run = {mode: greedy_soup(cands, greedy_scorer(e, lambda c: store.get(paths[c.name])), soups["greedy_accept"],
                                 soups["cross_fold_val"], early_exit=early) for mode, (e, early) in modes.items()}
        assert_same_decisions(run["early"], run["full"])
        assert_same_decisions(run["early_batch4"], run["full"])
        assert [step_record(s) for s in run["early"].steps] == rec["steps"], method
        assert rec["ingredients"] == [c.name for c in run["full"].ingredients]
        saved += run["full"].images - run["early_batch4"].images
        assert all(n == 1 for n in store.reads.values())
    assert saved > 0


@pytest.mark.slow
def test_turning_early_exit_off_reruns_the_greedy_soups_only(smoke_run, tmp_path):
    """soups.early_exit changes what soups/*.json record (not the soups): the soup jobs rerun,
    the budget analysis (which records no steps) and the models do not."""
    from test_rerun_scope import dry_run

    stats = dry_run(smoke_run, tmp_path, {"soups": {"early_exit": False}})
    assert stats["greedy_fold"] == 2 and stats["soup_all"] == 3 and stats["gsgs"] == 1
    assert not {"finetune", "uniform_subsets", "budget"} & set(stats)
