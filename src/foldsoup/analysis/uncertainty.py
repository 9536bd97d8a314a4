"""Beyond a single number per method: logit ensembles of the same ingredients (what a single
model costs) and paired bootstrap intervals on test accuracy (is a difference of a few test
images a win?). numpy only: everything here works from saved logits."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def ensemble_logits(logits: Sequence[np.ndarray]) -> np.ndarray:
    """Mean of the members' logits (accumulated in float64)."""
    if not logits:
        raise ValueError("an ensemble needs at least one member")
    total = np.zeros(logits[0].shape, dtype=np.float64)
    for member in logits:
        if member.shape != total.shape:
            raise ValueError(f"ensemble members disagree in shape: {member.shape} vs {total.shape}")
        total += member
    return total / len(logits)


def ensemble_of_groups(groups: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    """Mean over groups of each group's mean logits: every group weighs the same whatever its
    size, as every per-fold soup does in GSGS (the logit ensemble of GSGS's per-fold soups)."""
    return ensemble_logits([ensemble_logits(group) for group in groups])


def fold_counts(pool_logits: np.ndarray, pool_labels: np.ndarray, fold_of: np.ndarray, folds) -> dict[int, tuple[int, int]]:
    """fold -> (correct, total) of logits on the pool."""
    correct = pool_logits.argmax(1) == pool_labels
    return {int(i): (int(correct[fold_of == i].sum()), int((fold_of == i).sum())) for i in sorted(folds)}


def fold_accuracies(pool_logits: np.ndarray, pool_labels: np.ndarray, fold_of: np.ndarray, folds) -> dict:
    """fold -> exact accuracy (`soups.select.fold_acc` of `fold_counts`)."""
    from foldsoup.soups.select import fold_acc

    return {i: fold_acc(*c) for i, c in fold_counts(pool_logits, pool_labels, fold_of, folds).items()}


def correct_count(test_logits: np.ndarray, test_labels: np.ndarray) -> tuple[int, int]:
    """(correct, total) on the test set."""
    return int((test_logits.argmax(1) == test_labels).sum()), len(test_labels)


def confusion_matrix(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 [C, C]: row = true class, column = predicted class (argmax of the logits)."""
    predicted = np.asarray(logits).argmax(1)
    index = np.asarray(labels, dtype=np.int64) * num_classes + predicted
    return np.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_rows(method: str, matrix: np.ndarray, classes: Sequence[str]) -> list[dict]:
    """A method's rows of tables/per_class.csv: per true class its test images, correct answers,
    recall (NaN for a class without test images) and where its images went (predicted_<class>)."""
    rows = []
    for i, name in enumerate(classes):
        images = int(matrix[i].sum())
        rows.append({"method": method, "class": name, "images": images, "correct": int(matrix[i, i]),
                     "recall": matrix[i, i] / images if images else float("nan"),
                     **{f"predicted_{other}": int(matrix[i, j]) for j, other in enumerate(classes)}})
    return rows


def paired_bootstrap(
    correct: Mapping[str, np.ndarray], reference: str, n_resamples: int = 1000, seed: int = 0, level: float = 0.95,
    chunk: int = 100,
) -> list[dict]:
    """Percentile intervals of every method's test accuracy and of its difference to `reference`,
    all computed on the same resamples of the test set (paired), so shared easy and hard
    images cancel in the differences.

    `correct[method]` is a boolean vector over the test images (True where the method is right).
    """
    if reference not in correct:
        raise ValueError(f"reference method {reference!r} is not among {sorted(correct)}")
    names = list(correct)
    matrix = np.stack([np.asarray(correct[n], dtype=np.float64) for n in names])  # [methods, images]
    n_images = matrix.shape[1]
    rng = np.random.default_rng(seed)
    accs = np.empty((len(names), n_resamples))
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        idx = rng.integers(0, n_images, size=(stop - start, n_images))
        accs[:, start:stop] = matrix[:, idx].mean(axis=2)
    diffs = accs - accs[names.index(reference)]
    lo, hi = (1 - level) / 2, 1 - (1 - level) / 2
    rows = []
    for i, name in enumerate(names):
        diff = float(matrix[i].mean() - matrix[names.index(reference)].mean())
        d_lo, d_hi = np.quantile(diffs[i], [lo, hi])
        rows.append({
            "method": name,
            "test_acc": float(matrix[i].mean()),
            "test_ci_low": float(np.quantile(accs[i], lo)),
            "test_ci_high": float(np.quantile(accs[i], hi)),
            f"diff_vs_{reference}": diff,
            "diff_ci_low": float(d_lo),
            "diff_ci_high": float(d_hi),
            # A difference counts only when its whole interval is on one side of zero.
            "diff_significant": bool(d_lo > 0 or d_hi < 0),
        })
    return rows
