"""The paper preset's real code paths on small data: CIFAR-10 in torchvision's on-disk format
(a miniature written by tests/cifar_miniature.py), open_clip ViT-B-32 (built with
pretrained=None; pretrained weights from local checkpoint files) through the real pipeline.

The ViT-B/32 tests are marked `slow` (a few seconds to a minute each on 2 CPU cores); they are
part of the normal suite.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

try:
    from cifar_miniature import CLASSES, FOLDER, py2_pickle, write_cifar10_miniature
except ImportError:  # tests/ imported as a package
    from tests.cifar_miniature import CLASSES, FOLDER, py2_pickle, write_cifar10_miniature

from foldsoup.data.cifar10 import read_cifar10
from foldsoup.errors import DataError

REPO = Path(__file__).resolve().parents[1]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
N_TRAIN, N_TEST = 4, 2  # per class


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    written = write_cifar10_miniature(root, n_train_per_class=N_TRAIN, n_test_per_class=N_TEST, seed=0)
    return root, written


def _copy_dataset(src_root: Path, dst_root: Path) -> Path:
    folder = dst_root / FOLDER
    folder.mkdir(parents=True)
    for f in (src_root / FOLDER).iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


# ---------------------------------------------------------------- CIFAR-10 reader


def test_read_cifar10_miniature(cifar):
    root, w = cifar
    train_x, train_y, test_x, test_y, classes = read_cifar10(root, download=False)
    assert train_x.shape == (10 * N_TRAIN, 3, 32, 32) and train_x.dtype == np.uint8
    assert test_x.shape == (10 * N_TEST, 3, 32, 32) and test_x.dtype == np.uint8
    assert train_y.dtype == np.int64 and test_y.dtype == np.int64
    assert np.bincount(train_y, minlength=10).tolist() == [N_TRAIN] * 10
    assert np.array_equal(train_x, w["train_x"]) and np.array_equal(train_y, w["train_y"])
    assert np.array_equal(test_x, w["test_x"]) and np.array_equal(test_y, w["test_y"])
    assert classes == CLASSES


def test_miniature_reads_with_torchvision(cifar, monkeypatch):
    """Proof of format: torchvision's own reader returns the same images, labels and classes.
    torchvision checks the real files' md5 (in CIFAR10._check_integrity and, for batches.meta,
    in the module-level check_integrity); only those checks are switched off here."""
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    root, _ = cifar
    train_x, train_y, test_x, test_y, classes = read_cifar10(root, download=False)
    for train, x, y in ((True, train_x, train_y), (False, test_x, test_y)):
        ds = tv_cifar.CIFAR10(str(root), train=train, download=False)
        assert np.array_equal(ds.data, x.transpose(0, 2, 3, 1))  # torchvision keeps HWC
        assert ds.targets == y.tolist()
        assert ds.classes == classes
        image, label = ds[0]  # a PIL image, as torchvision hands it out
        assert np.array_equal(np.asarray(image), x[0].transpose(1, 2, 0)) and label == y[0]


def test_python3_pickles_read_too(tmp_path, cifar):
    """Files pickled again by Python 3 (bytes keys, protocols 2 and 5) still read: the allowed
    globals cover numpy's protocol-2 and protocol-5 array reconstruction."""
    root, w = cifar
    folder = _copy_dataset(root, tmp_path)
    for protocol, name in ((2, "data_batch_1"), (5, "test_batch")):
        with open(folder / name, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        entry = {k.encode(): v for k, v in entry.items()}
        entry[b"labels"] = np.asarray(entry[b"labels"], dtype=np.int64)  # numpy labels: numpy scalars/arrays
        (folder / name).write_bytes(pickle.dumps(entry, protocol=protocol))
    train_x, train_y, test_x, test_y, classes = read_cifar10(tmp_path, download=False)
    assert np.array_equal(train_x, w["train_x"]) and np.array_equal(test_y, w["test_y"]) and classes == CLASSES


def test_prepare_cifar10(cifar):
    from foldsoup.data.prepared import prepare

    root, w = cifar
    cfg = {"name": "cifar10", "root": str(root), "download": False, "max_pool": None, "max_test": None}
    data = prepare(cfg, 0)
    assert data.name == "cifar10" and data.classes == CLASSES and data.num_classes == 10
    assert data.pool_images.shape == (10 * N_TRAIN, 3, 32, 32) and data.test_images.shape == (10 * N_TEST, 3, 32, 32)
    assert np.array_equal(data.pool_labels, w["train_y"]) and data.pretrain_images is None
    capped = prepare({**cfg, "max_pool": 20, "max_test": 10}, 0)
    assert np.bincount(capped.pool_labels, minlength=10).tolist() == [2] * 10
    assert np.bincount(capped.test_labels, minlength=10).tolist() == [1] * 10


def test_missing_folder_or_file(tmp_path, cifar):
    with pytest.raises(DataError, match=r"cifar-10-batches-py.*does not exist.*data\.download: true"):
        read_cifar10(tmp_path / "nowhere", download=False)
    folder = _copy_dataset(cifar[0], tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"data_batch_3.*is missing.*data\.download: true"):
        read_cifar10(tmp_path, download=False)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_batch_names_the_file(tmp_path, cifar, damage):
    folder = _copy_dataset(cifar[0], tmp_path)
    path = folder / "data_batch_2"
    raw = path.read_bytes()
    path.write_bytes({"truncated": raw[: len(raw) // 2], "garbage": b"\x00not a pickle" * 50, "empty": b""}[damage])
    with pytest.raises(DataError, match=r"data_batch_2.*(truncated or corrupt|refusing)"):
        read_cifar10(tmp_path, download=False)


class _Evil:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize("target", ["os.system", "builtins.eval", "subprocess.call"])
def test_forbidden_global_is_refused(tmp_path, cifar, target):
    import builtins
    import subprocess

    folder = _copy_dataset(cifar[0], tmp_path)
    marker = tmp_path / "pwned"
    command = f"touch {marker}"
    func, arg = {
        "os.system": (os.system, command),
        "builtins.eval": (builtins.eval, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.call": (subprocess.call, command.split()),
    }[target]
    entry = {"data": np.zeros((1, 3072), np.uint8), "labels": [0], "batch_label": _Evil(func, arg)}
    (folder / "test_batch").write_bytes(pickle.dumps(entry, protocol=4))  # 4: no Python 2 renames
    module = {"os.system": "(posix|os)", "builtins.eval": "builtins", "subprocess.call": "subprocess"}[target]
    with pytest.raises(DataError, match=rf"test_batch: refusing to unpickle {module}\.\w+"):
        read_cifar10(tmp_path, download=False)
    assert not marker.exists()


@pytest.mark.parametrize(
    "problem, entry, message",
    [
        ("float data", {b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, r"'data' must be uint8 \[n, 3072\], got float32"),
        ("wrong width", {b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}, r"'data' must be uint8 \[n, 3072\], got uint8 \[2, 1024\]"),
        ("label range", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, r"label 10 is out of range 0\.\.9"),
        ("label count", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, r"2 images but 1 labels"),
        ("no labels", {b"data": np.zeros((2, 3072), np.uint8)}, r"missing entry \['labels'\]"),
        ("not a dict", [1, 2, 3], r"expected a pickled dict, found list"),
    ],
)
def test_bad_batch_contents(tmp_path, cifar, problem, entry, message):
    folder = _copy_dataset(cifar[0], tmp_path)
    (folder / "data_batch_4").write_bytes(py2_pickle(entry))
    with pytest.raises(DataError, match=r"data_batch_4: " + message):
        read_cifar10(tmp_path, download=False)


def test_bad_label_names(tmp_path, cifar):
    folder = _copy_dataset(cifar[0], tmp_path)
    (folder / "batches.meta").write_bytes(py2_pickle({b"label_names": [c.encode() for c in CLASSES[:9]]}))
    with pytest.raises(DataError, match=r"batches\.meta: 'label_names' must list 10 class names, got 9"):
        read_cifar10(tmp_path, download=False)


def test_download_branch_calls_torchvision_only_when_missing(tmp_path, cifar, monkeypatch):
    """download=True with files present never touches torchvision; with files missing it asks
    torchvision.datasets.CIFAR10(root, train=True, download=True) (replaced here: no network)."""
    import torchvision.datasets

    calls = []

    def fake_cifar10(root, train=True, download=False):
        calls.append((root, train, download))
        _copy_dataset(cifar[0], Path(root))

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_cifar10)
    read_cifar10(cifar[0], download=True)
    assert calls == []
    train_x, *_ = read_cifar10(tmp_path, download=True)
    assert calls == [(str(tmp_path), True, True)] and len(train_x) == 10 * N_TRAIN


def _pack_archive(src_root: Path, dst_root: Path) -> Path:
    """The miniature as cifar-10-python.tar.gz (the real archive holds cifar-10-batches-py/)."""
    import tarfile

    dst_root.mkdir(parents=True, exist_ok=True)
    archive = dst_root / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src_root / FOLDER, arcname=FOLDER)
    return archive


@pytest.fixture
def unreachable_cifar10(monkeypatch):
    """torchvision's real download code, pointed at a port nothing listens on: the failure of a
    machine without network, in milliseconds, and never a 163 MiB download where there is one."""
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")


def test_download_without_network_names_the_way_out(tmp_path, cifar, unreachable_cifar10):
    """data.download: true without network: one line naming the archive, data.root and
    data.download: false instead of urllib's traceback; the extracted folder then reads offline."""
    root = tmp_path / "cifar10"
    with pytest.raises(DataError) as info:
        read_cifar10(root, download=True)
    message = str(info.value)
    assert "\n" not in message and message.startswith(
        f"CIFAR-10: could not download cifar-10-python.tar.gz into {str(root)!r} (URLError: ")
    assert message.endswith(
        f"without network, put cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html into data.root "
        f"{str(root)!r} (torchvision then checks its md5 and extracts it, no network needed), or extract it there "
        f"yourself so that cifar-10-batches-py/ holds data_batch_1..5, test_batch and batches.meta, and set "
        f"data.download: false")
    # The extracted folder is the offline route: read with or without download, nothing fetched.
    _copy_dataset(cifar[0], root)
    for download in (True, False):
        assert len(read_cifar10(root, download=download)[0]) == 10 * N_TRAIN


def test_placed_archive_is_extracted_without_network(tmp_path, cifar, unreachable_cifar10, monkeypatch):
    """cifar-10-python.tar.gz put into data.root: torchvision checks its md5 and extracts it, with
    no network (the download URL is unreachable here). The miniature's archive cannot have the real
    md5, so (1) as it is, torchvision tries to download the original and the error says why;
    (2) with torchvision's md5 table set to the miniature's own sums, the real check-and-extract
    code runs offline, as it does for the real archive."""
    import hashlib

    import torchvision.datasets

    root = tmp_path / "cifar10"
    archive = _pack_archive(cifar[0], root)
    with pytest.raises(DataError) as info:
        read_cifar10(root, download=True)
    assert str(info.value).startswith(
        f"CIFAR-10: {str(archive)!r} is not the original cifar-10-python.tar.gz (md5 differs from "
        f"c58f30108f718f92721af3b95e74349a), so torchvision tried to download it again, which failed (URLError: ")
    assert str(info.value).endswith("put the original from https://www.cs.toronto.edu/~kriz/cifar.html in its place "
                                    "(torchvision then checks its md5 and extracts it, no network needed), or extract "
                                    "it there yourself so that cifar-10-batches-py/ holds data_batch_1..5, test_batch "
                                    "and batches.meta, and set data.download: false")

    def md5(path: Path) -> str:
        return hashlib.md5(path.read_bytes()).hexdigest()

    cls, folder = torchvision.datasets.CIFAR10, cifar[0] / FOLDER
    monkeypatch.setattr(cls, "tgz_md5", md5(archive))
    monkeypatch.setattr(cls, "train_list", [[name, md5(folder / name)] for name, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[name, md5(folder / name)] for name, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(folder / cls.meta["filename"])})
    train_x, train_y, test_x, _, classes = read_cifar10(root, download=True)
    assert (root / FOLDER / "data_batch_5").is_file() and classes == CLASSES
    assert np.array_equal(train_x, read_cifar10(cifar[0], download=False)[0]) and len(test_x) == 10 * N_TEST


# ---------------------------------------------------------------- open_clip ViT-B/32 (slow)


@pytest.fixture(scope="module")
def vit_checkpoints(tmp_path_factory):
    """A stand-in for pretrained weights (seeded random ViT-B-32 image tower) in two formats:
    an image-tower-only fp32 .safetensors, and a full-CLIP-style fp16 .pt (OpenAI's checkpoints
    are fp16): keys visual.* with a "module." prefix under "state_dict", text keys beside them."""
    import torch
    from safetensors.torch import save_file

    from foldsoup.models.clip import open_clip_visual

    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(123)
    visual, dim = open_clip_visual("ViT-B-32")
    state = {k: v.detach().clone().contiguous() for k, v in visual.state_dict().items()}
    safetensors_path = folder / "visual.safetensors"
    save_file(state, str(safetensors_path))
    full = {f"module.visual.{k}": v.half() for k, v in state.items()}
    full.update({"module.logit_scale": torch.tensor(4.6), "module.text_projection": torch.zeros(8, 8),
                 "module.token_embedding.weight": torch.zeros(4, 8)})
    pt_path = folder / "clip_full.pt"
    torch.save({"epoch": 32, "name": "stand-in", "state_dict": full}, pt_path)
    return {"state": state, "safetensors": safetensors_path, "pt": pt_path, "dim": dim}


def _model_cfg(pretrained, arch="ViT-B-32", quick_gelu=None) -> dict:
    return {"name": "open_clip", "arch": arch, "pretrained": str(pretrained), "quick_gelu": quick_gelu,
            "normalize_features": True}


@pytest.mark.slow
def test_open_clip_visual_builds_the_image_tower():
    import open_clip
    from open_clip.transformer import QuickGELU

    from foldsoup.errors import ClipError

    from foldsoup.models.clip import open_clip_visual

    visual, dim = open_clip_visual("ViT-B-32")
    reference = open_clip.create_model("ViT-B-32", pretrained=None).visual
    assert dim == 512 == reference.output_dim
    ours = {k: tuple(v.shape) for k, v in visual.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert not any(isinstance(m, QuickGELU) for m in visual.modules())
    # The activation follows the weights: OpenAI's CLIP was trained with QuickGELU.
    for arch, tag in (("ViT-B-32", "openai"), ("ViT-B-32-quickgelu", None)):
        v, _ = open_clip_visual(arch, tag)
        assert any(isinstance(m, QuickGELU) for m in v.modules()), (arch, tag)
    with pytest.raises(ClipError, match=r"'ViT-B-23' is not an open_clip model \(close names: .*ViT-B-32"):
        open_clip_visual("ViT-B-23")
    with pytest.raises(ClipError, match=r"'opnai' is neither a checkpoint file nor a pretrained tag of 'ViT-B-32' "
                                        r"\(tags for 'ViT-B-32': openai, "):
        open_clip_visual("ViT-B-32", "opnai")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_export_pretrained_visual_from_file(vit_checkpoints, fmt):
    import torch

    from foldsoup.models.clip import export_pretrained_visual

    state = export_pretrained_visual(_model_cfg(vit_checkpoints[fmt], quick_gelu=True))
    ref = vit_checkpoints["state"]
    assert state.keys() == ref.keys()
    for k, v in ref.items():
        assert state[k].dtype == torch.float32
        expected = v.half().float() if fmt == "pt" else v
        assert torch.equal(state[k], expected), k


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning", "ignore:.*TorchScript archive:UserWarning")
def test_export_pretrained_visual_bad_checkpoints(tmp_path, vit_checkpoints):
    import torch
    from safetensors.torch import save_file

    from foldsoup.errors import ClipError

    from foldsoup.models.clip import export_pretrained_visual

    ref = vit_checkpoints["state"]
    first = next(iter(ref))  # class_embedding
    cases = {}
    wrong = {k: v for k, v in ref.items()}
    wrong["transformer.resblocks.3.mlp.c_fc.weight"] = torch.zeros(7, 768)
    cases["wrong_shape.safetensors"] = (wrong, r"tensor 'transformer\.resblocks\.3\.mlp\.c_fc\.weight' has shape \[7, 768\]"
                                              r", the image tower of this model\.arch expects \[3072, 768\]")
    cases["missing.safetensors"] = ({first: ref[first]}, r"tensor 'positional_embedding' of the image tower of this model\.arch is missing")
    extra = dict(ref)
    extra["transformer.resblocks.12.ln_1.weight"] = torch.zeros(768)
    cases["extra.safetensors"] = (extra, r"unexpected tensor 'transformer\.resblocks\.12\.ln_1\.weight'")
    for name, (state, message) in cases.items():
        path = tmp_path / name
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        with pytest.raises(ClipError, match=rf"{path}: {message}"):
            export_pretrained_visual(_model_cfg(path, quick_gelu=True))

    # A torch file holding a pickled object: weights_only loading refuses it (nothing runs).
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"visual.class_embedding": ref[first]}, "obj": _Evil(print, "unpickled!")}, evil)
    with pytest.raises(ClipError, match=rf"{evil}: cannot load as a plain weights file"):
        export_pretrained_visual(_model_cfg(evil, quick_gelu=True))
    # A TorchScript archive (the format of OpenAI's original .pt files) is refused, not run.
    scripted = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(scripted))
    with pytest.raises(ClipError, match=rf"{scripted}: .*TorchScript archive"):
        export_pretrained_visual(_model_cfg(scripted, quick_gelu=True))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(vit_checkpoints["safetensors"].read_bytes()[:1000])
    with pytest.raises(ClipError, match=rf"{broken}: unreadable safetensors file"):
        export_pretrained_visual(_model_cfg(broken, quick_gelu=True))
    with pytest.raises(ClipError, match=r"checkpoint file .*nothere\.safetensors' does not exist"):
        export_pretrained_visual(_model_cfg(tmp_path / "nothere.safetensors", quick_gelu=True))
    with pytest.raises(ClipError, match=r"tags for 'ViT-B-32': openai"):
        export_pretrained_visual(_model_cfg("laion9000"))
    # A file does not say its activation: refused before it is read, as foldsoup.config.schema does.
    with pytest.raises(ClipError, match=rf"^model\.quick_gelu: null, but model\.pretrained '{vit_checkpoints['pt']}' is "
                                        r"a checkpoint file, .*true for OpenAI's CLIP weights \(or model\.arch: "
                                        r"ViT-B-32-quickgelu\), false for weights trained with GELU"):
        export_pretrained_visual(_model_cfg(vit_checkpoints["pt"]))


@pytest.mark.slow
def test_export_pretrained_tag_route(monkeypatch):
    """The tag route without network: open_clip.create_model is replaced by a stand-in that
    records its arguments; the export must ask for the tag with QuickGELU for `openai`, and
    refuse when the fine-tuning backbone's activation does not match the weights."""
    import open_clip
    import torch

    import foldsoup.models.clip
    from foldsoup.errors import ClipError
    from foldsoup.models.clip import export_pretrained_visual, open_clip_visual

    torch.manual_seed(7)
    source = open_clip_visual("ViT-B-32-quickgelu")[0]
    calls = []

    class FakeClip:
        visual = source

    def fake_create_model(arch, pretrained=None, **kwargs):
        calls.append((arch, pretrained, kwargs))
        return FakeClip()

    monkeypatch.setattr(open_clip, "create_model", fake_create_model)
    state = export_pretrained_visual(_model_cfg("openai", arch="ViT-B-32-quickgelu"))
    assert calls == [("ViT-B-32-quickgelu", "openai", {"force_quick_gelu": True})]
    assert all(torch.equal(state[k], v) for k, v in source.state_dict().items())
    # A fine-tuning backbone built with GELU for QuickGELU weights is refused before any download.
    monkeypatch.setattr(foldsoup.models.clip, "open_clip_visual", lambda arch, *args: open_clip_visual(arch))
    with pytest.raises(ClipError, match=r"^model\.quick_gelu: the 'openai' weights of 'ViT-B-32' were trained with "
                                        r"QuickGELU, but the backbone built for fine-tuning uses GELU; set "
                                        r"model\.quick_gelu: true \(or null: the tag's own\)$"):
        export_pretrained_visual(_model_cfg("openai"))
    assert len(calls) == 1
    # The real builder with a contradicting model.quick_gelu (foldsoup.config.schema refuses it first).
    monkeypatch.undo()
    monkeypatch.setattr(open_clip, "create_model", fake_create_model)
    with pytest.raises(ClipError, match=r"trained with QuickGELU, but the backbone built for fine-tuning uses GELU"):
        export_pretrained_visual(_model_cfg("openai", quick_gelu=False))
    assert len(calls) == 1
    # The real builder: QuickGELU for ViT-B-32 + openai, from model.quick_gelu or (null) the tag.
    for quick_gelu in (True, None):
        export_pretrained_visual(_model_cfg("openai", quick_gelu=quick_gelu))
        assert calls[-1] == ("ViT-B-32", "openai", {"force_quick_gelu": True})


@pytest.mark.slow
def test_local_openai_checkpoint_builds_the_tag_routes_network(tmp_path, vit_checkpoints):
    """model.pretrained: <a ViT-B-32 checkpoint file in OpenAI's key layout> + model.quick_gelu:
    true builds exactly the network of the paper preset's tag route (pretrained: openai, built
    from the config: building never downloads): the same module classes, QuickGELU in all 12
    blocks, the same features for the same weights. GELU (what the file route built before
    model.quick_gelu) gives other features, so the comparison can fail."""
    import torch
    from open_clip.transformer import QuickGELU
    from safetensors.torch import save_file

    from foldsoup.models.clip import export_pretrained_visual
    from foldsoup.config.schema import validate
    from foldsoup.config.yaml_files import deep_update, load_yaml_files
    from foldsoup.models.build import build_backbone

    # OpenAI's layout: the image tower under visual.*, the text tower's keys unprefixed beside it,
    # fp16; as .safetensors, the conversion docs/gpus-and-clusters.md, "Offline cluster", gives.
    openai_like = {f"visual.{k}": v.half() for k, v in vit_checkpoints["state"].items()}
    openai_like.update({k: torch.zeros(shape, dtype=torch.half) for k, shape in (
        ("positional_embedding", (77, 512)), ("text_projection", (512, 512)), ("logit_scale", ()),
        ("token_embedding.weight", (8, 512)), ("transformer.resblocks.0.attn.in_proj_weight", (1536, 512)))})
    path = tmp_path / "ViT-B-32-openai.safetensors"
    save_file(openai_like, str(path))

    paper = load_yaml_files(REPO / "config.yaml", REPO / "presets" / "paper-cifar10.yaml")
    tag = validate(paper, check_paths=False)["model"]
    local = validate(deep_update(paper, {"model": {"pretrained": str(path), "quick_gelu": True}}), check_paths=False)["model"]
    assert tag["pretrained"] == "openai" and tag["quick_gelu"] is True  # filled from open_clip's table of tags
    state = export_pretrained_visual(local)  # the pretrain job, from the file
    assert all(torch.equal(state[k], v.half().float()) for k, v in vit_checkpoints["state"].items())
    nets = {}
    for name, model_cfg in (("tag", tag), ("file", local), ("gelu", {**local, "quick_gelu": False})):
        nets[name] = build_backbone(model_cfg)[0].eval()
        nets[name].load_state_dict(state)
    assert [type(m) for m in nets["file"].modules()] == [type(m) for m in nets["tag"].modules()]
    assert sum(isinstance(m, QuickGELU) for m in nets["tag"].modules()) == 12
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = {name: net(x) for name, net in nets.items()}
    assert torch.equal(features["file"], features["tag"])
    assert (features["gelu"] - features["tag"]).abs().max() > 1e-3


@pytest.mark.slow
def test_weights_metadata_rebuilds_the_same_activation(tmp_path):
    """`foldsoup evaluate/predict` rebuild the tower from the weights' metadata (usage.load_model):
    model.quick_gelu there decides the activation; a model config saved before the key existed
    rebuilds what was built then (the arch's own GELU for a file). ViT-S-32: 4x cheaper than B/32."""
    import torch
    from open_clip.transformer import QuickGELU

    from foldsoup.models.build import build_classifier
    from foldsoup.usage import load_model
    from foldsoup.storage.weights import save_weights

    image = {"size": 224, "mean": CLIP_MEAN, "std": CLIP_STD, "hflip": False}
    old = {"name": "open_clip", "arch": "ViT-S-32", "pretrained": "/cluster/vit_s32.safetensors", "normalize_features": True}
    for model_cfg, quick in (({**old, "quick_gelu": True}, True), (old, False)):
        torch.manual_seed(0)
        state = build_classifier(model_cfg, 3).state_dict()
        path = tmp_path / f"quick{quick}.safetensors"
        save_weights(path, state, {"model": model_cfg, "classes": ["a", "b", "c"], "image": image})
        model, classes, _ = load_model(str(path), device="cpu")
        assert any(isinstance(m, QuickGELU) for m in model.modules()) == quick
        assert any(isinstance(m, torch.nn.GELU) for m in model.modules()) != quick and classes == ["a", "b", "c"]


@pytest.mark.slow
def test_tag_offline_fails_at_once_naming_the_way_out(tmp_path, cifar):
    """model.pretrained: openai on a machine without network, as the `pretrain` job meets it:
    with HF_HUB_OFFLINE=1 and an empty Hugging Face cache (HF_HOME), open_clip fails without
    retrying and the job says, in one line, which keys or variables to set instead."""
    import subprocess
    import sys

    from foldsoup import steps
    from foldsoup.config.schema import validate
    from foldsoup.config.yaml_files import deep_update, load_yaml_files

    paper = load_yaml_files(REPO / "config.yaml", REPO / "presets" / "paper-cifar10.yaml")
    cfg = validate(deep_update(paper, {"results": str(tmp_path / "results"), "device": "cpu",
                                       "data": {"root": str(cifar[0]), "download": False}}), check_paths=False)
    data = tmp_path / "dataset.safetensors"
    steps.prepare(cfg, str(data))
    hf_home = tmp_path / "hf"
    hf_home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FOLDSOUP_", "HF_"))}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-m", "foldsoup", "pretrain", "--config-json", json.dumps(cfg),
                          "--data", str(data), "--out", str(tmp_path / "backbone.safetensors")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr
    ours = [line for line in run.stderr.splitlines() if line.startswith("foldsoup pretrain: error:")]
    assert ours == [
        f"foldsoup pretrain: error: model.pretrained: the 'openai' weights of 'ViT-B-32' are not in the Hugging Face "
        f"cache {hf_home / 'hub'} and HF_HUB_OFFLINE=1 forbids downloading them from the Hugging Face hub "
        f"(timm/vit_base_patch32_clip_224.openai); set model.pretrained to a local checkpoint file of 'ViT-B-32' with "
        f"model.quick_gelu: true (docs/gpus-and-clusters.md, \"Offline cluster\"), or fill that cache (HF_HOME) on a machine with "
        f"network and copy it here"], run.stderr
    assert run.stderr.splitlines()[-1] == ours[0]  # open_clip's own ERROR log of the failure is not repeated
    assert not any(word in run.stderr for word in ("Traceback", "Retrying", "ERROR"))
    assert not (tmp_path / "backbone.safetensors").exists()


@pytest.mark.slow
def test_paper_pipeline_vit_b32(tmp_path, cifar, vit_checkpoints):
    """prepare -> folds -> pretrain (export from a local checkpoint) -> linear probe per fold ->
    fine-tune per fold -> uniform soup, with the paper's model and preprocessing on a miniature."""
    import torch

    from foldsoup import steps
    from foldsoup.config.schema import grid_points, validate
    from foldsoup.storage.weights import load_weights

    root, _ = cifar
    results = tmp_path / "results"
    cfg = validate(
        {
            "results": str(results),
            "seed": 0,
            "device": "cpu",
            "data": {"name": "cifar10", "root": str(root), "download": False, "image_size": 224,
                     "mean": CLIP_MEAN, "std": CLIP_STD, "hflip": True, "max_pool": 20, "max_test": 10},
            "model": _model_cfg(vit_checkpoints["pt"], quick_gelu=True),
            "folds": {"k": 2},
            "lp": {"max_iter": 20},
            "finetune": {"epochs": 1, "batch_size": 4, "warmup_steps": 1, "eval_batch_size": 16, "save_dtype": "bfloat16"},
            "grid": {"lr": [1e-5], "aug": ["medium"], "mixup": [True]},
        },
        check_paths=False,
    )
    data_path, folds_path = str(results / "prepared" / "dataset.safetensors"), str(results / "folds.csv")
    backbone = str(results / "pretrained" / "backbone.safetensors")
    steps.prepare(cfg, data_path)
    steps.folds(cfg, data_path, folds_path)
    steps.pretrain(cfg, data_path, backbone)
    exported, _ = load_weights(backbone)
    assert all(torch.equal(exported[k], v.half().float()) for k, v in vit_checkpoints["state"].items())

    (hp,) = [p.name for p in grid_points(cfg)]
    model_paths, metrics_paths = [], []
    for fold in range(2):
        head = str(results / "lp" / f"fold{fold}" / "head.safetensors")
        steps.linear_probe(cfg, data_path, folds_path, backbone, fold, head)
        head_state, head_meta = load_weights(head)
        assert head_state["weight"].shape == (10, 512) and 0 <= head_meta["val_acc"] <= 1
        out_dir = results / "models" / hp / f"fold{fold}"
        steps.finetune(cfg, data_path, folds_path, backbone, head, hp, fold, str(out_dir), str(tmp_path / "resume" / hp / f"fold{fold}"))
        metrics = json.loads((out_dir / "metrics.json").read_text())
        assert metrics["fold"] == fold and not metrics["diverged"] and metrics["steps"] == 2  # 10 images // batch 4
        assert all(0 <= metrics[k] <= 1 for k in ("val_acc", "test_acc"))
        assert all(0 <= a <= 1 for a in metrics["fold_accs"].values())
        model_state, _ = load_weights(out_dir / "model.safetensors")
        assert model_state["backbone.conv1.weight"].dtype == torch.bfloat16 and "head.weight" in model_state
        preds, _ = load_weights(out_dir / "predictions.safetensors")
        assert preds["pool_logits"].shape == (20, 10) and preds["test_logits"].shape == (10, 10)
        model_paths.append(str(out_dir / "model.safetensors"))
        metrics_paths.append(str(out_dir / "metrics.json"))

    soup = results / "soups" / "uniform_soup.safetensors"
    steps.uniform_all(cfg, data_path, folds_path, model_paths, metrics_paths, str(soup))
    record = json.loads(soup.with_suffix(".json").read_text())
    assert record["n_ingredients"] == 2 and record["folds"] == [0, 1]
    assert 0 <= record["val_acc"] <= 1 and 0 <= record["test_acc"] <= 1
    soup_state, _ = load_weights(soup)
    a, b = (load_weights(p)[0] for p in model_paths)
    key = "backbone.transformer.resblocks.0.mlp.c_fc.weight"
    assert torch.allclose(soup_state[key].float(), (a[key].float() + b[key].float()) / 2, atol=1e-2)
