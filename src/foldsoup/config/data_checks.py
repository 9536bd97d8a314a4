"""The data section beyond the schema: what each data.name takes, the class counts known without
reading the data (folds.k against the smallest class) and the files and folders data.root must be.

Here, not in foldsoup.data: the Snakefile checks these at parse time through
foldsoup.config.schema.validate, and config is the layer below data (the data readers import
torch). No torch, no scikit-learn here.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from foldsoup.config import manifest
from foldsoup.errors import DataError

# Images per class in scikit-learn's digits (1,797 images; fixed since 1998, checked by
# tests/test_config.py against load_digits). Lets folds.k be checked at parse time without
# paying ~2.5 s for importing and loading scikit-learn.
DIGITS_CLASS_COUNTS = (178, 182, 177, 183, 181, 182, 181, 179, 174, 180)
CIFAR10_CLASSES = 10


def smallest_class_bound(data: dict) -> tuple[int, str] | None:
    """An upper bound on the pool images of the smallest class, and what it comes from, or
    None when it is not known before the data is read (the `folds` job checks exactly)."""
    bounds: list[tuple[int, str]] = []
    if data["name"] == "digits":
        tf = data["test_fraction"]
        # A stratified split keeps floor(n * (1 - test_fraction)) or one more image of a class.
        per_class = [(math.floor(DIGITS_CLASS_COUNTS[c] * (1 - tf)) + 1, c) for c in data["classes"]]
        n, c = min(per_class)
        bounds.append((n, f"digits class {c} keeps at most {n} pool image(s) with data.test_fraction = {tf}"))
        num_classes = len(data["classes"])
        classes_text = f"the smallest of {num_classes} classes"
    elif data["name"] == "cifar10":
        num_classes = CIFAR10_CLASSES
        classes_text = f"the smallest of {num_classes} classes"
    elif data.get("class_names"):
        num_classes = len(data["class_names"])
        classes_text = f"the smallest of {num_classes} classes (data.class_names)"
    else:  # imagefolder, medmnist: the classes are known once the data is read; there are at least 2
        num_classes = 2
        classes_text = "the smallest class (of at least 2)"
    if data.get("max_pool") is not None:
        n = data["max_pool"] // num_classes  # the smallest class holds at most the average share
        bounds.append((n, f"data.max_pool = {data['max_pool']} leaves at most {n} pool image(s) in {classes_text}"))
    return min(bounds) if bounds else None


def folds_k_problem(data: dict, folds: dict) -> str | None:
    """folds.k above the bound on the smallest class (after the outer holdout): some fold would
    miss a class. None when it fits or the bound is not known before the data is read."""
    k, holdout = folds["k"], folds["holdout_fraction"]
    bound = smallest_class_bound(data)
    if bound is not None and holdout > 0:
        # The stratified holdout takes about this share of every class, and at least one image.
        kept = bound[0] - max(1, math.floor(bound[0] * holdout))
        bound = (kept, f"{bound[1]}, {kept} after folds.holdout_fraction = {holdout}")
    if bound is None or k <= bound[0]:
        return None
    return (f"folds.k: {k} is larger than the smallest class of the training pool: {bound[1]}; every fold "
            f"needs at least one image of every class, allowed: 2 <= k <= {bound[0]}" if bound[0] >= 2 else
            f"folds.k: {k} is larger than the smallest class of the training pool: {bound[1]}; "
            f"every fold needs at least one image of every class (raise data.max_pool or lower data.test_fraction)")


MEDMNIST_SOURCE = "download e.g. pneumoniamnist.npz or pneumoniamnist_224.npz from https://medmnist.com"


def key_problems(data: dict) -> list[str]:
    """Keys of imagefolder, medmnist and csv that need no disk access."""
    problems, name = [], data["name"]
    if name in ("imagefolder", "medmnist", "csv") and data["download"]:
        where = {"medmnist": "the .npz file", "imagefolder": "the class folders"}.get(name, "the manifest and its images")
        problems.append(f"data.download: true only fetches CIFAR-10; for data.name {name!r} put {where} at "
                        f"{'data.manifest' if name == 'csv' else 'data.root'} yourself, allowed: false")
    if data.get("class_names") is not None and name not in ("medmnist", "csv"):
        whose = "its folder names" if name == "imagefolder" else "the dataset"
        problems.append(f"data.class_names: only for data.name 'medmnist' or 'csv' ({name} takes its class names from "
                        f"{whose}); allowed: null")
    problems += _group_pattern_problems(data)
    glob = data.get("image_glob")
    if glob is not None and name != "csv":
        problems.append("data.image_glob: only for data.name 'csv' (a manifest's image column); allowed: null")
    elif glob is not None and "{image}" not in glob:
        problems.append(f"data.image_glob: {glob!r} has no {{image}}; allowed: a glob pattern with {{image}} for the "
                        f"image column's value, e.g. 'images_part_?/{{image}}.jpg'")
    if data.get("manifest") is not None and name != "csv":
        problems.append(f"data.manifest: only for data.name 'csv' ({name} reads data.root); allowed: null")
    if data.get("manifest") is None and name == "csv":
        problems.append(manifest.NO_MANIFEST)
    if name == "medmnist" and Path(data["root"]).suffix.lower() != ".npz":
        problems.append(f"data.root: {data['root']!r} is not an .npz file; with data.name 'medmnist' allowed: the path of "
                        f"a MedMNIST .npz file, e.g. data/medmnist/pneumoniamnist_224.npz ({MEDMNIST_SOURCE})")
    return problems


def _group_pattern_problems(data: dict) -> list[str]:
    pattern = data.get("group_pattern")
    if pattern is None:
        return []
    if data["name"] != "imagefolder":
        other = " (a manifest's groups are its group column, data.columns.group)" if data["name"] == "csv" else ""
        return [f"data.group_pattern: only for data.name 'imagefolder'{other}; allowed: null"]
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        return [f"data.group_pattern: {pattern!r} is not a regular expression ({exc}); allowed: a Python regular "
                f"expression with a group, e.g. '^(P\\d+)_'"]
    if compiled.groups == 0:
        return [f"data.group_pattern: {pattern!r} has no group; allowed: a regular expression whose first group (or "
                f"named group `group`) is the image's group, e.g. '^(P\\d+)_' for P012_view2.png"]
    return []


def manifest_problem(data: dict, folds: dict) -> str | None:
    """data.name csv: the manifest and every row of it (foldsoup.config.manifest), or why not."""
    if data["name"] != "csv" or data.get("manifest") is None:  # null: a key problem
        return None
    try:
        manifest.read_manifest(data, folds["k"], folds["holdout_fraction"])
    except DataError as exc:
        return str(exc)
    return None


def root_problem(data: dict) -> str | None:
    """data.root on disk: the folder (or file) each data.name reads, or why it is not there."""
    root = Path(data["root"])
    if data["name"] == "cifar10" and root.exists() and not root.is_dir():
        return (f"data.root: {str(root)!r} is a file; allowed: a folder holding (or receiving, with "
                f"data.download: true) cifar-10-batches-py/")
    if data["name"] == "cifar10" and not data["download"]:
        if not root.is_dir():
            return (f"data.root: folder {str(root)!r} does not exist; allowed: a folder holding "
                    f"cifar-10-batches-py/ (or set data.download: true to fetch CIFAR-10 there)")
        if not (root / "cifar-10-batches-py").is_dir() and (root / "cifar-10-python.tar.gz").is_file():
            return (f"data.root: folder {str(root)!r} holds cifar-10-python.tar.gz but no cifar-10-batches-py/; "
                    f"allowed: data.download: true (torchvision checks the archive's md5 and extracts it, no "
                    f"network needed), or extract it there yourself (tar xzf)")
        if not (root / "cifar-10-batches-py").is_dir():
            return (f"data.root: folder {str(root)!r} has no cifar-10-batches-py/ inside; allowed: a folder "
                    f"holding torchvision's CIFAR-10 files (or set data.download: true to fetch them there)")
    elif data["name"] == "imagefolder" and not root.is_dir():
        what = "is a file" if root.exists() else "does not exist"
        return (f"data.root: {str(root)!r} {what}; with data.name 'imagefolder' allowed: a folder with one "
                f"sub-folder of images per class, or with train/ and test/ (optionally val/) holding them")
    elif data["name"] == "medmnist" and root.suffix.lower() == ".npz" and not root.is_file():
        what = "is a folder" if root.exists() else "does not exist"
        return (f"data.root: {str(root)!r} {what}; with data.name 'medmnist' allowed: an existing MedMNIST "
                f".npz file ({MEDMNIST_SOURCE})")
    return None
