"""Stratified k-fold split of the training pool (Alg. 2), saved as folds.csv.

With an outer holdout (folds.holdout_fraction > 0) a stratified share of the pool is set aside
first and marked fold HOLDOUT (-1): no model trains on it and no fold validates on it, so it
scores cross-fold soups without the leakage of MinAcc/AvgAcc (the paper's first limitation:
fold i's val images are training images of every other fold's models).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from foldsoup.errors import DataError

FOLDS_HEADER = "index,label,fold"
HOLDOUT = -1  # the fold number of outer-holdout images in folds.csv and in fold_of arrays


def make_folds(labels: np.ndarray, k: int, seed: int, classes: list[str] | None = None,
               holdout_fraction: float = 0.0) -> np.ndarray:
    """Fold number (0..k-1, or HOLDOUT) of every pool image; stratified, disjoint, covering the pool."""
    if k < 2:
        raise DataError(f"folds.k = {k}: at least 2 folds are needed")
    fold_of = np.full(len(labels), HOLDOUT, dtype=np.int64)
    rest = np.arange(len(labels))
    if holdout_fraction > 0:
        rest = _split_holdout(labels, holdout_fraction, seed, classes)
    fold_of[rest] = _kfold(labels[rest], k, seed, classes, len(classes) if classes else int(labels.max()) + 1,
                           " after the outer holdout" if holdout_fraction > 0 else "")
    return fold_of


def _split_holdout(labels: np.ndarray, fraction: float, seed: int, classes: list[str] | None) -> np.ndarray:
    """Indices left for the k folds once a stratified `fraction` of every class is held out."""
    from sklearn.model_selection import train_test_split

    counts = np.bincount(labels, minlength=len(classes) if classes else 0)
    smallest = int(np.argmin(counts))
    if counts[smallest] < 2:
        name = classes[smallest] if classes else str(smallest)
        raise DataError(f"folds.holdout_fraction = {fraction}: class {name!r} has only {counts[smallest]} pool image(s); "
                        f"an outer holdout needs at least one image of every class besides the folds' (allowed: 0)")
    n_holdout = max(int(round(fraction * len(labels))), len(counts))  # at least one image per class
    rest, _ = train_test_split(np.arange(len(labels)), test_size=n_holdout, stratify=labels, random_state=seed)
    return np.sort(rest)


def _kfold(labels: np.ndarray, k: int, seed: int, classes: list[str] | None, num_classes: int, where: str) -> np.ndarray:
    counts = np.bincount(labels, minlength=num_classes)
    smallest = int(np.argmin(counts))
    if counts[smallest] < k:
        name = classes[smallest] if classes else str(smallest)
        raise DataError(
            f"folds.k = {k} is larger than class {name!r}, which has only {counts[smallest]} pool image(s){where}; "
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
    from foldsoup.storage.weights import atomic_write_text

    rows = "".join(f"{i},{int(y)},{int(f)}\n" for i, (y, f) in enumerate(zip(labels, fold_of)))
    atomic_write_text(path, FOLDS_HEADER + "\n" + rows)


def read_folds(path: str | Path, pool_labels: np.ndarray | None = None) -> np.ndarray:
    """Fold number per pool index; checks it matches the prepared pool when labels are given."""
    _check_fold_table_file(Path(path))
    try:
        table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable fold table ({exc}); rerun the `folds` rule") from exc
    if table.ndim != 2 or table.shape[1] != 3 or not np.array_equal(table[:, 0], np.arange(len(table))):
        raise DataError(f"{path}: expected columns index,label,fold with index 0..N-1")
    if pool_labels is not None and not np.array_equal(table[:, 1], pool_labels):
        raise DataError(f"{path}: labels do not match the prepared dataset; give the folds.csv of the run that "
                        f"made it, or rerun the `folds` rule")
    fold_of = table[:, 2]
    if len(fold_of) and (fold_of.min() < HOLDOUT or np.setdiff1d(np.arange(fold_of.max() + 1), fold_of).size):
        raise DataError(f"{path}: fold numbers must be 0..k-1 (each used) or {HOLDOUT} (outer holdout), "
                        f"got {sorted(set(fold_of.tolist()))}")
    return fold_of


def _check_fold_table_file(path: Path) -> None:
    """A folder, a missing file or another kind of file than a fold table, named before parsing."""
    from foldsoup.storage.files import folder_given, head_bytes, missing, sniff

    if path.is_dir():
        raise DataError(f"fold table {path} {folder_given(path, ('folds.csv',), 'the fold table folds.csv')}")
    if not path.is_file():
        raise DataError(f"fold table {path} {missing(path)}")
    if not head_bytes(path, len(FOLDS_HEADER) + 2).decode("utf-8", "replace").startswith(FOLDS_HEADER):
        raise DataError(f"fold table {path} is {sniff(path) or 'a binary file'}, not rows of {FOLDS_HEADER}; "
                        f"give the run's folds.csv, or rerun the `folds` rule")


def train_indices(fold_of: np.ndarray, fold: int) -> np.ndarray:
    """Pool images that fold `fold`'s models train on: every fold but its own, never the holdout."""
    return np.flatnonzero((fold_of != fold) & (fold_of != HOLDOUT))


def holdout_indices(fold_of: np.ndarray) -> np.ndarray:
    return np.flatnonzero(fold_of == HOLDOUT)


def num_folds(fold_of: np.ndarray) -> int:
    return int(fold_of.max()) + 1
