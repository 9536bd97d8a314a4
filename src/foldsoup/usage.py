"""Using a saved model or soup: every weights file foldsoup writes carries the model config,
the class names and the image settings in its metadata, so it loads without the workflow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from foldsoup.devices import place
from foldsoup.errors import WeightsError
from foldsoup.models.build import build_classifier
from foldsoup.models.classifier import load_full
from foldsoup.storage.weights import load_weights
from foldsoup.training.loop import ImageSpec, predict_logits


def load_model(path: str, device: str = "auto"):
    """(model on its device, class names, image spec) from a foldsoup .safetensors file."""
    model, meta, spec = _load(path, device)
    return model, meta["classes"], spec


MODEL_FILES = "a model or soup, e.g. results/soups/gsgs.safetensors or results/models/<hp>/fold<i>/model.safetensors"


def _load(path: str, device: str):
    from foldsoup.storage.files import safetensors_contents

    state, meta = load_weights(path)
    lacking = [key for key in ("model", "classes", "image") if key not in meta]
    if lacking:
        held = safetensors_contents(state, meta)
        # A model's or soup's logits sit beside its weights: models/.../predictions.safetensors, soups/<m>.predictions.safetensors.
        beside = [p for p in (Path(path).with_name("model.safetensors"), Path(path.replace(".predictions.safetensors", ".safetensors")))
                  if p != Path(path) and p.is_file()]
        if "test_logits" in state and beside:
            raise WeightsError(f"weight file {path} holds {held}, not weights; give the weights beside it, {str(beside[0])!r}")
        if held:
            raise WeightsError(f"weight file {path} holds {held}, not a model or soup; give {MODEL_FILES}")
        raise WeightsError(f"weight file {path} was not written by foldsoup (no {', '.join(map(repr, lacking))} in its "
                           f"metadata; {len(state)} tensors, the first {next(iter(state), '')!r}); give {MODEL_FILES}")
    model = build_classifier(meta["model"], len(meta["classes"]), meta["image"].get("size"))
    try:
        load_full(model, state, path)
    except WeightsError as exc:  # only a file whose tensors were replaced after foldsoup wrote it
        raise WeightsError(f"{exc} (the model its metadata describes: {meta['model'].get('name')}, {len(meta['classes'])} "
                           f"classes); its tensors belong to another model: give {MODEL_FILES}") from exc
    model.to(torch.device(place(device).device))
    return model, meta, ImageSpec(**meta["image"])


def evaluate(model_path: str, data_path: str, folds_path: str | None = None, device: str = "auto") -> dict:
    """Accuracy of a saved model or soup on the test set (and each fold's val part and the outer
    holdout, given the folds), each as an exact fraction beside it (`test_acc_exact`: "c/n"), and
    what the file's metadata says of its folds: on a val fold its ingredients trained on, the
    accuracy is no clean estimate (`trained_on_folds`)."""
    from foldsoup.data.folds import HOLDOUT, num_folds, read_folds
    from foldsoup.data.prepared import load_prepared
    from foldsoup.errors import DataError

    model, meta, spec = _load(model_path, device)
    classes = meta["classes"]
    data = load_prepared(data_path)
    channels = data.pool_images.shape[1]
    if data.classes != classes or channels != model_channels(spec):
        theirs, ours = ((f"classes {classes}", f"classes {data.classes}") if data.classes != classes
                        else (f"{model_channels(spec)}-channel images", f"{channels}-channel images"))
        raise DataError(f"{data_path}: the model {model_path} was trained on {theirs}, this dataset has {ours}; "
                        f"evaluate it on the prepared dataset of the run that trained it")
    dev = next(model.parameters()).device
    out: dict = {"model": model_path, **provenance(meta)}

    from foldsoup.soups.select import fold_acc

    def score(key: str, images: np.ndarray, labels: np.ndarray) -> None:
        logits = predict_logits(model, torch.from_numpy(images).to(dev), spec, 1024)
        correct, total = int((logits.argmax(1) == torch.from_numpy(labels).to(dev)).sum()), len(labels)
        out[key] = float(fold_acc(correct, total))  # the fraction's float, as the run's tables hold it
        out[f"{key}_exact"] = f"{correct}/{total}"

    score("test_acc", data.test_images, data.test_labels)
    out["test_images"] = int(len(data.test_labels))
    if folds_path:
        fold_of = read_folds(folds_path, data.pool_labels)
        k = num_folds(fold_of)
        parts = {f"val_acc_fold{i}": fold_of == i for i in range(k)}
        if (fold_of == HOLDOUT).any():
            parts["holdout_acc"] = fold_of == HOLDOUT
        for key, mask in parts.items():
            idx = np.flatnonzero(mask)
            score(key, data.pool_images[idx], data.pool_labels[idx])
        if "ingredient_folds" in out:
            out.update(trained_on(out["ingredient_folds"], k, "holdout_acc" in parts))
    return out


def provenance(meta: dict) -> dict:
    """What a weights file's metadata says of where it comes from: a fine-tune's grid point and
    fold, a soup's method, ingredients and the folds they were validated on (F(soup))."""
    from foldsoup.errors import SoupError
    from foldsoup.soups.methods import ingredient_folds

    if meta.get("kind") in ("finetune", "import"):  # import: a checkpoint of models_from, validated on its fold
        return {"kind": meta["kind"], "hp": meta.get("hp"), "ingredient_folds": [int(meta["fold"])]}
    if meta.get("kind") == "soup":
        out = {"kind": "soup", "method": meta.get("method"), "n_ingredients": len(meta["ingredients"])}
        try:
            return {**out, "ingredient_folds": ingredient_folds(meta["ingredients"])}
        except SoupError:  # ingredients named outside the workflow: their folds are not known
            return out
    return {}


def trained_on(folds: list[int], k: int, holdout: bool) -> dict:
    """The val folds whose images some ingredient trained on (an ingredient of fold i trained on
    every fold but i), and the same in words."""
    seen = [j for j in range(k) if any(i != j for i in folds)]
    clean = [j for j in range(k) if j not in seen]
    what = f"fold {folds[0]}" if len(folds) == 1 else f"folds {', '.join(map(str, folds))}"
    note = (f"ingredients validated on {what}, each trained on the other folds: val_acc_fold<i> is on images they "
            f"trained on for fold(s) {', '.join(map(str, seen)) or 'none'}"
            + (f"; clean for fold {', '.join(map(str, clean))}" if clean else "; no fold is clean (MinAcc over them is optimistic)")
            + f"; no model trained on the {'outer holdout or the ' if holdout else ''}test set")
    return {"trained_on_folds": seen, "folds_note": note}


def read_images(paths: list[str], channels: int, source: dict | None = None, size: int | None = None) -> list[torch.Tensor]:
    """uint8 [C, H, W] per image file, read as `prepare` read the model's training images: an
    imagefolder dataset's way (Pillow, EXIF orientation, RGB, transparent pixels onto the
    `background` its metadata records (none recorded: alpha dropped, as before the key existed),
    bicubic `resize` to `size`), or else decoded at their own size in the model's channel count
    (the eval transform resizes)."""
    from PIL import Image

    from foldsoup.data.imagefolder import IMAGE_EXTENSIONS
    from foldsoup.data.imagefolder import read_image as read_as_prepared
    from foldsoup.errors import DataError
    from foldsoup.storage.files import in_folder, missing

    for path in paths:
        p = Path(path)
        if p.is_dir():
            inside = in_folder(p, [f"*{ext}" for ext in IMAGE_EXTENSIONS])
            raise DataError(f"image {path!r} is a folder; give image files" + (f", e.g. {str(inside)!r} or {path}/*{inside.suffix}"
                                                                              if inside else " (this folder holds none)"))
        if not p.is_file():
            raise DataError(f"image {path!r} {missing(p)}")

    def decode(path: str) -> torch.Tensor:
        if (source or {}).get("dataset") in ("imagefolder", "csv"):  # image files, decoded by `prepare`
            pixels = read_as_prepared(Path(path), size, source.get("resize", "stretch"), source.get("background"))
            return torch.from_numpy(pixels.copy())
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
        return torch.from_numpy(pixels.reshape(*pixels.shape[:2], -1).transpose(2, 0, 1).copy())

    def read(path: str) -> torch.Tensor:
        try:
            return decode(path)
        except Exception as exc:  # UnidentifiedImageError, OSError (truncated), or imagefolder's DataError wrapping them
            cause = exc.__cause__ if isinstance(exc, DataError) else exc
            if cause is None:
                raise  # imagefolder's own message (a floating-point image)
            raise DataError(_not_an_image(path, cause)) from exc

    return [read(path) for path in paths]


def _not_an_image(path: str, exc: BaseException) -> str:
    from foldsoup.storage.files import sniff

    what = sniff(Path(path))
    if what and not what.endswith("image"):
        return f"image {path!r} is {what}, not an image; give image files (PNG, JPEG, ...)"
    return (f"image {path!r} cannot be decoded ({type(exc).__name__}: {exc}); it is damaged or cut short: "
            f"replace it with a readable copy")


def probabilities(model_path: str, image_paths: list[str], device: str = "auto") -> tuple[list[str], list[np.ndarray]]:
    """(the model's class names, per image the softmax of its float32 logits: float32 [classes])."""
    model, meta, spec = _load(model_path, device)
    dev = next(model.parameters()).device
    images = read_images(image_paths, model_channels(spec), meta.get("source"), spec.size)
    return meta["classes"], [predict_logits(model, image.unsqueeze(0).to(dev), spec, 1).softmax(1)[0].cpu().numpy()
                             for image in images]


def predict(model_path: str, image_paths: list[str], device: str = "auto"):
    """Yield (path, class name, probability) for each image."""
    classes, probs = probabilities(model_path, image_paths, device)
    for path, p in zip(image_paths, probs, strict=True):
        best = int(p.argmax())
        yield path, classes[best], float(p[best])


def prediction_columns(classes: list[str]) -> list[str]:
    """The header of `predict --out`: path (as given), predicted_class, then p_<class name> per
    class in the model's class order (no class column can be named like the first two)."""
    return ["path", "predicted_class", *(f"p_{name}" for name in classes)]


def write_predictions(model_path: str, image_paths: list[str], out: str, device: str = "auto") -> int:
    """`predict --out`: a CSV (prediction_columns) of each image's predicted class and the
    probability of every class (float, full precision), written atomically; returns the rows.
    `out` is checked before any image is read."""
    import csv
    import io

    from foldsoup.errors import DataError
    from foldsoup.storage.weights import atomic_write_text

    target = Path(out)
    if target.is_dir():
        raise DataError(f"--out {out!r} is a folder; give the path of a CSV file, e.g. {str(target / 'predictions.csv')!r}")
    if not target.parent.is_dir():
        raise DataError(f"--out {out!r}: its folder {str(target.parent)!r} does not exist; create it or give a path in "
                        f"an existing folder")
    classes, probs = probabilities(model_path, image_paths, device)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(prediction_columns(classes))
    for path, p in zip(image_paths, probs, strict=True):
        writer.writerow([path, classes[int(p.argmax())], *(float(v) for v in p)])
    atomic_write_text(out, text.getvalue())
    return len(probs)


def model_channels(spec: ImageSpec) -> int:
    return len(spec.mean)
