"""Models at chance: a fine-tune whose loss explodes without turning NaN is not "diverged", but
its val accuracy is no better than always predicting the fold's largest class. It is flagged in
its log, in tables/models.csv and in summary.md, and the summary says when such a model sets
Table 2's threshold (which keeps the paper's definition).

The rule (foldsoup.analysis.reliability.chance_ceiling): at chance = own-fold val accuracy not significantly
above that fold's majority-class rate, by a one-sided exact binomial test at p = 0.01. Checked
against scipy's binomial distribution, on hand-made tables, and on a tiny real fine-tune at
lr 1000 (digits, width-8 CNN: the loss reaches ~1e14 in one epoch and never turns NaN).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from foldsoup.analysis import reliability as analysis
from foldsoup.report import summary
from foldsoup.analysis.reliability import at_chance, chance_ceiling, majority_rate, reliability_table

# ---------------------------------------------------------------- the rule, known answers


def test_chance_ceiling_known_answers():
    # n = 10, rate 0.5: P(X >= 10) = 1/1024, P(X >= 9) = 11/1024, P(X >= 8) = 56/1024.
    assert chance_ceiling(10, 0.5, 0.01) == 0.9
    assert chance_ceiling(10, 0.5, 0.05) == 0.8
    # n = 4, rate 0.25: P(X = 4) = 1/256 <= 0.01 < P(X >= 3) = 13/256.
    assert chance_ceiling(4, 0.25, 0.01) == 0.75
    assert chance_ceiling(3, 1.0) == 1.0  # one class only: every accuracy is chance
    assert math.isnan(chance_ceiling(0, 0.5))


@pytest.mark.parametrize("n, rate", [(136, 0.3382), (89, 0.2022), (1000, 0.1), (10_000, 0.1), (50_000, 0.1)])
def test_chance_ceiling_is_the_exact_binomial_critical_value(n, rate):
    stats = pytest.importorskip("scipy.stats")
    ceiling = chance_ceiling(n, rate)
    c = round(ceiling * n) + 1  # the smallest count that is significantly above chance
    assert stats.binom.sf(c - 1, n, rate) <= 0.01 < stats.binom.sf(c - 2, n, rate)


def test_at_chance_compares_counts():
    assert at_chance(0.9, 10, 0.5) and not at_chance(1.0, 10, 0.5)
    assert at_chance(0.8999999, 10, 0.5)  # a float32 mean of 9/10
    assert not at_chance(0.9000001, 10, 0.4)  # 9 of 10 against 0.4 is significant
    assert not at_chance(float("nan"), 0, 0.5)  # no val images: nothing to tell
    assert majority_rate([0, 0, 1, 2]) == 0.5


# ---------------------------------------------------------------- threshold and summary

MODELS = pd.DataFrame(
    [("a", 0, 0.78, 0.78, False, False), ("a", 1, 0.80, 0.79, False, False), ("b", 0, 0.81, 0.80, False, False),
     ("b", 1, 0.34, 0.33, False, True), ("c", 0, 0.10, 0.10, True, True), ("c", 1, 0.82, 0.81, False, False)],
    columns=["hp", "fold", "val_acc", "test_acc", "diverged", "at_chance"])
SUBSETS = pd.DataFrame([(hp, str(f), 1, v, v, t) for hp, f, v, t, *_ in MODELS.itertuples(index=False)],
                       columns=["hp", "folds", "n", "avg_acc", "min_acc", "test_acc"])
METHODS = pd.DataFrame({"method": ["best_on_val"], "val_acc": [0.82], "test_acc": [0.81], "n_ingredients": [1]})


def test_a_model_at_chance_sets_the_threshold_and_is_named():
    table = reliability_table(SUBSETS, MODELS, k=2)
    # The paper's threshold: the lowest val accuracy of a non-diverged model, at chance or not.
    assert (table["threshold"] == 0.34).all()
    assert (table["threshold_model"] == "b/fold1").all() and table["threshold_at_chance"].all()
    assert list(table.columns) == list(analysis.RELIABILITY_COLUMNS)
    fine = reliability_table(SUBSETS, MODELS.assign(at_chance=False), k=2)
    assert fine["threshold_model"].iloc[0] == "b/fold1" and not fine["threshold_at_chance"].any()
    older = reliability_table(SUBSETS, MODELS.drop(columns="at_chance"), k=2)  # models.csv before the column
    assert older["threshold_at_chance"].isna().all() and (older["threshold"] == 0.34).all()


def _summary(models: pd.DataFrame) -> str:
    return summary.render_summary(reliability_table(SUBSETS, models, k=2), METHODS, models, SUBSETS,
                                  {"dataset": "digits", "model": "digits_cnn", "k": 2})


def test_summary_lists_models_at_chance_and_says_one_sets_the_threshold():
    text = _summary(MODELS)
    rule = ("at chance = own-fold val accuracy not significantly above the share of that fold's largest class "
            "(one-sided exact binomial test, p > 0.01)")
    # c/fold0 diverged: listed as diverged, not again as at chance.
    assert (f"- models at chance: 1 (b/fold1); {rule}; they learned nothing, yet they are not diverged and stay in "
            "the soups and in Table 2's threshold\n") in text
    assert "34.00% in this run (set by b/fold1), 97.20% in the paper. " in text
    assert ("**The threshold is set by a model at chance**: b/fold1's val accuracy is not significantly above its fold's "
            "largest-class share (binomial test, p > 0.01), so 'corr over thre' keeps nearly every "
            "soup and tells little beyond 'corr for all'. The paper's definition is kept; without the models at chance "
            "the lowest val accuracy would be 78.00% (a/fold0). ") in text


def test_summary_without_models_at_chance():
    text = _summary(MODELS.assign(at_chance=False))
    assert "- models at chance: none (at chance = own-fold val accuracy" in text
    assert "34.00% in this run (set by b/fold1), 97.20% in the paper. A correlation" in text
    assert "set by a model at chance" not in text
    older = _summary(MODELS.drop(columns="at_chance"))  # no column: nothing claimed either way
    assert "models at chance" not in older and "(set by b/fold1)" in older


def test_summary_lists_fine_tunes_that_started_far_and_those_below_their_probe():
    guarded = MODELS.assign(started_far=[False, False, True, False, True, False],
                            lp_val_acc=[0.70, 0.70, 0.75, 0.40, 0.90, 0.90])
    text = _summary(guarded)
    # c/fold0 diverged: listed as diverged only; b/fold0 started far; b/fold1 and c/fold1 end below their probes.
    assert "- fine-tunes that started far from their LP init: 1 (b/fold0); started far = first epoch's mean loss " in text
    assert "- fine-tunes ending below their linear probe's val accuracy: 2 of 5\n" in text
    calm = _summary(MODELS.assign(started_far=False))
    assert "- fine-tunes that started far from their LP init: none (started far = " in calm
    assert "started far" not in _summary(MODELS) and "below their linear probe" not in _summary(MODELS)


# ---------------------------------------------------------------- a real fine-tune at lr 1000

ABSURD_LR, GOOD_LR = 1000.0, 0.003


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """prepare, folds, pretrain, fold 0's linear probe and two fine-tunes (lr 1000 and 0.003) of
    fold 0, then models.csv, the fold subsets and reliability.csv, as the workflow's steps do;
    the logs of the fine-tunes are kept."""
    import contextlib
    import io

    from foldsoup import steps
    from foldsoup.config.schema import grid_points, validate

    root = tmp_path_factory.mktemp("chance") / "results"
    cfg = validate({"results": str(root), "seed": 0, "device": "cpu",
                    "data": {"name": "digits", "classes": [1, 2, 3], "pretrain_classes": [0, 4, 6], "test_fraction": 0.5},
                    "model": {"name": "digits_cnn", "width": 8}, "pretrain": {"epochs": 1}, "folds": {"k": 2},
                    "lp": {"max_iter": 2}, "finetune": {"epochs": 1, "batch_size": 32, "warmup_steps": 1},
                    "grid": {"lr": [ABSURD_LR, GOOD_LR], "aug": ["minimal"], "mixup": [False]}})
    data, folds = str(root / "prepared" / "dataset.safetensors"), str(root / "folds.csv")
    backbone, head = str(root / "pretrained" / "backbone.safetensors"), str(root / "lp" / "fold0" / "head.safetensors")
    steps.prepare(cfg, data)
    steps.folds(cfg, data, folds)
    steps.pretrain(cfg, data, backbone)
    steps.linear_probe(cfg, data, folds, backbone, 0, head)
    hps = {p.lr: p.name for p in grid_points(cfg)}
    logs = {}
    for lr, hp in hps.items():
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            steps.finetune(cfg, data, folds, backbone, head, hp, 0, str(root / "models" / hp / "fold0"), str(root / ".resume"))
        logs[lr] = err.getvalue()
    metrics = [str(root / "models" / hp / "fold0" / "metrics.json") for hp in hps.values()]
    models_log = io.StringIO()
    with contextlib.redirect_stderr(models_log):
        steps.models_table(metrics, str(root / "tables" / "models.csv"))
    subsets = []
    for hp in hps.values():
        subsets.append(str(root / "analysis" / f"{hp}.csv"))
        steps.uniform_subsets(cfg, data, folds, hp, [str(root / "models" / hp / "fold0" / "model.safetensors")],
                                 [str(root / "models" / hp / "fold0" / "metrics.json")], subsets[-1])
    steps.reliability(subsets, str(root / "tables" / "models.csv"), str(root / "tables" / "uniform_subsets.csv"),
                         str(root / "tables" / "reliability.csv"))
    return {"root": root, "hps": hps, "logs": logs, "models_log": models_log.getvalue(), "data": data, "folds": folds,
            "metrics": {lr: json.loads(Path(p).read_text()) for lr, p in zip(hps, metrics)}}


@pytest.mark.slow
def test_lr_1000_explodes_without_nan_and_is_flagged_at_chance(run):
    from foldsoup.data.prepared import load_prepared
    from foldsoup.data.folds import read_folds

    labels = load_prepared(run["data"]).pool_labels
    val = labels[read_folds(run["folds"], labels) == 0]
    majority = np.bincount(val).max() / len(val)
    bad, good = run["metrics"][ABSURD_LR], run["metrics"][GOOD_LR]
    # The loss exploded but stayed finite, so the model is not diverged: the case the flag is for.
    assert not bad["diverged"] and math.isfinite(bad["final_loss"]) and bad["final_loss"] > 1e6
    assert bad["val_images"] == len(val) and bad["val_majority"] == pytest.approx(majority)
    assert bad["chance_ceiling"] == chance_ceiling(len(val), majority)
    assert bad["val_acc"] <= bad["chance_ceiling"] and bad["at_chance"]
    assert good["val_acc"] > good["chance_ceiling"] and not good["at_chance"]
    hp = run["hps"][ABSURD_LR]
    warnings = [line for line in run["logs"][ABSURD_LR].splitlines() if "WARNING" in line]
    # Two warnings: its first epoch left the probe far behind (the first-step guard), and it ends at chance.
    far = [line for line in warnings if "started far from its LP init" in line]
    warning = [line for line in warnings if ": at chance: " in line]
    assert len(warnings) == 2 and len(far) == 1 and bad["started_far"] and not good["started_far"]
    assert len(warning) == 1 and re.search(
        rf"WARNING {re.escape(hp)}/fold0: at chance: val acc {bad['val_acc']:.4f} is not above {bad['chance_ceiling']:.4f}, "
        rf"the most a model blind to its input plausibly reaches on fold 0's {len(val)} val images \(largest class "
        rf"{majority:.4f}; binomial test at p = 0\.01\); final train loss .*\. It learned nothing: lower lr 1000 in grid\.lr "
        r"or check the data\. It is not diverged, so it still enters the soups and Table 2's threshold$", warning[0])
    assert "WARNING" not in run["logs"][GOOD_LR]


def test_models_csv_and_reliability_csv_name_it(run):
    root, hp = run["root"], run["hps"][ABSURD_LR]
    models = pd.read_csv(root / "tables" / "models.csv")
    assert dict(zip(models.hp, models.at_chance)) == {hp: True, run["hps"][GOOD_LR]: False}
    assert f"foldsoup: warning: 1 of 2 models are at chance (they learned nothing, yet stay in the soups): {hp}/fold0" in run["models_log"]
    rel = pd.read_csv(root / "tables" / "reliability.csv")
    assert (rel.threshold_model == f"{hp}/fold0").all() and rel.threshold_at_chance.all()
    assert rel.threshold.iloc[0] == pytest.approx(run["metrics"][ABSURD_LR]["val_acc"], abs=1e-6)
