"""A small grouped dataset and the two arms of the group-leakage experiment (issue 20, point 7),
shared by tests/test_group_leakage.py and scripts/group_leakage.py.

Data: each group ("patient") is one real 8x8 digit scan from scikit-learn's digits (10
classes), upscaled 3x to 24x24, given the patient's own tint and fixed texture (a scanner's,
a skin's look) and written VIEWS times, each view shifted by up to SHIFT pixels and noised:
near-duplicates of one another, as several images of one patient are. Few patients per class
and many views each: a model memorises a patient's look long before it learns the digit, so a
view of a patient it trained on is easy and a new patient is not. The manifest has image,
label, group and split columns; the test rows are the last TEST_GROUPS patients of each class
(group-disjoint from the pool by construction), so both arms score the same test set.

Arms: "plain" sets data.columns.group: null (the folds are stratified image by image, so every
group's views land in several folds: each fold's val images have near-duplicates in its
models' training images); "group" gives the group column (StratifiedGroupKFold). Each runs
the workflow's steps in process (prepare, folds, pretrain, lp, finetune, then the soup steps
and methods), as tests/tiny_runs.py does.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

DIGITS = tuple(range(10))  # every digit: ten classes, few patients each
POOL_GROUPS = 6  # per class, in the training pool (k = 3 group folds: 2 per class per fold)
TEST_GROUPS = 4  # per class, split: test
VIEWS = 6  # images per group
UPSCALE = 3  # 8x8 -> 24x24
SHIFT = 2  # pixels, each direction
NOISE = 0.06  # Gaussian, on [0, 1] intensities, per view
TEXTURE = 0.5  # amplitude of each group's own fixed texture
K = 3
ARMS = ("plain", "group")
SEED = 0


def write_grouped_manifest(folder: Path, seed: int = SEED) -> Path:
    """PNG views and manifest.csv (image,label,group,split) under `folder`; its path."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    size = 8 * UPSCALE
    rows = []
    for digit in DIGITS:
        sources = d.images[d.target == digit]
        chosen = rng.choice(len(sources), POOL_GROUPS + TEST_GROUPS, replace=False)
        for g, source in enumerate(chosen):
            base = np.kron(sources[source] / 16.0, np.ones((UPSCALE, UPSCALE)))
            padded = np.pad(base, SHIFT)
            # The patient's own look, shared by all its views: a tint and a fixed texture.
            tint = rng.uniform(0.4, 1.0, 3)
            texture = rng.uniform(0.0, TEXTURE, (size, size, 3))
            group = f"d{digit}_p{g:02d}"
            for v in range(VIEWS):
                dy, dx = rng.integers(0, 2 * SHIFT + 1, size=2)
                view = padded[dy:dy + size, dx:dx + size, None] * tint + texture
                view = view + rng.normal(0.0, NOISE, view.shape)
                rgb = np.rint(np.clip(view, 0.0, 1.0) * 255).astype(np.uint8)
                name = f"images/{group}_v{v}.png"
                Image.fromarray(rgb, mode="RGB").save(folder / name)
                rows.append({"image": name, "label": f"digit{digit}", "group": group,
                             "split": "test" if g >= POOL_GROUPS else "train"})
    path = folder / "manifest.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def arm_config(manifest: Path, arm: str, epochs: int = 12) -> dict:
    """presets/smoke.yaml's shape (2 grid points, lp max_iter 50) on the manifest, k = 3, with a
    small randomly initialised timm CNN that memorises (no download)."""
    assert arm in ARMS, arm
    return {
        "seed": SEED, "device": "cpu",
        "data": {"name": "csv", "manifest": str(manifest), "image_size": 8 * UPSCALE, "resize": "stretch",
                 "columns": {"image": "image", "label": "label", "split": "split", "fold": None,
                             "group": "group" if arm == "group" else None}},
        "model": {"name": "timm", "arch": "test_efficientnet", "pretrained": None},
        "folds": {"k": K, "holdout_fraction": 0},
        "lp": {"max_iter": 50},
        "finetune": {"epochs": epochs, "batch_size": 16, "warmup_steps": 5, "eval_batch_size": 256},
        "grid": {"lr": [0.003], "aug": ["minimal"], "mixup": [False, True]},
        "analysis": {"bootstrap_resamples": 100},
        "budget": {"enabled": False},
    }


def run_arm(root: Path, manifest: Path, arm: str, epochs: int = 12) -> dict:
    """Train and soup one arm in `root` (a results folder); its numbers (see `summarise`)."""
    from foldsoup import steps

    try:
        from tiny_runs import TinyRun, train_tiny_run
    except ImportError:  # tests/ imported as a package
        from tests.tiny_runs import TinyRun, train_tiny_run

    r = TinyRun(root, arm_config(manifest, arm, epochs))
    train_tiny_run(r, r.hps, K)
    cfg, soups, tables = r.cfg, r.root / "soups", r.root / "tables"
    dirs = [r.model_dir(hp, f) for hp in r.hps for f in range(K)]
    models, metrics = [str(p / "model.safetensors") for p in dirs], [str(p / "metrics.json") for p in dirs]
    steps.models_table(metrics, str(tables / "models.csv"))
    for fold in range(K):
        fold_dirs = [r.model_dir(hp, fold) for hp in r.hps]
        steps.greedy_per_fold(cfg, r.data, r.folds, fold, [str(p / "model.safetensors") for p in fold_dirs],
                              [str(p / "metrics.json") for p in fold_dirs], str(soups / f"greedy_fold{fold}.safetensors"),
                              str(soups / f"uniform_fold{fold}.safetensors"))
    steps.uniform_all(cfg, r.data, r.folds, models, metrics, str(soups / "uniform_soup.safetensors"))
    steps.greedy_all(cfg, r.data, r.folds, models, metrics, str(soups / "greedy_soup.safetensors"))
    steps.gsgs(cfg, r.data, r.folds, [str(soups / f"greedy_fold{i}.safetensors") for i in range(K)],
               str(soups / "gsgs.safetensors"))
    steps.methods(cfg, r.data, r.folds, str(tables / "models.csv"), str(r.root / "models"), str(soups),
                  str(tables / "methods.csv"))
    return summarise(r.root, arm, manifest)


def summarise(root: Path, arm: str, manifest: Path) -> dict:
    """The arm's numbers from its results folder: the fine-tunes' mean own-fold val accuracy and
    mean test accuracy (gap: val - test), best_on_val's and GSGS's val and test; and how the
    groups fell, from folds.csv and the prepared test set against the manifest: pool groups
    whose views are in more than one fold, and groups in both the pool and the test set."""
    import pandas as pd

    from foldsoup.data.prepared import load_prepared

    root = Path(root)
    models = pd.read_csv(root / "tables" / "models.csv")
    methods = pd.read_csv(root / "tables" / "methods.csv").set_index("method")
    group_of = pd.read_csv(manifest).set_index("image").group
    folds = pd.read_csv(root / "folds.csv")
    folds_per_group = folds.assign(of=folds.source.map(group_of)).groupby("of").fold.nunique()
    test_groups = set(group_of[load_prepared(str(root / "prepared" / "dataset.safetensors")).test_sources])
    out = {
        "arm": arm, "folds": "group-disjoint" if folds.group.notna().all() else "stratified (images)",
        "val": float(models.val_acc.mean()), "test": float(models.test_acc.mean()),
        "best_on_val": (float(methods.loc["best_on_val", "val_acc"]), float(methods.loc["best_on_val", "test_acc"])),
        "gsgs": (float(methods.loc["gsgs", "val_acc"]), float(methods.loc["gsgs", "test_acc"])),
        "pool_groups": len(folds_per_group), "groups_in_several_folds": int((folds_per_group > 1).sum()),
        "test_groups": len(test_groups), "groups_in_pool_and_test": len(test_groups & set(folds_per_group.index)),
    }
    out["gap"] = out["val"] - out["test"]
    return out


def table(results: list[dict]) -> str:
    """The markdown table of the arms' summaries."""
    lines = ["| arm | folds | mean val acc (own fold) | mean test acc | gap | best_on_val val / test | GSGS val / test |",
             "|---|---|---|---|---|---|---|"]
    for s in results:
        lines.append(f"| {s['arm']} | {s['folds']} | {s['val']:.3f} | {s['test']:.3f} | {s['gap']:+.3f} | "
                     f"{s['best_on_val'][0]:.3f} / {s['best_on_val'][1]:.3f} | {s['gsgs'][0]:.3f} / {s['gsgs'][1]:.3f} |")
    return "\n".join(lines)
