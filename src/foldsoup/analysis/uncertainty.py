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


def class_counts(logits: np.ndarray, labels: np.ndarray, num_classes: int):
    """Per-class correct answers and images of `logits` on `labels` (`soups.select.ClassCounts`)."""
    from foldsoup.soups.select import ClassCounts

    labels = np.asarray(labels, dtype=np.int64)
    right = labels[np.asarray(logits).argmax(1) == labels]
    return ClassCounts(tuple(np.bincount(right, minlength=num_classes).tolist()),
                       tuple(np.bincount(labels, minlength=num_classes).tolist()))


def fold_counts(pool_logits: np.ndarray, pool_labels: np.ndarray, fold_of: np.ndarray, folds, num_classes: int) -> dict:
    """fold -> per-class counts (`class_counts`) of logits on the pool."""
    return {int(i): class_counts(pool_logits[fold_of == i], pool_labels[fold_of == i], num_classes) for i in sorted(folds)}


def fold_accuracies(pool_logits: np.ndarray, pool_labels: np.ndarray, fold_of: np.ndarray, folds, num_classes: int,
                    metric: str = "accuracy") -> dict:
    """fold -> exact score under `metric` (a `soups.select.Score` of `fold_counts`)."""
    return {i: c.score(metric) for i, c in fold_counts(pool_logits, pool_labels, fold_of, folds, num_classes).items()}


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
    chunk: int = 100, labels: np.ndarray | None = None,
) -> list[dict]:
    """Percentile intervals of every method's test score and of its difference to `reference`,
    all computed on the same resamples of the test set (paired), so shared easy and hard
    images cancel in the differences.

    `correct[method]` is a boolean vector over the test images (True where the method is right).
    The score is accuracy, or with `labels` (the test images' classes) balanced accuracy: the
    mean recall over the classes present in each resample.
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
        if labels is None:
            accs[:, start:stop] = matrix[:, idx].mean(axis=2)
        else:
            for r, draw in enumerate(idx):
                accs[:, start + r] = _balanced(matrix[:, draw], np.asarray(labels)[draw])
    full = matrix.mean(axis=1) if labels is None else _balanced(matrix, np.asarray(labels))
    diffs = accs - accs[names.index(reference)]
    lo, hi = (1 - level) / 2, 1 - (1 - level) / 2
    rows = []
    for i, name in enumerate(names):
        diff = float(full[i] - full[names.index(reference)])
        d_lo, d_hi = np.quantile(diffs[i], [lo, hi])
        rows.append({
            "method": name,
            "test_score": float(full[i]),
            "test_ci_low": float(np.quantile(accs[i], lo)),
            "test_ci_high": float(np.quantile(accs[i], hi)),
            f"diff_vs_{reference}": diff,
            "diff_ci_low": float(d_lo),
            "diff_ci_high": float(d_hi),
            # A difference counts only when its whole interval is on one side of zero.
            "diff_significant": bool(d_lo > 0 or d_hi < 0),
        })
    return rows


def _balanced(matrix: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Balanced accuracy of each row of `matrix` (right answers, [methods, images]) on `labels`."""
    n_classes = int(labels.max()) + 1
    totals = np.bincount(labels, minlength=n_classes)
    flat = (np.arange(len(matrix))[:, None] * n_classes + labels[None, :]).ravel()
    right = np.bincount(flat, weights=matrix.ravel(), minlength=len(matrix) * n_classes).reshape(len(matrix), n_classes)
    present = totals > 0
    return (right[:, present] / totals[present]).mean(axis=1)

