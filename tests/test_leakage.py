"""No selection decision depends on test data; diverged models never enter a soup.

A tiny real run (digits, a width-8 CNN, k = 2, 3 grid points x 2 folds x 1 epoch; seconds on
a CPU) through the pipeline functions the workflow rules call, no Snakemake:

* leakage: every soup step (per-fold greedy and uniform soups, BGSS, greedy soup over all
  models, GSGS, uniform soup, best on val, the section 3.1 subsets, the methods table) runs
  twice on the same fine-tuned models: once with the real test labels, once with them
  permuted. Ingredients, greedy steps, every val accuracy and the soups' weights must be
  identical; test accuracies must differ somewhere (so the permutation was seen at all).
  Fine-tuning itself is rerun on the permuted data too: same weights, same val accuracies.
* divergence: a learning rate of 1e30 makes the loss non-finite. With
  finetune.on_divergence = error the job stops naming grid point, fold and step; with exclude
  the model is saved marked diverged and no soup takes it.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")

from foldsoup import steps  # noqa: E402

try:
    from tiny_runs import TinyRun, train_tiny_run  # noqa: E402
except ImportError:  # tests/ imported as a package
    from tests.tiny_runs import TinyRun, train_tiny_run  # noqa: E402
from foldsoup.config.schema import grid_points  # noqa: E402
from foldsoup.data.prepared import load_prepared, save_prepared  # noqa: E402
from foldsoup.storage.weights import load_weights, save_weights  # noqa: E402

GOOD_LRS = [0.003, 0.001, 0.0003]
DIVERGING_LR = 1e30
K = 2


class Run(TinyRun):
    """The tiny run of this module: three good learning rates and a diverging one."""

    def __init__(self, root: Path, on_divergence: str = "error"):
        super().__init__(root, {
            "seed": 0, "device": "cpu",
            "data": {"name": "digits", "classes": [1, 2, 3, 5, 7], "pretrain_classes": [0, 4, 6, 8, 9], "test_fraction": 0.5},
            "model": {"name": "digits_cnn", "width": 8},
            "pretrain": {"epochs": 3},
            "folds": {"k": K},
            "lp": {"max_iter": 20},
            "finetune": {"epochs": 1, "batch_size": 32, "warmup_steps": 2, "on_divergence": on_divergence},
            "grid": {"lr": [*GOOD_LRS, DIVERGING_LR], "aug": ["minimal"], "mixup": [False]},
        })
        points = grid_points(self.cfg)
        self.good = [p.name for p in points if p.lr != DIVERGING_LR]
        self.diverging = next(p.name for p in points if p.lr == DIVERGING_LR)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    r = Run(tmp_path_factory.mktemp("tiny") / "results")
    return train_tiny_run(r, r.good, K)


def _model_lists(r: Run, models: Path, hps: list[str], folds=range(K)) -> tuple[list[str], list[str]]:
    dirs = [r.model_dir(hp, f, models) for hp in hps for f in folds]
    return [str(d / "model.safetensors") for d in dirs], [str(d / "metrics.json") for d in dirs]


def run_selection(r: Run, data: str, models: Path, hps: list[str], out: Path) -> dict:
    """Every soup step of the workflow, in DAG order, on the given data and models."""
    cfg, soups, tables = r.cfg, out / "soups", out / "tables"
    all_models, all_metrics = _model_lists(r, models, hps)
    steps.models_table(all_metrics, str(tables / "models.csv"))
    for hp in hps:
        m, mt = _model_lists(r, models, [hp])
        steps.uniform_subsets(cfg, data, r.folds, hp, m, mt, str(out / "analysis" / f"{hp}.csv"))
    for fold in range(K):
        m, mt = _model_lists(r, models, hps, [fold])
        steps.greedy_per_fold(cfg, data, r.folds, fold, m, mt, str(soups / f"greedy_fold{fold}.safetensors"),
                                 str(soups / f"uniform_fold{fold}.safetensors"))
    steps.uniform_all(cfg, data, r.folds, all_models, all_metrics, str(soups / "uniform_soup.safetensors"))
    steps.greedy_all(cfg, data, r.folds, all_models, all_metrics, str(soups / "greedy_soup.safetensors"))
    steps.gsgs(cfg, data, r.folds, [str(soups / f"greedy_fold{i}.safetensors") for i in range(K)],
                  str(soups / "gsgs.safetensors"))
    steps.methods(cfg, data, r.folds, str(tables / "models.csv"), str(models), str(soups), str(tables / "methods.csv"))
    records = {p.stem: json.loads(p.read_text()) for p in sorted(soups.glob("*.json"))}
    subsets = pd.concat([_read_subsets(out / "analysis" / f"{hp}.csv") for hp in hps], ignore_index=True)
    return {"records": records, "methods": pd.read_csv(tables / "methods.csv", dtype={"folds": str}),
            "models": pd.read_csv(tables / "models.csv"), "subsets": subsets, "soups": soups}


def _read_subsets(path: Path) -> pd.DataFrame:
    # A grid point whose models all diverged has no subset soups; its file may hold no header.
    if not path.read_text().strip():
        return pd.DataFrame({"hp": pd.Series(dtype=str)})
    return pd.read_csv(path, dtype={"folds": str})


def _permuted_copy(r: Run, out: Path) -> tuple[str, Path]:
    """The prepared dataset with test labels permuted, and a copy of the fine-tuned models whose
    metrics.json test accuracies are recomputed from their saved test logits on those labels
    (what fine-tuning would have written)."""
    d = load_prepared(r.data)
    rng = np.random.default_rng(1)
    perm = rng.permutation(d.test_labels)
    while (perm == d.test_labels).mean() > 0.5:
        perm = rng.permutation(d.test_labels)
    d.test_labels = perm
    data = str(out / "prepared" / "dataset.safetensors")
    save_prepared(data, d)
    models = out / "models"
    shutil.copytree(r.root / "models", models)
    for metrics in models.glob("*/fold*/metrics.json"):
        logits = load_weights(metrics.parent / "predictions.safetensors")[0]["test_logits"]
        m = json.loads(metrics.read_text())
        m["test_acc"] = float((logits.argmax(1).numpy() == perm).mean())
        metrics.write_text(json.dumps(m))
    return data, models


# ---------------------------------------------------------------- no leakage


@pytest.fixture(scope="module")
def both(run, tmp_path_factory):
    base = tmp_path_factory.mktemp("selection")
    real = run_selection(run, run.data, run.root / "models", run.good, base / "real")
    data, models = _permuted_copy(run, base / "permuted")
    permuted = run_selection(run, data, models, run.good, base / "permuted")
    return real, permuted, data


SELECTION_KEYS = ("method", "ingredients", "n_ingredients", "folds", "fold_accs", "val_metric", "val_acc")


@pytest.mark.slow
def test_soups_do_not_depend_on_test_labels(both):
    real, permuted, _ = both
    names = set(real["records"])
    assert names == set(permuted["records"])
    assert {"best_on_val", "bgss", "gsgs", "greedy_soup", "uniform_soup", "best_uniform_per_split",
            "greedy_fold0", "greedy_fold1", "uniform_fold0", "uniform_fold1"} <= names
    for name in sorted(names):
        a, b = real["records"][name], permuted["records"][name]
        for key in SELECTION_KEYS:
            assert a.get(key) == b.get(key), f"{name}: {key} changed when the test labels were permuted"
        # Every greedy decision: the candidate tried, its fold accuracies, accepted or not.
        assert a.get("steps") == b.get("steps"), f"{name}: greedy steps changed with permuted test labels"
        # The same ingredients give the same soup, bit for bit.
        wa = load_weights(real["soups"] / f"{name}.safetensors")[0]
        wb = load_weights(permuted["soups"] / f"{name}.safetensors")[0]
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    assert any(real["records"][n]["test_acc"] != permuted["records"][n]["test_acc"] for n in names)


def test_greedy_soups_made_real_decisions(both):
    """The comparison above means something only if the greedy soups tried several candidates."""
    real, _, _ = both
    assert len(real["records"]["greedy_soup"]["steps"]) == len(GOOD_LRS) * K
    assert all(len(real["records"][f"greedy_fold{i}"]["steps"]) == len(GOOD_LRS) for i in range(K))
    assert len(real["records"]["gsgs"]["steps"]) == K


def test_methods_table_val_columns_do_not_depend_on_test_labels(both):
    real, permuted, _ = both
    a, b = real["methods"], permuted["methods"]
    assert list(a.method)[:6] == ["best_on_val", "uniform_soup", "greedy_soup", "bgss", "gsgs", "best_uniform_per_split"]
    for col in ("method", "val_acc", "n_ingredients", "val_metric", "folds"):
        assert a[col].tolist() == b[col].tolist(), f"methods.csv column {col} changed with permuted test labels"
    assert (a.test_acc != b.test_acc).any()
    models_a, models_b = real["models"], permuted["models"]
    assert models_a.val_acc.tolist() == models_b.val_acc.tolist()
    assert (models_a.test_acc != models_b.test_acc).any()


def test_fold_subset_val_accuracies_do_not_depend_on_test_labels(both):
    real, permuted, _ = both
    a, b = real["subsets"], permuted["subsets"]
    val_cols = ["hp", "folds", "n", "avg_acc", "min_acc"] + [c for c in a if c.startswith("acc_fold")]
    assert a[val_cols].equals(b[val_cols])
    assert (a.test_acc != b.test_acc).any()


@pytest.mark.slow
def test_finetuning_does_not_read_test_labels(run, both, tmp_path):
    """The same fine-tune on the permuted data: identical weights and val accuracies."""
    _, _, permuted_data = both
    hp = run.good[0]
    out = run.finetune(hp, 0, data=permuted_data, models=tmp_path / "models")
    original = run.model_dir(hp, 0)
    wa, wb = load_weights(original / "model.safetensors")[0], load_weights(out / "model.safetensors")[0]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (original, out))
    assert ma["val_acc"] == mb["val_acc"] and ma["fold_accs"] == mb["fold_accs"]
    assert ma["test_acc"] != mb["test_acc"]


# ---------------------------------------------------------------- divergence


@pytest.mark.slow
def test_divergence_stops_the_job_naming_grid_point_fold_and_step(run, tmp_path):
    from foldsoup.errors import Diverged

    with pytest.raises(Diverged) as info:
        run.finetune(run.diverging, 1, models=tmp_path / "models")
    message = str(info.value)
    assert run.diverging in message and "lr1e+30" in message
    assert "fold1" in message
    assert "step 1" in message and "non-finite" in message
    assert not (tmp_path / "models" / run.diverging / "fold1" / "metrics.json").exists()


@pytest.fixture(scope="module")
def diverged(run, tmp_path_factory):
    """The good models plus the diverging grid point on both folds, fine-tuned with exclude."""
    models = tmp_path_factory.mktemp("diverged") / "models"
    shutil.copytree(run.root / "models", models)
    excluding = Run(run.root, on_divergence="exclude")
    for fold in range(K):
        excluding.finetune(run.diverging, fold, models=models)
    return excluding, models


def test_excluded_divergence_is_marked_in_metrics(diverged):
    r, models = diverged
    for fold in range(K):
        m = json.loads((r.model_dir(r.diverging, fold, models) / "metrics.json").read_text())
        assert m["diverged"] is True and m["hp"] == r.diverging and m["fold"] == fold
    for hp in r.good:
        assert json.loads((r.model_dir(hp, 0, models) / "metrics.json").read_text())["diverged"] is False


@pytest.mark.slow
def test_diverged_models_are_in_no_soup(diverged, tmp_path):
    r, models = diverged
    hps = [*r.good, r.diverging]
    sel = run_selection(r, r.data, models, hps, tmp_path)
    diverged_names = {f"{r.diverging}/fold{i}" for i in range(K)}
    good_names = {f"{hp}/fold{i}" for hp in r.good for i in range(K)}
    records = sel["records"]
    assert set(records["uniform_soup"]["ingredients"]) == good_names
    for name, rec in records.items():
        assert not diverged_names & set(rec["ingredients"]), f"{name} took a diverged model"
        tried = {s["candidate"] for s in rec.get("steps", [])}
        assert not diverged_names & tried, f"{name} considered a diverged model"
    assert len(records["greedy_soup"]["steps"]) == len(good_names)
    # The models table lists the diverged models (the report shows them); best on val skips them.
    table = sel["models"]
    assert sorted(table.loc[table.diverged.astype(bool), "hp"].unique()) == [r.diverging]
    assert records["best_on_val"]["ingredients"][0] in good_names
    # Logit ensembles (methods.csv) take the same usable models only.
    ensembles = sel["methods"].set_index("method")
    if "ensemble_all" in ensembles.index:
        assert ensembles.loc["ensemble_all", "n_ingredients"] == len(good_names)
    # Section 3.1: no subset soup of the diverged grid point is made.
    assert (sel["subsets"].hp != r.diverging).all()
    # Its weights are not finite, so averaging it in would have shown.
    w = load_weights(r.model_dir(r.diverging, 0, models) / "model.safetensors")[0]
    assert not all(torch.isfinite(v).all() for v in w.values() if v.is_floating_point())


# ---------------------------------------------------------------- mismatched ingredients


def _with_reshaped_model(run: Run, tmp_path: Path, at: int, val_acc: float | None) -> tuple[list[str], list[str]]:
    """The good models' files, the one at `at` replaced by a copy whose head has one class too
    many (a model of another config), its metrics' val accuracy set to `val_acc` (None: kept)."""
    models, metrics = _model_lists(run, run.root / "models", run.good)
    src, dst = Path(models[at]).parent, tmp_path / "odd"
    state, meta = load_weights(src / "model.safetensors")
    state["head.weight"] = torch.cat([state["head.weight"], state["head.weight"][:1]])
    state["head.bias"] = torch.cat([state["head.bias"], state["head.bias"][:1]])
    dst.mkdir(parents=True)
    save_weights(dst / "model.safetensors", state, meta)
    m = json.loads((src / "metrics.json").read_text())
    (dst / "metrics.json").write_text(json.dumps(m if val_acc is None else {**m, "val_acc": val_acc}))
    models[at], metrics[at] = str(dst / "model.safetensors"), str(dst / "metrics.json")
    return models, metrics


# SoupError (averaging) and WeightsError (loading against the model) are both ValueErrors.
@pytest.mark.slow
@pytest.mark.parametrize("step, at, val_acc", [
    ("uniform_all", -1, None),  # the last file of the uniform soup
    ("greedy_all", 0, 0.0),  # sorts last: checked against the soup of the models before it
    ("greedy_all", 0, 1.0),  # sorts first: the first candidate
], ids=["uniform", "greedy-last-candidate", "greedy-first-candidate"])
def test_a_mismatched_ingredient_is_refused_naming_model_and_tensor(run, tmp_path, step, at, val_acc):
    models, metrics = _with_reshaped_model(run, tmp_path, at, val_acc)
    with pytest.raises(ValueError) as info:
        getattr(steps, step)(run.cfg, run.data, run.folds, models, metrics, str(tmp_path / "soup.safetensors"))
    message = str(info.value)
    assert re.search(r"tensor 'head\.(weight|bias)' has shape [\[(]6\b", message), message
    # The model: its name <hp>/fold<i> (models/<hp>/fold<i>/model.safetensors) or its path.
    hp, fold = run.good[at], 0 if at == 0 else K - 1
    assert f"{hp}/fold{fold}" in message or models[at] in message, message
    assert not (tmp_path / "soup.safetensors").exists()


def test_reliability_runs_with_a_fully_diverged_grid_point(diverged, tmp_path):
    r, models = diverged
    hps = [*r.good, r.diverging]
    paths = []
    for hp in hps:
        m, mt = _model_lists(r, models, [hp])
        paths.append(str(tmp_path / f"{hp}.csv"))
        steps.uniform_subsets(r.cfg, r.data, r.folds, hp, m, mt, paths[-1])
    all_metrics = _model_lists(r, models, hps)[1]
    steps.models_table(all_metrics, str(tmp_path / "models.csv"))
    steps.reliability(paths, str(tmp_path / "models.csv"), str(tmp_path / "subsets.csv"), str(tmp_path / "rel.csv"))
    assert r.diverging not in pd.read_csv(tmp_path / "subsets.csv").hp.tolist()
