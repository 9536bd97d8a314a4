"""Your own images in torchvision's ImageFolder layout: one folder of images per class.

Two layouts under `data.root`:

* `train/` and `test/` (and optionally `val/`), each holding one folder per class: the pool is
  train/ (+ val/: the k folds replace a fixed validation split), the test set is test/. Every
  split must hold the same class folders.
* class folders directly under `data.root`: a stratified, seeded share `data.test_fraction` of
  every class becomes the test set, the rest the pool.

Class names are the class folders' names, sorted (as torchvision's ImageFolder sorts them);
images may sit in sub-folders of their class folder. Hidden files and folders (".name") and the
desktop files Thumbs.db / desktop.ini are ignored; any other file that is not an image, or a
file beside the class folders, is an error naming it.

Images are decoded with Pillow (a dependency of torchvision), turned upright by their EXIF
orientation, converted to RGB (grey images are repeated into R, G and B, alpha is dropped,
16-bit images are scaled to 8 bits) and resized to `data.image_size` square with Pillow's
antialiased bicubic filter (`data.resize`: stretch the whole image, or CLIP's shorter side +
centre crop), so that every image stacks into one uint8 [N, 3, S, S] array.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from foldsoup.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pbm")
IGNORED_FILES = {"thumbs.db", "desktop.ini"}  # written by file browsers; compared in lower case
SPLITS = ("train", "val", "test")
RESIZE_MODES = ("stretch", "center_crop")
CHANNELS = 3  # every model these datasets can use (open_clip image towers) takes RGB


def _hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _entries(folder: Path) -> list[Path]:
    """Visible entries of a folder, sorted by name."""
    try:
        return sorted((p for p in folder.iterdir() if not _hidden(p)), key=lambda p: p.name)
    except OSError as exc:
        raise DataError(f"{folder}: cannot list the folder ({exc})") from exc


def _allowed_extensions() -> str:
    return ", ".join(IMAGE_EXTENSIONS)


def list_classes(folder: Path) -> list[str]:
    """Sorted class-folder names of `folder`; errors for a stray file, no or only one class."""
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise DataError(f"imagefolder: {str(folder)!r} {what}; expected a folder with one sub-folder of images per class")
    names = []
    for entry in _entries(folder):
        if entry.is_dir():
            names.append(entry.name)
        elif entry.name.lower() not in IGNORED_FILES:
            raise DataError(f"{entry}: a file beside the class folders of {folder}; every image belongs inside its "
                            f"class's folder ({folder}/<class name>/{entry.name}). Move or delete it "
                            f"(hidden files are ignored)")
    if not names:
        raise DataError(f"{folder}: no class folders; expected one sub-folder of images per class, "
                        f"e.g. {folder}/<class name>/image001.png")
    if len(names) < 2:
        raise DataError(f"{folder}: only one class folder ({names[0]!r}); classification needs at least 2 classes")
    return names


def list_images(class_dir: Path) -> list[Path]:
    """Image files of one class folder and its sub-folders, in sorted path order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith(".") or name.lower() in IGNORED_FILES:
                continue
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                raise DataError(f"{path}: not an image file (extension {path.suffix or '(none)'!r}; allowed: "
                                f"{_allowed_extensions()}); move it out of the class folder")
            found.append(path)
    if not found:
        raise DataError(f"{class_dir}: empty class folder: no images (allowed extensions: {_allowed_extensions()})")
    return sorted(found)


def find_splits(root: Path) -> dict[str, Path] | None:
    """{"train": ..., "test": ..., optionally "val": ...} when `root` holds train/ and test/,
    None when its sub-folders are the classes themselves."""
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise DataError(f"imagefolder: data.root {str(root)!r} {what}; expected a folder with one sub-folder of images "
                        f"per class, or with train/ and test/ (and optionally val/) holding such folders")
    present = {s: root / s for s in SPLITS if (root / s).is_dir()}
    if "train" not in present and "test" not in present:
        return None
    if "train" not in present or "test" not in present:
        has, lacks = ("train", "test") if "train" in present else ("test", "train")
        raise DataError(f"{root}: has {has}/ but no {lacks}/; give both train/ and test/ (optionally val/), each with "
                        f"one folder per class, or neither (class folders directly under data.root, the test set split "
                        f"off by data.test_fraction)")
    for entry in _entries(root):
        if entry.is_dir() and entry.name not in SPLITS:
            raise DataError(f"{entry}: unexpected folder beside train/ and test/ (allowed there: train/, val/, test/, "
                            f"each with one folder per class)")
    return present


def _check_same_classes(reference: Path, ref_classes: list[str], other: Path, classes: list[str]) -> None:
    for name in classes:
        if name not in ref_classes:
            raise DataError(f"{other / name}: class folder {name!r} is not in {reference} (classes there: "
                            f"{', '.join(ref_classes)}); {other.name}/ must hold the same class folders as {reference.name}/")
    for name in ref_classes:
        if name not in classes:
            raise DataError(f"{other}: no folder for class {name!r} of {reference}; {other.name}/ must hold the same "
                            f"class folders as {reference.name}/")


def _scan(folder: Path, classes: list[str]) -> tuple[list[Path], np.ndarray]:
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = list_images(folder / name)
        paths += files
        labels += [label] * len(files)
    return paths, np.asarray(labels, dtype=np.int64)


# ---------------------------------------------------------------- decoding


def _to_rgb8(image, path: Path):
    """A Pillow image as 8-bit RGB: 16/32-bit integer grey scaled by 1/257, palettes and other
    modes converted, alpha dropped."""
    from PIL import Image

    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image, dtype=np.int64)
        grey = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "F":
        raise DataError(f"{path}: floating-point image (Pillow mode 'F'); save it as 8- or 16-bit integer PNG/TIFF")
    return image if image.mode == "RGB" else image.convert("RGB")


def read_image(path: Path, size: int, resize: str) -> np.ndarray:
    """One image file -> uint8 [3, size, size]; DataError naming the file if it cannot be decoded."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated or corrupt file fails here, not later
            image = ImageOps.exif_transpose(image)
            image = _to_rgb8(image, path)
            if resize == "center_crop":
                image = ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC)
            elif image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BICUBIC)
            return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)
    except DataError:
        raise
    except Exception as exc:  # UnidentifiedImageError, OSError (truncated), DecompressionBombError, ...
        raise DataError(f"{path}: cannot read as an image ({type(exc).__name__}: {exc}); "
                        f"replace or delete the file") from exc


def read_images(paths: list[Path], size: int, resize: str) -> np.ndarray:
    """uint8 [N, 3, size, size], decoded on a few threads (Pillow releases the GIL)."""
    if resize not in RESIZE_MODES:
        raise DataError(f"data.resize: {resize!r} is not one of {', '.join(RESIZE_MODES)}")
    out = np.empty((len(paths), CHANNELS, size, size), dtype=np.uint8)

    def one(i: int) -> None:
        out[i] = read_image(paths[i], size, resize)

    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        for _ in pool.map(one, range(len(paths))):  # re-raises the first error, in path order
            pass
    return out


# ---------------------------------------------------------------- the dataset


def read_imagefolder(root: str | Path, size: int, resize: str = "stretch", test_fraction: float = 0.3,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(pool_x uint8 [N, 3, S, S], pool_y int64, test_x, test_y, class names) from `root`."""
    root = Path(root)
    splits = find_splits(root)
    if splits is not None:
        classes = list_classes(splits["train"])
        for name in ("val", "test"):
            if name in splits:
                _check_same_classes(splits["train"], classes, splits[name], list_classes(splits[name]))
        pool_paths, pool_y = _scan(splits["train"], classes)
        if "val" in splits:
            val_paths, val_y = _scan(splits["val"], classes)
            pool_paths, pool_y = pool_paths + val_paths, np.concatenate([pool_y, val_y])
        test_paths, test_y = _scan(splits["test"], classes)
    else:
        classes = list_classes(root)
        paths, labels = _scan(root, classes)
        pool_idx, test_idx = _split(root, classes, labels, test_fraction, seed)
        pool_paths, pool_y = [paths[i] for i in pool_idx], labels[pool_idx]
        test_paths, test_y = [paths[i] for i in test_idx], labels[test_idx]
    pool_x = read_images(pool_paths, size, resize)
    test_x = read_images(test_paths, size, resize)
    return pool_x, pool_y, test_x, test_y, classes


def _split(root: Path, classes: list[str], labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded (pool, test) indices, each sorted."""
    from sklearn.model_selection import train_test_split

    counts = np.bincount(labels, minlength=len(classes))
    for name, n in zip(classes, counts, strict=True):
        if n < 2:
            raise DataError(f"{root / name}: only {n} image; without train/ and test/ folders the test set is split off "
                            f"every class (data.test_fraction = {test_fraction}), which needs at least 2 images per class")
    try:
        pool, test = train_test_split(np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=seed)
    except ValueError as exc:
        raise DataError(f"{root}: cannot split a stratified test set with data.test_fraction = {test_fraction} from "
                        f"{len(labels)} images in {len(classes)} classes ({exc}); change data.test_fraction or give "
                        f"train/ and test/ folders") from exc
    return np.sort(pool), np.sort(test)
