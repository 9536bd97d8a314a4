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
    model, meta, spec = _load(path, device)
    return model, meta["classes"], spec


def _load(path: str, device: str):
    state, meta = load_weights(path)
    for key in ("model", "classes", "image"):
        if key not in meta:
            raise WeightsError(f"{path}: no {key!r} in its metadata; is it a model or soup written by foldsoup?")
    model = build_classifier(meta["model"], len(meta["classes"]))
    load_full(model, state, path)
    model.to(torch.device(place(device).device))
    return model, meta, ImageSpec(**meta["image"])


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


def read_images(paths: list[str], channels: int, source: dict | None = None, size: int | None = None) -> list[torch.Tensor]:
    """uint8 [C, H, W] per image file, read as `prepare` read the model's training images: an
    imagefolder dataset's way (Pillow, EXIF orientation, RGB, bicubic `resize` to `size`), or
    else decoded at their own size in the model's channel count (the eval transform resizes)."""
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"image {path!r} does not exist")
    if (source or {}).get("dataset") == "imagefolder":
        from .imagefolder import read_image as read_as_prepared

        return [torch.from_numpy(read_as_prepared(Path(p), size, source.get("resize", "stretch")).copy()) for p in paths]
    from PIL import Image

    def decode(path: str) -> torch.Tensor:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
        return torch.from_numpy(pixels.reshape(*pixels.shape[:2], -1).transpose(2, 0, 1).copy())

    return [decode(path) for path in paths]


def predict(model_path: str, image_paths: list[str], device: str = "auto"):
    """Yield (path, class name, probability) for each image."""
    model, meta, spec = _load(model_path, device)
    classes = meta["classes"]
    dev = next(model.parameters()).device
    for path, image in zip(image_paths, read_images(image_paths, model_channels(spec), meta.get("source"), spec.size)):
        probs = predict_logits(model, image.unsqueeze(0).to(dev), spec, 1).softmax(1)[0]
        best = int(probs.argmax())
        yield path, classes[best], float(probs[best])


def model_channels(spec: ImageSpec) -> int:
    return len(spec.mean)
