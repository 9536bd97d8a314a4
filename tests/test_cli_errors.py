"""A bug must look like a bug: the command line prints foldsoup's own errors (and an OS error
naming a file) as one line, everything else with its traceback (the job's log), and CUDA
out-of-memory as one line naming the keys to lower, with the traceback too."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from foldsoup import cli, steps
from foldsoup.errors import DataError, FoldsoupError, NoFreeDevice

ARGV = ["models-table", "--metrics", "m.json", "--out", "models.csv"]


def run_with(monkeypatch, capsys, exc: BaseException) -> tuple[int, str]:
    """(exit status, stderr) of `foldsoup models-table` whose step raises `exc`."""
    def step(*args, **kwargs):
        raise exc

    monkeypatch.setitem(steps.STEPS, "models-table", dataclasses.replace(steps.STEPS["models-table"], run=step))
    status = cli.main(ARGV)
    out = capsys.readouterr()
    assert out.out == ""
    return status, out.err


@pytest.mark.parametrize("exc, shown", [
    (KeyError("val_acc"), "KeyError: 'val_acc'"),
    (RuntimeError("boom inside the step"), "RuntimeError: boom inside the step"),
    (ValueError("a plain ValueError"), "ValueError: a plain ValueError"),
    (TimeoutError("no filename"), "TimeoutError: no filename"),  # an OSError that names no file
])
def test_an_unexpected_exception_keeps_its_traceback(monkeypatch, capsys, exc, shown):
    status, err = run_with(monkeypatch, capsys, exc)
    assert status == 1
    assert err.startswith("Traceback (most recent call last):\n"), err
    assert "in step\n" in err and f"\n{shown}\n" in err  # where it was raised, and what
    last = err.splitlines()[-1]
    assert last.startswith(f"foldsoup models-table: unexpected {type(exc).__name__}: ") and "please report it" in last
    assert "error:" not in err  # not passed off as bad input


@pytest.mark.parametrize("exc", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.15 GiB total capacity)"),
    RuntimeError("CUDA error: out of memory"),  # cuBLAS/cuDNN and older torch say it in a plain RuntimeError
])
def test_cuda_out_of_memory_names_the_keys_to_lower_and_keeps_the_traceback(monkeypatch, capsys, exc):
    status, err = run_with(monkeypatch, capsys, exc)
    assert status == 1
    assert err.startswith("Traceback (most recent call last):\n") and "out of memory" in err.splitlines()[-2]
    last = err.splitlines()[-1]
    assert last.startswith("foldsoup models-table: error: CUDA out of memory")
    for key in ("finetune.batch_size", "finetune.eval_batch_size", "lp.batch_size", "resources.*"):
        assert key in last, (key, last)


@pytest.mark.parametrize("exc", [DataError("data.root: 'x' does not exist"), NoFreeDevice("no free GPU among ['0']")])
def test_a_project_error_is_one_line_without_traceback(monkeypatch, capsys, exc):
    assert isinstance(exc, FoldsoupError)
    assert run_with(monkeypatch, capsys, exc) == (1, f"foldsoup models-table: error: {exc}\n")


def test_an_os_error_naming_a_file_is_one_line(monkeypatch, capsys):
    exc = PermissionError(13, "Permission denied", "results/tables/models.csv")
    assert run_with(monkeypatch, capsys, exc) == (
        1, "foldsoup models-table: error: 'results/tables/models.csv': permission denied; check its owner and mode\n")


def test_a_real_bad_input_is_still_one_line(tmp_path, capsys):
    """Unpatched: a missing prepared dataset, through the real step."""
    missing = tmp_path / "dataset.safetensors"
    argv = ["folds", "--config-json", '{"seed": 0, "folds": {"k": 2}}', "--data", str(missing), "--out", str(tmp_path / "f.csv")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == f"foldsoup folds: error: prepared dataset {str(missing)!r} does not exist (run the `prepare` rule)"
    assert not any("Traceback" in line for line in err)
