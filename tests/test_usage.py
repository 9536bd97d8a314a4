"""The user commands on saved weights: `foldsoup evaluate` and `foldsoup predict` (and the
reading of new images the way `prepare` read the training images)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from foldsoup import cli, steps
from foldsoup.config.schema import validate
from foldsoup.data.prepared import load_prepared
from foldsoup.data.folds import HOLDOUT, read_folds
from foldsoup.models.build import build_classifier
from foldsoup.training.loop import ImageSpec, predict_logits
from foldsoup.usage import evaluate, predict, read_images
from foldsoup.storage.weights import save_weights

SPEC = ImageSpec(8, [0.5], [0.5], False)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A prepared digits dataset with an outer holdout, and a (random) digits_cnn saved with the
    metadata the workflow writes."""
    root = tmp_path_factory.mktemp("usage")
    cfg = validate({"results": str(root), "seed": 0, "device": "cpu",
                    "data": {"name": "digits", "classes": [1, 2, 3], "pretrain_classes": [0, 4], "test_fraction": 0.5},
                    "model": {"name": "digits_cnn", "width": 8}, "folds": {"k": 2, "holdout_fraction": 0.2}})
    data, folds = str(root / "dataset.safetensors"), str(root / "folds.csv")
    steps.prepare(cfg, data)
    steps.folds(cfg, data, folds)
    torch.manual_seed(0)
    model = build_classifier(cfg["model"], 3)
    weights = str(root / "model.safetensors")
    save_weights(weights, model.state_dict(), {"model": cfg["model"], "classes": ["1", "2", "3"], "image": vars(SPEC),
                                               "source": {"dataset": "digits", "resize": "stretch"}})
    return model.eval(), weights, data, folds, root


def _acc(model, images, labels) -> float:
    logits = predict_logits(model, torch.from_numpy(images), SPEC, 64)
    return float((logits.argmax(1).numpy() == labels).mean())


def test_evaluate_reports_test_folds_and_holdout(saved):
    model, weights, data, folds, _ = saved
    d = load_prepared(data)
    fold_of = read_folds(folds, d.pool_labels)
    out = evaluate(weights, data, folds, device="cpu")
    assert out["test_acc"] == pytest.approx(_acc(model, d.test_images, d.test_labels))
    assert out["test_images"] == len(d.test_labels)
    for key, mask in (("val_acc_fold0", fold_of == 0), ("val_acc_fold1", fold_of == 1), ("holdout_acc", fold_of == HOLDOUT)):
        assert out[key] == pytest.approx(_acc(model, d.pool_images[mask], d.pool_labels[mask])), key


def test_evaluate_prints_exact_fractions(saved, capsys):
    """correct/total beside every accuracy, and the accuracy is that fraction (no float32 mean)."""
    model, weights, data, folds, _ = saved
    d = load_prepared(data)
    fold_of = read_folds(folds, d.pool_labels)
    assert cli.main(["evaluate", weights, "--data", data, "--folds", folds, "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key, images, labels in (("test_acc", d.test_images, d.test_labels),
                                ("val_acc_fold1", d.pool_images[fold_of == 1], d.pool_labels[fold_of == 1]),
                                ("holdout_acc", d.pool_images[fold_of == HOLDOUT], d.pool_labels[fold_of == HOLDOUT])):
        correct = int((predict_logits(model, torch.from_numpy(images), SPEC, 64).argmax(1).numpy() == labels).sum())
        assert out[f"{key}_exact"] == f"{correct}/{len(labels)}", key
        assert out[key] == correct / len(labels), key
    assert "ingredient_folds" not in out  # this file's metadata names no fold


def test_predict_reads_pngs_like_the_prepared_images(saved, tmp_path, capsys):
    model, weights, data, _, _ = saved
    d = load_prepared(data)
    paths = []
    for i in range(4):
        paths.append(str(tmp_path / f"digit{i}.png"))
        Image.fromarray(d.test_images[i, 0]).save(paths[-1])
    probs = predict_logits(model, torch.from_numpy(d.test_images[:4]), SPEC, 4).softmax(1)
    got = list(predict(weights, paths, device="cpu"))
    for (path, label, p), want in zip(got, probs):
        assert label == ["1", "2", "3"][int(want.argmax())] and p == pytest.approx(float(want.max()), abs=1e-6)
    assert cli.main(["predict", weights, *paths, "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[:2] for line in lines] == [[p, label] for p, label, _ in got]


def test_predict_errors_name_the_file(saved, tmp_path, capsys):
    _, weights, *_ = saved
    assert cli.main(["predict", weights, str(tmp_path / "missing.png"), "--device", "cpu"]) == 1
    assert f"image '{tmp_path / 'missing.png'}' does not exist" in capsys.readouterr().err


def test_imagefolder_models_read_new_images_as_prepare_did(tmp_path):
    """An imagefolder model's images were decoded by Pillow and resized (here: centre crop) in
    `prepare`; predict must do the same, not stretch the raw file on the device."""
    from foldsoup.data.imagefolder import read_image as read_as_prepared

    rng = np.random.default_rng(0)
    path = tmp_path / "wide.png"
    Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(path)
    source = {"dataset": "imagefolder", "resize": "center_crop"}
    [ours] = read_images([str(path)], 3, source, 16)
    assert ours.shape == (3, 16, 16)
    assert np.array_equal(ours.numpy(), read_as_prepared(path, 16, "center_crop"))
    [raw] = read_images([str(path)], 3, {"dataset": "cifar10"}, 16)  # other datasets: decoded as is
    assert raw.shape == (3, 24, 40)


def test_workflow_weights_record_their_source(saved):
    from foldsoup.storage.weights import load_weights

    _, weights, *_ = saved
    assert load_weights(weights)[1]["source"] == {"dataset": "digits", "resize": "stretch"}
    cfg = validate({"data": {"name": "digits", "classes": [1, 2], "pretrain_classes": [0, 4]}, "model": {"name": "digits_cnn"},
                    "folds": {"k": 2}})
    ctx = steps.Context.__new__(steps.Context)  # metadata() needs only cfg, data and spec
    ctx.cfg, ctx.spec = cfg, SPEC
    ctx.data = type("D", (), {"classes": ["1", "2"], "background": None})()
    assert ctx.metadata()["source"] == {"dataset": "digits", "resize": "stretch"}
    assert json.dumps(ctx.metadata())  # all of it goes into safetensors metadata as JSON
