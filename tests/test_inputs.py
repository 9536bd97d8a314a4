"""Bad data and weight files give clear errors naming the file, the class or the tensor.

Prepared datasets (the one file every job reads) are written here with `data.save_prepared`
or by hand with safetensors, then damaged in one way each. CIFAR-10 reading errors are in
tests/test_paper_preset.py; truncated/corrupt weight files in tests/test_soup.py.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import numpy as np
import pytest

from foldsoup.errors import DataError

from foldsoup.data.prepared import Prepared, load_prepared, save_prepared, validate_prepared
from foldsoup.data.folds import make_folds, read_folds, write_folds

SRC = Path(__file__).resolve().parents[1] / "src" / "foldsoup"
CLASSES = ["cat", "dog", "eel"]


def dataset(n_per_class=(6, 6, 6), channels=1, size=8, n_test=6) -> Prepared:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(len(n_per_class)), n_per_class).astype(np.int64)
    test_labels = np.arange(n_test, dtype=np.int64) % len(n_per_class)
    return Prepared(
        name="toy", classes=list(CLASSES[: len(n_per_class)]),
        pool_images=rng.integers(0, 256, (len(labels), channels, size, size), dtype=np.uint8), pool_labels=labels,
        test_images=rng.integers(0, 256, (n_test, channels, size, size), dtype=np.uint8), test_labels=test_labels,
    )


def write_raw(path: Path, tensors: dict, classes=CLASSES) -> str:
    """A prepared file written without any checks (what a broken or foreign writer leaves)."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path),
              metadata={"name": "toy", "classes": json.dumps(classes)})
    return str(path)


def good_tensors(**changes) -> dict:
    d = dataset()
    tensors = {"pool_images": d.pool_images, "pool_labels": d.pool_labels,
               "test_images": d.test_images, "test_labels": d.test_labels}
    tensors.update(changes)
    return {k: v for k, v in tensors.items() if v is not None}


# ---------------------------------------------------------------- prepared dataset files


def test_good_dataset_roundtrips(tmp_path):
    save_prepared(tmp_path / "d.safetensors", dataset())
    d = load_prepared(tmp_path / "d.safetensors")
    assert d.classes == CLASSES and d.pool_images.shape == (18, 1, 8, 8)


def test_missing_dataset_file(tmp_path):
    path = tmp_path / "prepared" / "dataset.safetensors"
    with pytest.raises(DataError, match=re.escape(f"prepared dataset {str(path)!r} does not exist (run the `prepare` rule)")):
        load_prepared(path)


@pytest.mark.parametrize("keep", [0.5, 0.99, 10])
def test_truncated_dataset_file(tmp_path, keep):
    path = tmp_path / "dataset.safetensors"
    save_prepared(path, dataset())
    data = path.read_bytes()
    kept = int(len(data) * keep) if keep < 1 else keep
    path.write_bytes(data[:kept])
    header = 8 + int.from_bytes(data[:8], "little")  # length field + JSON header
    what = (f"cut short ({kept} of {len(data)} bytes): an interrupted write or copy" if kept > header
            else f"cut short inside its header ({kept} bytes, the header alone needs {header})")
    with pytest.raises(DataError) as info:
        load_prepared(path)
    assert str(info.value) == f"prepared dataset {str(path)!r} is {what}; delete it and rerun `prepare`"


def test_dataset_file_that_is_not_safetensors(tmp_path):
    path = tmp_path / "dataset.safetensors"
    path.write_bytes(b"\x80\x04\x95 a pickle, say" + bytes(100))
    with pytest.raises(DataError) as info:
        load_prepared(path)
    assert str(info.value) == (f"prepared dataset {str(path)!r} is a pickle (torch.save or pickle.dump; foldsoup never "
                               f"unpickles: a pickle can run code), not a prepared dataset; give the prepared dataset, "
                               f"<results>/prepared/dataset.safetensors")


def test_dataset_file_missing_a_tensor(tmp_path):
    path = write_raw(tmp_path / "d.safetensors", good_tensors(test_labels=None))
    with pytest.raises(DataError, match=re.escape(f"{path!r} lacks tensor(s) ['test_labels']")):
        load_prepared(path)


@pytest.mark.parametrize(
    "change, message",
    [
        # [N, H, W]: no channel axis
        (dict(pool_images=np.zeros((18, 8, 8), np.uint8)), r"pool images must be uint8 \[N, C, H, W\], got uint8 \[18, 8, 8\]"),
        # floats instead of uint8 pixels
        (dict(pool_images=np.zeros((18, 1, 8, 8), np.float32)), r"pool images must be uint8 \[N, C, H, W\], got float32"),
        # channels last ([N, H, W, C]) reads as 8 channels
        (dict(pool_images=np.zeros((18, 8, 8, 3), np.uint8)), r"pool images have 8 channels \(shape \[18, 8, 8, 3\]\); expected 1 \(grey\) or 3 \(RGB\)"),
        # RGBA
        (dict(pool_images=np.zeros((18, 4, 8, 8), np.uint8)), r"pool images have 4 channels"),
        # test images of another size than the pool's
        (dict(test_images=np.zeros((6, 1, 16, 16), np.uint8)), r"test images have shape \[1, 16, 16\], expected \[1, 8, 8\] like the pool"),
        # test images with other channels than the pool's
        (dict(test_images=np.zeros((6, 3, 8, 8), np.uint8)), r"test images have shape \[3, 8, 8\], expected \[1, 8, 8\] like the pool"),
        # labels out of range, both ways
        (dict(pool_labels=np.array([0] * 17 + [3], np.int64)), r"pool label 3 is out of range for 3 classes \(allowed: 0..2; 1 bad label\(s\)\)"),
        (dict(test_labels=np.array([0, 1, 2, -1, 0, 1], np.int64)), r"test label -1 is out of range for 3 classes"),
        # float labels
        (dict(pool_labels=np.zeros(18, np.float32)), r"pool labels must be integers \[N\], got float32 \[18\]"),
        # one label missing
        (dict(pool_labels=np.zeros(17, np.int64)), r"pool has 18 images but 17 labels"),
        # empty test split
        (dict(test_images=np.zeros((0, 1, 8, 8), np.uint8), test_labels=np.zeros(0, np.int64)), r"test split is empty"),
    ],
)
def test_bad_tensors_name_the_file(tmp_path, change, message):
    path = write_raw(tmp_path / "d.safetensors", good_tensors(**change))
    with pytest.raises(DataError, match=re.escape(path) + ": " + message):
        load_prepared(path)


def test_class_with_no_images_names_the_class(tmp_path):
    labels = np.array([0] * 9 + [2] * 9, np.int64)  # no 'dog'
    path = write_raw(tmp_path / "d.safetensors", good_tensors(pool_labels=labels))
    with pytest.raises(DataError, match=re.escape(f"{path}: class 'dog' has no images in the training pool")):
        load_prepared(path)


def test_fewer_than_two_classes(tmp_path):
    path = write_raw(tmp_path / "d.safetensors", good_tensors(pool_labels=np.zeros(18, np.int64),
                                                               test_labels=np.zeros(6, np.int64)), classes=["cat"])
    with pytest.raises(DataError, match=r"needs at least 2 classes, got 1 \(\['cat'\]\)"):
        load_prepared(path)


def test_prepare_validates_what_a_loader_returns(monkeypatch):
    """`prepare` checks the loaded dataset before writing anything (message names the source)."""
    from foldsoup.data import prepared as data_module

    broken = dataset()
    broken.pool_labels = broken.pool_labels.copy()
    broken.pool_labels[broken.pool_labels == 1] = 0
    monkeypatch.setitem(data_module.LOADERS, "digits", lambda cfg, seed: broken)
    with pytest.raises(DataError, match=r"dataset 'digits' under 'data': class 'dog' has no images in the training pool"):
        data_module.prepare({"name": "digits", "root": "data", "max_pool": None, "max_test": None}, 0)


def test_validate_prepared_pretraining_part():
    d = dataset()
    d.pretrain_images = np.zeros((4, 1, 8, 8), np.uint8)
    d.pretrain_labels = np.array([0, 1, 2, 0], np.int64)
    d.pretrain_classes = ["a", "b"]
    with pytest.raises(DataError, match=r"src: pretrain label 2 is out of range for 2 classes"):
        validate_prepared(d, "src")


# ---------------------------------------------------------------- folds


def test_class_with_fewer_images_than_folds_names_the_class():
    labels = np.array([0] * 6 + [1] * 3 + [2] * 6)
    with pytest.raises(DataError, match=re.escape("folds.k = 4 is larger than class 'dog', which has only 3 pool image(s)")):
        make_folds(labels, 4, 0, CLASSES)
    # The last class absent from the labels is still seen (bincount minlength).
    with pytest.raises(DataError, match="class 'eel', which has only 0 pool image"):
        make_folds(np.array([0] * 6 + [1] * 6), 2, 0, CLASSES)


def test_folds_step_fails_before_training_naming_the_class(tmp_path):
    """steps.folds, as the `folds` job runs it: no fold table is written."""
    from foldsoup import steps

    data = tmp_path / "prepared" / "dataset.safetensors"
    save_prepared(data, dataset(n_per_class=(6, 2, 6)))
    out = tmp_path / "folds.csv"
    with pytest.raises(DataError, match=re.escape("folds.k = 3 is larger than class 'dog', which has only 2 pool image(s)")):
        steps.folds({"seed": 0, "folds": {"k": 3}}, str(data), str(out))
    assert not out.exists()
    steps.folds({"seed": 0, "folds": {"k": 2}}, str(data), str(out))
    assert np.bincount(read_folds(out, load_prepared(data).pool_labels)).tolist() == [7, 7]


def test_fold_table_errors_name_the_file(tmp_path):
    labels = np.array([0, 0, 1, 1])
    path = tmp_path / "folds.csv"
    write_folds(path, labels, np.array([0, 1, 0, 1]))
    with pytest.raises(DataError, match=re.escape(f"{path}: labels do not match the prepared dataset")):
        read_folds(path, np.array([0, 1, 1, 1]))
    path.write_text("index,label,fold\n0,0,0\n1,0,x\n")
    with pytest.raises(DataError, match=re.escape(f"{path}: unreadable fold table")):
        read_folds(path)
    path.write_text("index,label,fold\n0,0,0\n1,0,2\n")
    with pytest.raises(DataError, match=re.escape(f"{path}: fold numbers must be 0..k-1 (each used) or -1 (outer holdout), got [0, 2]")):
        read_folds(path)


# ---------------------------------------------------------------- weights


def test_model_file_into_mismatched_model_names_file_and_tensor(tmp_path):
    """A fine-tuned model file of width 8 loaded into a model configured with width 16."""
    from foldsoup.models.build import build_classifier
    from foldsoup.models.classifier import load_full
    from foldsoup.storage.weights import load_weights, save_weights

    path = tmp_path / "model.safetensors"
    save_weights(path, build_classifier({"name": "digits_cnn", "width": 8}, 5).state_dict())
    model = build_classifier({"name": "digits_cnn", "width": 16}, 5)
    with pytest.raises(ValueError) as info:
        load_full(model, load_weights(path)[0], str(path))
    assert str(info.value) == f"{path}: tensor 'backbone.0.weight' has shape [8, 1, 3, 3], the model expects [16, 1, 3, 3]"
    # Another number of classes: the head is named.
    save_weights(path, build_classifier({"name": "digits_cnn", "width": 16}, 3).state_dict())
    with pytest.raises(ValueError, match=re.escape(f"{path}: tensor 'head.weight' has shape [3, 32], the model expects [5, 32]")):
        load_full(model, load_weights(path)[0], str(path))
    # A backbone file (no head) given where a full model is expected.
    save_weights(path, {k: v for k, v in model.state_dict().items() if k.startswith("backbone.")})
    with pytest.raises(ValueError, match=re.escape(f"{path}: tensor 'head.weight' of the model is missing (2 of 14 missing: "
                                                   f"'head.weight', 'head.bias')")):
        load_full(model, load_weights(path)[0], str(path))


def test_load_weights_checks_keys_and_shapes_against_the_model(tmp_path):
    import torch

    from foldsoup.models.build import build_classifier
    from foldsoup.errors import WeightsError
    from foldsoup.storage.weights import load_weights, save_weights

    model = build_classifier({"name": "digits_cnn", "width": 8}, 5)
    path = tmp_path / "model.safetensors"
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    save_weights(path, state)
    loaded, _ = load_weights(path, expect=model.state_dict())  # bfloat16 file, fp32 model: fits
    assert loaded.keys() == state.keys()
    save_weights(path, {**state, "head.bias": torch.zeros(6)})
    with pytest.raises(WeightsError) as info:
        load_weights(path, expect=model.state_dict())
    assert str(info.value) == (f"weight file {path}: tensor 'head.bias' has shape [6], "
                               f"the configured model expects [5]")
    save_weights(path, {k: v for k, v in state.items() if k != "head.weight"} | {"head.wieght": torch.zeros(5, 16)})
    with pytest.raises(WeightsError) as info:
        load_weights(path, expect={k: tuple(v.shape) for k, v in model.state_dict().items()})
    assert str(info.value) == (f"weight file {path}: tensor 'head.weight' of the configured model is missing (1 of 14 "
                               f"missing; unexpected instead: 'head.wieght')")


# ---------------------------------------------------------------- nothing is unpickled

# Calls that can run code from a file: unpickling in any form, TorchScript, numpy/pandas pickles.
UNSAFE_CALLS = {"pickle.load", "pickle.loads", "pickle.Unpickler", "cPickle.load", "dill.load", "joblib.load",
                "torch.jit.load", "pd.read_pickle", "pandas.read_pickle", "np.load", "numpy.load", "torch.load",
                "torch.serialization.load", "shelve.open"}
# The one reviewed exception: cifar10.RestrictedUnpickler, a pickle.Unpickler whose find_class
# admits only numpy array constructors (tests/test_paper_preset.py attacks it).
ALLOWED_UNPICKLER = ("cifar10.py", "RestrictedUnpickler")


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def unsafe_loads(source: str, filename: str) -> list[str]:
    """Each call in `source` that may unpickle, unless made safe (weights_only=True for
    torch.load, allow_pickle=False for np.load); also any class deriving from an Unpickler
    other than the allowed one, and `from pickle import load`-style imports."""
    found = []
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "dill", "joblib", "torch.jit"):
            names = {a.name for a in node.names}
            if names & {"load", "loads", "Unpickler", "*"}:
                found.append(f"{filename}:{node.lineno}: from {node.module} import {', '.join(sorted(names))}")
        if isinstance(node, ast.ClassDef):
            for base in node.bases:
                if _dotted(base).endswith("Unpickler") and (Path(filename).name, node.name) != ALLOWED_UNPICKLER:
                    found.append(f"{filename}:{node.lineno}: class {node.name}({_dotted(base)})")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name not in UNSAFE_CALLS:
            continue
        kwargs = {k.arg: k.value for k in node.keywords}
        if name in ("torch.load", "torch.serialization.load"):
            flag = kwargs.get("weights_only")
            if isinstance(flag, ast.Constant) and flag.value is True:
                continue
        if name in ("np.load", "numpy.load"):
            flag = kwargs.get("allow_pickle")
            if isinstance(flag, ast.Constant) and flag.value is False:
                continue
        found.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_unsafe_load_detector_sees_what_it_should():
    bad = """
import pickle, torch, numpy as np
from pickle import loads
pickle.load(f)
torch.load(p)
torch.load(p, weights_only=False)
torch.jit.load(p)
np.load(p)
class Sneaky(pickle.Unpickler): pass
"""
    good = """
import torch, numpy as np
torch.load(p, map_location="cpu", weights_only=True)
np.load(p, allow_pickle=False)
"""
    assert sorted(unsafe_loads(bad, "x.py")) == sorted([
        "x.py:3: from pickle import loads", "x.py:4: pickle.load(f)", "x.py:5: torch.load(p)",
        "x.py:6: torch.load(p, weights_only=False)", "x.py:7: torch.jit.load(p)", "x.py:8: np.load(p)",
        "x.py:9: class Sneaky(pickle.Unpickler)"])
    assert unsafe_loads(good, "x.py") == []


def test_nothing_in_src_unpickles_outside_the_restricted_cifar_reader():
    files = sorted(SRC.rglob("*.py"))
    assert {"storage/weights.py", "data/cifar10.py", "models/clip.py", "models/timm_backbone.py", "steps/train.py"} <= {
        str(f.relative_to(SRC)) for f in files}
    found = [hit for f in files for hit in unsafe_loads(f.read_text(), str(f.relative_to(SRC.parent)))]
    assert found == [], "calls that may unpickle a file:\n" + "\n".join(found)
    # The one Unpickler there is, and it is the restricted one, loaded only through its own class.
    cifar = (SRC / "data" / "cifar10.py").read_text()
    assert "class RestrictedUnpickler(pickle.Unpickler)" in cifar and "def find_class" in cifar


def test_weight_files_are_read_and_written_as_safetensors_only():
    text = (SRC / "storage" / "weights.py").read_text()
    tree = ast.parse(text)
    imported = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in n.names} | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "pickle" not in imported and "torch.save" not in text and "torch.load" not in text
    assert {"safetensors", "safetensors.torch"} <= imported


# ---------------------------------------------------------------- files handed to the commands

# What a user can hand `foldsoup evaluate MODEL --data DATA [--folds FOLDS]` and `foldsoup predict
# MODEL IMAGE...` by mistake, and the one line each gets. The good files come from a tiny real
# run (digits, width-8 CNN, k = 2, one fine-tune of 1 epoch) through the pipeline functions the
# workflow runs; the bad ones are copies, cuts and the run's other files.

MODEL_FILES = "a model or soup, e.g. results/soups/gsgs.safetensors or results/models/<hp>/fold<i>/model.safetensors"
DATASET = "give the prepared dataset, <results>/prepared/dataset.safetensors"
NOT_PICKLED = "foldsoup never unpickles: a pickle can run code"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A finished tiny run's files (results/...) and bad files made from them (bad/...)."""
    import torch
    from PIL import Image

    from foldsoup import steps
    from foldsoup.config.schema import grid_points, validate
    from foldsoup.storage.weights import load_weights, save_weights

    root = tmp_path_factory.mktemp("commands")
    res, bad = root / "results", root / "bad"
    cfg = validate({"results": str(res), "seed": 0, "device": "cpu",
                    "data": {"name": "digits", "classes": [1, 2, 3], "pretrain_classes": [0, 4, 6], "test_fraction": 0.5},
                    "model": {"name": "digits_cnn", "width": 8}, "pretrain": {"epochs": 1}, "folds": {"k": 2},
                    "lp": {"max_iter": 2}, "finetune": {"epochs": 1, "batch_size": 32, "warmup_steps": 1},
                    "grid": {"lr": [0.003], "aug": ["minimal"], "mixup": [False]}})
    f = {"data": res / "prepared" / "dataset.safetensors", "folds": res / "folds.csv",
         "backbone": res / "pretrained" / "backbone.safetensors", "head": res / "lp" / "fold0" / "head.safetensors"}
    hp = grid_points(cfg)[0].name
    model_dir = res / "models" / hp / "fold0"
    steps.prepare(cfg, str(f["data"]))
    steps.folds(cfg, str(f["data"]), str(f["folds"]))
    steps.pretrain(cfg, str(f["data"]), str(f["backbone"]))
    steps.linear_probe(cfg, str(f["data"]), str(f["folds"]), str(f["backbone"]), 0, str(f["head"]))
    steps.finetune(cfg, str(f["data"]), str(f["folds"]), str(f["backbone"]), str(f["head"]), hp, 0, str(model_dir),
                      str(res / ".resume"))
    f.update(model_dir=model_dir, model=model_dir / "model.safetensors", metrics=model_dir / "metrics.json",
             predictions=model_dir / "predictions.safetensors", results=res, bad=bad)

    bad.mkdir()
    (bad / "empty.safetensors").write_bytes(b"")
    blob = f["model"].read_bytes()
    (bad / "half.safetensors").write_bytes(blob[: len(blob) // 2])
    f["model_size"] = len(blob)
    state, meta = load_weights(f["model"])
    torch.save(state, bad / "model.pt")
    save_weights(bad / "foreign.safetensors", {"visual.conv1.weight": torch.zeros(4, 3, 2, 2), "visual.proj": torch.zeros(4)})
    save_weights(bad / "swapped.safetensors", {**state, "head.weight": torch.zeros(5, 16), "head.bias": torch.zeros(5)}, meta)
    other = validate({**cfg, "data": {**cfg["data"], "classes": [1, 2, 3, 5]}})
    steps.prepare(other, str(bad / "other.safetensors"))  # another run's dataset: 4 classes
    (bad / "other_folds.csv").write_text(f["folds"].read_text().replace("\n0,0,", "\n0,1,", 1))  # labels differ
    digit = load_prepared(f["data"]).test_images[0, 0]
    Image.fromarray(digit).save(bad / "digit.png")
    png = (bad / "digit.png").read_bytes()
    big = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    Image.fromarray(big).save(bad / "noise.png")
    (bad / "cut.png").write_bytes((bad / "noise.png").read_bytes()[:2000])
    (bad / "notes.png").write_text("class 1: a one\n")
    (bad / "empty.png").write_bytes(b"")
    (bad / "images").mkdir()
    (bad / "images" / "a.png").write_bytes(png)
    (bad / "nothing").mkdir()
    return f


def _bad_inputs(f) -> dict[str, tuple[list[str], str]]:
    """{case: (argv, the error line after 'foldsoup <command>: error: ')}."""
    b, m, d = f["bad"], str(f["model"]), str(f["data"])
    ev = lambda model, data=d, *more: ["evaluate", str(model), "--data", str(data), *more, "--device", "cpu"]  # noqa: E731
    pr = lambda *images, model=m: ["predict", str(model), *map(str, images), "--device", "cpu"]  # noqa: E731
    csv_start = "'index,label,fold 0,0,0 1,2,0 2,0,0 3,1,0...'"
    json_start = repr(" ".join(f["metrics"].read_text().split())[:40] + "...")
    return {
        # ---- the model or soup (evaluate and predict read it the same way)
        "weights: missing, a typo": (ev(m[:-1]), f"weight file {m[:-1]} does not exist; did you mean {m!r}?"),
        "weights: missing": (ev(b / "nope.safetensors"), f"weight file {b / 'nope.safetensors'} does not exist; check the path"),
        "weights: a model's folder": (ev(f["model_dir"]), f"weight file {f['model_dir']} is a folder; give a .safetensors file, e.g. {m!r}"),
        "weights: empty": (ev(b / "empty.safetensors"), f"weight file {b / 'empty.safetensors'} is empty (0 bytes): an interrupted "
                           "write or copy; copy it again, or delete it and rerun the step that wrote it"),
        "weights: cut short": (ev(b / "half.safetensors"), f"weight file {b / 'half.safetensors'} is cut short ({f['model_size'] // 2} "
                               f"of {f['model_size']} bytes): an interrupted write or copy; copy it again, or delete it and rerun "
                               "the step that wrote it"),
        "weights: torch.save": (ev(b / "model.pt"), f"weight file {b / 'model.pt'} is a PyTorch checkpoint (torch.save; "
                                f"{NOT_PICKLED}), not a safetensors file; give a .safetensors file written by foldsoup"),
        "weights: folds.csv": (ev(f["folds"]), f"weight file {f['folds']} is a CSV file (starting {csv_start}), not a safetensors "
                               "file; give a .safetensors file written by foldsoup"),
        "weights: metrics.json": (ev(f["metrics"]), f"weight file {f['metrics']} is a JSON file (starting {json_start}), not a "
                                  "safetensors file; give a .safetensors file written by foldsoup"),
        "weights: an image (arguments swapped)": (pr(m, model=b / "digit.png"), f"weight file {b / 'digit.png'} is a PNG image, "
                                                  "not a safetensors file; give a .safetensors file written by foldsoup"),
        "weights: predictions": (ev(f["predictions"]), f"weight file {f['predictions']} holds a model's saved logits (a "
                                 f"predictions file), not weights; give the weights beside it, {m!r}"),
        "weights: the prepared dataset": (ev(d), f"weight file {d} holds a prepared dataset, not a model or soup; give {MODEL_FILES}"),
        "weights: the backbone": (ev(f["backbone"]), f"weight file {f['backbone']} holds the pretrained backbone alone (no head, no "
                                  f"class names), not a model or soup; give {MODEL_FILES}"),
        "weights: a linear-probe head": (ev(f["head"]), f"weight file {f['head']} holds a linear-probe head alone (no backbone), not "
                                         f"a model or soup; give {MODEL_FILES}"),
        "weights: another program's": (ev(b / "foreign.safetensors"), f"weight file {b / 'foreign.safetensors'} was not written by "
                                       "foldsoup (no 'model', 'classes', 'image' in its metadata; 2 tensors, the first "
                                       f"'visual.conv1.weight'); give {MODEL_FILES}"),
        "weights: another model's tensors": (ev(b / "swapped.safetensors"), f"{b / 'swapped.safetensors'}: tensor 'head.weight' has "
                                             "shape [5, 16], the model expects [3, 16] (the model its metadata describes: "
                                             f"digits_cnn, 3 classes); its tensors belong to another model: give {MODEL_FILES}"),
        # ---- --data
        "data: another run's dataset": (ev(m, b / "other.safetensors"), f"{b / 'other.safetensors'}: the model {m} was trained on "
                                        "classes ['1', '2', '3'], this dataset has classes ['1', '2', '3', '5']; evaluate it on "
                                        "the prepared dataset of the run that trained it"),
        "data: missing": (ev(m, b / "dataset.safetensors"), f"prepared dataset {str(b / 'dataset.safetensors')!r} does not exist "
                          "(run the `prepare` rule)"),
        "data: the results folder": (ev(m, f["results"]), f"prepared dataset {str(f['results'])!r} is a folder; give the prepared "
                                     f"dataset file, e.g. {d!r}"),
        "data: empty": (ev(m, b / "empty.safetensors"), f"prepared dataset {str(b / 'empty.safetensors')!r} is empty (0 bytes): an "
                        "interrupted write or copy; delete it and rerun `prepare`"),
        "data: folds.csv": (ev(m, f["folds"]), f"prepared dataset {str(f['folds'])!r} is a CSV file (starting {csv_start}), not a "
                            f"prepared dataset; {DATASET}"),
        "data: metrics.json": (ev(m, f["metrics"]), f"prepared dataset {str(f['metrics'])!r} is a JSON file (starting {json_start}), "
                               f"not a prepared dataset; {DATASET}"),
        "data: model weights": (ev(m, m), f"prepared dataset {m!r} holds model weights, not a prepared dataset; {DATASET}"),
        "data: predictions": (ev(m, f["predictions"]), f"prepared dataset {str(f['predictions'])!r} holds a model's saved logits (a "
                              f"predictions file), not a prepared dataset; {DATASET}"),
        "data: torch.save": (ev(m, b / "model.pt"), f"prepared dataset {str(b / 'model.pt')!r} is a PyTorch checkpoint (torch.save; "
                             f"{NOT_PICKLED}), not a prepared dataset; {DATASET}"),
        # ---- --folds
        "folds: missing, a typo": (ev(m, d, "--folds", str(f["results"] / "fold.csv")), f"fold table {f['results'] / 'fold.csv'} does "
                                   f"not exist; did you mean {str(f['folds'])!r}?"),
        "folds: the results folder": (ev(m, d, "--folds", str(f["results"])), f"fold table {f['results']} is a folder; give the fold "
                                      f"table folds.csv, e.g. {str(f['folds'])!r}"),
        "folds: the prepared dataset": (ev(m, d, "--folds", d), f"fold table {d} is a safetensors file, not rows of index,label,fold; "
                                        "give the run's folds.csv, or rerun the `folds` rule"),
        "folds: metrics.json": (ev(m, d, "--folds", str(f["metrics"])), f"fold table {f['metrics']} is a JSON file (starting "
                                f"{json_start}), not rows of index,label,fold; give the run's folds.csv, or rerun the `folds` rule"),
        "folds: empty": (ev(m, d, "--folds", str(b / "empty.png")), f"fold table {b / 'empty.png'} is empty (0 bytes), not rows of "
                         "index,label,fold; give the run's folds.csv, or rerun the `folds` rule"),
        "folds: another run's": (ev(m, d, "--folds", str(b / "other_folds.csv")), f"{b / 'other_folds.csv'}: labels do not match the "
                                 "prepared dataset; give the folds.csv of the run that made it, or rerun the `folds` rule"),
        # ---- predict's images
        "image: a text file": (pr(b / "digit.png", b / "notes.png"), f"image {str(b / 'notes.png')!r} is a text file (starting "
                               "'class 1: a one'), not an image; give image files (PNG, JPEG, ...)"),
        "image: empty": (pr(b / "empty.png"), f"image {str(b / 'empty.png')!r} is empty (0 bytes), not an image; give image files "
                         "(PNG, JPEG, ...)"),
        "image: cut short": (pr(b / "cut.png"), f"image {str(b / 'cut.png')!r} cannot be decoded (OSError: image file is truncated); "
                             "it is damaged or cut short: replace it with a readable copy"),
        "image: weights": (pr(m), f"image {m!r} is a safetensors file, not an image; give image files (PNG, JPEG, ...)"),
        "image: a folder of images": (pr(b / "images"), f"image {str(b / 'images')!r} is a folder; give image files, e.g. "
                                      f"{str(b / 'images' / 'a.png')!r} or {b / 'images'}/*.png"),
        "image: an empty folder": (pr(b / "nothing"), f"image {str(b / 'nothing')!r} is a folder; give image files (this folder holds "
                                   "none)"),
        "image: missing, a typo": (pr(b / "digit.pgn"), f"image {str(b / 'digit.pgn')!r} does not exist; did you mean "
                                   f"{str(b / 'digit.png')!r}?"),
    }


def _case_ids() -> list[str]:
    """The case names, read without the fixture (pytest collects ids before fixtures run)."""
    fake = {k: Path("/x") / k for k in ("data", "folds", "backbone", "head", "model_dir", "model", "metrics", "predictions",
                                         "results", "bad")}
    fake["model_size"] = 0
    fake["metrics"] = Path(__file__)  # any readable text file
    return list(_bad_inputs(fake))


@pytest.mark.parametrize("case", _case_ids())
def test_a_bad_file_gets_one_line_naming_it(files, case, capsys):
    from foldsoup import cli

    argv, message = _bad_inputs(files)[case]
    assert cli.main(argv) == 1
    out = capsys.readouterr()
    assert out.out == "" and out.err == f"foldsoup {argv[0]}: error: {message}\n"


@pytest.mark.slow
@pytest.mark.parametrize("case", ["image: a text file", "data: folds.csv", "folds: empty"])
def test_the_command_prints_that_line_and_nothing_else(files, case):
    """As a user runs it: exit status 1, the line on stderr, no traceback or warning."""
    import subprocess
    import sys

    from conftest import clean_env

    argv, message = _bad_inputs(files)[case]
    proc = subprocess.run([sys.executable, "-m", "foldsoup", *argv], env=clean_env(), capture_output=True, text=True,
                          timeout=300)
    assert (proc.returncode, proc.stdout, proc.stderr) == (1, "", f"foldsoup {argv[0]}: error: {message}\n")


def test_a_step_given_a_file_for_a_folder_or_a_folder_for_a_file(files, capsys):
    """Paths no loader reads (a step's output) are named by the OS error, in one line."""
    from foldsoup import cli

    config = json.dumps({"seed": 0, "folds": {"k": 2}})
    notes, folder = files["bad"] / "notes.png", files["bad"] / "nothing"
    def error_after_settings() -> str:
        """A step logs its settings first (a job's log starts with them), then the one error line."""
        settings, *rest = capsys.readouterr().err.splitlines(keepends=True)
        assert " folds: settings {" in settings and len(rest) == 1, (settings, rest)
        return rest[0]

    assert cli.main(["folds", "--config-json", config, "--data", str(files["data"]), "--out", str(notes / "folds.csv")]) == 1
    assert error_after_settings() == (f"foldsoup folds: error: {str(notes)!r}: a file stands where a folder is needed (File "
                                       "exists); move it away or choose another path\n")
    assert cli.main(["folds", "--config-json", config, "--data", str(files["data"]), "--out", str(folder)]) == 1
    assert error_after_settings() == f"foldsoup folds: error: {str(folder)!r} is a folder; give the path of a file\n"
    assert sorted(p.name for p in folder.iterdir()) == []  # no temporary file left behind
