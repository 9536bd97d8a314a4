"""Steps `prepare` and `folds`: the dataset decoded once, and the stratified k-fold split (no torch)."""

from __future__ import annotations

import numpy as np

from foldsoup.data.folds import HOLDOUT, fold_summary, given_folds, holdout_indices, make_folds, write_folds
from foldsoup.data.prepared import load_prepared, save_prepared
from foldsoup.data.prepared import prepare as prepare_data
from foldsoup.steps.context import log


def prepare(cfg: dict, out: str) -> None:
    data = prepare_data(cfg["data"], cfg["seed"])
    counts = np.bincount(data.pool_labels, minlength=data.num_classes)
    log(f"{data.name}: pool {len(data.pool_labels)} images (per class {counts.tolist()}), "
        f"test {len(data.test_labels)}, image shape {list(data.pool_images.shape[1:])}"
        + (f", pretraining {len(data.pretrain_labels)} images of classes {data.pretrain_classes}" if data.pretrain_images is not None else "")
        + (f", {len(set(data.pool_groups))} groups in the pool and {len(set(data.test_groups))} in the test set"
           if data.pool_groups is not None else ""))
    save_prepared(out, data)


def folds(cfg: dict, data_path: str, out: str) -> None:
    data = load_prepared(data_path)
    holdout = cfg["folds"].get("holdout_fraction", 0)  # the schema's default, for configs made by hand
    k = cfg["folds"]["k"]
    if data.pool_folds is not None:  # the manifest's own fold column, used as given
        fold_of = given_folds(data.pool_folds, k, data.pool_groups, holdout)
        what = f"{k} folds from the manifest's fold column"
    else:
        fold_of = make_folds(data.pool_labels, k, cfg["seed"], data.classes, holdout, data.pool_groups)
        what = f"{k} stratified folds" + (" (group-disjoint)" if data.pool_groups is not None else "")
    write_folds(out, data.pool_labels, fold_of, data.pool_groups, data.pool_sources)
    log(f"{what} of sizes {np.bincount(fold_of[fold_of != HOLDOUT]).tolist()}"
        + (f", outer holdout of {len(holdout_indices(fold_of))} images" if (fold_of == HOLDOUT).any() else ""))
    for line in fold_summary(fold_of, data.pool_groups, data.pool_labels, data.classes):
        log(line)
