"""One val accuracy, exact (issue 19.2): accuracies are fractions of recorded counts, so every
selection compares the same values wherever it reads them (models.csv, metrics.json, soup
records), and a model gets the same counts scored alone or as a one-ingredient soup."""

from __future__ import annotations

import json
from fractions import Fraction

import pandas as pd
import pytest

from foldsoup.soups import methods, select
from foldsoup.soups.select import accuracy_of, fold_acc
from foldsoup.steps.soups import _candidates, models_table, record_val, soup_record

try:
    from test_early_exit import digits_models  # noqa: F401 (a fixture: real digits CNNs)
except ImportError:
    from tests.test_early_exit import digits_models  # noqa: F401


def _metrics(hp: str, fold: int, correct: int, total: int, other: tuple[int, int]) -> dict:
    """A fine-tune's metrics.json as steps.train writes it (two folds)."""
    counts = {fold: (correct, total), 1 - fold: other}
    return {"hp": hp, "lr": 0.1, "aug": "none", "mixup": False, "fold": fold, "diverged": False,
            "val_acc": float(fold_acc(correct, total)), "val_correct": correct, "val_total": total,
            "test_acc": 0.5, "test_correct": 5, "test_total": 10,
            "fold_accs": {str(i): float(fold_acc(*c)) for i, c in sorted(counts.items())},
            "fold_counts": {str(i): list(c) for i, c in sorted(counts.items())}}


def test_best_on_val_from_models_csv_orders_as_the_greedy_soups_do(tmp_path):
    """1001/2001 (first in grid order) and 1000/1999 are both 0.50025 to six digits: models.csv's
    %.6g once tied them (best_on_val took the first) while the greedy soups, reading metrics.json,
    sorted the second first. From the counts both agree: 1000/1999 is higher."""
    assert f"{1001 / 2001:.6g}" == f"{1000 / 1999:.6g}" and Fraction(1000, 1999) > Fraction(1001, 2001)
    records = [_metrics("lr0.1_none_nomix", 0, 1001, 2001, (1000, 1999)),
               _metrics("lr0.1_none_nomix", 1, 1000, 1999, (1001, 2001))]
    paths = []
    for r in records:
        path = tmp_path / r["hp"] / f"fold{r['fold']}" / "metrics.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))
        paths.append(str(path))
    models_table(paths, str(tmp_path / "models.csv"))
    table = pd.read_csv(tmp_path / "models.csv")
    assert list(table.val_correct) == [1001, 1000] and list(table.val_total) == [2001, 1999]
    from_csv = methods.best_on_val([methods.ModelResult.from_record(r) for r in table.to_dict("records")])
    from_json = methods.best_on_val([methods.ModelResult.from_record(r) for r in records])
    greedy_order = select.sort_candidates(_candidates(records, paths)[0])
    assert from_csv.name == from_json.name == greedy_order[0].name == "lr0.1_none_nomix/fold1"
    assert from_csv.val_acc == Fraction(1000, 1999)  # exact, not the rounded cell


def test_equal_fractions_tie_whatever_their_float_path():
    """2/6 and 1/3 are one accuracy: they tie (and the tie rule keeps the first), and AvgAcc of
    1/3 and 2/3 is exactly 1/2, where floats need not be."""
    a, b = accuracy_of({"val_correct": 2, "val_total": 6}, "val_acc"), accuracy_of({"val_correct": 1, "val_total": 3}, "val_acc")
    assert a == b
    cands = [select.Candidate("x/fold0", {0}, a), select.Candidate("y/fold1", {1}, b)]
    assert select.best_on_val(cands).name == "x/fold0"
    assert select.avg_acc({0: fold_acc(1, 3), 1: fold_acc(2, 3)}) == Fraction(1, 2)
    assert select.bgss({0: fold_acc(1, 3), 1: fold_acc(2, 6)}) == 0


def test_soup_records_keep_the_counts_and_readers_compare_them():
    rec = soup_record("greedy_fold1", ["a/fold1"], {}, "min", {1: select.ClassCounts((990, 10), (1000, 999))})
    assert rec["fold_counts"] == {"1": [1000, 1999]} and (rec["val_correct"], rec["val_total"]) == (1000, 1999)
    assert (rec["val_class_correct"], rec["val_class_total"]) == ([990, 10], [1000, 999])
    assert rec["val_acc"] == 1000 / 1999 and record_val(json.loads(json.dumps(rec))) == Fraction(1000, 1999)
    balanced = (Fraction(990, 1000) + Fraction(10, 999)) / 2
    assert rec["val_bacc"] == float(balanced) and record_val(json.loads(json.dumps(rec)), "balanced_accuracy") == balanced
    avg = soup_record("greedy_soup", ["a/fold0", "b/fold1"], {}, "avg",
                      {0: select.ClassCounts((1, 0), (1, 2)), 1: select.ClassCounts((2,), (3,))})
    assert record_val(avg) == Fraction(1, 2) and avg["val_metric"] == "avg"
    assert record_val(avg, "balanced_accuracy") == (Fraction(1, 2) + Fraction(2, 3)) / 2


def test_old_metrics_without_counts_are_read_as_their_floats():
    """Metrics from before the counts: their floats (not exact), as before."""
    old = {"hp": "a", "fold": 0, "val_acc": 0.75, "test_acc": 0.5, "diverged": False}
    m = methods.ModelResult.from_record(old)
    assert (m.val_acc, m.test_acc, m.holdout_acc, m.counts) == (0.75, 0.5, None, {})
    assert record_val({"val_acc": 0.75, "val_metric": "own"}) == 0.75


@pytest.mark.slow
def test_a_model_alone_and_as_a_one_ingredient_soup_gets_the_same_counts(digits_models):
    """The fine-tune's scoring (steps.train: training.loop.fold_logits + fold_counts) and the
    soups' (Evaluator, batch by batch per fold) give the same counts on every fold and the
    holdout, with an eval batch that does not divide the folds."""
    import numpy as np
    import torch

    from foldsoup.data.folds import HOLDOUT
    from foldsoup.soups.average import average
    from foldsoup.soups.evaluation import Evaluator, class_counts
    from foldsoup.training.loop import ImageSpec, fold_logits

    model, images, labels, fold_of, states = digits_models
    fold_of = fold_of.copy()
    fold_of[:20] = HOLDOUT
    spec, batch = ImageSpec(8, [0.5], [0.5], False), 7
    ev = Evaluator(model, images, labels, fold_of, images[:8], labels[:8], spec, batch, "fp32", torch.device("cpu"))
    folds = [*range(3), HOLDOUT]
    for name, state in list(states.items())[:3]:
        model.load_state_dict(state)
        pool = fold_logits(model, torch.from_numpy(images), torch.from_numpy(fold_of), spec, batch)
        alone = {f: class_counts(pool[fold_of == f], torch.from_numpy(labels[fold_of == f]), 5) for f in folds}
        soup = ev.counts_of(ev.fold_accs(average([state]), folds))
        assert alone == soup, name
        assert all(c.images == int((fold_of == f).sum()) for f, c in alone.items()) and np.isin(fold_of, folds).all()
