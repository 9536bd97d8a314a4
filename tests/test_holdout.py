"""The outer holdout (folds.holdout_fraction > 0): split, training exclusion, the soups selected
on it and the reliability columns that compare it with MinAcc and AvgAcc.

The tiny real run (digits, width-8 CNN, k = 2, 2 grid points, 1 epoch) goes through the
pipeline functions the workflow rules call.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from foldsoup.analysis.reliability import reliability_table
from foldsoup.errors import ConfigError
from foldsoup.config.schema import validate
from foldsoup.errors import DataError
from foldsoup.data.folds import HOLDOUT, holdout_indices, make_folds, read_folds, train_indices, write_folds

K = 2
HOLDOUT_FRACTION = 0.25


# ---------------------------------------------------------------- the split


def _labels(counts: list[int]) -> np.ndarray:
    return np.repeat(np.arange(len(counts)), counts)


def test_holdout_is_stratified_disjoint_and_seeded():
    labels = _labels([40, 60, 100])
    fold_of = make_folds(labels, 4, seed=3, holdout_fraction=0.2)
    held = fold_of == HOLDOUT
    assert held.sum() == 40  # round(0.2 * 200)
    assert np.bincount(labels[held]).tolist() == [8, 12, 20]  # stratified: 20 % of each class
    rest = ~held
    assert sorted(set(fold_of[rest].tolist())) == [0, 1, 2, 3]
    for f in range(4):  # the k folds split what is left, stratified
        assert np.bincount(labels[fold_of == f], minlength=3).tolist() == [8, 12, 20]
    assert np.array_equal(fold_of, make_folds(labels, 4, seed=3, holdout_fraction=0.2))
    assert not np.array_equal(fold_of, make_folds(labels, 4, seed=4, holdout_fraction=0.2))


def test_no_holdout_is_the_plain_split():
    from sklearn.model_selection import StratifiedKFold

    labels = _labels([10, 12, 9])
    fold_of = make_folds(labels, 3, seed=0)
    assert (fold_of >= 0).all()
    for f, (_, val) in enumerate(StratifiedKFold(3, shuffle=True, random_state=0).split(labels, labels)):
        assert (fold_of[val] == f).all()


def test_train_indices_leave_out_own_fold_and_holdout():
    fold_of = np.array([0, 1, HOLDOUT, 2, 0, HOLDOUT, 1, 2])
    assert train_indices(fold_of, 0).tolist() == [1, 3, 6, 7]
    assert train_indices(fold_of, 2).tolist() == [0, 1, 4, 6]
    assert holdout_indices(fold_of).tolist() == [2, 5]


def test_holdout_needs_two_images_per_class():
    with pytest.raises(DataError, match=r"folds.holdout_fraction = 0.2: class 'b' has only 1 pool image"):
        make_folds(_labels([10, 1]), 2, seed=0, classes=["a", "b"], holdout_fraction=0.2)


def test_k_is_checked_after_the_holdout():
    with pytest.raises(DataError, match=r"folds.k = 5 is larger than class '0', which has only 4 pool image\(s\) after the outer holdout"):
        make_folds(_labels([5, 50]), 5, seed=0, holdout_fraction=0.2)


def test_read_folds_accepts_holdout_and_refuses_other_negatives(tmp_path):
    labels = np.array([0, 1, 0, 1, 0])
    path = tmp_path / "folds.csv"
    write_folds(path, labels, np.array([0, 1, HOLDOUT, 0, 1]))
    assert read_folds(path, labels).tolist() == [0, 1, -1, 0, 1]
    write_folds(path, labels, np.array([0, 1, -2, 0, 1]))
    with pytest.raises(DataError, match=r"fold numbers must be 0..k-1 \(each used\) or -1 \(outer holdout\), got \[-2, 0, 1\]"):
        read_folds(path, labels)


def _digits_cfg(**folds) -> dict:
    return {"data": {"name": "digits", "classes": [1, 2, 3, 5, 7], "pretrain_classes": [0, 4, 6, 8, 9], "test_fraction": 0.5},
            "model": {"name": "digits_cnn"}, "folds": folds}


def test_config_holdout_range_and_k_bound():
    assert validate(_digits_cfg(k=5))["folds"]["holdout_fraction"] == 0
    with pytest.raises(ConfigError, match=r"folds.holdout_fraction: 0.5 is out of range; allowed: a number >= 0 and < 0.5"):
        validate(_digits_cfg(k=5, holdout_fraction=0.5))
    # Class 2 keeps at most 89 pool images; a 0.2 holdout leaves at most 72 for the folds.
    validate(_digits_cfg(k=72, holdout_fraction=0.2))
    with pytest.raises(ConfigError, match=r"folds.k: 73 .* 72 after folds.holdout_fraction = 0.2; .* allowed: 2 <= k <= 72"):
        validate(_digits_cfg(k=73, holdout_fraction=0.2))


# ---------------------------------------------------------------- reliability columns


def test_reliability_holdout_columns_known_answers():
    subsets = pd.DataFrame({
        "hp": ["a", "b", "a", "b"], "folds": ["0", "0", "0-1", "0-1"], "n": [1, 1, 2, 2],
        "avg_acc": [0.90, 0.80, 0.95, 0.85], "min_acc": [0.90, 0.80, 0.93, 0.81],
        "holdout_acc": [0.88, 0.79, 0.90, 0.84], "test_acc": [0.89, 0.80, 0.91, 0.83],
    })
    models = pd.DataFrame({"hp": ["a", "b"], "fold": [0, 1], "val_acc": [0.9, 0.8], "test_acc": [0.89, 0.8]})
    table = reliability_table(subsets, models, k=2).set_index("n")
    # n = 2: holdout gaps -0.01, +0.01 -> RMSE 0.01, mean 0; two points on a rising line -> corr 1.
    assert table.loc[2, "rmse_holdout_acc"] == pytest.approx(0.01)
    assert table.loc[2, "mean_gap_holdout_acc"] == pytest.approx(0.0)
    assert table.loc[2, "corr_holdout_acc"] == pytest.approx(1.0)
    assert table.loc[1, "rmse_holdout_acc"] == pytest.approx(math.sqrt((0.01**2 + 0.01**2) / 2))
    # Without a holdout column the holdout statistics are NaN, the others unchanged.
    plain = reliability_table(subsets.drop(columns="holdout_acc"), models, k=2).set_index("n")
    assert math.isnan(plain.loc[2, "rmse_holdout_acc"]) and math.isnan(plain.loc[2, "corr_holdout_acc"])
    assert plain.loc[2, "rmse_min_acc"] == table.loc[2, "rmse_min_acc"]


def test_summary_compares_the_three_signals():
    from foldsoup.report.summary import holdout_section

    rel = pd.DataFrame({"n": [1, 2], "rmse_avg_acc": [0.02, 0.03], "rmse_min_acc": [0.02, 0.05],
                        "rmse_holdout_acc": [0.01, 0.01], "mean_gap_avg_acc": [0.0, 0.01], "mean_gap_min_acc": [0.0, -0.02],
                        "mean_gap_holdout_acc": [0.0, 0.0], "corr_avg_acc": [0.5, 0.6], "corr_all": [0.5, 0.4],
                        "corr_holdout_acc": [0.7, 0.8]})
    text = holdout_section(rel)
    assert "the RMSE is AvgAcc 3.00%, MinAcc 5.00%, holdout 1.00%: holdout estimates test accuracy best" in text
    assert holdout_section(rel.assign(rmse_holdout_acc=float("nan"))) == ""


# ---------------------------------------------------------------- a tiny real run


torch = pytest.importorskip("torch")

from foldsoup import steps  # noqa: E402

try:
    from tiny_runs import train_tiny_run  # noqa: E402
except ImportError:  # tests/ imported as a package
    from tests.tiny_runs import train_tiny_run  # noqa: E402
from foldsoup.config.schema import grid_points  # noqa: E402
from foldsoup.data.prepared import load_prepared, save_prepared  # noqa: E402
from foldsoup.storage.weights import load_weights  # noqa: E402


class Run:
    def __init__(self, root: Path):
        self.root = root
        self.cfg = validate({
            "results": str(root), "seed": 0, "device": "cpu",
            "data": {"name": "digits", "classes": [1, 2, 3], "pretrain_classes": [0, 4, 6, 8, 9], "test_fraction": 0.5},
            "model": {"name": "digits_cnn", "width": 8},
            "pretrain": {"epochs": 2},
            "folds": {"k": K, "holdout_fraction": HOLDOUT_FRACTION},
            "lp": {"max_iter": 10},
            "finetune": {"epochs": 1, "batch_size": 32, "warmup_steps": 2},
            "grid": {"lr": [0.003, 0.001], "aug": ["minimal"], "mixup": [False]},
        })
        self.data = str(root / "prepared" / "dataset.safetensors")
        self.folds = str(root / "folds.csv")
        self.backbone = str(root / "pretrained" / "backbone.safetensors")
        self.hps = [p.name for p in grid_points(self.cfg)]

    def head(self, fold: int, root: Path | None = None) -> str:
        return str((root or self.root) / "lp" / f"fold{fold}" / "head.safetensors")

    def finetune(self, hp: str, fold: int, root: Path | None = None, data: str | None = None, folds: str | None = None) -> Path:
        root = root or self.root
        out = root / "models" / hp / f"fold{fold}"
        steps.finetune(self.cfg, data or self.data, folds or self.folds, self.backbone, self.head(fold, root), hp, fold,
                          str(out), str(root / ".resume" / hp / f"fold{fold}"))
        return out

    def lists(self) -> tuple[list[str], list[str]]:
        dirs = [self.root / "models" / hp / f"fold{f}" for hp in self.hps for f in range(K)]
        return [str(d / "model.safetensors") for d in dirs], [str(d / "metrics.json") for d in dirs]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    r = Run(tmp_path_factory.mktemp("holdout") / "results")
    train_tiny_run(r, r.hps, K)
    models, metrics = r.lists()
    soups, tables = r.root / "soups", r.root / "tables"
    steps.models_table(metrics, str(tables / "models.csv"))
    for hp in r.hps:
        steps.uniform_subsets(r.cfg, r.data, r.folds, hp, [m for m in models if f"/{hp}/" in m],
                                 [m for m in metrics if f"/{hp}/" in m], str(r.root / "analysis" / f"{hp}.csv"))
    for fold in range(K):
        pick = [i for i, m in enumerate(models) if m.endswith(f"fold{fold}/model.safetensors")]
        steps.greedy_per_fold(r.cfg, r.data, r.folds, fold, [models[i] for i in pick], [metrics[i] for i in pick],
                                 str(soups / f"greedy_fold{fold}.safetensors"), str(soups / f"uniform_fold{fold}.safetensors"))
    steps.uniform_all(r.cfg, r.data, r.folds, models, metrics, str(soups / "uniform_soup.safetensors"))
    steps.greedy_all(r.cfg, r.data, r.folds, models, metrics, str(soups / "greedy_soup.safetensors"))
    steps.greedy_all(r.cfg, r.data, r.folds, models, metrics, str(soups / "greedy_soup_holdout.safetensors"), on_holdout=True)
    steps.gsgs(r.cfg, r.data, r.folds, [str(soups / f"greedy_fold{i}.safetensors") for i in range(K)],
                  str(soups / "gsgs.safetensors"))
    steps.methods(r.cfg, r.data, r.folds, str(tables / "models.csv"), str(r.root / "models"), str(soups),
                     str(tables / "methods.csv"))
    return r


@pytest.mark.slow
def test_holdout_split_of_the_run(run):
    d = load_prepared(run.data)
    fold_of = read_folds(run.folds, d.pool_labels)
    held = fold_of == HOLDOUT
    assert held.sum() == round(HOLDOUT_FRACTION * len(fold_of))
    assert np.bincount(d.pool_labels[held]).min() >= 1


@pytest.mark.slow
def test_models_never_train_on_the_holdout(run, tmp_path):
    """Permuting the holdout's labels changes what is measured on it, never what is trained."""
    d = load_prepared(run.data)
    fold_of = read_folds(run.folds, d.pool_labels)
    held = np.flatnonzero(fold_of == HOLDOUT)
    d.pool_labels = d.pool_labels.copy()
    d.pool_labels[held] = (d.pool_labels[held] + 1) % len(d.classes)  # every holdout label now wrong
    data, folds = str(tmp_path / "dataset.safetensors"), str(tmp_path / "folds.csv")
    save_prepared(data, d)
    write_folds(folds, d.pool_labels, fold_of)
    root = tmp_path / "results"
    hp, fold = run.hps[0], 1
    steps.linear_probe(run.cfg, data, folds, run.backbone, fold, run.head(fold, root))
    out = run.finetune(hp, fold, root=root, data=data, folds=folds)
    ours, theirs = load_weights(out / "model.safetensors")[0], load_weights(run.root / "models" / hp / f"fold{fold}" / "model.safetensors")[0]
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    new, old = (json.loads((p / "metrics.json").read_text()) for p in (out, run.root / "models" / hp / f"fold{fold}"))
    assert new["fold_accs"] == old["fold_accs"] and new["test_acc"] == old["test_acc"]
    assert new["holdout_acc"] != old["holdout_acc"]


@pytest.mark.slow
def test_greedy_soup_on_holdout_is_scored_on_holdout(run):
    rec = json.loads((run.root / "soups" / "greedy_soup_holdout.json").read_text())
    assert rec["val_metric"] == "holdout" and rec["folds"] == [HOLDOUT]
    assert rec["val_acc"] == rec["holdout_acc"] == rec["fold_accs"][str(HOLDOUT)]
    models = pd.read_csv(run.root / "tables" / "models.csv")
    # Alg. 1 sorts candidates by their own score: the first step tries the best model on holdout.
    first = rec["steps"][0]
    best = models.loc[models.holdout_acc.idxmax()]
    assert models.set_index(models.hp + "/fold" + models.fold.astype(str)).loc[first["candidate"], "holdout_acc"] == best.holdout_acc
    # A soup is never worse on the holdout than its first ingredient alone (it was accepted).
    assert rec["holdout_acc"] >= best.holdout_acc - 1e-6  # models.csv keeps 6 digits


@pytest.mark.slow
def test_methods_table_has_holdout_rows_and_column(run):
    methods = pd.read_csv(run.root / "tables" / "methods.csv").set_index("method")
    models = pd.read_csv(run.root / "tables" / "models.csv")
    for m in ("best_on_holdout", "greedy_soup_holdout", "ensemble_greedy_soup_holdout"):
        assert methods.loc[m, "val_metric"] == "holdout"
    top = models.loc[models.holdout_acc.idxmax()]
    assert methods.loc["best_on_holdout", "holdout_acc"] == pytest.approx(top.holdout_acc)
    assert methods.loc["best_on_holdout", "test_acc"] == pytest.approx(top.test_acc)
    assert methods.holdout_acc.notna().all()
    best = models.loc[models.val_acc.idxmax()]
    assert methods.loc["best_on_val", "holdout_acc"] == pytest.approx(best.holdout_acc)


@pytest.mark.slow
def test_uniform_subsets_and_reliability_carry_the_holdout(run):
    subsets = pd.concat([pd.read_csv(run.root / "analysis" / f"{hp}.csv") for hp in run.hps])
    assert subsets.holdout_acc.between(0, 1).all()
    # The single-fold soup of a grid point is that model: its holdout accuracy is the model's.
    models = pd.read_csv(run.root / "tables" / "models.csv").set_index(["hp", "fold"])
    for row in subsets[subsets.n == 1].itertuples():
        assert row.holdout_acc == pytest.approx(models.loc[(row.hp, int(row.folds)), "holdout_acc"], abs=1e-6)
    table = reliability_table(subsets, models.reset_index())
    assert np.isfinite(table.rmse_holdout_acc).all()


@pytest.mark.slow
def test_greedy_on_holdout_without_holdout_is_refused(run, tmp_path):
    d = load_prepared(run.data)
    folds = tmp_path / "folds.csv"
    write_folds(folds, d.pool_labels, make_folds(d.pool_labels, K, 0))
    models, metrics = run.lists()
    with pytest.raises(ValueError, match=r"folds.csv: has no outer holdout \(set folds.holdout_fraction > 0"):
        steps.greedy_all(run.cfg, run.data, str(folds), models, metrics, str(tmp_path / "g.safetensors"), on_holdout=True)


@pytest.mark.slow
def test_validation_signals_figure_has_a_panel_per_signal(run, tmp_path):
    from PIL import Image

    from foldsoup.report.plots import DPI, plot_validation_signals

    subsets = pd.concat([pd.read_csv(run.root / "analysis" / f"{hp}.csv", dtype={"folds": str}) for hp in run.hps])
    for frame, panels in ((subsets, 3), (subsets.drop(columns="holdout_acc"), 2), (subsets.assign(holdout_acc=np.nan), 2)):
        path = tmp_path / f"signals{panels}.png"
        plot_validation_signals(frame, path)
        assert Image.open(path).size[0] == round(4.6 * panels * DPI)  # AvgAcc, MinAcc (+ holdout)
