"""One GSGS: the workflow's step (`steps.gsgs`) is the library's `select.gsgs`, on real weights
with the answer worked out here from the guide's definition; and the GSGS ensemble weighs each
per-fold soup the same, as GSGS does (steps.methods on hand-made logits)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")

from foldsoup import steps  # noqa: E402
from foldsoup.errors import SoupError  # noqa: E402
from foldsoup.soups import select  # noqa: E402
from foldsoup.soups.average import average  # noqa: E402
from foldsoup.steps.context import Context  # noqa: E402
from foldsoup.steps.soups import predictions_path, soup_record  # noqa: E402
from foldsoup.storage.weights import load_weights, save_weights  # noqa: E402

try:
    from tiny_runs import TinyRun  # noqa: E402
except ImportError:  # tests/ imported as a package
    from tests.tiny_runs import TinyRun  # noqa: E402

K = 3


@pytest.fixture(scope="module")
def fold_soups(tmp_path_factory):
    """Prepared digits, k = 3 folds and one per-fold soup per fold, with the records `greedy_fold`
    writes (the soup's val accuracy on its own fold). No training: the configured model's random
    backbone and, per fold, a nearest-centroid head on its training part, moved at random, so the
    soups differ (the selection sees only accuracies)."""
    from foldsoup.training.loop import extract_features

    r = TinyRun(tmp_path_factory.mktemp("gsgs") / "results", {
        "seed": 0, "device": "cpu",
        "data": {"name": "digits", "classes": [1, 2, 3], "pretrain_classes": [0, 4], "test_fraction": 0.5, "max_pool": 120},
        "model": {"name": "digits_cnn", "width": 8},
        "folds": {"k": K},
        "finetune": {"eval_batch_size": 16},
        "grid": {"lr": [0.001], "aug": ["minimal"], "mixup": [False]},
    })
    steps.prepare(r.cfg, r.data)
    steps.folds(r.cfg, r.data, r.folds)
    ctx = Context(r.cfg, r.data, r.folds)
    ev, model = ctx.evaluator(), ctx.model()
    features = extract_features(model, ctx.tensor(ctx.data.pool_images), ctx.spec, 64, "fp32")
    labels, fold_of = torch.from_numpy(ctx.data.pool_labels), torch.from_numpy(ctx.fold_of)
    g = torch.Generator().manual_seed(4)
    paths = []
    for fold in range(K):
        train = fold_of != fold
        centroids = torch.stack([features[train & (labels == c)].mean(0) for c in range(ctx.data.num_classes)])
        state = {**model.state_dict(), "head.bias": -(centroids**2).sum(1) / 2,
                 "head.weight": centroids + 0.2 * centroids.std() * torch.randn(centroids.shape, generator=g)}
        path = r.root / "soups" / f"greedy_fold{fold}.safetensors"
        save_weights(path, state)
        record = soup_record(f"greedy_fold{fold}", [f"hp/fold{fold}"], ev.fold_accs(state, [fold]), "min")
        path.with_suffix(".json").write_text(json.dumps(record))
        paths.append(str(path))
    return r, paths


def test_the_workflow_step_is_the_library_gsgs_and_gives_the_guides_answer(fold_soups, monkeypatch):
    r, paths = fold_soups
    calls, library = [], select.gsgs
    monkeypatch.setattr(select, "gsgs", lambda *args, **kwargs: calls.append((args, kwargs)) or library(*args, **kwargs))
    out = r.root / "soups" / "gsgs.safetensors"
    steps.gsgs(r.cfg, r.data, r.folds, paths, str(out))

    records = [json.loads(Path(p).with_suffix(".json").read_text()) for p in paths]
    own = {fold: rec["val_acc"] for fold, rec in enumerate(records)}
    ((per_fold, _), settings), = calls
    assert per_fold == own
    assert settings == {"accept": r.cfg["soups"]["greedy_accept"], "cross_fold": r.cfg["soups"]["cross_fold_val"],
                        "early_exit": r.cfg["soups"]["early_exit"]}

    # The guide's GSGS (the defaults: `>=`, MinAcc): the per-fold soups sorted by their own val
    # accuracy (ties: fold order), each one ingredient; a soup joins when MinAcc over the folds
    # included after adding it is >= the soup's MinAcc without it; the first always joins.
    assert (settings["accept"], settings["cross_fold"]) == (">=", "min")
    ev = Context(r.cfg, r.data, r.folds).evaluator()
    soups = [load_weights(p)[0] for p in paths]

    def min_acc(folds):
        return min(ev.fold_accs(average(soups[f] for f in folds), folds).values())

    order = sorted(range(K), key=lambda f: -own[f])
    accepted, best = [order[0]], min_acc([order[0]])
    for fold in order[1:]:
        score = min_acc([*accepted, fold])
        if score >= best:
            accepted, best = [*accepted, fold], score

    assert 1 < len(accepted) < K  # a real contest: a soup joins, another does not

    gsgs = json.loads(out.with_suffix(".json").read_text())
    assert gsgs["ingredients"] == [f"greedy_fold{f}" for f in accepted]
    assert gsgs["val_acc"] == float(best) and gsgs["val_metric"] == "min"
    assert [s["candidate"] for s in gsgs["steps"]] == [f"greedy_fold{f}" for f in order]
    weights = load_weights(out)[0]
    expected = average(soups[f] for f in accepted)  # each soup weighs the same, whatever its models
    assert all(torch.equal(weights[k], expected[k]) for k in expected)


def test_a_per_fold_soup_spanning_folds_is_refused_naming_it(fold_soups, tmp_path):
    r, paths = fold_soups
    record = json.loads(Path(paths[0]).with_suffix(".json").read_text())
    bad = tmp_path / "greedy_fold0.safetensors"
    bad.with_suffix(".json").write_text(json.dumps({**record, "folds": [0, 1]}))
    with pytest.raises(SoupError, match=re.escape(f"{bad}: a per-fold greedy soup spans folds [0, 1]")):
        steps.gsgs(r.cfg, r.data, r.folds, [str(bad), *paths[1:]], str(tmp_path / "gsgs.safetensors"))


# ------------------------------------------------------------------------ the GSGS ensemble


def _write_logits(path: Path, **arrays: np.ndarray) -> None:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.astype(np.float32) for k, v in arrays.items()}, str(path))


def test_the_gsgs_ensemble_weighs_each_per_fold_soup_the_same(tmp_path):
    """GSGS took fold 0's soup (one model) and fold 1's (three models). On the label-0 images the
    fold-0 model says [2, 0] and the three fold-1 models [0, 1]; on label-1 images every model
    says [0, 1]. Per soup then over soups: [1, 0.5] (right everywhere); per model: [0.5, 0.75]
    (wrong on every label-0 image, val and test accuracy 0.5)."""
    from foldsoup.config.schema import validate
    from foldsoup.data.folds import write_folds
    from foldsoup.data.prepared import Prepared, save_prepared

    pool_labels, test_labels = np.array([0, 1, 0, 1]), np.array([0, 1])
    fold_of = np.array([0, 0, 1, 1])
    data, folds = tmp_path / "dataset.safetensors", tmp_path / "folds.csv"
    image = np.zeros((1, 1, 2, 2), dtype=np.uint8)
    save_prepared(data, Prepared("toy", ["zero", "one"], image.repeat(4, 0), pool_labels, image.repeat(2, 0), test_labels))
    write_folds(folds, pool_labels, fold_of)

    def logits(labels, label0):
        return np.array([label0 if y == 0 else [0.0, 1.0] for y in labels])

    soup_models = {0: ["a/fold0"], 1: ["a/fold1", "b/fold1", "c/fold1"]}
    models_dir, soups = tmp_path / "models", tmp_path / "soups"
    rows = []
    for hp in "abc":
        for fold in (0, 1):
            label0 = [2.0, 0.0] if f"{hp}/fold{fold}" == "a/fold0" else [0.0, 1.0]
            _write_logits(models_dir / hp / f"fold{fold}" / "predictions.safetensors",
                          pool_logits=logits(pool_labels, label0), test_logits=logits(test_labels, label0))
            rows.append({"hp": hp, "fold": fold, "val_acc": 0.5, "test_acc": 0.5, "diverged": False})
    pd.DataFrame(rows).to_csv(tmp_path / "models.csv", index=False)

    def soup(method, ingredients, fold_accs):
        soups.mkdir(exist_ok=True)
        (soups / f"{method}.json").write_text(json.dumps({**soup_record(method, ingredients, fold_accs, "min"),
                                                          "test_acc": 0.5, "holdout_acc": None}))
        _write_logits(predictions_path(soups / f"{method}.safetensors"), test_logits=logits(test_labels, [0.0, 1.0]))

    soup("uniform_soup", [f"{hp}/fold{f}" for hp in "abc" for f in (0, 1)], {0: 0.5, 1: 0.5})
    soup("greedy_soup", ["a/fold0"], {0: 1.0})
    for fold, names in soup_models.items():
        soup(f"greedy_fold{fold}", names, {fold: 0.5})
        soup(f"uniform_fold{fold}", [f"{hp}/fold{fold}" for hp in "abc"], {fold: 0.5})
    soup("gsgs", ["greedy_fold0", "greedy_fold1"], {0: 0.5, 1: 0.5})

    cfg = validate({"results": str(tmp_path / "results"), "data": {"name": "digits"}, "model": {"name": "digits_cnn"},
                    "folds": {"k": 2}}, check_paths=False)
    out = tmp_path / "methods.csv"
    steps.methods(cfg, str(data), str(folds), str(tmp_path / "models.csv"), str(models_dir), str(soups), str(out))
    row = pd.read_csv(out).set_index("method").loc["ensemble_gsgs"]
    assert (row.val_acc, row.test_acc, row.n_ingredients, row.folds) == (1.0, 1.0, 4, "0-1")
