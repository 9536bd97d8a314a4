"""Soups of BatchNorm models (model.norm: batch): running statistics averaged like weights, step
counters (`num_batches_tracked`) as their integer mean, train/eval modes where they belong.

The tiny real run (digits, a width-8 BatchNorm CNN, k = 2, 2 grid points x 1 epoch) goes through
the pipeline functions the workflow rules call. Its folds' training parts hold 31 and 32 images
and a batch is 8 images, so fold 0's models take 3 steps and fold 1's take 4: their counters
differ, which made every soup spanning both folds fail before.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

# Workflow runs (Snakemake, a SLURM cluster or served jobs): outside the fast lane.
pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")

from foldsoup import steps  # noqa: E402

try:
    from tiny_runs import TinyRun, train_tiny_run  # noqa: E402
except ImportError:  # tests/ imported as a package
    from tests.tiny_runs import TinyRun, train_tiny_run  # noqa: E402
from foldsoup.data.prepared import load_prepared  # noqa: E402
from foldsoup.data.folds import read_folds, train_indices  # noqa: E402
from foldsoup.models.build import build_classifier  # noqa: E402
from foldsoup.training.loop import ImageSpec, extract_features, linear_probe, predict_logits  # noqa: E402
from foldsoup.storage.weights import load_weights  # noqa: E402

K = 2
BATCH = 8
COUNTER = "backbone.1.num_batches_tracked"  # the first BatchNorm2d of digits_cnn


class Run(TinyRun):
    def __init__(self, root: Path):
        super().__init__(root, {
            "seed": 0, "device": "cpu",
            "data": {"name": "digits", "classes": [1, 2, 3], "pretrain_classes": [0, 4, 6, 8, 9], "test_fraction": 0.5,
                     "max_pool": 63},
            "model": {"name": "digits_cnn", "width": 8, "norm": "batch"},
            "pretrain": {"epochs": 2},
            "folds": {"k": K, "holdout_fraction": 0},
            "lp": {"max_iter": 10},
            # Batch statistics in training (not the default, frozen): the step counters then differ.
            "finetune": {"epochs": 1, "batch_size": BATCH, "warmup_steps": 1, "batchnorm": "train"},
            "grid": {"lr": [0.003, 0.001], "aug": ["minimal"], "mixup": [False]},
        })

    def lists(self, fold: int | None = None) -> tuple[list[str], list[str]]:
        dirs = [self.model_dir(hp, f) for hp in self.hps for f in range(K) if fold is None or f == fold]
        return [str(d / "model.safetensors") for d in dirs], [str(d / "metrics.json") for d in dirs]

    def soup(self, name: str) -> tuple[dict, dict]:
        return load_weights(self.root / "soups" / f"{name}.safetensors")[0], json.loads((self.root / "soups" / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    r = Run(tmp_path_factory.mktemp("batchnorm") / "results")
    train_tiny_run(r, r.hps, K)
    models, metrics = r.lists()
    soups = r.root / "soups"
    steps.models_table(metrics, str(r.root / "tables" / "models.csv"))
    for hp in r.hps:
        steps.uniform_subsets(r.cfg, r.data, r.folds, hp, [m for m in models if f"/{hp}/" in m],
                                 [m for m in metrics if f"/{hp}/" in m], str(r.root / "analysis" / f"{hp}.csv"))
    for fold in range(K):
        fold_models, fold_metrics = r.lists(fold)
        steps.greedy_per_fold(r.cfg, r.data, r.folds, fold, fold_models, fold_metrics,
                                 str(soups / f"greedy_fold{fold}.safetensors"), str(soups / f"uniform_fold{fold}.safetensors"))
    steps.uniform_all(r.cfg, r.data, r.folds, models, metrics, str(soups / "uniform_soup.safetensors"))
    steps.greedy_all(r.cfg, r.data, r.folds, models, metrics, str(soups / "greedy_soup.safetensors"))
    steps.gsgs(r.cfg, r.data, r.folds, [str(soups / f"greedy_fold{i}.safetensors") for i in range(K)],
                  str(soups / "gsgs.safetensors"))
    return r


def _counter(path: Path | str) -> int:
    return int(load_weights(path)[0][COUNTER])


def test_folds_train_different_step_counts(run):
    """The premise: the two folds' models carry different counters (else nothing is tested)."""
    d = load_prepared(run.data)
    fold_of = read_folds(run.folds, d.pool_labels)
    assert [len(train_indices(fold_of, i)) // BATCH for i in range(K)] == [3, 4]
    pretrained = int(load_weights(run.backbone)[0][COUNTER[len("backbone."):]])
    assert pretrained == 2 * (len(d.pretrain_labels) // 64)  # pretrain: 2 epochs of 64-image steps
    for hp in run.hps:
        counters = []
        for fold in range(K):
            steps = json.loads((run.model_dir(hp, fold) / "metrics.json").read_text())["steps"]
            # Fine-tuning adds one count per step; the linear probe (frozen features) and the
            # evaluations after training (eval mode) add none.
            assert _counter(run.model_dir(hp, fold) / "model.safetensors") == pretrained + steps
            counters.append(pretrained + steps)
        assert counters == [pretrained + 3, pretrained + 4]


def test_models_table_carries_the_first_step_guard_and_the_lp_it_started_from(run):
    table = pd.read_csv(run.root / "tables" / "models.csv")
    assert {"lp_val_acc", "lp_step_loss", "first_step_loss", "first_epoch_loss", "started_far"} <= set(table.columns)
    for row in table.itertuples():
        metrics = json.loads((run.model_dir(row.hp, row.fold) / "metrics.json").read_text())
        head_meta = load_weights(run.head(row.fold))[1]
        assert row.lp_val_acc == pytest.approx(head_meta["val_acc"], abs=1e-6)
        assert row.lp_step_loss == pytest.approx(metrics["lp_step_loss"], rel=1e-5) and row.lp_step_loss > 0
        assert row.first_epoch_loss == pytest.approx(metrics["first_epoch_loss"], rel=1e-5)
        assert bool(row.started_far) == metrics["started_far"]
    # The head's metadata records the L2 fit (chosen strength, sweep on the inner split).
    fit = load_weights(run.head(0))[1]["fit"]
    assert fit["l2"] in run.cfg["lp"]["l2"] and set(fit["sweep"]) == {f"{v:g}" for v in run.cfg["lp"]["l2"]}


def test_uniform_soup_spans_folds_with_averaged_statistics(run):
    state, rec = run.soup("uniform_soup")
    ingredients = [load_weights(run.model_dir(hp, f) / "model.safetensors")[0] for hp in run.hps for f in range(K)]
    assert rec["n_ingredients"] == 4 and rec["folds"] == [0, 1]
    for key in ("backbone.1.running_mean", "backbone.1.running_var", "backbone.4.running_var", "backbone.0.weight"):
        torch.testing.assert_close(state[key], torch.stack([s[key] for s in ingredients]).mean(0))
    counters = [int(s[COUNTER]) for s in ingredients]
    assert len(set(counters)) == 2
    assert state[COUNTER].dtype == torch.int64
    assert int(state[COUNTER]) == sum(counters) // 4  # (2(P+3) + 2(P+4)) / 4 = P + 3.5 -> P + 3


def test_every_soup_step_succeeds_and_scores_what_it_saved(run):
    from foldsoup.usage import evaluate

    for name in ("uniform_soup", "greedy_soup", "gsgs", "greedy_fold0", "uniform_fold1"):
        state, rec = run.soup(name)
        assert 0 <= rec["test_acc"] <= 1
        # The saved weights (averaged statistics included) are the ones that were scored.
        assert evaluate(str(run.root / "soups" / f"{name}.safetensors"), run.data, run.folds, "cpu")["test_acc"] == pytest.approx(rec["test_acc"])
        # Every soup's counter lies between its models' counters.
        counters = [_counter(run.model_dir(hp, int(fold)) / "model.safetensors")
                    for hp, fold in (name.split("/fold") for name in _models_of(run, rec))]
        assert min(counters) <= int(state[COUNTER]) <= max(counters)


def _models_of(run, rec: dict) -> list[str]:
    """The single models under a soup record (GSGS's ingredients are per-fold soups)."""
    out = []
    for ing in rec["ingredients"]:
        out += _models_of(run, run.soup(ing)[1]) if "/fold" not in ing else [ing]
    return out


def test_uniform_subsets_include_the_soup_of_both_folds(run):
    for hp in run.hps:
        table = pd.read_csv(run.root / "analysis" / f"{hp}.csv", dtype={"folds": str})
        assert sorted(table.folds) == ["0", "0-1", "1"]
        assert table.min_acc.between(0, 1).all()


def test_budget_soups_span_folds(run):
    from foldsoup.steps import budget

    out = run.root / "analysis" / "budget" / "f2.csv"
    budget(run.cfg, run.data, run.folds, str(run.root / "models"), K, str(out))
    table = pd.read_csv(out, dtype={"grid": str, "folds": str})
    assert {"uniform_soup", "greedy_soup", "gsgs"} <= set(table.method)
    assert (table.loc[table.method == "uniform_soup", "folds"] == "0-1").all()


# ---------------------------------------------------------------- train/eval modes


def _bn_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_classifier({"name": "digits_cnn", "width": 8, "norm": "batch"}, 3)


def _buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.named_buffers()}


def test_linear_probe_and_prediction_leave_running_statistics_alone():
    model = _bn_model()
    model.train()  # as a model is left after fine-tuning: every step below must switch to eval
    before = _buffers(model)
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (24, 1, 8, 8), dtype=torch.uint8, generator=gen)
    labels = torch.arange(24) % 3
    spec = ImageSpec(8, [0.5], [0.5], False)
    linear_probe(model, images, labels, spec, {"l2": [0.01, 0.1], "inner_val_fraction": 0.25, "max_iter": 10,
                                               "batch_size": 8}, "fp32", 0, lambda m: None)
    model.train()
    logits = predict_logits(model, images, spec, 8)
    model.train()
    feats = extract_features(model, images, spec, 24, "fp32")
    after = _buffers(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "running statistics changed outside training"
    # Eval mode: an image's output does not depend on the rest of its batch.
    torch.testing.assert_close(predict_logits(model, images, spec, 1), logits)
    torch.testing.assert_close(extract_features(model, images[:5], spec, 5, "fp32"), feats[:5])


def test_norm_group_is_the_default_and_batch_swaps_the_layers():
    group = build_classifier({"name": "digits_cnn", "width": 8}, 3)  # weights saved before model.norm existed
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in group.modules())
    bn = _bn_model()
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in bn.modules()) == 3
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in bn.modules())
    with pytest.raises(ValueError, match=r"model.norm: 'layer' is unknown; allowed: 'group', 'batch'"):
        build_classifier({"name": "digits_cnn", "width": 8, "norm": "layer"}, 3)
