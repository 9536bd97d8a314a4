"""Soup the models you already have (issue 22): `models_from`, a CSV of checkpoints trained
outside foldsoup (checkpoint, fold, config), on data with its own folds (a manifest's fold column).

Tiny timm models (`test_resnet`, a BatchNorm CNN that timm ships, random init) are trained here
with plain PyTorch, as a user's own script would, on the grouped manifest of tests/test_manifest.py
with its fold column, and saved as users save them: torch.save of a training checkpoint with a
DataParallel `module.` prefix for one config, safetensors for the other. Nothing is downloaded.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

timm = pytest.importorskip("timm")
from safetensors.torch import load_file, save_file  # noqa: E402
from test_manifest import CLASSES, COLUMNS, _rows, problems_of, write_manifest  # noqa: E402

from conftest import ROOT, clean_env, snakemake  # noqa: E402
from foldsoup import steps  # noqa: E402
from foldsoup.data.folds import read_folds  # noqa: E402
from foldsoup.data.prepared import load_prepared  # noqa: E402
from foldsoup.errors import ModelError  # noqa: E402
from foldsoup.storage.weights import load_weights  # noqa: E402

ARCH = "test_resnet"
K = 3
SIZE = 16
CONFIGS = {"lr3e-2": 3e-2, "lr1e-2": 1e-2}  # label -> the learning rate of the user's own script
STEPS = 30


def data_section(manifest: Path) -> dict:
    return {"name": "csv", "manifest": str(manifest), "columns": COLUMNS, "image_size": SIZE, "mean": [0.5],
            "std": [0.5], "interpolation": "bilinear"}


def base_config(manifest: Path, models_csv: Path | None, results: Path) -> dict:
    return {"results": str(results), "device": "cpu", "data": data_section(manifest),
            "model": {"name": "timm", "arch": ARCH, "pretrained": None}, "folds": {"k": K, "holdout_fraction": 0},
            "models_from": None if models_csv is None else str(models_csv)}


# ---------------------------------------------------------------- the user's side: plain PyTorch


def user_images(manifest: Path, rows: list[dict]) -> torch.Tensor:
    """The user's own loader: PIL, resized to SIZE, scaled to [-1, 1]."""
    from PIL import Image

    arrays = [np.asarray(Image.open(manifest.parent / r["image_id"]).convert("RGB").resize((SIZE, SIZE), Image.BICUBIC))
              for r in rows]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    return (x - 0.5) / 0.5


def train_outside(manifest: Path, lr: float, fold: int, seed: int) -> torch.nn.Module:
    """A timm classifier trained on every fold but `fold` (the user's k-fold cross-validation)."""
    rows = [r for r in _rows(split=True, fold=True) if r["split"] != "test" and int(r["fold"]) != fold]
    x, y = user_images(manifest, rows), torch.tensor([CLASSES.index(r["dx"]) for r in rows])
    torch.manual_seed(seed)
    model = timm.create_model(ARCH, pretrained=False, num_classes=len(CLASSES))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    g = torch.Generator().manual_seed(seed)
    for _ in range(STEPS):
        idx = torch.randperm(len(y), generator=g)[:16]
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def save_as_user(model_or_state, path: Path, prefix: str = "") -> Path:
    """torch.save of a training checkpoint (the state dict under "state_dict", with `prefix`), or
    safetensors of the plain state dict, by the file's suffix."""
    state = model_or_state if isinstance(model_or_state, dict) else model_or_state.state_dict()
    state = {prefix + k: v.detach().clone().contiguous() for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"epoch": STEPS, "arch": ARCH, "state_dict": state}, path)
    return path


def write_models_csv(path: Path, rows: list[tuple[str, int, str]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["checkpoint", "fold", "config"])
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one torch thread is several times faster than two on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def user(tmp_path_factory, one_thread):
    """The manifest with its folds, 2 configs x 3 folds trained outside foldsoup, the CSV."""
    base = tmp_path_factory.mktemp("byo")
    manifest = write_manifest(base / "data", _rows(split=True, fold=True))
    listed = []
    for c, (label, lr) in enumerate(CONFIGS.items()):
        for fold in range(K):
            model = train_outside(manifest, lr, fold, seed=10 * c + fold)
            if c == 0:  # a DataParallel model's torch checkpoint
                file = save_as_user(model, base / "ckpt" / f"{label}_fold{fold}.pth", prefix="module.")
            else:
                file = save_as_user(model, base / "ckpt" / f"{label}_fold{fold}.safetensors")
            listed.append((f"ckpt/{file.name}", fold, label))
    models_csv = write_models_csv(base / "models.csv", listed)
    return {"base": base, "manifest": manifest, "csv": models_csv, "listed": listed}


def prepared(user, results: Path) -> tuple[dict, str, str]:
    from foldsoup.config.schema import validate

    cfg = validate(base_config(user["manifest"], user["csv"], results))
    data, folds = str(results / "prepared" / "dataset.safetensors"), str(results / "folds.csv")
    steps.prepare(cfg, data)
    steps.folds(cfg, data, folds)
    return cfg, data, folds


# ---------------------------------------------------------------- (a) the import job's files


def direct_counts(checkpoint: Path, data_path: str, folds_path: str) -> tuple[dict, tuple[int, int]]:
    """Counts of the user's own model (timm, their checkpoint loaded by hand) on the prepared
    images, normalised as the run's data.mean/std say: {fold: (correct, total)}, test."""
    if checkpoint.suffix == ".safetensors":
        state = load_file(str(checkpoint))
    else:
        state = {k.removeprefix("module."): v for k, v in torch.load(checkpoint, weights_only=True)["state_dict"].items()}
    model = timm.create_model(ARCH, pretrained=False, num_classes=len(CLASSES))
    model.load_state_dict(state)
    model.eval()
    d = load_prepared(data_path)
    fold_of = read_folds(folds_path, d.pool_labels)

    def predict(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model((torch.from_numpy(images).float() / 255.0 - 0.5) / 0.5).argmax(1).numpy()

    pool, test = predict(d.pool_images), predict(d.test_images)
    folds = {f: (int((pool[fold_of == f] == d.pool_labels[fold_of == f]).sum()), int((fold_of == f).sum()))
             for f in range(K)}
    return folds, (int((test == d.test_labels).sum()), len(d.test_labels))


def test_an_imported_checkpoint_scores_as_the_users_own_model(user, tmp_path):
    cfg, data, folds = prepared(user, tmp_path / "results")
    for checkpoint, fold, label in user["listed"]:
        out = tmp_path / "results" / "models" / label / f"fold{fold}"
        steps.import_model(cfg, data, folds, str(user["base"] / checkpoint), label, fold, str(out))
        m = json.loads((out / "metrics.json").read_text())
        fold_counts, test_count = direct_counts(user["base"] / checkpoint, data, folds)
        assert {int(i): tuple(c) for i, c in m["fold_counts"].items()} == fold_counts, checkpoint
        assert (m["test_correct"], m["test_total"]) == test_count
        assert (m["val_correct"], m["val_total"]) == fold_counts[fold]
        assert m["val_acc"] == fold_counts[fold][0] / fold_counts[fold][1]
        assert m["test_acc"] == test_count[0] / test_count[1]
        assert (m["hp"], m["fold"], m["lr"], m["aug"], m["mixup"], m["diverged"]) == (label, fold, None, None, None, False)
        assert m["lp_val_acc"] is None and m["started_far"] is None and m["steps"] is None
        state, meta = load_weights(out / "model.safetensors")
        assert meta["kind"] == "import" and meta["checkpoint"] == str(user["base"] / checkpoint)
        assert meta["classes"] == CLASSES and meta["hp"] == label and meta["fold"] == fold
        assert {"head.weight", "head.bias"} <= set(state) and any(k.startswith("backbone.") for k in state)
    # `foldsoup evaluate` takes the imported weights as any model foldsoup wrote (no "not written by foldsoup").
    from foldsoup.usage import evaluate

    checkpoint, fold, label = user["listed"][0]
    scores = evaluate(str(tmp_path / "results" / "models" / label / f"fold{fold}" / "model.safetensors"), data, folds, "cpu")
    assert scores["test_acc"] == json.loads((tmp_path / "results" / "models" / label / f"fold{fold}" /
                                             "metrics.json").read_text())["test_acc"]


# ---------------------------------------------------------------- (b) the DAG and (c) a real run


def overlay(user, results: Path, **extra) -> Path:
    cfg = base_config(user["manifest"], user["csv"], results)
    cfg.update({"analysis": {"bootstrap_resamples": 100, "max_subsets_per_n": None},
                "finetune": {"eval_batch_size": 64}, "budget": {"enabled": True, "draws": 1}, **extra})
    path = results.parent / "my_models.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_dry_run_has_one_import_job_per_checkpoint_and_no_training(user, tmp_path):
    run = snakemake("-n", "--cores", "2", "--configfile", str(ROOT / "presets" / "manifest-cpu.yaml"),
                    str(overlay(user, tmp_path / "results")))
    assert run.returncode == 0, run.tail()
    print("dry run with models_from (2 configs x 3 folds):", json.dumps(run.stats))
    assert run.stats["import_model"] == len(CONFIGS) * K
    assert not {"pretrain", "lp", "finetune"} & set(run.stats), run.stats
    assert run.stats["greedy_fold"] == K and run.stats["uniform_subsets"] == len(CONFIGS) and run.stats["gsgs"] == 1
    assert run.stats["budget"] == K and run.stats["summary"] == 1 and run.stats["ship"] == 1


@pytest.mark.slow
def test_a_run_on_imported_models_goes_to_the_end(user, tmp_path):
    results = tmp_path / "results"
    run = snakemake("--cores", "2", "--configfile", str(ROOT / "presets" / "manifest-cpu.yaml"),
                    str(overlay(user, results)), env=clean_env(HF_HUB_OFFLINE="1"))
    assert run.returncode == 0, run.tail(80)
    print(f"real run on imported models: {run.seconds:.0f} s,", json.dumps(run.stats))
    import pandas as pd

    models = pd.read_csv(results / "tables" / "models.csv")
    assert models.hp.tolist() == [label for label in CONFIGS for _ in range(K)] and models.lr.isna().all()
    methods = pd.read_csv(results / "tables" / "methods.csv")
    assert {"gsgs", "bgss", "greedy_soup", "uniform_soup", "best_on_val"} <= set(methods.method)
    ship = json.loads((results / "ship" / "ship.json").read_text())
    assert ship["method"] == "gsgs" and (results / "ship" / "model.safetensors").is_file()
    summary = (results / "summary.md").read_text()
    assert "imported from models_from" in summary and (results / "tables" / "budget.csv").is_file()
    assert f"- imported models (trained outside foldsoup): {len(CONFIGS) * K}" in summary
    assert "fine-tuned models" not in summary and "started far" not in summary  # no fine-tune, no first-step guard
    # Replacing one checkpoint reruns its import and what follows it, no other import.
    checkpoint = user["base"] / user["listed"][-1][0]
    checkpoint.write_bytes(checkpoint.read_bytes())
    again = snakemake("-n", "--cores", "2", "--configfile", str(ROOT / "presets" / "manifest-cpu.yaml"),
                      str(overlay(user, results)))
    assert again.returncode == 0 and again.stats.get("import_model") == 1, again.tail()
    assert again.stats["greedy_fold"] == 1 and "prepare" not in again.stats, again.stats


# ---------------------------------------------------------------- (d) bad CSVs and checkpoints: one line


def _bad_csv(user, tmp_path, rows) -> tuple[list[str], Path]:
    path = write_models_csv(tmp_path / "bad.csv", rows)
    for checkpoint, _, _ in rows:  # the checkpoints beside the CSV, so relative paths hold
        src = user["base"] / checkpoint
        if src.is_file():
            (tmp_path / checkpoint).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / checkpoint).write_bytes(src.read_bytes())
    return problems_of(base_config(user["manifest"], path, tmp_path / "results")), path


def test_bad_csv_rows_are_one_line_naming_file_row_and_column(user, tmp_path):
    good = list(user["listed"])
    cases = {
        "unknown fold": ([*good[:2], (good[2][0], 3, good[2][2]), *good[3:]], 4, "fold",
                         "fold '3' is not a fold of this run; allowed: 0..2 (folds.k = 3, the folds of the data's fold "
                         "column)"),
        "twice": ([*good, (good[0][0].replace("fold0", "fold0b"), 0, good[0][2])], None, None, None),
        "unsafe label": ([(good[0][0], 0, "lr 3e-2"), *good[1:]], 2, "config",
                         "config 'lr 3e-2' is not a safe name; allowed: letters, digits, '.', '_' and '-' (it names the "
                         "folder models/<config>/ and the hp column)"),
        "suffix": ([("ckpt/model.h5", 0, good[0][2]), *good[1:]], 2, "checkpoint",
                   "'model.h5' is not a weights file name; allowed suffixes: .safetensors, .pt, .pth, .bin, .ckpt "
                   "(safetensors, or a torch file read with weights_only=True)"),
    }
    printed = []
    for case, (rows, line, column, message) in cases.items():
        if case == "twice":
            twin = tmp_path / rows[-1][0]
            twin.parent.mkdir(parents=True, exist_ok=True)
            twin.write_bytes((user["base"] / good[0][0]).read_bytes())
            problems, path = _bad_csv(user, tmp_path, rows)
            assert problems == [f"models_from {str(path)!r} line 8 (checkpoint {rows[-1][0]!r}), column 'fold': config "
                                f"'lr3e-2' fold 0 again (line 2 has it); every (config, fold) has one checkpoint"]
        else:
            problems, path = _bad_csv(user, tmp_path, rows)
            assert problems == [f"models_from {str(path)!r} line {line} (checkpoint {rows[line - 2][0]!r}), column "
                                f"{column!r}: {message}"], case
        printed += problems
    # A config without all k folds, a fold without any checkpoint: named, with what to do.
    problems, path = _bad_csv(user, tmp_path, [r for r in good if not (r[2] == "lr1e-2" and r[1] == 1)])
    assert problems == [f"models_from {str(path)!r} line 5 (checkpoint 'ckpt/lr1e-2_fold0.safetensors'), column 'config': "
                        f"config 'lr1e-2' has no checkpoint of fold(s) 1; every config needs all k = 3 folds, as a grid "
                        f"point does (its per-fold soups and Tables 1-2 take one model per fold)"]
    printed += problems
    problems, path = _bad_csv(user, tmp_path, [r for r in good if r[1] != 2])
    assert problems == [f"models_from {str(path)!r}, column 'fold': fold 2 has no checkpoint; folds.k = 3 needs "
                        f"checkpoints of every fold 0..2 (set folds.k to the number of your folds)"]
    missing = tmp_path / "nope.csv"
    assert problems_of(base_config(user["manifest"], missing, tmp_path / "r")) == [
        f"models_from {str(missing)!r} does not exist; allowed: a CSV file with a row per checkpoint (columns checkpoint, "
        f"fold, config)"]
    # The data must give the folds: a manifest without its fold column is refused naming the key to set.
    (problem,) = problems_of({**base_config(user["manifest"], user["csv"], tmp_path / "r"),
                              "data": {**data_section(user["manifest"]), "columns": {**COLUMNS, "fold": None}}})
    assert problem == ("models_from: the checkpoints' folds must be the data's own: data.name 'csv' with a fold column "
                       "(data.columns.fold: each train/val image's fold 0..k-1, the fold it was validated on); "
                       "data.columns.fold is null: set it to the column of data.manifest holding each image's fold")
    print("\n".join(printed))


def test_a_mismatched_checkpoint_names_the_file_and_the_tensor(user, tmp_path):
    cfg, data, folds = prepared(user, tmp_path / "results")
    out = str(tmp_path / "out")
    # Another architecture's weights: the first tensor that does not fit is named.
    other = timm.create_model("test_efficientnet", pretrained=False, num_classes=len(CLASSES))
    wrong = save_as_user(other, tmp_path / "efficientnet.safetensors")
    with pytest.raises(ModelError) as info:
        steps.import_model(cfg, data, folds, str(wrong), "lr3e-2", 0, out)
    assert str(info.value).startswith(f"{wrong}: no classifier 'fc.weight' (timm's classifier of {ARCH}, "
                                      f"pretrained_cfg['classifier']); tensors the backbone lacks: ")
    # Same arch, another number of classes: the classifier's shape against the data's classes.
    ten = save_as_user(timm.create_model(ARCH, pretrained=False, num_classes=10), tmp_path / "ten.pth", prefix="module.")
    with pytest.raises(ModelError) as info:
        steps.import_model(cfg, data, folds, str(ten), "lr3e-2", 0, out)
    assert str(info.value) == (f"{ten}: tensor 'fc.weight' has shape [10, 96], the configured model's head (3 classes "
                               f"of the data, 96 features) expects [3, 96]")
    # The backbone alone (saved with num_classes=0): cannot be scored, says what to give.
    bare = save_as_user(timm.create_model(ARCH, pretrained=False, num_classes=0), tmp_path / "bare.safetensors")
    with pytest.raises(ModelError) as info:
        steps.import_model(cfg, data, folds, str(bare), "lr3e-2", 0, out)
    assert str(info.value) == (f"{bare}: no classifier 'fc.weight' (timm's classifier of {ARCH}, "
                               f"pretrained_cfg['classifier']); a checkpoint without its classifier cannot be scored: "
                               f"save the state_dict of the whole model with its linear classifier over the 3 classes")
    # A tensor of the backbone with another shape (a wider first convolution): file and tensor named.
    state = load_file(str(user["base"] / user["listed"][3][0]))
    key = next(k for k, v in state.items() if v.ndim == 4)  # the first convolution
    shape = list(state[key].shape)
    state[key] = torch.zeros(shape[0] + 8, *shape[1:])
    odd = save_as_user(state, tmp_path / "odd.safetensors")
    with pytest.raises(ModelError) as info:
        steps.import_model(cfg, data, folds, str(odd), "lr3e-2", 0, out)
    print(info.value)
    assert str(info.value) == (f"{odd}: tensor {key!r} has shape {[shape[0] + 8, *shape[1:]]}, the backbone of this "
                               f"model.arch expects {shape}")
    assert not (tmp_path / "out" / "metrics.json").exists()


# ---------------------------------------------------------------- (e) imported = trained inside


def test_the_same_models_imported_give_the_same_soups_as_trained_inside(user, tmp_path):
    """Models fine-tuned by foldsoup itself, exported to a user's layout (timm keys, classifier
    `fc`, `module.` prefix, torch.save) and imported again: the same metrics, the same per-fold
    greedy soups and GSGS, the same weights."""
    from tiny_runs import TinyRun, train_tiny_run

    cfg = {**base_config(user["manifest"], None, tmp_path / "inside"), "lp": {"max_iter": 10, "l2": [0.01]},
           "finetune": {"epochs": 1, "batch_size": 16, "warmup_steps": 1, "eval_batch_size": 64},
           "grid": {"lr": [0.01], "aug": ["minimal"], "mixup": [False, True]}}
    del cfg["models_from"]
    run = TinyRun(tmp_path / "inside", cfg)
    r = train_tiny_run(run, run.hps, K)
    listed = []
    for hp in r.hps:
        for fold in range(K):
            state, _ = load_weights(r.model_dir(hp, fold) / "model.safetensors")
            user_state = {k.removeprefix("backbone.").replace("head.", "fc.", 1) if k.startswith("head.") else
                          k.removeprefix("backbone."): v for k, v in state.items()}
            file = save_as_user(user_state, tmp_path / "exported" / f"{hp}_fold{fold}.pt", prefix="module.")
            listed.append((f"exported/{file.name}", fold, hp))
    models_csv = write_models_csv(tmp_path / "models.csv", listed)
    from foldsoup.config.schema import validate

    icfg = validate(base_config(user["manifest"], models_csv, tmp_path / "imported"))
    imported = tmp_path / "imported" / "models"
    for checkpoint, fold, hp in listed:
        steps.import_model(icfg, r.data, r.folds, str(tmp_path / checkpoint), hp, fold, str(imported / hp / f"fold{fold}"))
        inside = json.loads((r.model_dir(hp, fold) / "metrics.json").read_text())
        outside = json.loads((imported / hp / f"fold{fold}" / "metrics.json").read_text())
        assert list(outside) == list(inside)  # field for field what a fine-tune writes
        for key in ("val_acc", "test_acc", "fold_counts", "fold_accs", "val_correct", "test_correct", "at_chance"):
            assert outside[key] == inside[key], (hp, fold, key)
    soups = {}
    for name, root in (("inside", r.root / "models"), ("imported", imported)):
        out = tmp_path / f"soups_{name}"
        for fold in range(K):
            models = [str(root / hp / f"fold{fold}" / "model.safetensors") for hp in r.hps]
            steps.greedy_per_fold(r.cfg, r.data, r.folds, fold, models, [m.replace("model.safetensors", "metrics.json")
                                                                           for m in models],
                                  str(out / f"greedy_fold{fold}.safetensors"), str(out / f"uniform_fold{fold}.safetensors"))
        steps.gsgs(r.cfg, r.data, r.folds, [str(out / f"greedy_fold{fold}.safetensors") for fold in range(K)],
                   str(out / "gsgs.safetensors"))
        soups[name] = out
    for soup in [*(f"greedy_fold{f}" for f in range(K)), *(f"uniform_fold{f}" for f in range(K)), "gsgs"]:
        a = json.loads((soups["inside"] / f"{soup}.json").read_text())
        b = json.loads((soups["imported"] / f"{soup}.json").read_text())
        for key in ("ingredients", "fold_accs", "val_acc", "test_acc"):
            assert a[key] == b[key], (soup, key)
        wa, wb = load_weights(soups["inside"] / f"{soup}.safetensors")[0], load_weights(soups["imported"] / f"{soup}.safetensors")[0]
        assert all(torch.equal(wa[k], wb[k]) for k in wa), soup


# ---------------------------------------------------------------- open_clip image towers


def test_open_clip_tower_checkpoints_map_into_the_configured_model(tmp_path):
    """An open_clip image tower with a linear head, in the layouts training scripts write: a
    whole model with `visual.*` and `head.*` under Lightning's `state_dict` and `model.` prefix,
    and model soups' ImageClassifier (`image_encoder.model.visual.*`, `classification_head.*`)."""
    pytest.importorskip("open_clip")
    from foldsoup.models.build import build_classifier
    from foldsoup.models.imported import classifier_state

    model_cfg = {"name": "open_clip", "arch": "ViT-S-32", "pretrained": None, "quick_gelu": False,
                 "normalize_features": True}
    torch.manual_seed(0)
    source = build_classifier(model_cfg, 3)  # the user's tower and head, random weights
    tower = {k: v.half() for k, v in source.backbone.state_dict().items()}  # saved in fp16, as CLIP checkpoints are
    head = source.head.state_dict()
    lightning = tmp_path / "clip.ckpt"
    torch.save({"state_dict": {**{f"model.visual.{k}": v for k, v in tower.items()},
                               **{f"model.head.{k}": v for k, v in head.items()}}}, lightning)
    soups = save_as_user({**{f"image_encoder.model.visual.{k}": v for k, v in tower.items()},
                          **{f"classification_head.{k}": v for k, v in head.items()}}, tmp_path / "soups.safetensors")
    target = build_classifier(model_cfg, 3)
    for path in (lightning, soups):
        state = classifier_state(target, model_cfg, path)
        assert set(state) == set(target.state_dict())
        assert torch.equal(state["head.weight"], head["weight"]), path
        assert all(torch.equal(state[f"backbone.{k}"], v.float()) for k, v in tower.items()), path
    with pytest.raises(ModelError, match=r"soups_no_head.safetensors: no classifier 'head.weight' or 'classifier.weight'"):
        classifier_state(target, model_cfg, save_as_user({f"visual.{k}": v for k, v in tower.items()},
                                                         tmp_path / "soups_no_head.safetensors"))


def test_job_configs_with_models_from(user, tmp_path):
    """The import job depends on the image spec, the model and the fine-tunes' precision and save
    dtype (its checkpoint is its input file), never on the grid; the budget draws from the configs
    of the CSV. A run without models_from keeps its jobs' configurations."""
    from foldsoup.config.job import job_config
    from foldsoup.config.schema import hp_names, validate

    cfg = validate(base_config(user["manifest"], user["csv"], tmp_path / "r"))
    assert hp_names(cfg) == list(CONFIGS)
    imported = job_config(cfg, "import_model")
    assert "grid" not in imported and "models_from" not in imported
    assert imported["finetune"] == {"precision": "fp32", "save_dtype": "float32"}
    budget = job_config(cfg, "budget")
    assert budget["models_from"] == str(user["csv"]) and "grid" not in budget
    trained = validate(base_config(user["manifest"], None, tmp_path / "r"))
    assert "models_from" not in job_config(trained, "budget") and "grid" in job_config(trained, "budget")
    assert "models_from" not in job_config(trained, "summary")
    # budget.grid_points counts configs, not grid points.
    (problem,) = problems_of({**base_config(user["manifest"], user["csv"], tmp_path / "r"), "budget": {"grid_points": [3]}})
    assert problem == ("budget.grid_points[0]: 3 is larger than the 2 configs of models_from; "
                       "allowed: 1 <= value <= 2 (or null)")
