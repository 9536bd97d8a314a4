"""Ensembles and paired bootstrap intervals, on cases with known answers."""

import numpy as np
import pytest

from foldsoup.analysis.uncertainty import ensemble_logits, ensemble_of_groups, fold_accuracies, paired_bootstrap


def test_ensemble_is_the_mean_of_logits_and_can_beat_its_members():
    # Three images, two classes; each member is wrong on a different image, the mean on none.
    a = np.array([[2.0, 0.0], [-1.0, 0.0], [0.0, 3.0]])  # right, wrong, right (labels 0, 0, 1)
    b = np.array([[-1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])  # wrong, right, right
    labels = np.array([0, 0, 1])
    mean = ensemble_logits([a, b])
    np.testing.assert_allclose(mean, (a + b) / 2)
    assert (a.argmax(1) == labels).mean() == pytest.approx(2 / 3)
    assert (mean.argmax(1) == labels).mean() == 1.0
    with pytest.raises(ValueError, match="at least one"):
        ensemble_logits([])
    with pytest.raises(ValueError, match="shape"):
        ensemble_logits([a, a[:2]])


def test_ensemble_of_groups_weighs_each_group_the_same():
    # GSGS of two per-fold soups: fold 0's of one model, fold 1's of three. One image, label 0.
    a = np.array([[2.0, 0.0]])
    b, c, d = np.array([[0.0, 1.0]]), np.array([[0.0, 2.0]]), np.array([[0.0, 0.0]])
    # Per soup: [2, 0] and [0, 1]; over soups: [1, 0.5] (right). Per model: [0.5, 0.75] (wrong).
    np.testing.assert_array_equal(ensemble_of_groups([[a], [b, c, d]]), [[1.0, 0.5]])
    np.testing.assert_array_equal(ensemble_logits([a, b, c, d]), [[0.5, 0.75]])
    # One group is the plain ensemble, bit for bit.
    np.testing.assert_array_equal(ensemble_of_groups([[a, b, c]]), ensemble_logits([a, b, c]))


def test_fold_accuracies_by_fold():
    logits = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=float)
    labels = np.array([0, 1, 1, 1])
    fold_of = np.array([0, 0, 1, 1])
    assert fold_accuracies(logits, labels, fold_of, [0, 1], 2) == {0: 0.5, 1: 1.0}
    # Balanced: fold 0 has one image of each class, one right; fold 1 only class 1, all right.
    assert fold_accuracies(logits, labels, fold_of, [0, 1], 2, "balanced_accuracy") == {0: 0.5, 1: 1.0}


def test_paired_bootstrap_known_answers():
    rng = np.random.default_rng(0)
    base = rng.random(400) < 0.8
    better = base.copy()
    better[np.flatnonzero(~base)[:40]] = True  # right on 40 more images, never worse
    same = base.copy()
    rows = {r["method"]: r for r in paired_bootstrap({"ref": base, "same": same, "better": better}, "ref", 500, seed=1)}
    assert rows["ref"]["test_score"] == pytest.approx(base.mean())
    assert rows["ref"]["test_ci_low"] < base.mean() < rows["ref"]["test_ci_high"]
    # Identical predictions: the paired difference is exactly zero in every resample.
    assert rows["same"]["diff_vs_ref"] == 0 and rows["same"]["diff_ci_low"] == 0 and rows["same"]["diff_ci_high"] == 0
    assert not rows["same"]["diff_significant"]
    # Never worse and 10 points better: the whole interval is above zero.
    assert rows["better"]["diff_vs_ref"] == pytest.approx(0.1)
    assert 0 < rows["better"]["diff_ci_low"] <= 0.1 <= rows["better"]["diff_ci_high"]
    assert rows["better"]["diff_significant"]


def test_a_two_image_difference_on_a_small_test_set_is_not_a_win():
    rng = np.random.default_rng(3)
    ref = rng.random(200) < 0.9
    other = ref.copy()
    flip_up = np.flatnonzero(~ref)[:3]
    flip_down = np.flatnonzero(ref)[:1]
    other[flip_up] = True
    other[flip_down] = False  # net +2 images = +1 point
    row = next(r for r in paired_bootstrap({"ref": ref, "other": other}, "ref", 2000, seed=0) if r["method"] == "other")
    assert row["diff_vs_ref"] == pytest.approx(0.01)
    assert row["diff_ci_low"] <= 0 < row["diff_ci_high"]
    assert not row["diff_significant"]


def test_bootstrap_is_reproducible_for_a_seed():
    x = np.random.default_rng(0).random(100) < 0.7
    y = np.random.default_rng(1).random(100) < 0.7
    assert paired_bootstrap({"a": x, "b": y}, "a", 300, seed=5) == paired_bootstrap({"a": x, "b": y}, "a", 300, seed=5)
    with pytest.raises(ValueError, match="reference"):
        paired_bootstrap({"a": x}, "missing")
