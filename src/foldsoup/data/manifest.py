"""`data.name: csv`: your images listed in one manifest CSV (data.manifest), a row per image, with
its path, label and optionally group (patient), split and fold; column names from data.columns.

The rows are checked by foldsoup.config.manifest (also at parse time, before any job). The pool
is the train and val rows (the k folds replace a fixed validation split), the test set the test
rows; without a split column the test set is split off by data.test_fraction, stratified and,
with a group column, group-disjoint (foldsoup.data.folds.split_off). Images are decoded as
imagefolder decodes them (Pillow, EXIF orientation, RGB, `data.resize` to data.image_size).
Each image's source is its path as the CSV writes it, its group the group column's value.
"""

from __future__ import annotations

import numpy as np

from foldsoup.config.manifest import read_manifest
from foldsoup.data.folds import split_off
from foldsoup.data.imagefolder import DEFAULT_BACKGROUND, ColourModes, log, read_images
from foldsoup.errors import DataError


def read_manifest_dataset(data_cfg: dict, seed: int) -> dict:
    """The keyword arguments of foldsoup.data.prepared.Prepared (which loads this module)."""
    manifest = read_manifest(data_cfg)
    rows, columns = manifest.rows, manifest.columns
    labels = np.array([manifest.classes.index(r.label) for r in rows], dtype=np.int64)
    groups = [r.group for r in rows] if columns["group"] else None
    if columns["split"]:
        pool = np.array([i for i, r in enumerate(rows) if r.pool], dtype=np.int64)
        test = np.array([i for i, r in enumerate(rows) if not r.pool], dtype=np.int64)
    else:
        pool, test = split_off(labels, data_cfg["test_fraction"], seed, groups, manifest.classes,
                               f"data.manifest {str(manifest.path)!r}: data.test_fraction = {data_cfg['test_fraction']}")
    background = data_cfg.get("background", DEFAULT_BACKGROUND)
    modes = ColourModes(background)
    by_path = {str(r.path): r for r in rows}
    try:
        pool_x, test_x = (read_images([rows[i].path for i in part], data_cfg["image_size"], data_cfg["resize"],
                                      background, modes) for part in (pool, test))
    except DataError as exc:  # the file's own message, with the row that names it
        row = by_path.get(str(exc).split(": ", 1)[0])
        if row is None:
            raise
        raise DataError(f"data.manifest {str(manifest.path)!r} line {row.line}, column {columns['image']!r}: "
                        f"{exc}") from exc
    for line in modes.report("csv", manifest.path.parent):
        log(line)
    pool_rows, test_rows = [rows[i] for i in pool], [rows[i] for i in test]
    return dict(name="csv", classes=manifest.classes, pool_images=pool_x, pool_labels=labels[pool], test_images=test_x,
                test_labels=labels[test], pool_groups=[r.group for r in pool_rows] if columns["group"] else None,
                test_groups=[r.group for r in test_rows] if columns["group"] else None,
                pool_sources=[r.image for r in pool_rows], test_sources=[r.image for r in test_rows],
                pool_folds=np.array([r.fold for r in pool_rows], dtype=np.int64) if columns["fold"] else None,
                background=background)
