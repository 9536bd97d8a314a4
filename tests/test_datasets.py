"""Your own data: `data.name: imagefolder` (a folder per class) and `data.name: medmnist` (a
MedMNIST .npz), on miniatures written in the real on-disk formats from scikit-learn's digits
(real 8x8 scans, upscaled): PNG files in class folders, and an .npz with MedMNIST's keys,
shapes and dtypes. Then config validation of the new keys, the shipped presets, and one run
per format through the real pipeline with an open_clip model from a local checkpoint.

The two end-to-end runs and the open_clip checks are marked `slow` (part of the normal suite).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from foldsoup.errors import ConfigError

from foldsoup.config.schema import fill_defaults, load_schema, validate
from foldsoup.config.yaml_files import deep_update, load_yaml_files
from foldsoup.errors import DataError
from foldsoup.data.prepared import prepare

REPO = Path(__file__).resolve().parents[1]
# Folder name of each digit; sorted, the class order is covid (2), normal (0), pneumonia (1).
FOLDER_OF_DIGIT = {0: "normal", 1: "pneumonia", 2: "covid"}
CLASSES = sorted(FOLDER_OF_DIGIT.values())
COLOURS = {0: (255, 64, 0), 1: (0, 200, 255), 2: (128, 255, 32)}
MEDMNIST_SPLITS = {"train": 6, "val": 2, "test": 3}  # images per class


# ---------------------------------------------------------------- real images: scikit-learn's digits


@pytest.fixture(scope="module")
def digits() -> dict[int, np.ndarray]:
    """Real digit scans per digit 0..9: uint8 [n, 32, 32] (8x8, 0..16 grey levels, upscaled 4x)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    grey = np.rint(d.images * (255 / 16)).astype(np.uint8)
    big = np.kron(grey, np.ones((1, 4, 4), dtype=np.uint8))
    return {c: big[d.target == c] for c in range(10)}


def _colour(grey: np.ndarray, digit: int) -> np.ndarray:
    """[H, W] grey -> [H, W, 3]: the digit drawn in its class colour."""
    return np.rint(grey[..., None].astype(np.float64) * np.array(COLOURS[digit]) / 255).astype(np.uint8)


def write_class_folders(folder: Path, digits: dict, per_class: int, rgb: bool = False, offset: int = 0,
                        classes: dict[int, str] = FOLDER_OF_DIGIT) -> dict[str, list[np.ndarray]]:
    """One PNG per image in folder/<class>/NNN.png (lossless); returns the written pixels per
    class folder as stored: uint8 [3, H, W] (grey repeated into R, G, B)."""
    from PIL import Image

    written = {}
    for digit, name in classes.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        written[name] = []
        for i in range(per_class):
            grey = digits[digit][offset + i]
            pixels = _colour(grey, digit) if rgb else grey
            Image.fromarray(pixels).save(folder / name / f"{i:03d}.png")
            written[name].append(pixels.transpose(2, 0, 1) if rgb else np.repeat(grey[None], 3, axis=0))
    return written


def _stack(written: dict[str, list[np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Images in the order prepare() reads them (sorted class, sorted file) and their labels."""
    images = [img for name in CLASSES for img in written[name]]
    labels = [CLASSES.index(name) for name in CLASSES for _ in written[name]]
    return np.stack(images), np.array(labels, dtype=np.int64)


def data_cfg(**keys) -> dict:
    """A data section with every schema default filled in, as jobs receive it."""
    return fill_defaults({"data": keys, "model": {"name": "open_clip"}}, load_schema())["data"]


# ---------------------------------------------------------------- imagefolder: layouts, pixels, labels


def test_train_test_layout_is_pixel_exact_and_adds_val_to_the_pool(tmp_path, digits):
    root = tmp_path / "scans"
    train = write_class_folders(root / "train", digits, 4)
    val = write_class_folders(root / "val", digits, 1, offset=4)
    test = write_class_folders(root / "test", digits, 2, offset=5)
    (root / "README.txt").write_text("files beside train/ and test/ are fine")
    data = prepare(data_cfg(name="imagefolder", root=str(root), image_size=32), seed=0)
    assert data.name == "imagefolder" and data.classes == ["covid", "normal", "pneumonia"]
    train_x, train_y = _stack(train)
    val_x, val_y = _stack(val)
    test_x, test_y = _stack(test)
    assert data.pool_images.dtype == np.uint8 and data.pool_images.shape == (15, 3, 32, 32)
    assert np.array_equal(data.pool_images, np.concatenate([train_x, val_x]))
    assert np.array_equal(data.pool_labels, np.concatenate([train_y, val_y])) and data.pool_labels.dtype == np.int64
    assert np.array_equal(data.test_images, test_x) and np.array_equal(data.test_labels, test_y)
    assert data.pretrain_images is None
    # folder "normal" holds digit 0: label 1 after sorting
    assert np.array_equal(data.pool_images[data.pool_labels == 1][0], np.repeat(digits[0][0][None], 3, axis=0))


def test_class_folders_only_are_split_stratified_and_seeded(tmp_path, digits):
    root = tmp_path / "scans"
    written = write_class_folders(root, digits, 8, rgb=True)
    (root / ".DS_Store").write_bytes(b"\x00\x01")  # hidden files and desktop files are ignored
    (root / "normal" / "Thumbs.db").write_bytes(b"\x00")
    (root / "normal" / ".hidden").mkdir()
    (root / "normal" / ".hidden" / "junk.txt").write_text("ignored")
    cfg = data_cfg(name="imagefolder", root=str(root), image_size=32, test_fraction=0.25)
    data = prepare(cfg, seed=0)
    assert data.classes == CLASSES
    assert np.bincount(data.pool_labels).tolist() == [6, 6, 6] and np.bincount(data.test_labels).tolist() == [2, 2, 2]
    everything, labels = _stack(written)
    # pool and test are disjoint and together every written image, each with its own label
    got = np.concatenate([data.pool_images, data.test_images])
    got_labels = np.concatenate([data.pool_labels, data.test_labels])
    key = [img.tobytes() + bytes([lab]) for img, lab in zip(everything, labels, strict=True)]
    assert sorted(img.tobytes() + bytes([lab]) for img, lab in zip(got, got_labels, strict=True)) == sorted(key)
    assert not np.array_equal(data.pool_images[:, 0], data.pool_images[:, 1])  # colour kept: R != G
    again = prepare(cfg, seed=0)
    assert np.array_equal(again.test_images, data.test_images)
    other = prepare(cfg, seed=1)
    assert not np.array_equal(other.test_images, data.test_images)
    capped = prepare({**cfg, "max_pool": 9, "max_test": 3}, seed=0)
    assert np.bincount(capped.pool_labels).tolist() == [3, 3, 3] and np.bincount(capped.test_labels).tolist() == [1, 1, 1]


def test_modes_and_resizing(tmp_path, digits):
    """JPEG, RGBA (alpha dropped), palette, 16-bit grey (scaled by 1/257), sub-folders of a class
    folder; images of other sizes resized to image_size by Pillow's bicubic filter, stretched or
    centre-cropped."""
    from PIL import Image, ImageOps

    root = tmp_path / "mixed"
    grey = digits[0][0]
    wide = np.kron(digits[1][0][:, :6], np.ones((1, 2), dtype=np.uint8))[:24]  # [24, 12] -> a 24 x 12 image
    (root / "a" / "deeper").mkdir(parents=True)
    (root / "b").mkdir()
    rgba = np.dstack([_colour(grey, 0), np.full_like(grey, 7)])
    Image.fromarray(rgba, mode="RGBA").save(root / "a" / "1_rgba.png")
    Image.fromarray(grey).convert("P").save(root / "a" / "2_palette.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(root / "a" / "deeper" / "3_sixteen.png")
    Image.fromarray(wide).save(root / "b" / "1_wide.png")
    Image.fromarray(_colour(grey, 2)).save(root / "b" / "2_photo.JPG", quality=95)
    for name in ("a", "b"):
        for i in range(2):
            Image.fromarray(digits[2][i]).save(root / name / f"9_{i}.png")
    assert Image.open(root / "a" / "deeper" / "3_sixteen.png").mode.startswith("I")

    data = prepare(data_cfg(name="imagefolder", root=str(root), image_size=32, test_fraction=0.5), seed=0)
    images = np.concatenate([data.pool_images, data.test_images])
    assert images.shape == (9, 3, 32, 32)

    from foldsoup.data.imagefolder import read_image

    expected_grey = np.repeat(grey[None], 3, axis=0)
    assert np.array_equal(read_image(root / "a" / "1_rgba.png", 32, "stretch"), _colour(grey, 0).transpose(2, 0, 1))
    assert np.array_equal(read_image(root / "a" / "2_palette.png", 32, "stretch"), expected_grey)
    assert np.array_equal(read_image(root / "a" / "deeper" / "3_sixteen.png", 32, "stretch"), expected_grey)
    jpeg = read_image(root / "b" / "2_photo.JPG", 32, "stretch").astype(int)
    assert np.abs(jpeg - _colour(grey, 2).transpose(2, 0, 1)).mean() < 8  # lossy, but close
    pil = Image.fromarray(wide).convert("RGB")
    stretched = np.asarray(pil.resize((16, 16), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    cropped = np.asarray(ImageOps.fit(pil, (16, 16), method=Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    assert np.array_equal(read_image(root / "b" / "1_wide.png", 16, "stretch"), stretched)
    assert np.array_equal(read_image(root / "b" / "1_wide.png", 16, "center_crop"), cropped)
    assert not np.array_equal(stretched, cropped)
    small = prepare(data_cfg(name="imagefolder", root=str(root), image_size=16, test_fraction=0.5, resize="center_crop"), 0)
    assert small.pool_images.shape[1:] == (3, 16, 16)


# ---------------------------------------------------------------- imagefolder: every error names the file


def _png(path: Path, digits, digit: int = 0) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(digits[digit][0]).save(path)


def _error(root: Path, **keys) -> str:
    with pytest.raises(DataError) as info:
        prepare(data_cfg(name="imagefolder", root=str(root), image_size=32, **keys), seed=0)
    return str(info.value)


def test_imagefolder_layout_errors(tmp_path, digits):
    root = tmp_path / "r"
    assert _error(root) == (f"imagefolder: data.root {str(root)!r} does not exist; expected a folder with one sub-folder of "
                            f"images per class, or with train/ and test/ (and optionally val/) holding such folders")
    root.write_text("")
    assert f"data.root {str(root)!r} is a file, not a folder" in _error(root)
    root.unlink()
    root.mkdir()
    assert _error(root).startswith(f"{root}: no class folders; expected one sub-folder of images per class")
    write_class_folders(root, digits, 2, classes={0: "only"})
    assert _error(root) == f"{root}: only one class folder ('only'); classification needs at least 2 classes"
    write_class_folders(root, digits, 2, classes={1: "other"})
    (root / "stray.png").write_bytes(b"")
    assert _error(root).startswith(f"{root / 'stray.png'}: a file beside the class folders of {root}; every image "
                                   f"belongs inside its class's folder")
    (root / "stray.png").unlink()
    (root / "other" / "notes.txt").write_text("x")
    assert _error(root).startswith(f"{root / 'other' / 'notes.txt'}: not an image file (extension '.txt'; allowed: .png, .jpg")
    (root / "other" / "notes.txt").unlink()
    (root / "empty").mkdir()
    assert _error(root).startswith(f"{root / 'empty'}: empty class folder: no images (allowed extensions: .png,")
    (root / "empty").rmdir()
    (root / "third").mkdir()
    _png(root / "third" / "a.png", digits)
    assert _error(root, test_fraction=0.5) == (
        f"{root / 'third'}: only 1 image; without train/ and test/ folders the test set is split off every class "
        f"(data.test_fraction = 0.5), which needs at least 2 images per class")
    _png(root / "third" / "b.png", digits)
    message = _error(root, test_fraction=0.1)
    assert message.startswith(f"{root}: cannot split a stratified test set with data.test_fraction = 0.1 from 6 images "
                              f"in 3 classes (") and "change data.test_fraction or give train/ and test/ folders" in message


def test_imagefolder_split_errors(tmp_path, digits):
    root = tmp_path / "r"
    write_class_folders(root / "train", digits, 2)
    assert _error(root) == (f"{root}: has train/ but no test/; give both train/ and test/ (optionally val/), each with "
                            f"one folder per class, or neither (class folders directly under data.root, the test set "
                            f"split off by data.test_fraction)")
    write_class_folders(root / "test", digits, 1, classes={0: "normal", 1: "pneumonia", 2: "covid", 3: "flu"})
    assert _error(root) == (f"{root / 'test' / 'flu'}: class folder 'flu' is not in {root / 'train'} (classes there: "
                            f"covid, normal, pneumonia); test/ must hold the same class folders as train/")
    for f in (root / "test" / "flu").iterdir():
        f.unlink()
    (root / "test" / "flu").rmdir()
    for f in (root / "test" / "covid").iterdir():
        f.unlink()
    assert _error(root) == f"{root / 'test' / 'covid'}: empty class folder: no images (allowed extensions: " + \
        ".png, .jpg, .jpeg, .bmp, .tif, .tiff, .webp, .gif, .ppm, .pgm, .pbm)"
    (root / "test" / "covid").rmdir()
    assert _error(root) == (f"{root / 'test'}: no folder for class 'covid' of {root / 'train'}; test/ must hold the "
                            f"same class folders as train/")
    write_class_folders(root / "test", digits, 1)
    (root / "train" / "notes.md").write_text("x")
    assert _error(root).startswith(f"{root / 'train' / 'notes.md'}: a file beside the class folders of {root / 'train'}")
    (root / "train" / "notes.md").unlink()
    (root / "extra").mkdir()
    assert _error(root) == (f"{root / 'extra'}: unexpected folder beside train/ and test/ (allowed there: train/, val/, "
                            f"test/, each with one folder per class)")
    (root / "extra").rmdir()
    assert len(prepare(data_cfg(name="imagefolder", root=str(root), image_size=32), 0).test_labels) == 3


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "float"])
def test_unreadable_image_names_the_file(tmp_path, digits, damage):
    from PIL import Image

    root = tmp_path / "r"
    write_class_folders(root / "train", digits, 2)
    write_class_folders(root / "test", digits, 1, offset=2)
    bad = root / "test" / "normal" / ("000.tif" if damage == "float" else "000.png")
    raw = (root / "test" / "normal" / "000.png").read_bytes()
    if damage == "float":
        (root / "test" / "normal" / "000.png").unlink()
        Image.fromarray(digits[0][0].astype(np.float32) / 255).save(bad)
        assert _error(root) == f"{bad}: floating-point image (Pillow mode 'F'); save it as 8- or 16-bit integer PNG/TIFF"
        return
    bad.write_bytes({"garbage": b"not an image at all" * 20, "truncated": raw[: len(raw) // 2], "empty": b""}[damage])
    message = _error(root)
    assert message.startswith(f"{bad}: cannot read as an image (") and message.endswith("replace or delete the file")


# ---------------------------------------------------------------- medmnist


def write_medmnist(path: Path, digits: dict, rgb: bool = False, size: int = 28, **replace) -> dict[str, np.ndarray]:
    """A MedMNIST-format .npz: {split}_images uint8 [N, H, W] (or [N, H, W, 3]), {split}_labels
    uint8 [N, 1], written with np.savez_compressed. Digits 0..2 are the classes; `replace`
    overrides arrays by key (None drops the key)."""
    arrays, start = {}, 0
    for split, per_class in MEDMNIST_SPLITS.items():
        images, labels = [], []
        for i in range(per_class):
            for digit in FOLDER_OF_DIGIT:
                grey = np.pad(digits[digit][start + i][::4, ::4].repeat(3, 0).repeat(3, 1), 2)  # 8 -> 24 -> 28 px
                grey = np.kron(grey, np.ones((size // 28, size // 28), dtype=np.uint8)) if size != 28 else grey
                images.append(_colour(grey, digit) if rgb else grey)
                labels.append(digit)
        arrays[f"{split}_images"] = np.stack(images).astype(np.uint8)
        arrays[f"{split}_labels"] = np.array(labels, dtype=np.uint8)[:, None]
        start += per_class
    for key, value in replace.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    np.savez_compressed(path, **arrays)
    return arrays


def _as_stored(images: np.ndarray) -> np.ndarray:
    return np.repeat(images[:, None], 3, axis=1) if images.ndim == 3 else images.transpose(0, 3, 1, 2)


@pytest.mark.parametrize("rgb", [False, True], ids=["grey", "rgb"])
def test_medmnist_pool_is_train_plus_val(tmp_path, digits, rgb):
    path = tmp_path / ("bloodmnist.npz" if rgb else "pneumoniamnist.npz")
    arrays = write_medmnist(path, digits, rgb=rgb)
    with np.load(path) as f:  # the miniature has MedMNIST's keys, dtypes and shapes
        assert sorted(f.files) == sorted(f"{s}_{k}" for s in MEDMNIST_SPLITS for k in ("images", "labels"))
        assert f["train_images"].shape == ((18, 28, 28, 3) if rgb else (18, 28, 28)) and f["train_images"].dtype == np.uint8
        assert f["train_labels"].shape == (18, 1) and f["train_labels"].dtype == np.uint8
    data = prepare(data_cfg(name="medmnist", root=str(path)), seed=0)
    assert data.name == "medmnist" and data.classes == ["0", "1", "2"]
    assert data.pool_images.shape == (24, 3, 28, 28) and data.test_images.shape == (9, 3, 28, 28)
    pool = np.concatenate([arrays["train_images"], arrays["val_images"]])
    assert np.array_equal(data.pool_images, _as_stored(pool))
    assert np.array_equal(data.pool_labels, np.concatenate([arrays["train_labels"][:, 0], arrays["val_labels"][:, 0]]))
    assert np.array_equal(data.test_images, _as_stored(arrays["test_images"]))
    assert np.array_equal(data.test_labels, arrays["test_labels"][:, 0]) and data.test_labels.dtype == np.int64
    named = prepare(data_cfg(name="medmnist", root=str(path), class_names=["zero", "one", "two"], max_pool=12), seed=0)
    assert named.classes == ["zero", "one", "two"] and np.bincount(named.pool_labels).tolist() == [4, 4, 4]


def _medmnist_error(path: Path, **keys) -> str:
    with pytest.raises(DataError) as info:
        prepare(data_cfg(name="medmnist", root=str(path), **keys), seed=0)
    return str(info.value)


def test_medmnist_file_errors(tmp_path, digits):
    path = tmp_path / "pneumoniamnist.npz"
    assert _medmnist_error(path) == (f"MedMNIST: data.root {str(path)!r} does not exist; expected a MedMNIST .npz file "
                                     f"from https://medmnist.com (MedMNIST v2/v3 .npz files, e.g. pneumoniamnist.npz "
                                     f"or pneumoniamnist_224.npz)")
    path.write_bytes(b"PK\x03\x04 not really a zip")
    assert _medmnist_error(path).startswith(f"{path}: not a readable .npz file (")
    arrays = write_medmnist(path, digits)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    assert _medmnist_error(path).startswith(f"{path}: not a readable .npz file (BadZipFile: ")
    np.save(tmp_path / "single.npy", arrays["train_images"])
    (tmp_path / "single.npy").rename(path)
    assert _medmnist_error(path) == (f"{path}: holds a single array (uint8 [18, 28, 28]), not an .npz archive of the keys "
                                     f"train_images, train_labels, val_images, val_labels, test_images, test_labels")
    write_medmnist(path, digits, val_labels=None)
    assert _medmnist_error(path) == (
        f"{path}: missing key(s) ['val_labels']; a MedMNIST .npz holds train_images, train_labels, val_images, "
        f"val_labels, test_images, test_labels; found ['test_images', 'test_labels', 'train_images', 'train_labels', "
        f"'val_images']")


@pytest.mark.parametrize("key, value, message", [
    ("train_images", lambda a: a.astype(np.float32) / 255,
     "'train_images' must be uint8 [N, H, W] (grey) or [N, H, W, 3] (RGB), got float32 [18, 28, 28]"),
    ("val_images", lambda a: np.zeros((6, 28, 28, 28), np.uint8),
     "'val_images' must be uint8 [N, H, W] (grey) or [N, H, W, 3] (RGB), got uint8 [6, 28, 28, 28] (3D MedMNIST "
     "volumes [N, D, H, W] are not supported; use a 2D dataset)"),
    ("test_images", lambda a: np.zeros((9, 64, 64), np.uint8),
     "'test_images' holds images of shape [64, 64], 'train_images' [28, 28]; every split must have the same image size "
     "and channels"),
    ("train_labels", lambda a: np.zeros((18, 14), np.uint8),
     "'train_labels' has shape [18, 14]: 14 labels per image, a multi-label dataset (like ChestMNIST's 14 findings). "
     "foldsoup trains single-label classifiers (one class per image); use a single-label MedMNIST dataset (e.g. "
     "pneumoniamnist)"),
    ("test_labels", lambda a: a.astype(np.float32), "'test_labels' must be integer class labels [N, 1], got float32 [9, 1]"),
    ("val_labels", lambda a: a[:-1], "'val_labels' has 5 labels for 6 images in 'val_images'"),
    ("val_labels", lambda a: a.astype(np.int64) - 1, "'val_labels' holds the negative label -1; labels must be 0..C-1"),
    ("train_labels", lambda a: np.array([[None]] * 18, dtype=object),
     "key 'train_labels' cannot be read (ValueError: Object arrays cannot be loaded when allow_pickle=False)"),
], ids=["float-images", "3d-volume", "test-size", "multi-label", "float-labels", "count", "negative", "pickled"])
def test_medmnist_content_errors(tmp_path, digits, key, value, message):
    path = tmp_path / "pneumoniamnist.npz"
    arrays = write_medmnist(path, digits)
    write_medmnist(path, digits, **{key: value(arrays[key])})
    assert _medmnist_error(path) == f"{path}: {message}"


def test_medmnist_class_names_and_missing_classes(tmp_path, digits):
    path = tmp_path / "pneumoniamnist.npz"
    arrays = write_medmnist(path, digits)
    assert _medmnist_error(path, class_names=["a", "b"]) == (
        f"{path}: 'train_labels' holds label 2, but data.class_names lists 2 classes (labels 0..1)")
    # a class named but absent from the pool: validate_prepared names it
    assert _medmnist_error(path, class_names=["a", "b", "c", "d"]) == (
        f"dataset 'medmnist' under {str(path)!r}: class 'd' has no images in the training pool")
    labels = arrays["train_labels"].copy()
    labels[labels == 2] = 0
    val = arrays["val_labels"].copy()
    val[val == 2] = 1
    write_medmnist(path, digits, train_labels=labels, val_labels=val)
    assert _medmnist_error(path) == f"dataset 'medmnist' under {str(path)!r}: class '2' has no images in the training pool"
    write_medmnist(path, digits, train_labels=arrays["train_labels"][:, 0])  # [N] labels read as well as [N, 1]
    assert prepare(data_cfg(name="medmnist", root=str(path)), 0).pool_labels.tolist()[:3] == [0, 1, 2]


# ---------------------------------------------------------------- configuration


@pytest.fixture(scope="module")
def base() -> dict:
    cfg = load_yaml_files(REPO / "config.yaml")
    cfg["folds"]["holdout_fraction"] = 0  # the k bounds below are the plain split's (with a holdout: test_holdout.py)
    return cfg


def problems_of(config: dict, **kwargs) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate(config, **kwargs)
    return [line.removeprefix("  - ") for line in str(info.value).splitlines()[1:]]


@pytest.fixture(scope="module")
def own_data(tmp_path_factory, digits) -> dict:
    folder = tmp_path_factory.mktemp("own")
    write_class_folders(folder / "scans", digits, 6)
    write_medmnist(folder / "pneumoniamnist.npz", digits)
    return {"imagefolder": folder / "scans", "medmnist": folder / "pneumoniamnist.npz"}


@pytest.mark.parametrize("preset", ["imagefolder-clip", "medmnist-clip"])
def test_presets_are_valid(base, preset, own_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    merged = deep_update(base, load_yaml_files(REPO / "presets" / f"{preset}.yaml"))
    name = merged["data"]["name"]
    cfg = validate(merged, check_paths=False)
    keys = ("name", "arch", "pretrained", "quick_gelu", "normalize_features")
    assert {k: cfg["model"][k] for k in keys} == {"name": "open_clip", "arch": "ViT-B-32", "pretrained": "openai",
                                                  "quick_gelu": True, "normalize_features": True}  # as 'openai' was trained
    assert cfg["data"]["image_size"] == 224 and not cfg["data"]["hflip"] and not cfg["data"]["download"]
    assert len(cfg["grid"]["lr"]) * len(cfg["grid"]["aug"]) * len(cfg["grid"]["mixup"]) == 18 and cfg["folds"]["k"] == 5
    # the placeholder root does not exist here: named at parse time, before any job
    (problem,) = problems_of(merged)
    assert problem.startswith(f"data.root: {merged['data']['root']!r} does not exist; with data.name {name!r} allowed: ")
    validate(deep_update(merged, {"data": {"root": str(own_data[name])}}))


def test_new_keys_are_validated(base, tmp_path, own_data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    clip = {"model": {"name": "open_clip"}}
    medmnist = deep_update(base, {"data": {"name": "medmnist", "root": str(own_data["medmnist"])}, **clip})
    imagefolder = deep_update(base, {"data": {"name": "imagefolder", "root": str(own_data["imagefolder"])}, **clip})
    validate(medmnist)
    validate(imagefolder)
    assert problems_of(deep_update(medmnist, {"model": {"name": "digits_cnn"}})) == [
        "model.name: 'digits_cnn' is pretrained on digits classes; with data.name 'medmnist' allowed: 'open_clip' or 'timm'"]
    assert problems_of(deep_update(imagefolder, {"model": {"name": "digits_cnn"}})) == [
        "model.name: 'digits_cnn' is pretrained on digits classes; with data.name 'imagefolder' allowed: 'open_clip' or 'timm'"]
    assert problems_of(deep_update(medmnist, {"data": {"download": True}})) == [
        "data.download: true only fetches CIFAR-10; for data.name 'medmnist' put the .npz file at data.root yourself, "
        "allowed: false"]
    assert problems_of(deep_update(imagefolder, {"data": {"class_names": ["a", "b"]}})) == [
        "data.class_names: only for data.name 'medmnist' or 'csv' (imagefolder takes its class names from its folder "
        "names); allowed: null"]
    assert problems_of(deep_update(medmnist, {"data": {"class_names": ["a"]}})) == [
        "data.class_names: ['a'] has 1 item(s); allowed: a list of strings (at least 2 item(s), no duplicates) or null"]
    assert problems_of(deep_update(medmnist, {"data": {"class_names": ["a", "a"]}})) == [
        "data.class_names: 'a' appears more than once in ['a', 'a']; every value may appear only once"]
    assert problems_of(deep_update(imagefolder, {"data": {"resize": "crop"}})) == [
        "data.resize: 'crop' is not allowed (allowed: one of 'stretch', 'center_crop')"]
    assert problems_of(deep_update(imagefolder, {"data": {"mean": [0.5, 0.5]}, })) == [
        "data.mean and data.std need the same length, got 2 and 1",
        "data.mean: [0.5, 0.5] has 2 values; imagefolder images have 3 channel(s), allowed: 1 value (for every "
        "channel) or 3"]
    assert problems_of(deep_update(base, {"data": {"name": "medmnst"}})) == [
        "data.name: 'medmnst' is not allowed; did you mean 'medmnist'? (allowed: one of 'digits', 'cifar10', "
        "'imagefolder', 'medmnist', 'csv')"]
    # paths: the .npz file, the image folder
    zipped = str(own_data["medmnist"].with_suffix(".zip"))
    assert problems_of(deep_update(medmnist, {"data": {"root": zipped}}), check_paths=False) == [
        f"data.root: {zipped!r} is not an .npz file; with data.name 'medmnist' allowed: the path of a MedMNIST .npz "
        f"file, e.g. data/medmnist/pneumoniamnist_224.npz (download e.g. pneumoniamnist.npz or pneumoniamnist_224.npz "
        f"from https://medmnist.com)"]
    missing = str(tmp_path / "chestmnist.npz")
    assert problems_of(deep_update(medmnist, {"data": {"root": missing}})) == [
        f"data.root: {missing!r} does not exist; with data.name 'medmnist' allowed: an existing MedMNIST .npz file "
        f"(download e.g. pneumoniamnist.npz or pneumoniamnist_224.npz from https://medmnist.com)"]
    (tmp_path / "folder.npz").mkdir()
    assert problems_of(deep_update(medmnist, {"data": {"root": str(tmp_path / "folder.npz")}}))[0].startswith(
        f"data.root: {str(tmp_path / 'folder.npz')!r} is a folder; with data.name 'medmnist' allowed: an existing")
    validate(deep_update(medmnist, {"data": {"root": missing}}), check_paths=False)
    for root, what in ((tmp_path / "nowhere", "does not exist"), (own_data["medmnist"], "is a file")):
        assert problems_of(deep_update(imagefolder, {"data": {"root": str(root)}})) == [
            f"data.root: {str(root)!r} {what}; with data.name 'imagefolder' allowed: a folder with one sub-folder of "
            f"images per class, or with train/ and test/ (optionally val/) holding them"]
    # k against max_pool: the number of classes is known from class_names, else at least 2
    assert problems_of(deep_update(imagefolder, {"data": {"max_pool": 8}})) == [
        "folds.k: 5 is larger than the smallest class of the training pool: data.max_pool = 8 leaves at most 4 pool "
        "image(s) in the smallest class (of at least 2); every fold needs at least one image of every class, allowed: "
        "2 <= k <= 4"]
    assert problems_of(deep_update(medmnist, {"data": {"max_pool": 12, "class_names": ["a", "b", "c"]}})) == [
        "folds.k: 5 is larger than the smallest class of the training pool: data.max_pool = 12 leaves at most 4 pool "
        "image(s) in the smallest of 3 classes (data.class_names); every fold needs at least one image of every "
        "class, allowed: 2 <= k <= 4"]


def test_open_clip_arch_and_pretrained_tag(base, tmp_path, monkeypatch):
    """Any open_clip model name and any of its pretrained tags, or a local checkpoint file;
    checked at parse time without importing open_clip."""
    monkeypatch.chdir(tmp_path)
    cifar = deep_update(base, {"data": {"name": "cifar10", "download": True}, "model": {"name": "open_clip"}})

    def model(**keys) -> dict:
        return deep_update(cifar, {"model": keys})

    for arch, tag in (("ViT-B-32", "laion2b_s34b_b79k"), ("ViT-B-16", "openai"), ("RN50", "yfcc15m"),
                      ("ViT-B-32-quickgelu", "metaclip_400m"), ("convnext_base_w", "laion2b_s13b_b82k")):
        validate(model(arch=arch, pretrained=tag))
    assert problems_of(model(pretrained="opnai")) == [
        "model.pretrained: 'opnai' is not a pretrained tag of 'ViT-B-32'; did you mean 'openai'? (allowed: one of "
        "'openai', 'laion400m_e31', 'laion400m_e32', 'laion2b_e16', 'laion2b_s34b_b79k', 'datacomp_xl_s13b_b90k', "
        "'datacomp_m_s128m_b4k', 'commonpool_m_clip_s128m_b4k', 'commonpool_m_laion_s128m_b4k', "
        "'commonpool_m_image_s128m_b4k', 'commonpool_m_text_s128m_b4k', 'commonpool_m_basic_s128m_b4k', "
        "'commonpool_m_s128m_b4k', 'datacomp_s_s13m_b4k', 'commonpool_s_clip_s13m_b4k', 'commonpool_s_laion_s13m_b4k', "
        "'commonpool_s_image_s13m_b4k', 'commonpool_s_text_s13m_b4k', 'commonpool_s_basic_s13m_b4k', "
        "'commonpool_s_s13m_b4k', 'metaclip_400m', 'metaclip_fullcc', or the path of a local .safetensors/.pt "
        "checkpoint)"]
    assert problems_of(model(arch="ViT-L-14", pretrained="laion2b"))[0].startswith(
        "model.pretrained: 'laion2b' is not a pretrained tag of 'ViT-L-14'; did you mean 'laion2b_s32b_b82k'?")
    assert problems_of(model(arch="ViT-S-32", pretrained="openai")) == [
        "model.pretrained: 'openai': open_clip has no pretrained weights for model.arch 'ViT-S-32'; the tag 'openai' "
        "exists for RN50, RN101, RN50x4, RN50x16, RN50x64, ViT-B-32; allowed: the path of a local .safetensors/.pt "
        "checkpoint of 'ViT-S-32'"]
    assert problems_of(model(pretrained="")) == ["model.pretrained: '' is empty; allowed: a non-empty string"]
    # a local checkpoint: any existing file (even without a suffix), or a path that must exist
    (tmp_path / "my_clip").write_bytes(b"weights")
    validate(model(arch="ViT-S-32", pretrained="my_clip", quick_gelu=False))
    validate(model(arch="ViT-S-32", pretrained=str(tmp_path / "later.safetensors"), quick_gelu=True), check_paths=False)
    assert problems_of(model(arch="ViT-S-32", pretrained=str(tmp_path / "later.safetensors"), quick_gelu=True)) == [
        f"model.pretrained: checkpoint file {str(tmp_path / 'later.safetensors')!r} does not exist; allowed: an "
        f"open_clip pretrained tag (e.g. 'openai') or an existing .safetensors/.pt file"]


def test_open_clip_activation(base, tmp_path, monkeypatch):
    """model.quick_gelu, checked at parse time without importing open_clip: a tag fills it (as the
    tag was trained) and refuses a contradiction; a checkpoint file needs it, unless the arch says it
    (*-quickgelu) or its image tower has no GELU (RN*'s ModifiedResNet uses ReLU, timm towers their own)."""
    monkeypatch.chdir(tmp_path)
    cifar = deep_update(base, {"data": {"name": "cifar10", "download": True}, "model": {"name": "open_clip"}})
    checkpoint = str(tmp_path / "clip.safetensors")
    (tmp_path / "clip.safetensors").write_bytes(b"weights")

    def quick_gelu(**keys):
        return validate(deep_update(cifar, {"model": keys}))["model"]["quick_gelu"]

    def problem(**keys) -> str:
        (line,) = problems_of(deep_update(cifar, {"model": keys}))
        return line

    # A tag: null takes the tag's own activation, as open_clip's pretrained configs say.
    assert quick_gelu(pretrained="openai") is True and quick_gelu(pretrained="laion2b_s34b_b79k") is False
    assert quick_gelu(pretrained="openai", quick_gelu=True) is True
    assert quick_gelu(arch="ViT-B-32-quickgelu", pretrained="metaclip_400m") is True
    assert problem(pretrained="openai", quick_gelu=False) == (
        "model.quick_gelu: false contradicts model.pretrained 'openai': open_clip's 'openai' weights of 'ViT-B-32' were "
        "trained with QuickGELU; allowed: true or null (null takes the tag's activation)")
    assert problem(pretrained="laion2b_s34b_b79k", quick_gelu=True) == (
        "model.quick_gelu: true contradicts model.pretrained 'laion2b_s34b_b79k': open_clip's 'laion2b_s34b_b79k' "
        "weights of 'ViT-B-32' were trained with GELU; allowed: false or null (null takes the tag's activation)")
    # A file: said explicitly, or by the arch; refused before any job otherwise.
    assert quick_gelu(pretrained=checkpoint, quick_gelu=True) is True
    assert quick_gelu(pretrained=checkpoint, quick_gelu=False) is False
    assert quick_gelu(arch="ViT-B-32-quickgelu", pretrained=checkpoint) is True
    assert problem(pretrained=checkpoint) == (
        f"model.quick_gelu: null, but model.pretrained {checkpoint!r} is a checkpoint file, which does not say which "
        f"activation its weights were trained with; allowed: true for OpenAI's CLIP weights (or model.arch: "
        f"ViT-B-32-quickgelu), false for weights trained with GELU (e.g. most LAION ones)")
    assert problem(arch="ViT-S-32", pretrained=checkpoint).endswith(  # no ViT-S-32-quickgelu in open_clip
        "allowed: true for OpenAI's CLIP weights, false for weights trained with GELU (e.g. most LAION ones)")
    assert problem(arch="ViT-B-32-quickgelu", pretrained=checkpoint, quick_gelu=False) == (
        "model.quick_gelu: false contradicts model.arch 'ViT-B-32-quickgelu', which is built with QuickGELU; allowed: "
        "true or null, or model.arch 'ViT-B-32' for weights trained with GELU")
    # Towers without GELU: not needed, any value accepted (it changes nothing there).
    for arch in ("RN50", "convnext_base_w"):
        assert quick_gelu(arch=arch, pretrained=checkpoint) is None
    assert quick_gelu(arch="RN50", pretrained="openai", quick_gelu=False) is False
    # digits_cnn has no activation to choose: nothing filled in.
    assert validate(base)["model"]["quick_gelu"] is None


@pytest.mark.slow
def test_towers_without_gelu_ignore_quick_gelu():
    """What test_open_clip_activation relies on: model.quick_gelu changes the ViT image tower
    only; the RN50 (ModifiedResNet, ReLU) and convnext (timm) towers come out the same either way."""
    import torch
    from open_clip.transformer import QuickGELU

    from foldsoup.models.clip import open_clip_visual
    from foldsoup.config.open_clip_names import activation_matters, model_config

    for arch in ("RN50", "convnext_base_w", "ViT-S-32"):
        with torch.device("meta"):  # module classes only
            kinds = [[type(m) for m in open_clip_visual(arch, None, quick)[0].modules()] for quick in (False, True)]
        matters = activation_matters(model_config(arch))
        assert (kinds[0] != kinds[1]) == matters == (arch == "ViT-S-32"), arch
        assert (QuickGELU in kinds[1]) == matters, arch


def _preset_snakemake(tmp_path: Path, preset: str, root: Path, *args: str):
    """The real snakemake on a preset with data.root pointed at `root`, results under tmp_path."""
    import os

    try:
        from conftest import clean_env, snakemake
    except ImportError:  # tests/ imported as a package
        from tests.conftest import clean_env, snakemake

    # The SLURM plugin asks `scontrol` at start-up, which waits 10 s where SLURM is installed but
    # not running: a stub answers at once (as in tests/test_config.py).
    stub = tmp_path / "bin" / "scontrol"
    if not stub.exists():
        stub.parent.mkdir()
        stub.write_text("#!/bin/sh\nexit 1\n")
        stub.chmod(0o755)
    overlay = tmp_path / "root.yaml"
    # The miniatures' classes are not the preset's (medmnist's class_names: normal, pneumonia).
    names = "  class_names: null\n" if preset.startswith("medmnist") else ""
    # device: cpu, as a user on a machine without a GPU would set it: the presets say cuda, and
    # a real run of them stops before any job where no GPU is visible.
    overlay.write_text(f"results: {tmp_path / 'results'}\ndevice: cpu\ndata:\n  root: {root}\n{names}")
    return snakemake(*args, "--cores", "2", "--configfile", str(REPO / "presets" / f"{preset}.yaml"), str(overlay),
                     env=clean_env(PATH=f"{stub.parent}{os.pathsep}{os.environ['PATH']}"))


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["imagefolder-clip", "medmnist-clip"])
def test_preset_dry_run(tmp_path, own_data, preset):
    """The real Snakefile accepts each preset (root pointed at a miniature): the paper's 90 fine-tunes."""
    run = _preset_snakemake(tmp_path, preset, own_data[preset.split("-")[0]], "-n")
    assert run.returncode == 0, run.tail()
    assert run.stats["prepare"] == 1 and run.stats["lp"] == 5 and run.stats["finetune"] == 90


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["imagefolder-clip", "medmnist-clip"])
def test_replacing_the_data_reruns_prepare(tmp_path, digits, preset):
    """The dataset's files are the `prepare` rule's inputs: once prepared, nothing reruns it;
    a new image in a class folder, or a changed .npz, does."""
    import os

    from foldsoup.data.prepared import source_paths

    if preset == "imagefolder-clip":
        root = tmp_path / "images"
        write_class_folders(root, digits, 4)
        assert source_paths({"name": "imagefolder", "root": str(root)}) == [str(root), *sorted(str(p) for p in root.iterdir())]
    else:
        root = tmp_path / "mini.npz"
        write_medmnist(root, digits)
        assert source_paths({"name": "medmnist", "root": str(root)}) == [str(root)]
    target = str(tmp_path / "results" / "prepared" / "dataset.safetensors")
    assert _preset_snakemake(tmp_path, preset, root, target).returncode == 0
    assert "prepare" not in _preset_snakemake(tmp_path, preset, root, "-n", target).stats  # up to date
    if preset == "imagefolder-clip":
        _png(root / "covid" / "new.png", digits, 2)
        os.utime(root / "covid", (time.time() + 5, time.time() + 5))  # a coarse clock must still see it as newer
    else:  # new content: Snakemake (>= 9.18) also compares a file's checksum, so a bare touch would not do
        write_medmnist(root, digits, rgb=True)
        os.utime(root, (time.time() + 5, time.time() + 5))
    again = _preset_snakemake(tmp_path, preset, root, "-n", target)
    assert again.returncode == 0, again.tail()
    assert again.stats.get("prepare") == 1, again.tail()


@pytest.mark.slow
def test_parse_time_tables_equal_open_clip():
    """The model names and tags config.py reads without importing open_clip are open_clip's own."""
    import open_clip

    from foldsoup.errors import ClipError

    from foldsoup.models.clip import pretrained_tag_cfg
    from foldsoup.config import open_clip_names

    assert open_clip_names.list_models() == sorted(open_clip.list_models())
    expected: dict[str, list[str]] = {}
    for arch, tag in open_clip.list_pretrained():
        expected.setdefault(arch, []).append(tag)
    assert open_clip_names.pretrained_tags() == expected
    # and the activation each tag was trained with, which fills model.quick_gelu
    assert open_clip_names.tag_table() == {arch: {tag: bool(open_clip.get_pretrained_cfg(arch, tag).get("quick_gelu", False))
                                                     for tag in tags} for arch, tags in expected.items()}
    for arch in ("ViT-B-32", "RN50", "ViT-B-32-quickgelu"):
        assert open_clip_names.model_config(arch) == open_clip.get_model_config(arch)
    assert all(open_clip.list_pretrained_tags_by_model(a) == t for a, t in expected.items())
    with pytest.raises(ClipError, match=r"pretrained tag of 'ViT-B-32' \(tags for 'ViT-B-32': openai, .*\); "
                                        r"did you mean 'openai'\?$"):
        pretrained_tag_cfg("ViT-B-32", "opnai")


# ---------------------------------------------------------------- end to end, one run per format


@pytest.fixture(scope="module")
def vit_s32_checkpoint(tmp_path_factory) -> Path:
    """A local checkpoint of another open_clip model than the presets' (ViT-S-32, 4x cheaper than
    ViT-B-32 on a CPU): its image tower with seeded random weights, as .safetensors."""
    import torch
    from safetensors.torch import save_file

    from foldsoup.models.clip import open_clip_visual

    torch.manual_seed(5)
    visual, _ = open_clip_visual("ViT-S-32")
    path = tmp_path_factory.mktemp("ckpt") / "vit_s32.safetensors"
    save_file({k: v.detach().clone().contiguous() for k, v in visual.state_dict().items()}, str(path))
    return path


def run_pipeline(results: Path, preset: str, data: dict, checkpoint: Path) -> dict:
    """The preset, shrunk: prepare -> folds -> pretrain (export from the checkpoint) -> linear probe
    per fold -> one fine-tune per fold -> uniform soup, through foldsoup.steps as the jobs run it."""
    from foldsoup import steps
    from foldsoup.config.schema import grid_points

    merged = deep_update(load_yaml_files(REPO / "config.yaml", REPO / "presets" / f"{preset}.yaml"), {
        "results": str(results), "device": "cpu", "data": data,
        "model": {"arch": "ViT-S-32", "pretrained": str(checkpoint), "quick_gelu": False},
        "folds": {"k": 2}, "lp": {"max_iter": 20},
        "finetune": {"epochs": 1, "batch_size": 2, "warmup_steps": 1, "eval_batch_size": 32, "precision": "fp32"},
        "grid": {"lr": [1e-5], "aug": ["strong"], "mixup": [True]},
    })
    cfg = validate(merged)
    data_path, folds_path = str(results / "prepared" / "dataset.safetensors"), str(results / "folds.csv")
    backbone = str(results / "pretrained" / "backbone.safetensors")
    steps.prepare(cfg, data_path)
    steps.folds(cfg, data_path, folds_path)
    steps.pretrain(cfg, data_path, backbone)
    (hp,) = [p.name for p in grid_points(cfg)]
    model_paths, metrics_paths, metrics = [], [], []
    for fold in range(2):
        head = str(results / "lp" / f"fold{fold}" / "head.safetensors")
        steps.linear_probe(cfg, data_path, folds_path, backbone, fold, head)
        out_dir = results / "models" / hp / f"fold{fold}"
        steps.finetune(cfg, data_path, folds_path, backbone, head, hp, fold, str(out_dir),
                          str(results / ".resume" / hp / f"fold{fold}"))
        model_paths.append(str(out_dir / "model.safetensors"))
        metrics_paths.append(str(out_dir / "metrics.json"))
        metrics.append(json.loads((out_dir / "metrics.json").read_text()))
    soup = results / "soups" / "uniform_soup.safetensors"
    steps.uniform_all(cfg, data_path, folds_path, model_paths, metrics_paths, str(soup))
    return {"cfg": cfg, "data": data_path, "metrics": metrics, "soup": json.loads(soup.with_suffix(".json").read_text()),
            "model": model_paths[0]}


def _check_run(run: dict, classes: list[str], n_pool: int, n_test: int, stored: tuple) -> None:
    from foldsoup.data.prepared import load_prepared
    from foldsoup.storage.weights import load_weights

    data = load_prepared(run["data"])
    assert data.classes == classes and data.pool_images.shape == (n_pool, *stored) and len(data.test_labels) == n_test
    for fold, m in enumerate(run["metrics"]):
        assert m["fold"] == fold and not m["diverged"] and m["steps"] == (n_pool // 2) // 2
        assert all(0 <= m[k] <= 1 for k in ("val_acc", "test_acc"))
    state, meta = load_weights(run["model"])
    assert state["head.weight"].shape == (len(classes), 384)  # ViT-S-32's embedding width
    assert meta["classes"] == classes and meta["model"]["arch"] == "ViT-S-32" and meta["image"]["size"] == 224
    assert run["soup"]["n_ingredients"] == 2 and run["soup"]["folds"] == [0, 1] and 0 <= run["soup"]["test_acc"] <= 1


@pytest.mark.slow
def test_imagefolder_preset_end_to_end(tmp_path, digits, vit_s32_checkpoint):
    root = tmp_path / "scans"
    write_class_folders(root / "train", digits, 2, rgb=True)
    write_class_folders(root / "test", digits, 1, offset=2, rgb=True)
    run = run_pipeline(tmp_path / "results", "imagefolder-clip", {"root": str(root)}, vit_s32_checkpoint)
    _check_run(run, CLASSES, 6, 3, (3, 224, 224))


@pytest.mark.slow
def test_medmnist_preset_end_to_end(tmp_path, digits, vit_s32_checkpoint):
    path = tmp_path / "pneumoniamnist.npz"
    write_medmnist(path, digits)
    run = run_pipeline(tmp_path / "results", "medmnist-clip",
                       {"root": str(path), "class_names": ["zero", "one", "two"], "max_pool": 6, "max_test": 3},
                       vit_s32_checkpoint)
    _check_run(run, ["zero", "one", "two"], 6, 3, (3, 28, 28))  # stored at 28 px, resized to 224 on the device
