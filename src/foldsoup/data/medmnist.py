"""MedMNIST v2/v3 2D datasets from their official .npz files (e.g. pneumoniamnist.npz, 28 px,
or pneumoniamnist_224.npz), read with numpy only and never unpickling (allow_pickle=False).

A file holds six arrays: train_images, val_images, test_images (uint8 [N, H, W] for grey
datasets, [N, H, W, 3] for colour ones) and train_labels, val_labels, test_labels (integers
[N, 1]). The pool is train + val: the k folds take the place of the official validation
split. The test set is the official test split. Images are stored at their own size (the model
resizes them on the device to data.image_size, like CIFAR-10's 32 px) and as RGB, grey
repeated into R, G and B, since the models these datasets can use (open_clip image towers)
take RGB.

Multi-label datasets (ChestMNIST: 14 findings per image, labels [N, 14]) and 3D volumes
(OrganMNIST3D & co.: [N, 28, 28, 28]) are refused: foldsoup trains single-label classifiers on
2D images. The .npz holds no class names: they are "0".."C-1" unless data.class_names lists them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from foldsoup.errors import DataError

SPLITS = ("train", "val", "test")
KEYS = tuple(f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels"))
WHERE = "https://medmnist.com (MedMNIST v2/v3 .npz files, e.g. pneumoniamnist.npz or pneumoniamnist_224.npz)"


def _describe(array: np.ndarray) -> str:
    return f"{array.dtype} {list(array.shape)}"


def _open(path: Path):
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise DataError(f"MedMNIST: data.root {str(path)!r} {what}; expected a MedMNIST .npz file from {WHERE}")
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as exc:  # BadZipFile, ValueError (a pickle), OSError, EOFError: not an .npz
        raise DataError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc}); expected a MedMNIST .npz "
                        f"from {WHERE}") from exc
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: holds a single array ({_describe(npz)}), not an .npz archive of the keys "
                        f"{', '.join(KEYS)}")
    return npz


def _get(npz, path: Path, key: str) -> np.ndarray:
    try:
        return npz[key]
    except Exception as exc:  # ValueError (object arrays need pickle), BadZipFile / zlib error (damaged member)
        raise DataError(f"{path}: key {key!r} cannot be read ({type(exc).__name__}: {exc})") from exc


def _check_images(path: Path, key: str, images: np.ndarray) -> None:
    ok_shape = images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (1, 3))
    if images.dtype != np.uint8 or not ok_shape or min(images.shape[1:], default=0) < 1:
        hint = ""
        if images.ndim == 4 and images.shape[-1] not in (1, 3):
            hint = " (3D MedMNIST volumes [N, D, H, W] are not supported; use a 2D dataset)"
        raise DataError(f"{path}: {key!r} must be uint8 [N, H, W] (grey) or [N, H, W, 3] (RGB), got "
                        f"{_describe(images)}{hint}")


def _check_labels(path: Path, key: str, labels: np.ndarray, n_images: int) -> np.ndarray:
    """int64 [N] labels from [N, 1] (or [N]); multi-label [N, K > 1] refused."""
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise DataError(f"{path}: {key!r} has shape {list(labels.shape)}: {labels.shape[1]} labels per image, a multi-label "
                        f"dataset (like ChestMNIST's 14 findings). foldsoup trains single-label classifiers (one class "
                        f"per image); use a single-label MedMNIST dataset (e.g. pneumoniamnist)")
    if labels.dtype == np.bool_ or not np.issubdtype(labels.dtype, np.integer) or labels.ndim not in (1, 2):
        raise DataError(f"{path}: {key!r} must be integer class labels [N, 1], got {_describe(labels)}")
    labels = labels.reshape(-1).astype(np.int64)
    if len(labels) != n_images:
        images_key = key.replace("_labels", "_images")
        raise DataError(f"{path}: {key!r} has {len(labels)} labels for {n_images} images in {images_key!r}")
    if labels.size and labels.min() < 0:
        raise DataError(f"{path}: {key!r} holds the negative label {int(labels.min())}; labels must be 0..C-1")
    return labels


def _to_rgb_nchw(*parts: np.ndarray) -> np.ndarray:
    """[N, H, W] or [N, H, W, 1|3] uint8 arrays -> one [sum N, 3, H, W] uint8 array (grey
    repeated into R, G and B), written in place without intermediate copies."""
    n, (h, w) = sum(len(p) for p in parts), parts[0].shape[1:3]
    out = np.empty((n, 3, h, w), dtype=np.uint8)
    start = 0
    for images in parts:
        if images.ndim == 3:
            images = images[..., None]
        out[start : start + len(images)] = images.transpose(0, 3, 1, 2)  # broadcasts 1 -> 3 channels
        start += len(images)
    return out


def read_medmnist(path: str | Path, class_names: list[str] | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(pool_x uint8 [N, 3, H, W] = train + val, pool_y int64, test_x, test_y, class names)."""
    path = Path(path)
    with _open(path) as npz:
        missing = [k for k in KEYS if k not in npz.files]
        if missing:
            raise DataError(f"{path}: missing key(s) {missing}; a MedMNIST .npz holds {', '.join(KEYS)}; "
                            f"found {sorted(npz.files)}")
        images, labels = {}, {}
        for split in SPLITS:
            key = f"{split}_images"
            images[split] = _get(npz, path, key)
            _check_images(path, key, images[split])
            labels[split] = _check_labels(path, f"{split}_labels", _get(npz, path, f"{split}_labels"), len(images[split]))
    shapes = {split: tuple(images[split].shape[1:]) for split in SPLITS}
    shapes = {s: (shape if len(shape) == 3 and shape[-1] == 3 else shape[:2]) for s, shape in shapes.items()}
    for split in ("val", "test"):
        if shapes[split] != shapes["train"]:
            raise DataError(f"{path}: '{split}_images' holds images of shape {list(shapes[split])}, 'train_images' "
                            f"{list(shapes['train'])}; every split must have the same image size and channels")
    highest = max((int(y.max()) for y in labels.values() if y.size), default=0)
    if class_names is not None:
        classes = [str(c) for c in class_names]
        for split in SPLITS:
            bad = labels[split][labels[split] >= len(classes)]
            if bad.size:
                raise DataError(f"{path}: '{split}_labels' holds label {int(bad[0])}, but data.class_names lists "
                                f"{len(classes)} classes (labels 0..{len(classes) - 1})")
    else:
        classes = [str(c) for c in range(highest + 1)]
    pool_x = _to_rgb_nchw(images["train"], images["val"])
    pool_y = np.concatenate([labels["train"], labels["val"]])
    return pool_x, pool_y, _to_rgb_nchw(images["test"]), labels["test"], classes
