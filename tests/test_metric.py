"""soups.metric: balanced accuracy (mean recall over the classes present) as the score of every
selection and table. Known answers on unbalanced records (a model that ignores the rare class
wins on accuracy and loses on balanced accuracy), the records' round trip through models.csv,
and the smoke run redone with soups.metric: balanced_accuracy (what reruns, and that every
selection, record, table and the summary then use it)."""

from __future__ import annotations

import json
import math
import shutil
from fractions import Fraction

import pandas as pd
import pytest

from foldsoup.soups import methods, select
from foldsoup.steps.soups import models_table


def _record(hp: str, fold: int, correct: tuple[int, int], total: tuple[int, int]) -> dict:
    """A metrics.json as steps.train writes it (every metric's fields from per-class counts)."""
    counts = select.ClassCounts(correct, total)
    test = select.ClassCounts((50, 5), (50, 10))
    return {"hp": hp, "lr": 0.1, "aug": "none", "mixup": False, "fold": fold, "diverged": False,
            **select.score_fields("val", counts), **select.score_fields("test", test),
            "fold_accs": {str(fold): float(counts.score("accuracy"))},
            "fold_baccs": {str(fold): float(counts.score("balanced_accuracy"))}}


IGNORES_RARE = _record("lr0.1_none_nomix", 0, (90, 0), (90, 10))  # accuracy 0.9, balanced 0.5
SEES_RARE = _record("lr0.01_none_nomix", 0, (80, 8), (90, 10))  # accuracy 0.88, balanced 0.8444


def test_best_on_val_follows_the_metric(tmp_path):
    records = [IGNORES_RARE, SEES_RARE]
    paths = []
    for r in records:
        path = tmp_path / r["hp"] / "fold0" / "metrics.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(r))
        paths.append(str(path))
    models_table(paths, str(tmp_path / "models.csv"))
    rows = pd.read_csv(tmp_path / "models.csv").to_dict("records")
    assert rows[0]["val_class_correct"] == "90 0" and rows[1]["val_bacc"] == pytest.approx(0.844444)
    for source in (records, rows):  # metrics.json and the models.csv row give the same exact scores
        by_acc = [methods.ModelResult.from_record(r) for r in source]
        by_bacc = [methods.ModelResult.from_record(r, metric="balanced_accuracy") for r in source]
        assert methods.best_on_val(by_acc).hp == "lr0.1_none_nomix"
        assert methods.best_on_val(by_bacc).hp == "lr0.01_none_nomix"
        assert by_bacc[1].val_acc == (Fraction(80, 90) + Fraction(8, 10)) / 2  # exact, from the cells
        assert by_bacc[0].test_acc == pytest.approx(0.75)  # test: (50/50 + 5/10) / 2
    old = {"hp": "a", "fold": 0, "val_acc": 0.9, "val_bacc": 0.5, "test_acc": 0.5, "diverged": False}
    assert methods.ModelResult.from_record(old, metric="balanced_accuracy").val_acc == 0.5  # before the counts: floats


def test_a_soup_record_has_every_metric_and_the_counts_behind_it():
    from foldsoup.steps.soups import record_val, soup_record

    counts = {0: select.ClassCounts((90, 0), (90, 10)), 1: select.ClassCounts((40, 9), (45, 10))}
    rec = json.loads(json.dumps(soup_record("greedy_soup", ["a/fold0", "b/fold1"], {}, "min", counts)))
    assert rec["fold_baccs"] == {"0": 0.5, "1": float((Fraction(40, 45) + Fraction(9, 10)) / 2)}
    assert rec["val_bacc"] == 0.5 and rec["val_acc"] == float(Fraction(49, 55))  # MinAcc of each metric
    assert record_val(rec, "balanced_accuracy") == Fraction(1, 2) and record_val(rec) == Fraction(49, 55)


def test_a_bad_metric_is_refused_by_the_config_check():
    from foldsoup.config.schema import validate
    from foldsoup.errors import ConfigError

    from conftest import ROOT
    from foldsoup.config.yaml_files import load_yaml_files

    base = load_yaml_files(ROOT / "config.yaml")
    with pytest.raises(ConfigError, match=r"soups.metric: 'f1'.*balanced_accuracy"):
        validate({**base, "soups": {"metric": "f1"}}, check_paths=False)
    assert validate(base, check_paths=False)["soups"]["metric"] == "accuracy"


METRIC_RULES = {"greedy_fold", "soup_all", "gsgs", "methods", "reliability", "figures", "summary"}
TRAINING_RULES = {"prepare", "folds", "pretrain", "lp", "finetune", "models_table", "uniform_subsets"}


@pytest.mark.slow
def test_the_smoke_run_with_balanced_accuracy(smoke_run, tmp_path):
    """soups.metric reruns the selections and tables, no fine-tune; redone, every selection
    compares balanced accuracy, the records and tables hold it, the summary says so."""
    from conftest import SMOKE, snakemake
    from test_rerun_scope import dry_run

    overlay = {"soups": {"metric": "balanced_accuracy"}}
    stats = dry_run(smoke_run, tmp_path, overlay)
    assert stats == {"greedy_fold": 2, "soup_all": 3, "gsgs": 1, "methods": 1, "ship": 1, "budget": 2, "budget_table": 1,
                     "reliability": 1, "figures": 1, "summary": 1, "all": 1}, stats
    assert METRIC_RULES <= set(stats) and not TRAINING_RULES & set(stats)

    results = tmp_path / "results"
    shutil.copytree(smoke_run.results, results, symlinks=True)
    (tmp_path / "edit.yaml").write_text(json.dumps(overlay))
    run = snakemake("--cores", "2", "--configfile", str(SMOKE), str(tmp_path / "edit.yaml"),
                    "--config", f"results={results}", "--forcerun", *sorted(set(stats) - {"ship", "budget_table"}))
    assert run.returncode == 0, run.tail()
    assert not TRAINING_RULES & set(run.stats), run.stats

    models = pd.read_csv(results / "tables" / "models.csv")
    table = pd.read_csv(results / "tables" / "methods.csv").set_index("method")
    assert list(table.columns[:3]) == ["val_bacc", "test_bacc", "holdout_bacc"] and "val_acc" in table
    usable = models[~models.diverged.astype(bool)]
    best = usable.iloc[int(usable.val_bacc.values.argmax())]  # first of the highest: the tie rule
    assert json.loads((results / "soups" / "best_on_val.json").read_text())["selected"] == f"{best.hp}/fold{best.fold}"
    assert table.loc["best_on_val", "val_bacc"] == pytest.approx(best.val_bacc, abs=1e-6)
    for method in ("greedy_fold0", "greedy_soup", "gsgs"):
        rec = json.loads((results / "soups" / f"{method}.json").read_text())
        assert rec["metric"] == "balanced_accuracy"
        last = [s for s in rec["steps"] if s["accepted"]][-1]
        assert last["fold_accs"] == rec["fold_baccs"] and last["score"] == rec["val_bacc"]  # decided on bacc
        assert rec["val_bacc"] == min(rec["fold_baccs"].values())  # MinAcc of balanced accuracy
        if method in table.index:  # per-fold soups are no row of methods.csv
            assert table.loc[method, "test_bacc"] == pytest.approx(rec["test_bacc"], abs=1e-6)
    subsets = pd.read_csv(results / "tables" / "uniform_subsets.csv")
    reliability = pd.read_csv(results / "tables" / "reliability.csv")
    assert set(reliability.metric) == {"balanced_accuracy"}
    ones = subsets[subsets.n == 1]
    rmse = math.sqrt(((ones.min_bacc - ones.test_bacc) ** 2).mean())
    assert reliability.loc[reliability.n == 1, "rmse_min_acc"].iloc[0] == pytest.approx(rmse, abs=1e-5)
    summary = (results / "summary.md").read_text()
    assert "score of every selection and table: balanced accuracy" in summary
    assert "## Table 2: Pearson correlation of MinBAcc and test balanced accuracy" in summary
