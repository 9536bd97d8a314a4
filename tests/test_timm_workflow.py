"""End to end through Snakemake with a timm backbone (`model.name: timm`): an ImageFolder of real
images, a BatchNorm timm model (`test_efficientnet`, timm's tiny test architecture) whose weights
come from a file saved the way timm saves a model (classifier and all), 2 grid points x 2 folds,
every soup, then `foldsoup evaluate` and `predict` on the saved soup spanning both folds.

Nothing is downloaded (HF_HUB_OFFLINE=1): the file route is the one a user without network takes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

# Workflow runs (Snakemake, a SLURM cluster or served jobs): outside the fast lane.
pytestmark = pytest.mark.slow

timm = pytest.importorskip("timm")

from conftest import ROOT, clean_env, snakemake  # noqa: E402
from foldsoup.storage.weights import load_weights  # noqa: E402

ARCH = "test_efficientnet"
CLASSES = {1: "one", 3: "three", 7: "seven"}  # digit -> class folder
COLOURS = {1: (255, 80, 0), 3: (0, 200, 255), 7: (120, 255, 40)}
PER_CLASS = 10
K = 2


def write_images(folder: Path) -> list[Path]:
    """Real digit scans (scikit-learn), 8x8 upscaled to 24x24, drawn in a class colour, as PNGs."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    written = []
    for digit, name in CLASSES.items():
        (folder / name).mkdir(parents=True)
        grey = d.images[d.target == digit][:PER_CLASS] / 16.0
        for i, img in enumerate(grey):
            rgb = np.rint(np.kron(img, np.ones((3, 3)))[..., None] * np.array(COLOURS[digit])).astype(np.uint8)
            path = folder / name / f"{i:02d}.png"
            Image.fromarray(rgb).save(path)
            written.append(path)
    return written


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("timm_run")
    images = write_images(base / "images")
    # timm's own layout: the state dict of a model with its 1000-class classifier, BatchNorm
    # statistics moved away from their initial values as after training.
    torch.manual_seed(0)
    source = timm.create_model(ARCH, pretrained=False)
    with torch.no_grad():
        source.train()(torch.rand(8, 3, 32, 32))
    weights = base / f"{ARCH}.pth"
    torch.save(source.state_dict(), weights)
    results = base / "results"
    cfg = {
        "results": str(results), "seed": 0, "device": "cpu",
        "data": {"name": "imagefolder", "root": str(base / "images"), "test_fraction": 0.3, "image_size": 32},
        "model": {"name": "timm", "arch": ARCH, "pretrained": str(weights)},
        "folds": {"k": K, "holdout_fraction": 0},
        "lp": {"max_iter": 10},
        "finetune": {"epochs": 1, "batch_size": 7, "warmup_steps": 1, "eval_batch_size": 64},
        "grid": {"lr": [0.001], "aug": ["minimal"], "mixup": [False, True]},
        "analysis": {"bootstrap_resamples": 100},
        "budget": {"enabled": False},
    }
    config = base / "timm.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = snakemake("--cores", "2", "--configfile", str(config), env=clean_env(HF_HUB_OFFLINE="1"))
    assert out.returncode == 0, f"timm run failed:\n{out.tail(80)}"
    return {"results": results, "weights": weights, "source": source, "images": images, "run": out}


def _soup(results: Path, name: str) -> tuple[dict, dict]:
    return load_weights(results / "soups" / f"{name}.safetensors")[0], json.loads((results / "soups" / f"{name}.json").read_text())


def test_pretrained_backbone_is_the_files_weights_without_classifier(run):
    backbone, meta = load_weights(run["results"] / "pretrained" / "backbone.safetensors")
    source = run["source"].state_dict()
    assert set(source) - set(backbone) == {"classifier.weight", "classifier.bias"}
    assert all(torch.equal(backbone[k], source[k]) for k in backbone)
    assert meta["model"] == {"name": "timm", "arch": ARCH, "pretrained": str(run["weights"]), "normalize_features": False}


def test_image_settings_come_from_the_pretrained_config_unless_set(run):
    """image_size was set (32, below the pretrained 160); mean, std and interpolation were not:
    the weights' own (timm's pretrained configuration of test_efficientnet)."""
    _, meta = load_weights(run["results"] / "models" / "lr0.001_minimal_nomix" / "fold0" / "model.safetensors")
    assert meta["image"] == {"size": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "hflip": False,
                             "interpolation": "bicubic"}


def test_soup_spanning_folds_averages_batchnorm_statistics(run):
    results = run["results"]
    state, rec = _soup(results, "uniform_soup")
    assert rec["folds"] == [0, 1] and rec["n_ingredients"] == 4
    models = [load_weights(p)[0] for p in sorted((results / "models").glob("*/fold*/model.safetensors"))]
    assert len(models) == 4
    for key in ("backbone.bn1.running_mean", "backbone.bn1.running_var", "backbone.conv_stem.weight", "head.weight"):
        torch.testing.assert_close(state[key], torch.stack([m[key] for m in models]).mean(0))
    counter = "backbone.bn1.num_batches_tracked"
    assert state[counter].dtype == torch.int64
    assert int(state[counter]) == sum(int(m[counter]) for m in models) // 4
    methods = (results / "tables" / "methods.csv").read_text()
    for method in ("best_on_val", "uniform_soup", "greedy_soup", "bgss", "gsgs"):
        assert f"\n{method}," in methods


def test_evaluate_and_predict_rebuild_the_saved_soup(run):
    results = run["results"]
    for name in ("uniform_soup", "gsgs"):
        _, rec = _soup(results, name)
        out = subprocess.run([sys.executable, "-m", "foldsoup", "evaluate", str(results / "soups" / f"{name}.safetensors"),
                              "--data", str(results / "prepared" / "dataset.safetensors"), "--folds",
                              str(results / "folds.csv"), "--device", "cpu"],
                             cwd=ROOT, env=clean_env(PYTHONPATH=str(ROOT / "src")), capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        scores = json.loads(out.stdout)
        assert scores["test_acc"] == pytest.approx(rec["test_acc"])
        assert set(scores) >= {"val_acc_fold0", "val_acc_fold1"}
    images = [str(p) for p in run["images"][:: PER_CLASS]]  # one of each class
    out = subprocess.run([sys.executable, "-m", "foldsoup", "predict", str(results / "soups" / "uniform_soup.safetensors"),
                          *images, "--device", "cpu"], cwd=ROOT, env=clean_env(PYTHONPATH=str(ROOT / "src")),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3 and all(line.split()[0] in images for line in lines)
    assert all(any(name in line for name in CLASSES.values()) for line in lines)
