"""Datasets, prepared once into one safetensors file that every later job reads.

A prepared dataset holds uint8 images [N, C, H, W] and int64 labels for the training pool and
the test set (and, for the embedded demo, the disjoint pretraining images). Reading it needs
numpy and safetensors only, so jobs stay cheap to start; torch tensors are made where needed.

Datasets of files (imagefolder, csv) also record each pool and test image's source (its path
relative to data.root, or as the manifest CSV gives it) and, where the data has groups
(patients: the manifest's group column, imagefolder's data.group_pattern), its group; a
manifest's fold column gives pool_folds. They live in the file's metadata (JSON lists) and
pool_folds as a tensor, so the `folds` job and folds.csv keep them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from foldsoup.errors import DataError


@dataclass
class Prepared:
    name: str
    classes: list[str]
    pool_images: np.ndarray  # uint8 [N, C, H, W]
    pool_labels: np.ndarray  # int64 [N]
    test_images: np.ndarray
    test_labels: np.ndarray
    pretrain_images: np.ndarray | None = None
    pretrain_labels: np.ndarray | None = None
    pretrain_classes: list[str] = field(default_factory=list)
    pool_groups: list[str] | None = None  # a group (patient, subject, ...) per image, where the data has them
    test_groups: list[str] | None = None
    pool_sources: list[str] | None = None  # where each image came from (datasets of files)
    test_sources: list[str] | None = None
    pool_folds: np.ndarray | None = None  # int64 [N]: the user's own folds (a manifest's fold column)
    background: str | None = None  # what transparent pixels were composited onto (datasets of files)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def validate_prepared(data: Prepared, source: str) -> None:
    """Shapes, dtypes, label ranges and non-empty classes, with errors naming `source`."""
    parts = [("pool", data.pool_images, data.pool_labels, data.classes), ("test", data.test_images, data.test_labels, data.classes)]
    if data.pretrain_images is not None:
        parts.append(("pretrain", data.pretrain_images, data.pretrain_labels, data.pretrain_classes))
    if len(data.classes) < 2:
        raise DataError(f"{source}: needs at least 2 classes, got {len(data.classes)} ({data.classes})")
    channels = None
    for part, images, labels, classes in parts:
        if labels is None:
            raise DataError(f"{source}: {part} images have no labels")
        if images.dtype != np.uint8 or images.ndim != 4:
            raise DataError(f"{source}: {part} images must be uint8 [N, C, H, W], got {images.dtype} {list(images.shape)}")
        if images.shape[1] not in (1, 3):
            raise DataError(f"{source}: {part} images have {images.shape[1]} channels (shape {list(images.shape)}); "
                            f"expected 1 (grey) or 3 (RGB) in [N, C, H, W] order")
        if min(images.shape[2:]) < 1:
            raise DataError(f"{source}: {part} images have an empty side (shape {list(images.shape)})")
        if channels is None:
            channels = images.shape[1:]
        elif images.shape[1:] != channels:
            raise DataError(f"{source}: {part} images have shape {list(images.shape[1:])}, expected {list(channels)} like the pool")
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{source}: {part} labels must be integers [N], got {labels.dtype} {list(labels.shape)}")
        if labels.shape != (images.shape[0],):
            raise DataError(f"{source}: {part} has {images.shape[0]} images but {labels.shape[0]} labels")
        if len(labels) == 0:
            raise DataError(f"{source}: {part} split is empty")
        bad = labels[(labels < 0) | (labels >= len(classes))]
        if bad.size:
            raise DataError(f"{source}: {part} label {int(bad[0])} is out of range for {len(classes)} classes "
                            f"(allowed: 0..{len(classes) - 1}; {bad.size} bad label(s))")
    counts = np.bincount(data.pool_labels, minlength=data.num_classes)
    for c, n in enumerate(counts):
        if n == 0:
            raise DataError(f"{source}: class {data.classes[c]!r} has no images in the training pool")
    _validate_traced(data, source)


TRACED = ("pool_groups", "test_groups", "pool_sources", "test_sources")  # JSON lists in the metadata


def _validate_traced(data: Prepared, source: str) -> None:
    """Groups, sources and the given folds: one per image; no group in the pool and the test set."""
    for key in (*TRACED, "pool_folds"):
        values, labels = getattr(data, key), data.pool_labels if key.startswith("pool") else data.test_labels
        if values is not None and len(values) != len(labels):
            raise DataError(f"{source}: {len(values)} {key.replace('_', ' ')} for {len(labels)} images")
    if (data.pool_groups is None) != (data.test_groups is None):
        raise DataError(f"{source}: groups of only one of the pool and the test set")
    if data.pool_groups is not None:
        pool_at = dict(zip(data.pool_groups, data.pool_sources or range(len(data.pool_groups))))
        for i, group in enumerate(data.test_groups):
            if group in pool_at:
                test_image = data.test_sources[i] if data.test_sources else i
                raise DataError(f"{source}: group {group!r} has images in the training pool ({pool_at[group]}) and in "
                                f"the test set ({test_image}); no group may be in both")


def save_prepared(path: str | Path, data: Prepared) -> None:
    from safetensors.numpy import save_file

    from foldsoup.storage.weights import atomic_path

    tensors = {
        "pool_images": data.pool_images,
        "pool_labels": data.pool_labels.astype(np.int64),
        "test_images": data.test_images,
        "test_labels": data.test_labels.astype(np.int64),
    }
    if data.pretrain_images is not None:
        tensors["pretrain_images"] = data.pretrain_images
        tensors["pretrain_labels"] = data.pretrain_labels.astype(np.int64)
    if data.pool_folds is not None:
        tensors["pool_folds"] = data.pool_folds.astype(np.int64)
    meta = {"name": data.name, "classes": json.dumps(data.classes), "pretrain_classes": json.dumps(data.pretrain_classes)}
    meta.update({key: json.dumps(list(getattr(data, key))) for key in TRACED if getattr(data, key) is not None})
    if data.background is not None:
        meta["background"] = data.background
    with atomic_path(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata=meta)


def load_prepared(path: str | Path) -> Prepared:
    from safetensors import safe_open

    from foldsoup.storage.files import (
        folder_given,
        safetensors_contents,
        unreadable_safetensors,
    )

    path = Path(path)
    instead = "give the prepared dataset, <results>/prepared/dataset.safetensors"
    if path.is_dir():
        raise DataError(f"prepared dataset {str(path)!r} "
                        + folder_given(path, ("dataset.safetensors", "prepared/dataset.safetensors"), "the prepared dataset file"))
    if not path.is_file():
        raise DataError(f"prepared dataset {str(path)!r} does not exist (run the `prepare` rule)")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for damaged files
        what, damaged = unreadable_safetensors(path, exc)
        raise DataError(f"prepared dataset {str(path)!r} is {what}; delete it and rerun `prepare`" if damaged
                        else f"prepared dataset {str(path)!r} is {what}, not a prepared dataset; {instead}") from exc
    missing = [k for k in ("pool_images", "pool_labels", "test_images", "test_labels") if k not in arrays]
    held = safetensors_contents(arrays, meta)
    if missing and held not in (None, "a prepared dataset"):
        raise DataError(f"prepared dataset {str(path)!r} holds {held}, not a prepared dataset; {instead}")
    if missing:
        raise DataError(f"prepared dataset {str(path)!r} lacks tensor(s) {missing}; it holds {sorted(arrays)}. "
                        f"Delete it and rerun `prepare`")
    if ("pretrain_images" in arrays) != ("pretrain_labels" in arrays):
        raise DataError(f"prepared dataset {str(path)!r} has only one of pretrain_images and pretrain_labels")
    try:
        classes = json.loads(meta.get("classes", "[]"))
        pretrain_classes = json.loads(meta.get("pretrain_classes", "[]"))
        traced = {key: json.loads(meta[key]) for key in TRACED if key in meta}
    except json.JSONDecodeError as exc:
        raise DataError(f"prepared dataset {str(path)!r}: class names in the metadata are not valid JSON ({exc})") from exc
    if not isinstance(classes, list):
        raise DataError(f"prepared dataset {str(path)!r}: metadata 'classes' must be a list of class names, got {classes!r}")
    data = Prepared(
        name=meta.get("name", "?"),
        classes=classes,
        pool_images=arrays["pool_images"],
        pool_labels=arrays["pool_labels"],
        test_images=arrays["test_images"],
        test_labels=arrays["test_labels"],
        pretrain_images=arrays.get("pretrain_images"),
        pretrain_labels=arrays.get("pretrain_labels"),
        pretrain_classes=pretrain_classes,
        pool_folds=arrays.get("pool_folds"),
        background=meta.get("background"),
        **traced,
    )
    validate_prepared(data, str(path))
    return data


def _stratified_subset(labels: np.ndarray, keep: int | None, seed: int) -> np.ndarray:
    """Indices of a stratified random subset of size `keep` (all indices when keep is None)."""
    if keep is None or keep >= len(labels):
        return np.arange(len(labels))
    from sklearn.model_selection import train_test_split

    idx, _ = train_test_split(np.arange(len(labels)), train_size=keep, stratify=labels, random_state=seed)
    return np.sort(idx)


def _relabel(labels: np.ndarray, classes: list[int]) -> np.ndarray:
    lookup = {c: i for i, c in enumerate(classes)}
    return np.array([lookup[int(v)] for v in labels], dtype=np.int64)


def load_digits_prepared(data_cfg: dict, seed: int) -> Prepared:
    """scikit-learn's digits: the pool/test classes and the disjoint pretraining classes."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # 0..16 grey levels -> 0..255 uint8, one channel.
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None, :, :]
    target = digits.target
    classes, pre_classes = list(data_cfg["classes"]), list(data_cfg["pretrain_classes"])
    fine = np.isin(target, classes)
    pre = np.isin(target, pre_classes)
    fine_idx = np.flatnonzero(fine)
    pool_idx, test_idx = train_test_split(
        fine_idx, test_size=data_cfg["test_fraction"], stratify=target[fine_idx], random_state=seed
    )
    pool_idx, test_idx = np.sort(pool_idx), np.sort(test_idx)
    return Prepared(
        name="digits",
        classes=[str(c) for c in classes],
        pool_images=images[pool_idx],
        pool_labels=_relabel(target[pool_idx], classes),
        test_images=images[test_idx],
        test_labels=_relabel(target[test_idx], classes),
        pretrain_images=images[pre],
        pretrain_labels=_relabel(target[pre], pre_classes),
        pretrain_classes=[str(c) for c in pre_classes],
    )


def load_cifar10_prepared(data_cfg: dict, seed: int) -> Prepared:
    from foldsoup.data.cifar10 import read_cifar10

    train_x, train_y, test_x, test_y, classes = read_cifar10(data_cfg["root"], download=data_cfg["download"])
    return Prepared("cifar10", classes, train_x, train_y.astype(np.int64), test_x, test_y.astype(np.int64))


def load_imagefolder_prepared(data_cfg: dict, seed: int) -> Prepared:
    """A folder per class (train/ and test/ folders, or split by data.test_fraction); images
    stored as RGB at data.image_size; sources relative to data.root, groups by data.group_pattern."""
    from foldsoup.data.imagefolder import DEFAULT_BACKGROUND, list_imagefolder, read_imagefolder

    root = Path(data_cfg["root"])
    files = list_imagefolder(root, data_cfg["test_fraction"], seed, data_cfg.get("group_pattern"))
    background = data_cfg.get("background", DEFAULT_BACKGROUND)
    pool_x, pool_y, test_x, test_y, classes = read_imagefolder(
        root, data_cfg["image_size"], data_cfg["resize"], background=background, files=files)
    return Prepared("imagefolder", classes, pool_x, pool_y, test_x, test_y, background=background,
                    pool_groups=files.pool_groups, test_groups=files.test_groups,
                    pool_sources=[p.relative_to(root).as_posix() for p in files.pool_paths],
                    test_sources=[p.relative_to(root).as_posix() for p in files.test_paths])


def load_medmnist_prepared(data_cfg: dict, seed: int) -> Prepared:
    """A MedMNIST .npz: pool = train + val, test = test, images as RGB at their own size."""
    from foldsoup.data.medmnist import read_medmnist

    pool_x, pool_y, test_x, test_y, classes = read_medmnist(data_cfg["root"], data_cfg.get("class_names"))
    return Prepared("medmnist", classes, pool_x, pool_y, test_x, test_y)


def load_manifest_prepared(data_cfg: dict, seed: int) -> Prepared:
    """A manifest CSV (data.manifest): see foldsoup.data.manifest."""
    from foldsoup.data.manifest import read_manifest_dataset

    return Prepared(**read_manifest_dataset(data_cfg, seed))


LOADERS = {
    "digits": load_digits_prepared,
    "cifar10": load_cifar10_prepared,
    "imagefolder": load_imagefolder_prepared,
    "medmnist": load_medmnist_prepared,
    "csv": load_manifest_prepared,
}



def source_paths(data_cfg: dict) -> list[str]:
    """What `prepare` reads from disk, as far as it exists now: the `prepare` rule's inputs, so
    that replacing the data reruns it (Snakemake compares modification times, and for files also
    checksums: a file touched but unchanged reruns nothing). For imagefolder
    the folders down to the class folders (adding, removing or renaming an image changes its
    folder's time; overwriting one in place does not). Digits ships with scikit-learn: none."""
    name, root = data_cfg["name"], Path(data_cfg.get("root") or ".")
    if name == "csv":  # the manifest; its images are read where it points (replacing one reruns nothing)
        manifest = Path(data_cfg.get("manifest") or "")
        return [str(manifest)] if manifest.is_file() else []
    if name == "medmnist":
        return [str(root)] if root.is_file() else []
    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        return sorted(str(p) for p in folder.glob("*_batch*")) if folder.is_dir() else []
    if name == "imagefolder" and root.is_dir():
        def folders(parent: Path) -> list[Path]:
            return sorted(p for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))

        split_dirs = [d for d in folders(root) if d.name in ("train", "val", "test")]
        class_dirs = [c for d in split_dirs for c in folders(d)] if split_dirs else folders(root)
        return [str(p) for p in [root, *split_dirs, *class_dirs]]
    return []


def prepare(data_cfg: dict, seed: int) -> Prepared:
    """Load the configured dataset, apply the optional stratified caps, validate."""
    data = LOADERS[data_cfg["name"]](data_cfg, seed)
    pool = _stratified_subset(data.pool_labels, data_cfg.get("max_pool"), seed)
    test = _stratified_subset(data.test_labels, data_cfg.get("max_test"), seed)
    data.pool_images, data.pool_labels = data.pool_images[pool], data.pool_labels[pool]
    data.test_images, data.test_labels = data.test_images[test], data.test_labels[test]
    for key in (*TRACED, "pool_folds"):
        values = getattr(data, key)
        if values is not None:
            keep = pool if key.startswith("pool") else test
            setattr(data, key, values[keep] if isinstance(values, np.ndarray) else [values[i] for i in keep])
    validate_prepared(data, f"dataset {data_cfg['name']!r} under {data_cfg.get('root', '')!r}")
    return data
