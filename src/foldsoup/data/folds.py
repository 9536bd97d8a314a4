"""Stratified k-fold split of the training pool (Alg. 2), saved as folds.csv.

With an outer holdout (folds.holdout_fraction > 0) a stratified share of the pool is set aside
first and marked fold HOLDOUT (-1): no model trains on it and no fold validates on it, so it
scores cross-fold soups without the leakage of MinAcc/AvgAcc (the paper's first limitation:
fold i's val images are training images of every other fold's models).

With groups (a patient, subject or lesion per image: the manifest's group column, or
imagefolder's data.group_pattern) every split is also group-disjoint: the k folds
(scikit-learn's StratifiedGroupKFold), the outer holdout and the test split (`split_off`), so no
group's images are validated on by a model that trained on others of them. folds.csv then has
the columns index,label,fold,group,source (source: the image's file or manifest path).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

import numpy as np

from foldsoup.errors import DataError

FOLDS_HEADER = "index,label,fold"
TRACED_COLUMNS = ("group", "source")  # after FOLDS_HEADER, for datasets that record them
HOLDOUT = -1  # the fold number of outer-holdout images in folds.csv and in fold_of arrays
# One group holding more than this share of a fold's images: the `folds` log warns (that fold's
# val accuracy mostly measures one patient).
LARGE_GROUP_SHARE = 0.25


def make_folds(labels: np.ndarray, k: int, seed: int, classes: list[str] | None = None,
               holdout_fraction: float = 0.0, groups: Sequence[str] | None = None) -> np.ndarray:
    """Fold number (0..k-1, or HOLDOUT) of every pool image; stratified, disjoint, covering the
    pool; with `groups` (one per image) also group-disjoint, the holdout included."""
    if k < 2:
        raise DataError(f"folds.k = {k}: at least 2 folds are needed")
    fold_of = np.full(len(labels), HOLDOUT, dtype=np.int64)
    rest = np.arange(len(labels))
    group_of = None if groups is None else np.asarray(groups, dtype=str)
    if holdout_fraction > 0 and group_of is not None:
        rest, _ = split_off(labels, holdout_fraction, seed, group_of, classes, f"folds.holdout_fraction = {holdout_fraction}")
    elif holdout_fraction > 0:
        rest = _split_holdout(labels, holdout_fraction, seed, classes)
    where = " after the outer holdout" if holdout_fraction > 0 else ""
    num_classes = len(classes) if classes else int(labels.max()) + 1
    if group_of is not None:
        fold_of[rest] = _group_kfold(labels[rest], group_of[rest], k, seed, classes, num_classes, where)
    else:
        fold_of[rest] = _kfold(labels[rest], k, seed, classes, num_classes, where)
    return fold_of


def _class_name(classes: list[str] | None, c: int) -> str:
    return classes[c] if classes else str(c)


def _groups_per_class(labels: np.ndarray, groups: np.ndarray, num_classes: int) -> np.ndarray:
    return np.array([len(np.unique(groups[labels == c])) for c in range(num_classes)])


def _first_group_fold(labels: np.ndarray, groups: np.ndarray, n_splits: int, seed: int) -> np.ndarray:
    """Indices of the first of `n_splits` stratified, group-disjoint folds (seeded shuffle)."""
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold

    codes = np.unique(groups, return_inverse=True)[1]
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # "the least populated class has only n members": checked per group instead
        warnings.simplefilter("ignore", UserWarning)
        return next(splitter.split(np.zeros(len(labels)), labels, codes))[1]


def split_off(labels: np.ndarray, fraction: float, seed: int, groups: Sequence[str] | None = None,
              classes: list[str] | None = None, what: str = "data.test_fraction") -> tuple[np.ndarray, np.ndarray]:
    """(rest, held) sorted indices: a stratified, seeded share `fraction` held out. With `groups`
    group-disjoint: the first fold of StratifiedGroupKFold(round(1 / fraction)) groups (of
    1 - fraction above one half), so the share is close to `fraction`, not exact."""
    if groups is None:
        from sklearn.model_selection import train_test_split

        rest, held = train_test_split(np.arange(len(labels)), test_size=fraction, stratify=labels, random_state=seed)
        return np.sort(rest), np.sort(held)
    groups = np.asarray(groups, dtype=str)
    num_classes = len(classes) if classes else int(labels.max()) + 1
    per_class = _groups_per_class(labels, groups, num_classes)
    smallest = int(np.argmin(per_class))
    if per_class[smallest] < 2:
        raise DataError(f"{what}: class {_class_name(classes, smallest)!r} has only {per_class[smallest]} group(s); a "
                        f"group-disjoint split keeps every group on one side, which needs at least 2 groups per class")
    small = min(fraction, 1 - fraction)
    n_splits = int(min(max(2, round(1 / small)), len(np.unique(groups))))
    part = np.zeros(len(labels), dtype=bool)
    part[_first_group_fold(labels, groups, n_splits, seed)] = True
    held = part if fraction <= 0.5 else ~part
    return np.flatnonzero(~held), np.flatnonzero(held)


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


def _group_kfold(labels: np.ndarray, groups: np.ndarray, k: int, seed: int, classes: list[str] | None,
                 num_classes: int, where: str) -> np.ndarray:
    """StratifiedGroupKFold's folds (seeded shuffle): no group in two folds."""
    per_class = _groups_per_class(labels, groups, num_classes)
    smallest = int(np.argmin(per_class))
    if per_class[smallest] < k:
        raise DataError(
            f"folds.k = {k} is larger than the number of groups of class {_class_name(classes, smallest)!r}: "
            f"{per_class[smallest]} group(s){where}; no group may be in two folds and every fold needs one of every "
            f"class (allowed: k <= {per_class[smallest]}, or more groups of that class)")
    from sklearn.model_selection import StratifiedGroupKFold

    codes = np.unique(groups, return_inverse=True)[1]
    fold_of = np.empty(len(labels), dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for fold, (_, val_idx) in enumerate(splitter.split(np.zeros(len(labels)), labels, codes)):
        fold_of[val_idx] = fold
    return fold_of


def given_folds(fold_of: np.ndarray, k: int, groups: Sequence[str] | None = None,
                holdout_fraction: float = 0.0) -> np.ndarray:
    """The user's own folds (the manifest's fold column), checked: 0..k-1, each used, no group in two."""
    fold_of = np.asarray(fold_of, dtype=np.int64)
    if holdout_fraction > 0:
        raise DataError(f"folds.holdout_fraction: {holdout_fraction} with the manifest's own folds, which are used as "
                        f"given; allowed: 0 (or data.columns.fold: null to compute the folds)")
    used = set(fold_of.tolist())
    if used != set(range(k)):
        raise DataError(f"folds.k = {k}, but the manifest's fold column has folds {sorted(used)}; allowed: every fold "
                        f"0..{k - 1} with at least one image, and no other")
    if groups is not None:
        first: dict[str, int] = {}
        for g, f in zip(groups, fold_of.tolist()):
            if first.setdefault(g, f) != f:
                raise DataError(f"the manifest's fold column puts group {g!r} in folds {first[g]} and {f}; no group "
                                f"may be in two folds")
    return fold_of


def missing_classes(labels: np.ndarray, fold_of: np.ndarray, num_classes: int) -> dict[int, list[int]]:
    """fold (and HOLDOUT) -> the classes it has no image of. Group-disjoint folds can leave a
    rare class out of a fold: that fold's val score then says nothing about the class (balanced
    accuracy averages over the classes present)."""
    out = {}
    for fold in sorted(set(fold_of.tolist()), key=lambda f: (f == HOLDOUT, f)):
        absent = np.flatnonzero(np.bincount(labels[fold_of == fold], minlength=num_classes) == 0).tolist()
        if absent:
            out[int(fold)] = absent
    return out


def fold_summary(fold_of: np.ndarray, groups: Sequence[str] | None, labels: np.ndarray | None = None,
                 classes: Sequence[str] | None = None) -> list[str]:
    """Per fold (and the holdout) the images and groups, and a WARNING line for each fold where
    one group holds more than LARGE_GROUP_SHARE of the images; with `labels` and `classes`, a
    WARNING for each fold without an image of some class. Nothing without groups."""
    if groups is None:
        return []
    groups = np.asarray(groups, dtype=str)
    lines, warnings = [], []
    for fold in sorted(set(fold_of.tolist()), key=lambda f: (f == HOLDOUT, f)):
        name = "outer holdout" if fold == HOLDOUT else f"fold {fold}"
        names, counts = np.unique(groups[fold_of == fold], return_counts=True)
        top = int(np.argmax(counts))
        share, biggest = counts[top] / counts.sum(), str(names[top])
        lines.append(f"{name}: {int(counts.sum())} images of {len(names)} groups (largest group {biggest!r}: "
                     f"{int(counts[top])} images, {share:.0%})")
        if share > LARGE_GROUP_SHARE:
            warnings.append(f"WARNING {name}: group {biggest!r} holds {share:.0%} of its images ({int(counts[top])} of "
                            f"{int(counts.sum())}, above {LARGE_GROUP_SHARE:.0%}): its accuracy mostly measures that one "
                            f"group")
    if labels is not None and classes is not None:
        for fold, absent in missing_classes(np.asarray(labels), fold_of, len(classes)).items():
            name = "outer holdout" if fold == HOLDOUT else f"fold {fold}"
            warnings.append(f"WARNING {name}: no image of class(es) {', '.join(repr(classes[c]) for c in absent)} (too few "
                            f"groups of them to reach every fold): its val score says nothing about them")
    return lines + warnings


def write_folds(path: str | Path, labels: np.ndarray, fold_of: np.ndarray, groups: Sequence[str] | None = None,
                sources: Sequence[str] | None = None) -> None:
    """index,label,fold per pool image; with groups or sources (datasets of files) also group,source."""
    from foldsoup.storage.weights import atomic_write_text

    if groups is None and sources is None:
        rows = "".join(f"{i},{int(y)},{int(f)}\n" for i, (y, f) in enumerate(zip(labels, fold_of)))
        atomic_write_text(path, FOLDS_HEADER + "\n" + rows)
        return
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*FOLDS_HEADER.split(","), *TRACED_COLUMNS])
    for i, (y, f) in enumerate(zip(labels, fold_of)):
        writer.writerow([i, int(y), int(f), "" if groups is None else groups[i], "" if sources is None else sources[i]])
    atomic_write_text(path, out.getvalue())


def read_folds(path: str | Path, pool_labels: np.ndarray | None = None) -> np.ndarray:
    """Fold number per pool index; checks it matches the prepared pool when labels are given."""
    _check_fold_table_file(Path(path))
    try:
        with open(path, newline="", encoding="utf-8") as f:
            header, *body = list(csv.reader(f))
        table = np.array([[int(v) for v in row[:3]] for row in body if row], dtype=np.int64).reshape(-1, 3)
        width = {len(row) for row in body if row}
    except (OSError, ValueError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: unreadable fold table ({exc}); rerun the `folds` rule") from exc
    # Old tables have index,label,fold; newer ones of datasets of files also group,source.
    if width - {len(header)} or header[:3] != FOLDS_HEADER.split(",") or not np.array_equal(table[:, 0], np.arange(len(table))):
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
