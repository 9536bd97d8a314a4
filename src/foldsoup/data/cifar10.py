"""CIFAR-10 in torchvision's on-disk format (`<root>/cifar-10-batches-py/`), read safely.

The files are Python pickles (written by Python 2): dicts holding a uint8 array `data`
[n, 3072] (1024 red, 1024 green, 1024 blue values per image, rows of 32), a list `labels` and,
in `batches.meta`, the class names `label_names`. Unpickling can run arbitrary code, so the
files are read with a restricted unpickler that only rebuilds numpy arrays and plain
containers; anything else is refused with an error naming the file.

torchvision is used only to download (it checks the archive's md5); reading never checks md5,
so miniatures written in the same format (tests/cifar_miniature.py) read like the real thing.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from foldsoup.errors import DataError

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
NUM_CLASSES = 10
IMAGE_VALUES = 3 * 32 * 32


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _numpy_scalar():
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import scalar
    return scalar


def _numpy_frombuffer():
    try:
        from numpy._core.numeric import _frombuffer
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.numeric import _frombuffer
    return _frombuffer


def _latin1_encode(text, encoding="latin1", errors="strict"):
    """`_codecs.encode` as Python 3 pickles of bytes (protocol <= 2) call it, latin-1 only."""
    if encoding.lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not allowed")
    return text.encode("latin1", errors)


# The only globals a CIFAR-10 batch file may name. The real files need the first three
# (numpy.core.multiarray._reconstruct, numpy.ndarray, numpy.dtype); the others are the pure
# data constructors that numpy and Python 3 use when such a dict is pickled again (numpy scalars,
# protocol-5 arrays, bytes under protocol 2). Plain containers (dict, list, str, int) need no
# global at all. The numpy.core names are resolved to numpy._core without importing the
# deprecated numpy.core package.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy.core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: _latin1_encode,
}


class ForbiddenGlobal(pickle.UnpicklingError):
    """The pickle names a global that a CIFAR-10 file never needs."""


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler that rebuilds numpy arrays and plain containers, nothing else."""

    def __init__(self, file, source: str):
        super().__init__(file, encoding="latin1")  # Python 2 str -> str, like torchvision
        self.source = source

    def find_class(self, module: str, name: str):
        factory = _ALLOWED.get((module, name))
        if factory is None:
            raise ForbiddenGlobal(
                f"{self.source}: refusing to unpickle {module}.{name}; a CIFAR-10 batch file only holds "
                f"numpy arrays, lists and strings (is this file really from cifar-10-python.tar.gz?)"
            )
        return factory()

    def persistent_load(self, pid):
        raise ForbiddenGlobal(f"{self.source}: refusing a persistent reference in the pickle")


def safe_load(path: str | Path) -> object:
    """Unpickle one CIFAR-style file with the restricted unpickler; DataError names the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, str(path)).load()
    except ForbiddenGlobal as exc:
        raise DataError(str(exc)) from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    except Exception as exc:  # EOFError, UnpicklingError, ValueError, ...: a damaged file
        raise DataError(
            f"{path}: truncated or corrupt ({type(exc).__name__}: {exc}); delete {path.parent} and "
            f"download CIFAR-10 again (data.download: true)"
        ) from exc


def _text(value) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def _entries(obj: object, path: Path, keys: list[str]) -> dict:
    """The dict's entries under str keys (Python 2 files give str keys under latin1, files
    written by Python 3 give bytes keys); error naming the file when a key is missing."""
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    entries = {_text(k): v for k, v in obj.items()}
    missing = [k for k in keys if k not in entries]
    if missing:
        raise DataError(f"{path}: missing entr{'y' if len(missing) == 1 else 'ies'} {missing}; found {sorted(entries)}")
    return entries


def read_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (uint8 images [n, 3, 32, 32], int64 labels [n]), validated."""
    path = Path(path)
    entries = _entries(safe_load(path), path, ["data", "labels"])
    data = entries["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != IMAGE_VALUES:
        desc = f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' must be uint8 [n, {IMAGE_VALUES}], got {desc}")
    try:
        labels = np.asarray(entries["labels"])
        if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
            raise TypeError
        labels = labels.astype(np.int64)
    except (TypeError, ValueError):
        raise DataError(f"{path}: 'labels' must be a list of integers") from None
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images but {len(labels)} labels")
    bad = labels[(labels < 0) | (labels >= NUM_CLASSES)]
    if bad.size:
        raise DataError(f"{path}: label {int(bad[0])} is out of range 0..{NUM_CLASSES - 1}")
    return data.reshape(-1, 3, 32, 32), labels


def read_meta(path: str | Path) -> list[str]:
    path = Path(path)
    entries = _entries(safe_load(path), path, ["label_names"])
    names = entries["label_names"]
    if not isinstance(names, (list, tuple)) or len(names) != NUM_CLASSES:
        n = len(names) if isinstance(names, (list, tuple)) else type(names).__name__
        raise DataError(f"{path}: 'label_names' must list {NUM_CLASSES} class names, got {n}")
    return [_text(n) for n in names]


def _missing_files(folder: Path) -> list[str]:
    return [name for name in TRAIN_FILES + [TEST_FILE, META_FILE] if not (folder / name).is_file()]


ARCHIVE = "cifar-10-python.tar.gz"
SOURCE = "https://www.cs.toronto.edu/~kriz/cifar.html"


def _download_failure(root: Path, exc: Exception) -> str:
    """One line for a failed torchvision download: where to put the archive or its folder instead."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity

    cause = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"
    archive = root / ARCHIVE
    extract = (f"or extract it there yourself so that {FOLDER}/ holds data_batch_1..5, test_batch and batches.meta, "
               f"and set data.download: false")
    if archive.is_file() and not check_integrity(str(archive), CIFAR10.tgz_md5):
        return (f"CIFAR-10: {str(archive)!r} is not the original {ARCHIVE} (md5 differs from {CIFAR10.tgz_md5}), so "
                f"torchvision tried to download it again, which failed ({cause}); put the original from {SOURCE} in "
                f"its place (torchvision then checks its md5 and extracts it, no network needed), {extract}")
    if archive.is_file():
        return f"CIFAR-10: torchvision could not extract or verify {str(archive)!r} ({cause}); {extract.removeprefix('or ')}"
    return (f"CIFAR-10: could not download {ARCHIVE} into {str(root)!r} ({cause}); without network, put {ARCHIVE} from "
            f"{SOURCE} into data.root {str(root)!r} (torchvision then checks its md5 and extracts it, no network "
            f"needed), {extract}")


def read_cifar10(root: str | Path, download: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(train_x uint8 [50000, 3, 32, 32], train_y int64, test_x, test_y, class names) from
    `<root>/cifar-10-batches-py/`; with `download`, torchvision fetches missing files first."""
    folder = Path(root) / FOLDER
    missing = _missing_files(folder)
    if missing and download:
        import torchvision  # only here: it costs seconds to import

        # Downloads cifar-10-python.tar.gz (md5-checked by torchvision; an archive with the right
        # md5 already in root is used as it is, without network), extracts it and checks every
        # file's md5; the data it loads are discarded and read below instead.
        try:
            torchvision.datasets.CIFAR10(str(root), train=True, download=True)
        except Exception as exc:  # URLError without network, RuntimeError on a bad md5, tarfile errors
            raise DataError(_download_failure(Path(root), exc)) from exc
        missing = _missing_files(folder)
    if missing:
        where = f"folder {str(folder)!r} does not exist" if not folder.is_dir() else f"{str(folder / missing[0])!r} is missing"
        raise DataError(
            f"CIFAR-10: {where} (missing: {', '.join(missing)}). Set data.download: true to let torchvision "
            f"fetch it (or use {ARCHIVE} placed in {str(Path(root))!r}, without network), or extract {ARCHIVE} "
            f"from {SOURCE} into {str(Path(root))!r} so that {FOLDER}/ holds data_batch_1..5, test_batch and batches.meta"
        )
    train = [read_batch(folder / name) for name in TRAIN_FILES]
    test_x, test_y = read_batch(folder / TEST_FILE)
    classes = read_meta(folder / META_FILE)
    train_x = np.concatenate([x for x, _ in train])
    train_y = np.concatenate([y for _, y in train])
    return train_x, train_y, test_x, test_y, classes
