"""Weight averaging (Eq. 1) and safetensors I/O."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

try:
    import foldsoup.soups.average  # noqa: F401
except ImportError:  # running from a checkout without an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from foldsoup.errors import SoupError

from foldsoup.soups.average import RunningSum, average
from foldsoup.storage.weights import (
    WeightsError,
    atomic_write_json,
    atomic_write_text,
    load_weights,
    save_weights,
)


def random_state(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g).to(dtype),
        "conv.bias": torch.randn(4, generator=g).to(dtype),
        "head.weight": torch.randn(10, 4, generator=g).to(dtype),
    }


def with_buffers(state: dict[str, torch.Tensor], tracked: int = 7) -> dict[str, torch.Tensor]:
    return {
        **state,
        "bn.num_batches_tracked": torch.tensor(tracked, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
    }


# ------------------------------------------------------------------------------------------
# Averaging
# ------------------------------------------------------------------------------------------


def test_average_equals_arithmetic_mean():
    states = [random_state(i) for i in range(5)]
    soup = average(states)
    for key in states[0]:
        expected = sum(s[key].double() for s in states) / len(states)
        torch.testing.assert_close(soup[key].double(), expected, rtol=0, atol=1e-6)
        assert soup[key].dtype == torch.float32


def test_streaming_from_generator_equals_stack_mean():
    states = [random_state(i) for i in range(7)]
    soup = average(s for s in states)
    for key in states[0]:
        torch.testing.assert_close(soup[key], torch.stack([s[key] for s in states]).mean(0))


def test_average_holds_one_ingredient_at_a_time():
    refs: list[weakref.ref] = []

    def generate():
        for i in range(6):
            gc.collect()
            # Every earlier ingredient must already be freed when the next one is made.
            assert all(r() is None for r in refs), "average() kept an earlier ingredient alive"
            state = random_state(i)
            refs.append(weakref.ref(state["conv.weight"]))
            yield state
            del state

    soup = average(generate())
    assert soup["conv.weight"].shape == (4, 3, 3, 3)


def test_inputs_are_not_modified():
    states = [random_state(i) for i in range(3)]
    before = [{k: v.clone() for k, v in s.items()} for s in states]
    average(states)
    for s, b in zip(states, before):
        for key in s:
            assert torch.equal(s[key], b[key])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_accumulation_beats_low_precision_sum(dtype):
    n = 4096
    g = torch.Generator().manual_seed(0)
    # Increments in [0.6, 1): a naive running sum stalls once its spacing reaches 2, i.e. at 256
    # in bf16 and 2048 in fp16, because every further increment rounds away.
    states = [{"w": (0.6 + 0.4 * torch.rand(64, generator=g)).to(dtype)} for _ in range(n)]
    reference = torch.stack([s["w"].double() for s in states]).mean(0)

    naive = torch.zeros(64, dtype=dtype)
    for s in states:
        naive += s["w"]
    naive = naive / n
    naive_err = (naive.double() - reference).abs().max().item()

    soup = average(states)
    assert soup["w"].dtype == dtype
    ours_err = (soup["w"].double() - reference).abs().max().item()

    assert naive_err > 0.05  # the naive sum visibly fails
    # Ours is the fp64 mean rounded once to the input dtype.
    assert torch.equal(soup["w"], reference.to(dtype))
    assert ours_err <= 2.0**-8


def test_float64_accumulation_option():
    states = [{"w": torch.full((3,), 1e8 + i, dtype=torch.float64)} for i in range(4)]
    states.append({"w": torch.full((3,), 1.0, dtype=torch.float64)})
    # float64 tensors are never squeezed through float32, whatever accum_dtype says.
    for accum in ("float32", "float64", torch.float64):
        soup = average(states, accum_dtype=accum)
        assert soup["w"].dtype == torch.float64
        assert soup["w"][0].item() == (4e8 + 6 + 1) / 5
    with pytest.raises(ValueError, match="accum_dtype"):
        average(states, accum_dtype="float16")


def test_float64_accumulation_is_closer_for_fp32_inputs():
    g = torch.Generator().manual_seed(1)
    states = [{"w": (1000 + torch.rand(256, generator=g)).float()} for _ in range(2000)]
    reference = torch.stack([s["w"].double() for s in states]).mean(0)
    err32 = (average(states, accum_dtype="float32")["w"].double() - reference).abs().max()
    err64 = (average(states, accum_dtype="float64")["w"].double() - reference).abs().max()
    assert err64 <= err32
    assert err64 <= 1000 * 2.0**-24  # half an fp32 ulp at ~1000, i.e. rounded once


def test_integer_and_bool_buffers_are_copied():
    states = [with_buffers(random_state(i), tracked=7) for i in range(3)]
    soup = average(states)
    assert soup["bn.num_batches_tracked"].dtype == torch.int64
    assert soup["bn.num_batches_tracked"].item() == 7
    assert soup["mask"].dtype == torch.bool
    assert soup["mask"].tolist() == [True, False, True]
    # The copied buffer is not the caller's tensor.
    soup["bn.num_batches_tracked"].add_(1)
    assert states[0]["bn.num_batches_tracked"].item() == 7


def test_integer_buffer_mismatch_names_key_and_ingredient():
    # Any integer buffer but BatchNorm's step counter: an index buffer (e.g. position ids).
    states = [{**with_buffers(random_state(i)), "embed.position_ids": torch.arange(4) + i} for i in range(2)]
    with pytest.raises(SoupError, match=r"'model_b'.*'embed\.position_ids'.*must be equal in every ingredient"):
        average(states, names=["model_a", "model_b"])
    # A scalar int64 counter of another name is no BatchNorm counter either.
    states = [{**random_state(i), "optimizer.step": torch.tensor(10 + i)} for i in range(2)]
    with pytest.raises(SoupError, match=r"'#1'.*'optimizer\.step'"):
        average(states)


# ------------------------------------------------------------------------------------------
# BatchNorm: running statistics averaged, step counters as their exact integer mean
# ------------------------------------------------------------------------------------------


def bn_state(mean: list[float], var: list[float], tracked: int) -> dict[str, torch.Tensor]:
    return {
        "bn.weight": torch.ones(2),
        "bn.bias": torch.zeros(2),
        "bn.running_mean": torch.tensor(mean, dtype=torch.float32),
        "bn.running_var": torch.tensor(var, dtype=torch.float32),
        "bn.num_batches_tracked": torch.tensor(tracked, dtype=torch.int64),
        "mask": torch.tensor([True, False]),
    }


def test_batchnorm_running_stats_averaged_and_counter_is_floor_of_mean():
    a, b = bn_state([0.0, 2.0], [1.0, 3.0], 40), bn_state([1.0, 4.0], [2.0, 5.0], 45)
    soup = average([a, b])
    assert soup["bn.running_mean"].tolist() == [0.5, 3.0]
    assert soup["bn.running_var"].tolist() == [1.5, 4.0]
    assert soup["bn.num_batches_tracked"].dtype == torch.int64
    assert soup["bn.num_batches_tracked"].item() == 42  # floor(85 / 2)
    assert soup["bn.num_batches_tracked"].dim() == 0
    assert average([a, b, bn_state([0, 0], [1, 1], 50)])["bn.num_batches_tracked"].item() == 45  # 135 / 3
    assert average([a])["bn.num_batches_tracked"].item() == 40  # a soup of one is that model
    assert a["bn.num_batches_tracked"].item() == 40  # inputs untouched


def test_batchnorm_counter_mean_is_exact_beyond_float64():
    # 2**53 + 1 is not a float64: a float mean would give 2**53 + 2 or 2**53; exact is 2**53 + 1.
    big = 2**53
    states = [bn_state([0, 0], [1, 1], big), bn_state([0, 0], [1, 1], big + 2), bn_state([0, 0], [1, 1], big + 1)]
    assert average(states)["bn.num_batches_tracked"].item() == big + 1
    # Near int64's maximum an int64 sum would overflow; the mean of two equal counters is them.
    top = 2**63 - 1
    assert average([bn_state([0, 0], [1, 1], top)] * 2)["bn.num_batches_tracked"].item() == top


def test_batchnorm_counter_weighted_mean_and_mean_with():
    rs = RunningSum()
    rs.add(bn_state([0, 0], [1, 1], 10), "a", weight=1.0)
    rs.add(bn_state([4, 4], [1, 1], 20), "b", weight=3.0)
    assert rs.mean()["bn.num_batches_tracked"].item() == 17  # floor(70 / 4)
    assert rs.mean()["bn.running_mean"].tolist() == [3.0, 3.0]
    preview = rs.mean_with(bn_state([0, 0], [1, 1], 33), "c", weight=0.5)
    assert preview["bn.num_batches_tracked"].item() == 19  # floor(86.5 / 4.5) = floor(19.22)
    assert rs.mean()["bn.num_batches_tracked"].item() == 17  # mean_with left the sum unchanged
    rs.add(bn_state([0, 0], [1, 1], 33), "c", weight=0.5)
    assert torch.equal(rs.mean()["bn.num_batches_tracked"], preview["bn.num_batches_tracked"])


def test_batchnorm_counters_still_check_dtype_and_other_buffers():
    a = bn_state([0, 0], [1, 1], 10)
    average([a, bn_state([1, 1], [1, 1], 99)])  # counters may differ
    wrong = bn_state([0, 0], [1, 1], 10)
    wrong["bn.num_batches_tracked"] = torch.tensor(10, dtype=torch.int32)
    with pytest.raises(SoupError, match=r"'bn\.num_batches_tracked' has dtype torch\.int32"):
        average([a, wrong])
    flipped = bn_state([0, 0], [1, 1], 12)
    flipped["mask"] = torch.tensor([False, False])
    with pytest.raises(SoupError, match=r"'mask'.*must be equal"):
        average([a, flipped])


def test_missing_key_names_ingredient_and_key():
    a, b = random_state(0), random_state(1)
    del b["conv.bias"]
    with pytest.raises(SoupError, match=r"ingredient 'b': tensor 'conv\.bias' of the soup's first ingredient 'a' is missing \(1 of 3 missing\)"):
        average([a, b], names=["a", "b"])
    c = {**random_state(2), "extra.weight": torch.zeros(2)}
    with pytest.raises(SoupError, match=r"ingredient '#1': unexpected tensor 'extra\.weight' \(1 not in the soup's first ingredient '#0'"):
        average([a, c])  # unnamed ingredients are numbered from 0


def test_shape_mismatch_names_ingredient_key_and_both_shapes():
    a, b = random_state(0), random_state(1)
    b["head.weight"] = torch.zeros(12, 4)
    with pytest.raises(SoupError) as info:
        average([a, b], names=["fold0", "fold1"])
    msg = str(info.value)
    assert "'fold1'" in msg and "'head.weight'" in msg
    assert "has shape [12, 4]" in msg and "'fold0' expects [10, 4]" in msg


def test_dtype_mismatch_raises():
    a, b = random_state(0), random_state(1, torch.float16)
    with pytest.raises(SoupError, match=r"'conv\.weight'.*float16"):
        average([a, b])


def test_failed_add_leaves_running_sum_unchanged():
    rs = RunningSum()
    rs.add(random_state(0), "a")
    before = rs.mean()
    bad = random_state(1)
    bad["head.weight"] = torch.zeros(3, 3)
    with pytest.raises(SoupError):
        rs.add(bad, "bad")
    assert rs.count == 1
    after = rs.mean()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_mean_with_does_not_mutate_and_matches_add():
    states = [with_buffers(random_state(i)) for i in range(3)]
    rs = RunningSum()
    rs.add(states[0], "a")
    rs.add(states[1], "b")
    before = rs.mean()

    preview = rs.mean_with(states[2], "c")

    assert rs.count == 2 and rs.names == ("a", "b")
    after = rs.mean()
    assert all(torch.equal(before[k], after[k]) for k in before)
    expected = average(states)
    assert all(torch.equal(preview[k], expected[k]) for k in expected)


def test_mean_with_on_empty_sum_is_the_state():
    state = random_state(0, torch.bfloat16)
    out = RunningSum().mean_with(state)
    assert all(torch.equal(out[k], state[k]) and out[k] is not state[k] for k in state)


def test_weighted_mean():
    rs = RunningSum()
    rs.add({"w": torch.tensor([0.0])}, weight=1.0)
    rs.add({"w": torch.tensor([4.0])}, weight=3.0)
    assert rs.mean()["w"].item() == 3.0
    assert rs.mean_with({"w": torch.tensor([12.0])}, weight=4.0)["w"].item() == 7.5
    with pytest.raises(SoupError, match="weight"):
        rs.add({"w": torch.tensor([1.0])}, weight=0.0)


def test_empty_and_length_mismatch():
    with pytest.raises(SoupError, match="zero"):
        average([])
    with pytest.raises(SoupError, match="names"):
        average([random_state(0), random_state(1)], names=["only_one"])
    with pytest.raises(SoupError, match="names"):
        average([random_state(0)], names=["a", "b"])


# ------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------


def test_weights_module_imports_without_torch():
    # CSV/JSON writers use foldsoup.storage.weights; importing it must not pull in torch.
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    code = "import sys, foldsoup.storage.weights; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_save_load_roundtrip_with_metadata(tmp_path):
    state = with_buffers(random_state(0, torch.bfloat16))
    state["t"] = torch.randn(3, 4).t()  # non-contiguous
    meta = {"hp": "lr0.001_medium_mixup", "fold": 2, "accs": {"0": 0.5}, "classes": ["a", "b"]}
    path = tmp_path / "model.safetensors"
    save_weights(path, state, meta)
    loaded, loaded_meta = load_weights(path)
    assert loaded_meta == meta
    assert set(loaded) == set(state)
    for key in state:
        assert loaded[key].dtype == state[key].dtype
        assert torch.equal(loaded[key], state[key])


def test_save_handles_shared_storage(tmp_path):
    w = torch.randn(5, 3)
    save_weights(tmp_path / "tied.safetensors", {"embed": w, "head": w})
    loaded, _ = load_weights(tmp_path / "tied.safetensors")
    assert torch.equal(loaded["embed"], w) and torch.equal(loaded["head"], w)


def test_missing_file_raises_weights_error(tmp_path):
    with pytest.raises(WeightsError, match="nope.safetensors"):
        load_weights(tmp_path / "nope.safetensors")
    assert issubclass(WeightsError, ValueError)


def test_truncated_file_raises_weights_error(tmp_path):
    path = tmp_path / "trunc.safetensors"
    save_weights(path, random_state(0))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(WeightsError, match="trunc.safetensors"):
        load_weights(path)
    path.write_bytes(data[:5])  # not even the header length survives
    with pytest.raises(WeightsError, match="trunc.safetensors"):
        load_weights(path)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda d: b"\xff" * 8 + d[8:],  # header length field overwritten
        lambda d: d[:8] + b"\xfe\xff garbage" + d[18:],  # header JSON overwritten
        lambda d: d[:8] + d[8:40].replace(b'"', b"'") + d[40:],  # header no longer valid JSON
    ],
)
def test_corrupt_header_raises_weights_error(tmp_path, corrupt):
    path = tmp_path / "bad.safetensors"
    save_weights(path, random_state(0), {"fold": 1})
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(WeightsError, match="bad.safetensors"):
        load_weights(path)


def test_atomic_writes_leave_only_the_final_files(tmp_path):
    save_weights(tmp_path / "w.safetensors", random_state(0))
    atomic_write_text(tmp_path / "t.csv", "a,b\n1,2\n")
    atomic_write_json(tmp_path / "sub" / "m.json", {"val_acc": 0.5})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub", "t.csv", "w.safetensors"]
    assert os.listdir(tmp_path / "sub") == ["m.json"]
    assert (tmp_path / "t.csv").read_text() == "a,b\n1,2\n"
    assert json.loads((tmp_path / "sub" / "m.json").read_text()) == {"val_acc": 0.5}
    # Permissions like a plain open() (mkstemp would give 0600).
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "t.csv").stat().st_mode & 0o777 == 0o666 & ~umask


def test_failed_atomic_write_keeps_old_file_and_no_temp(tmp_path):
    path = tmp_path / "m.json"
    atomic_write_json(path, {"v": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"v": object()})
    with pytest.raises(TypeError):
        save_weights(tmp_path / "w.safetensors", {"w": "not a tensor"})
    assert os.listdir(tmp_path) == ["m.json"]
    assert json.loads(path.read_text()) == {"v": 1}


def test_failure_during_save_removes_temp(tmp_path, monkeypatch):
    import safetensors.torch

    def broken_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_weights(tmp_path / "w.safetensors", random_state(0))
    assert os.listdir(tmp_path) == []
