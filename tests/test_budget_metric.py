"""soups.metric in the budget analysis: with balanced_accuracy every budget row's val_acc and
test_acc (names kept) hold balanced accuracy, named in the `metric` column, each equal to the
balanced accuracy computed here from the models' saved logits (and, for the uniform soup, from
the soup's logits); with accuracy (the default) they hold accuracy, computed the same way."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")

from foldsoup import steps  # noqa: E402
from foldsoup.analysis.budget import COLUMNS, METHODS, BudgetRun, draw_subsets, grid_ladder, mean_table  # noqa: E402
from foldsoup.config.schema import validate  # noqa: E402
from foldsoup.config.yaml_files import deep_update  # noqa: E402
from foldsoup.soups.average import average  # noqa: E402
from foldsoup.steps.budget import load_models  # noqa: E402
from foldsoup.steps.context import Context  # noqa: E402
from foldsoup.storage.weights import load_weights  # noqa: E402
from foldsoup.training.loop import predict_logits  # noqa: E402

try:
    from tiny_runs import TinyRun, train_tiny_run  # noqa: E402
except ImportError:  # tests/ imported as a package
    from tests.tiny_runs import TinyRun, train_tiny_run  # noqa: E402

K = 2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two grid points x 2 folds of real (tiny) fine-tunes on three digit classes."""
    r = TinyRun(tmp_path_factory.mktemp("budget_metric") / "results", {
        "seed": 0, "device": "cpu",
        "data": {"name": "digits", "classes": [1, 2, 3], "pretrain_classes": [0, 4, 6, 8, 9], "test_fraction": 0.5,
                 "max_pool": 63},
        "model": {"name": "digits_cnn", "width": 8},
        "pretrain": {"epochs": 2},
        "folds": {"k": K, "holdout_fraction": 0},
        "lp": {"max_iter": 10},
        "finetune": {"epochs": 1, "batch_size": 8, "warmup_steps": 1, "eval_batch_size": 16},
        "grid": {"lr": [0.003, 0.001], "aug": ["minimal"], "mixup": [False]},
    })
    return train_tiny_run(r, r.hps, K)


def with_metric(cfg: dict, metric: str | None) -> dict:
    return cfg if metric is None else validate(deep_update(cfg, {"soups": {"metric": metric}}), check_paths=False)


def score(logits, labels, metric: str) -> Fraction:
    """Accuracy or balanced accuracy (mean recall over the classes present), from scratch."""
    predicted, labels = np.asarray(logits).argmax(1), np.asarray(labels)
    if metric == "accuracy":
        return Fraction(int((predicted == labels).sum()), len(labels))
    classes = np.unique(labels)
    return sum((Fraction(int((predicted[labels == c] == c).sum()), int((labels == c).sum())) for c in classes),
               Fraction(0)) / len(classes)


def expected_rows(r, cfg: dict, metric: str, sub, ctx: Context) -> dict[str, tuple]:
    """(val, test) under `metric` of the methods checked from scratch on subset `sub`."""
    from safetensors.numpy import load_file

    pool_labels, fold_of, test_labels = ctx.data.pool_labels, ctx.fold_of, ctx.data.test_labels
    cross = min if cfg["soups"]["cross_fold_val"] == "min" else (lambda s: sum(s) / len(s))
    members = [(hp, fold) for g, hp in enumerate(r.hps) for fold in range(K) if g in sub.grid and fold in sub.folds]
    preds = {m: load_file(str(r.model_dir(*m) / "predictions.safetensors")) for m in members}
    own = {m: score(preds[m]["pool_logits"][fold_of == m[1]], pool_labels[fold_of == m[1]], metric) for m in members}
    test = {m: score(preds[m]["test_logits"], test_labels, metric) for m in members}
    out = {}
    best = max(members, key=lambda m: own[m])  # max keeps the first of equals: grid order, then fold
    out["best_on_val"] = (own[best], test[best])

    pool = np.mean(np.stack([preds[m]["pool_logits"].astype(np.float64) for m in members]), axis=0)
    test_ens = np.mean(np.stack([preds[m]["test_logits"].astype(np.float64) for m in members]), axis=0)
    out["ensemble_all"] = (cross([score(pool[fold_of == i], pool_labels[fold_of == i], metric) for i in sub.folds]),
                           score(test_ens, test_labels, metric))

    state = average(load_weights(r.model_dir(*m) / "model.safetensors")[0] for m in members)
    model = ctx.model()
    model.load_state_dict(state)
    ft = cfg["finetune"]

    def logits(images):
        return predict_logits(model, torch.from_numpy(images), ctx.spec, ft["eval_batch_size"], ft["precision"]).numpy()

    val = [score(logits(ctx.data.pool_images[fold_of == i]), pool_labels[fold_of == i], metric) for i in sub.folds]
    out["uniform_soup"] = (cross(val), score(logits(ctx.data.test_images), test_labels, metric))
    if len(members) == 1:  # one model: every soup is that model
        for method in ("greedy_soup", "bgss", "gsgs"):
            out[method] = out["best_on_val"]
    return out


@pytest.mark.parametrize("metric", [None, "accuracy", "balanced_accuracy"])
def test_budget_rows_hold_the_runs_metric(run, metric):
    r = run
    cfg = with_metric(r.cfg, metric)
    name = metric or "accuracy"
    ctx = Context(cfg, r.data, r.folds)
    budget = BudgetRun(ctx, load_models(cfg, r.root / "models"), ctx.data.pool_labels, ctx.fold_of)
    checked = 0
    for g in grid_ladder(len(r.hps)):
        for f in range(1, K + 1):
            for sub in draw_subsets(len(r.hps), K, g, f, draws=10, seed=cfg["seed"]):
                rows = {row["method"]: row for row in budget.methods(sub)}
                assert list(rows) == list(METHODS)
                assert all(row["metric"] == name for row in rows.values())
                for method, (val, test) in expected_rows(r, cfg, name, sub, ctx).items():
                    assert rows[method]["val_acc"] == float(val), (sub, method)
                    assert rows[method]["test_acc"] == float(test), (sub, method)
                    checked += 1
    assert checked > 4 * 3  # every subset, the one-model ones with every soup too


def test_balanced_accuracy_changes_the_budget_and_its_table(run, tmp_path):
    """The two metrics give other numbers on this run (so the test above tells them apart), and
    the step's table names its metric in every row."""
    r = run
    tables = {}
    for metric in ("accuracy", "balanced_accuracy"):
        cfg = with_metric(r.cfg, metric)
        out = tmp_path / metric / "budget_f2.csv"
        out.parent.mkdir()
        steps.budget(cfg, r.data, r.folds, str(r.root / "models"), K, str(out))
        tables[metric] = pd.read_csv(out, dtype={"grid": str, "folds": str})
        assert list(tables[metric].columns) == list(COLUMNS)
        assert (tables[metric].metric == metric).all()
        assert (mean_table(tables[metric]).metric == metric).all()
    acc, bacc = (tables[m].set_index(["method", "grid_points", "draw"]) for m in ("accuracy", "balanced_accuracy"))
    differs = (acc.val_acc != bacc.val_acc) | (acc.test_acc != bacc.test_acc)
    assert differs.any(), "balanced accuracy equals accuracy everywhere on this run: the metric test proves nothing"
