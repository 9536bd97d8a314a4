"""Using a saved model or soup: every weights file foldsoup writes carries the model config,
the class names and the image settings in its metadata, so it loads without the workflow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .devices import place
from .models import build_classifier, load_full
from .train import ImageSpec, accuracy, predict_logits
from .weights import WeightsError, load_weights


def load_model(path: str, device: str = "auto"):
    """(model on its device, class names, image spec) from a foldsoup .safetensors file."""
    state, meta = load_weights(path)
    for key in ("model", "classes", "image"):
        if key not in meta:
            raise WeightsError(f"{path}: no {key!r} in its metadata; is it a model or soup written by foldsoup?")
    model = build_classifier(meta["model"], len(meta["classes"]))
    load_full(model, state, path)
    model.to(torch.device(place(device).device))
    return model, meta["classes"], ImageSpec(**meta["image"])


def evaluate(model_path: str, data_path: str, folds_path: str | None = None, device: str = "auto") -> dict:
    from .data import load_prepared
    from .folds import HOLDOUT, read_folds

    model, classes, spec = load_model(model_path, device)
    data = load_prepared(data_path)
    if data.classes != classes:
        raise ValueError(f"{model_path} predicts classes {classes}, {data_path} has {data.classes}")
    dev = next(model.parameters()).device
    test_logits = predict_logits(model, torch.from_numpy(data.test_images).to(dev), spec, 1024)
    out = {"model": model_path, "test_acc": accuracy(test_logits, torch.from_numpy(data.test_labels).to(dev)),
           "test_images": int(len(data.test_labels))}
    if folds_path:
        fold_of = read_folds(folds_path, data.pool_labels)
        parts = {f"val_acc_fold{i}": fold_of == i for i in range(int(fold_of.max()) + 1)}
        if (fold_of == HOLDOUT).any():
            parts["holdout_acc"] = fold_of == HOLDOUT
        for key, mask in parts.items():
            idx = np.flatnonzero(mask)
            logits = predict_logits(model, torch.from_numpy(data.pool_images[idx]).to(dev), spec, 1024)
            out[key] = accuracy(logits, torch.from_numpy(data.pool_labels[idx]).to(dev))
    return out


def read_images(paths: list[str], channels: int) -> torch.Tensor:
    """uint8 [N, C, H, W] from image files, converted to the model's channel count.
    Images of different sizes are each resized later by the model's eval transform."""
    from torchvision.io import ImageReadMode, read_image

    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    images = []
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"image {path!r} does not exist")
        images.append(read_image(path, mode=mode))
    return images


def predict(model_path: str, image_paths: list[str], device: str = "auto"):
    """Yield (path, class name, probability) for each image."""
    model, classes, spec = load_model(model_path, device)
    channels = model_channels(spec)
    dev = next(model.parameters()).device
    for path, image in zip(image_paths, read_images(image_paths, channels)):
        probs = predict_logits(model, image.unsqueeze(0).to(dev), spec, 1).softmax(1)[0]
        best = int(probs.argmax())
        yield path, classes[best], float(probs[best])


def model_channels(spec: ImageSpec) -> int:
    return len(spec.mean)
