"""Steps `prepare` and `folds`: the dataset decoded once, and the stratified k-fold split (no torch)."""

from __future__ import annotations

import numpy as np

from foldsoup.data.folds import HOLDOUT, holdout_indices, make_folds, write_folds
from foldsoup.data.prepared import load_prepared, save_prepared
from foldsoup.data.prepared import prepare as prepare_data
from foldsoup.steps.context import log


def prepare(cfg: dict, out: str) -> None:
    data = prepare_data(cfg["data"], cfg["seed"])
    counts = np.bincount(data.pool_labels, minlength=data.num_classes)
    log(f"{data.name}: pool {len(data.pool_labels)} images (per class {counts.tolist()}), "
        f"test {len(data.test_labels)}, image shape {list(data.pool_images.shape[1:])}"
        + (f", pretraining {len(data.pretrain_labels)} images of classes {data.pretrain_classes}" if data.pretrain_images is not None else ""))
    save_prepared(out, data)


def folds(cfg: dict, data_path: str, out: str) -> None:
    data = load_prepared(data_path)
    holdout = cfg["folds"].get("holdout_fraction", 0)  # the schema's default, for configs made by hand
    fold_of = make_folds(data.pool_labels, cfg["folds"]["k"], cfg["seed"], data.classes, holdout)
    write_folds(out, data.pool_labels, fold_of)
    log(f"{cfg['folds']['k']} stratified folds of sizes {np.bincount(fold_of[fold_of != HOLDOUT]).tolist()}"
        + (f", outer holdout of {len(holdout_indices(fold_of))} images" if (fold_of == HOLDOUT).any() else ""))
