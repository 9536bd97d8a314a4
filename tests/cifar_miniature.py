"""A miniature CIFAR-10 in the exact on-disk format of cifar-10-python.tar.gz.

The real files are protocol-2 pickles written by Python 2: dicts whose keys and strings are
Python 2 `str` (opcodes SHORT_BINSTRING / BINSTRING, read back as str under
encoding="latin1", as torchvision reads them) and whose `data` is a numpy array pickled as
`numpy.core.multiarray._reconstruct(numpy.ndarray, (0,), 'b')` plus its state. The pickler
below writes the same opcodes from Python 3, so both torchvision's reader and
foldsoup.data.cifar10 read these files as they read the real ones.

Images are class-dependent: each class has its own colour and a horizontal or vertical
stripe pattern, plus noise, so a classifier can learn something from a few of them.
"""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path

import numpy as np

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FOLDER = "cifar-10-batches-py"


class Py2Pickler(pickle._Pickler):
    """Protocol 2 with Python 2 str opcodes for bytes and str, and numpy arrays/dtypes reduced
    under the global names numpy 1.x (and the real files) use."""

    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, file):
        super().__init__(file, protocol=2)

    def _save_py2_str(self, data: bytes) -> None:
        n = len(data)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + data)

    def save_bytes(self, obj: bytes) -> None:
        self._save_py2_str(obj)
        self.memoize(obj)

    def save_str(self, obj: str) -> None:
        self._save_py2_str(obj.encode("latin1"))
        self.memoize(obj)

    def save_ndarray(self, obj: np.ndarray) -> None:
        state = (1, obj.shape, obj.dtype, bool(np.isfortran(obj)), np.ascontiguousarray(obj).tobytes())
        self.save_reduce(_reconstruct(), (np.ndarray, (0,), b"b"), state, obj=obj)

    def reducer_override(self, obj):
        if isinstance(obj, np.dtype):
            _, args, state = obj.__reduce__()
            name, align, copy = args
            return np.dtype, (name, int(align), int(copy)), state  # Python 2 numpy wrote ints
        return NotImplemented

    def save_global(self, obj, name=None) -> None:
        names = {id(_reconstruct()): (b"numpy.core.multiarray", b"_reconstruct"), id(np.ndarray): (b"numpy", b"ndarray"),
                 id(np.dtype): (b"numpy", b"dtype")}
        if id(obj) not in names:
            raise pickle.PicklingError(f"{obj!r} does not occur in CIFAR-10 files")
        module, attr = names[id(obj)]
        self.write(pickle.GLOBAL + module + b"\n" + attr + b"\n")
        self.memoize(obj)

    dispatch[bytes] = save_bytes
    dispatch[str] = save_str
    dispatch[np.ndarray] = save_ndarray


def _reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct as f
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct as f
    return f


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf).dump(obj)
    return buf.getvalue()


def class_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 [n, 3, 32, 32]: class colour + class stripe pattern + noise."""
    hues = np.linspace(0, 1, 10, endpoint=False)
    colours = np.stack([0.5 + 0.4 * np.cos(2 * np.pi * (hues + s)) for s in (0, 1 / 3, 2 / 3)], axis=1)  # [10, 3]
    yy, xx = np.mgrid[0:32, 0:32]
    images = np.empty((len(labels), 3, 32, 32), dtype=np.uint8)
    for i, c in enumerate(labels):
        period = 4 + 2 * (c % 5)
        stripes = np.sin(2 * np.pi * (xx if c < 5 else yy) / period)  # [32, 32]
        img = colours[c][:, None, None] + 0.15 * stripes[None] + rng.normal(0, 0.08, (3, 32, 32))
        images[i] = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    return images


def _balanced_labels(per_class: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.repeat(np.arange(10), per_class))


def _batch(label: str, images: np.ndarray, labels: np.ndarray, first_index: int) -> dict:
    names = [f"{CLASSES[c]}_s_{first_index + i:06d}.png".encode() for i, c in enumerate(labels)]
    return {
        b"batch_label": label.encode(),
        b"labels": [int(v) for v in labels],
        b"data": images.reshape(len(images), -1),  # 1024 R, 1024 G, 1024 B per row
        b"filenames": names,
    }


def write_cifar10_miniature(root: str | Path, n_train_per_class: int = 4, n_test_per_class: int = 2, seed: int = 0) -> dict:
    """Write data_batch_1..5, test_batch and batches.meta under <root>/cifar-10-batches-py/.

    The training images are spread over the five batches like the real ones (in shuffled
    order). Returns what was written: {"train_x", "train_y", "test_x", "test_y", "classes"}.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    train_y = _balanced_labels(n_train_per_class, rng)
    train_x = class_images(train_y, rng)
    test_y = _balanced_labels(n_test_per_class, rng)
    test_x = class_images(test_y, rng)
    bounds = np.linspace(0, len(train_y), 6).astype(int)
    for b in range(5):
        lo, hi = bounds[b], bounds[b + 1]
        batch = _batch(f"training batch {b + 1} of 5", train_x[lo:hi], train_y[lo:hi], lo)
        (folder / f"data_batch_{b + 1}").write_bytes(py2_pickle(batch))
    (folder / "test_batch").write_bytes(py2_pickle(_batch("testing batch 1 of 1", test_x, test_y, 0)))
    per_batch = int(bounds[1] - bounds[0])
    meta = {b"num_cases_per_batch": per_batch, b"label_names": [c.encode() for c in CLASSES], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(py2_pickle(meta))
    return {"train_x": train_x, "train_y": train_y.astype(np.int64), "test_x": test_x, "test_y": test_y.astype(np.int64),
            "classes": list(CLASSES)}
