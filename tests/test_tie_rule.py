"""One tie rule for every selection (README, "Ties"): the highest score wins; among equal scores
the first in grid order (grid points in config order), then the lower fold; per-fold soups in
fold order. Checked on one table of tied models through every method the workflow and the
budget analysis call (foldsoup.soups.methods, foldsoup.soups.select), and on models.csv's order."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from foldsoup.config.schema import grid_points
from foldsoup.soups import methods, select
from foldsoup.steps import models_table

# Grid order of a config with grid.lr [0.002, 0.0005] and grid.aug [minimal, medium]: the names
# sort differently ("lr0.0005..." < "lr0.002..."), which is how the old tie order went wrong.
GRID = {"lr": [0.002, 0.0005], "aug": ["minimal", "medium"], "mixup": [False]}
HPS = [p.name for p in grid_points({"grid": GRID})]


def model(hp, fold, val, test=0.5, holdout=None, diverged=False):
    return methods.ModelResult(hp, fold, val, test, holdout, diverged)


def test_grid_order_is_config_order_not_name_order():
    assert HPS == ["lr0.002_minimal_nomix", "lr0.002_medium_nomix", "lr0.0005_minimal_nomix", "lr0.0005_medium_nomix"]
    assert sorted(HPS) != HPS


# Every model ties at 1.0 on its own fold, but the first grid point's fold-0 model diverged.
MODELS = [model(hp, fold, 1.0, holdout=0.9, diverged=(hp, fold) == (HPS[0], 0)) for hp in HPS for fold in (0, 1)]


def test_best_on_val_and_on_holdout_take_the_first_in_grid_order_then_fold():
    assert methods.best_on_val(MODELS).name == f"{HPS[0]}/fold1"  # fold0 of HPS[0] diverged
    assert methods.best_on_holdout(MODELS).name == f"{HPS[0]}/fold1"
    # A strictly better model anywhere still wins.
    better = [*MODELS[:-1], model(HPS[-1], 1, 1.0, holdout=0.95)]
    assert methods.best_on_holdout(better).name == f"{HPS[-1]}/fold1"
    assert methods.best_on_val(better).name == f"{HPS[0]}/fold1"


def test_every_model_diverged_is_an_error_naming_the_method():
    with pytest.raises(ValueError, match="best_on_val: every model diverged"):
        methods.best_on_val([model(HPS[0], 0, 0.5, diverged=True)])


def test_greedy_candidates_of_equal_accuracy_are_tried_in_grid_order_then_fold():
    cands = methods.candidates(MODELS)
    assert [c.name for c in select.sort_candidates(cands)] == [m.name for m in MODELS if not m.diverged]


def test_bgss_best_uniform_per_split_and_gsgs_order_take_the_first_fold():
    scores = {0: 0.9, 1: 0.95, 2: 0.95}
    assert select.bgss(scores) == 1
    assert select.best_uniform_per_split(scores) == 1
    assert [c.name for c in select.sort_candidates(select.gsgs_candidates(scores))] == ["greedy_fold1", "greedy_fold2",
                                                                                      "greedy_fold0"]


def test_models_table_keeps_the_workflow_order(tmp_path):
    """tables/models.csv lists the models in the order of its inputs (the workflow's: grid
    order, then fold), so reading it back gives the tie order; no timing column."""
    paths = []
    for hp in HPS:
        for fold in (0, 1):
            lr, aug, _ = hp.split("_")
            path = tmp_path / hp / f"fold{fold}" / "metrics.json"
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps({"hp": hp, "lr": float(lr[2:]), "aug": aug, "mixup": False, "fold": fold,
                                        "val_acc": 1.0, "test_acc": 0.5, "diverged": False, "images_per_s": 123.0,
                                        "fold_accs": {"0": 1.0, "1": 1.0}}))
            paths.append(str(path))
    models_table(paths, str(tmp_path / "models.csv"))
    table = pd.read_csv(tmp_path / "models.csv")
    assert [f"{r.hp}/fold{r.fold}" for r in table.itertuples()] == [f"{hp}/fold{f}" for hp in HPS for f in (0, 1)]
    assert "images_per_s" not in table.columns
    rows = [methods.ModelResult.from_record(r) for r in table.to_dict("records")]
    assert methods.best_on_val(rows).name == f"{HPS[0]}/fold0"
