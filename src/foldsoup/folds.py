"""Stratified k-fold split of the training pool (Alg. 2), saved as folds.csv."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .data import DataError


def make_folds(labels: np.ndarray, k: int, seed: int, classes: list[str] | None = None) -> np.ndarray:
    """Fold number (0..k-1) of every pool image; stratified, disjoint, covering the pool."""
    counts = np.bincount(labels, minlength=len(classes) if classes else 0)
    if k < 2:
        raise DataError(f"folds.k = {k}: at least 2 folds are needed")
    smallest = int(np.argmin(counts))
    if counts[smallest] < k:
        name = classes[smallest] if classes else str(smallest)
        raise DataError(
            f"folds.k = {k} is larger than class {name!r}, which has only {counts[smallest]} pool image(s); "
            f"every fold needs at least one image of every class (allowed: k <= {counts[smallest]}, "
            f"or more images of that class)"
        )
    from sklearn.model_selection import StratifiedKFold

    fold_of = np.empty(len(labels), dtype=np.int64)
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    for fold, (_, val_idx) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        fold_of[val_idx] = fold
    return fold_of


def write_folds(path: str | Path, labels: np.ndarray, fold_of: np.ndarray) -> None:
    from .weights import atomic_write_text

    rows = "".join(f"{i},{int(y)},{int(f)}\n" for i, (y, f) in enumerate(zip(labels, fold_of)))
    atomic_write_text(path, "index,label,fold\n" + rows)


def read_folds(path: str | Path, pool_labels: np.ndarray | None = None) -> np.ndarray:
    """Fold number per pool index; checks it matches the prepared pool when labels are given."""
    try:
        table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable fold table ({exc}); rerun the `folds` rule") from exc
    if table.ndim != 2 or table.shape[1] != 3 or not np.array_equal(table[:, 0], np.arange(len(table))):
        raise DataError(f"{path}: expected columns index,label,fold with index 0..N-1")
    if pool_labels is not None and not np.array_equal(table[:, 1], pool_labels):
        raise DataError(f"{path}: labels do not match the prepared dataset; rerun the `folds` rule")
    fold_of = table[:, 2]
    if len(fold_of) and (fold_of.min() < 0 or np.setdiff1d(np.arange(fold_of.max() + 1), fold_of).size):
        raise DataError(f"{path}: fold numbers must be 0..k-1, each used, got {sorted(set(fold_of.tolist()))}")
    return fold_of
