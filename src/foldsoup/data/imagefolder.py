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
orientation, converted to RGB (grey images are repeated into R, G and B, 16-bit images are
scaled to 8 bits; transparent pixels, of an alpha channel or a palette's or colour key's
transparency, are composited onto `data.background`, or refused) and resized to
`data.image_size` square with Pillow's antialiased bicubic filter (`data.resize`: stretch the
whole image, or CLIP's shorter side + centre crop), so that every image stacks into one uint8
[N, 3, S, S] array. `prepare` logs the Pillow modes it met, with a file of each, and warns when
some files had transparent pixels (`ColourModes`).
"""

from __future__ import annotations

import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from foldsoup.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pbm")
IGNORED_FILES = {"thumbs.db", "desktop.ini"}  # written by file browsers; compared in lower case
SPLITS = ("train", "val", "test")
RESIZE_MODES = ("stretch", "center_crop")
CHANNELS = 3  # every model these datasets can use (open_clip image towers) takes RGB
# data.background: the colour transparent pixels are composited onto, or "refuse" (an error naming
# the file). None (read_image's default): alpha dropped, how files were read before the key
# existed (models whose metadata "source" records no background).
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0)}
BACKGROUND_CHOICES = (*BACKGROUNDS, "refuse")
DEFAULT_BACKGROUND = "white"  # the schema's default
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N")


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


def _to_rgb8(image, path: Path, background: str | None):
    """(A Pillow image as 8-bit RGB, whether it had transparent pixels): 16/32-bit integer grey
    scaled by 1/257, palettes and other modes converted, transparent pixels composited onto
    `background` (refuse: a DataError naming the file; None: alpha dropped)."""
    from PIL import Image

    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image, dtype=np.int64)
        grey = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB"), False
    if image.mode == "F":
        raise DataError(f"{path}: floating-point image (Pillow mode 'F'); save it as 8- or 16-bit integer PNG/TIFF")
    if background is not None and (image.mode in ALPHA_MODES or "transparency" in image.info):
        rgba = image.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] == 255:  # an alpha channel, but every pixel opaque
            return rgba.convert("RGB"), False
        if background == "refuse":
            raise DataError(f"{path}: has transparent pixels (Pillow mode {image.mode!r}) and data.background is 'refuse'; "
                            f"save it without transparency, or set data.background to white or black (the colour "
                            f"transparent pixels become)")
        canvas = Image.new("RGBA", rgba.size, (*BACKGROUNDS[background], 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB"), True
    return (image if image.mode == "RGB" else image.convert("RGB")), False


def _decode(path: Path, size: int, resize: str, background: str | None) -> tuple[np.ndarray, str, bool]:
    """(uint8 [3, size, size], the file's Pillow mode, whether it had transparent pixels)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated or corrupt file fails here, not later
            mode = image.mode
            image = ImageOps.exif_transpose(image)
            image, transparent = _to_rgb8(image, path, background)
            if resize == "center_crop":
                image = ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC)
            elif image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BICUBIC)
            return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1), mode, transparent
    except DataError:
        raise
    except Exception as exc:  # UnidentifiedImageError, OSError (truncated), DecompressionBombError, ...
        raise DataError(f"{path}: cannot read as an image ({type(exc).__name__}: {exc}); "
                        f"replace or delete the file") from exc


def read_image(path: Path, size: int, resize: str, background: str | None = None) -> np.ndarray:
    """One image file -> uint8 [3, size, size], read as `prepare` reads each (`data.resize`,
    `data.background`; None: alpha dropped); DataError naming the file if it cannot be decoded,
    or has transparent pixels and background is "refuse"."""
    return _decode(path, size, resize, background)[0]


@dataclass
class ColourModes:
    """The Pillow modes of the image files a dataset's `prepare` read: files per mode with the
    first of each, and per mode the files with transparent pixels (composited onto `background`)."""

    background: str
    count: dict[str, int] = field(default_factory=dict)
    example: dict[str, Path] = field(default_factory=dict)
    transparent: dict[str, list[Path]] = field(default_factory=dict)

    def add(self, path: Path, mode: str, transparent: bool) -> None:
        self.count[mode] = self.count.get(mode, 0) + 1
        self.example.setdefault(mode, path)
        if transparent:
            self.transparent.setdefault(mode, []).append(path)

    def report(self, name: str, root: Path) -> list[str]:
        """The log lines: files per mode, each with an example (relative to `root`); a warning
        when some files had transparent pixels, composited onto the background."""
        def shown(path: Path) -> str:
            return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)

        n = sum(self.count.values())
        modes = sorted(self.count, key=lambda m: (-self.count[m], m))
        grey = [m for m in modes if m in GREY_MODES]
        lines = [f"{name}: colour modes of the {n} image files: "
                 + ", ".join(f"{m} {self.count[m]} (e.g. {shown(self.example[m])})" for m in modes)
                 + "; stored as RGB" + (f" ({', '.join(grey)}: grey repeated into R, G and B)" if grey else "")]
        if self.transparent:
            k = sum(len(files) for files in self.transparent.values())
            which = "; ".join(f"{m} {len(self.transparent[m])}, e.g. {shown(self.transparent[m][0])}"
                              for m in modes if m in self.transparent)
            some = f"the dataset mixes images with and without transparency: {k} of {n}" if k < n else f"all {n}"
            lines.append(f"WARNING {name}: {some} image files have transparent pixels ({which}); they are composited "
                         f"onto {self.background} (data.background: white, black or refuse)")
        return lines


def read_images(paths: list[Path], size: int, resize: str, background: str | None = None,
                modes: ColourModes | None = None) -> np.ndarray:
    """uint8 [N, 3, size, size], decoded on a few threads (Pillow releases the GIL), as read_image
    reads each; every file's mode and transparency added to `modes`, in path order."""
    if resize not in RESIZE_MODES:
        raise DataError(f"data.resize: {resize!r} is not one of {', '.join(RESIZE_MODES)}")
    if background is not None and background not in BACKGROUND_CHOICES:
        raise DataError(f"data.background: {background!r} is not one of {', '.join(BACKGROUND_CHOICES)}")
    out = np.empty((len(paths), CHANNELS, size, size), dtype=np.uint8)
    met: list[tuple[str, bool]] = [("", False)] * len(paths)

    def one(i: int) -> None:
        out[i], mode, transparent = _decode(paths[i], size, resize, background)
        met[i] = (mode, transparent)

    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        for _ in pool.map(one, range(len(paths))):  # re-raises the first error, in path order
            pass
    if modes is not None:
        for path, (mode, transparent) in zip(paths, met, strict=True):
            modes.add(path, mode, transparent)
    return out


def log(msg: str) -> None:
    """A line of the job's log (the format of foldsoup.steps.log, a layer above this one)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the dataset


@dataclass
class ImageFolderFiles:
    """The image files of the pool and the test set, their labels and (data.group_pattern) groups."""

    classes: list[str]
    pool_paths: list[Path]
    pool_labels: np.ndarray
    test_paths: list[Path]
    test_labels: np.ndarray
    pool_groups: list[str] | None = None
    test_groups: list[str] | None = None


def group_of(path: Path, class_dir: Path, pattern: re.Pattern) -> str:
    """The group (patient, ...) `pattern` reads from the image's path inside its class folder:
    its named group `group`, else its first group."""
    inside = path.relative_to(class_dir).as_posix()
    found = pattern.search(inside)
    group = found and (found.group("group") if "group" in pattern.groupindex else found.group(1))
    if not group:
        raise DataError(f"{path}: data.group_pattern {pattern.pattern!r} finds no group in {inside!r} (the image's path "
                        f"inside its class folder); every image needs one (e.g. 'P012_view2.png' with '^(P\\d+)_')")
    return group


def _groups(folder: Path, paths: list[Path], pattern: re.Pattern | None) -> list[str] | None:
    if pattern is None:
        return None
    return [group_of(p, folder / p.relative_to(folder).parts[0], pattern) for p in paths]


def list_imagefolder(root: str | Path, test_fraction: float = 0.3, seed: int = 0,
                     group_pattern: str | None = None) -> ImageFolderFiles:
    """The files of `root` in either layout; without train/ and test/ the test set split off by
    `test_fraction` (group-disjoint with a group pattern)."""
    root = Path(root)
    pattern = re.compile(group_pattern) if group_pattern else None
    splits = find_splits(root)
    if splits is not None:
        classes = list_classes(splits["train"])
        for name in ("val", "test"):
            if name in splits:
                _check_same_classes(splits["train"], classes, splits[name], list_classes(splits[name]))
        pool_paths, pool_y = _scan(splits["train"], classes)
        pool_groups = _groups(splits["train"], pool_paths, pattern)
        if "val" in splits:
            val_paths, val_y = _scan(splits["val"], classes)
            pool_paths, pool_y = pool_paths + val_paths, np.concatenate([pool_y, val_y])
            pool_groups = None if pattern is None else pool_groups + _groups(splits["val"], val_paths, pattern)
        test_paths, test_y = _scan(splits["test"], classes)
        return ImageFolderFiles(classes, pool_paths, pool_y, test_paths, test_y, pool_groups,
                                _groups(splits["test"], test_paths, pattern))
    classes = list_classes(root)
    paths, labels = _scan(root, classes)
    groups = _groups(root, paths, pattern)
    pool_idx, test_idx = _split(root, classes, labels, test_fraction, seed, groups)
    return ImageFolderFiles(classes, [paths[i] for i in pool_idx], labels[pool_idx], [paths[i] for i in test_idx],
                            labels[test_idx], groups and [groups[i] for i in pool_idx],
                            groups and [groups[i] for i in test_idx])


def read_imagefolder(root: str | Path, size: int, resize: str = "stretch", test_fraction: float = 0.3,
                     seed: int = 0, background: str = DEFAULT_BACKGROUND, files: ImageFolderFiles | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(pool_x uint8 [N, 3, S, S], pool_y int64, test_x, test_y, class names) from `root` (of
    `files`, when listed already); logs the colour modes of its files (ColourModes.report)."""
    root = Path(root)
    files = files or list_imagefolder(root, test_fraction, seed)
    modes = ColourModes(background)
    pool_x = read_images(files.pool_paths, size, resize, background, modes)
    test_x = read_images(files.test_paths, size, resize, background, modes)
    for line in modes.report("imagefolder", root):
        log(line)
    return pool_x, files.pool_labels, test_x, files.test_labels, files.classes


def _split(root: Path, classes: list[str], labels: np.ndarray, test_fraction: float, seed: int,
           groups: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded (pool, test) indices, each sorted; group-disjoint with `groups`."""
    from sklearn.model_selection import train_test_split

    if groups is not None:
        from foldsoup.data.folds import split_off

        return split_off(labels, test_fraction, seed, groups, classes,
                         f"{root}: data.test_fraction = {test_fraction} with data.group_pattern")
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
