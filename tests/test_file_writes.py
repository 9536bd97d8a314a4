"""Files as a team expects them: the umask decides their permissions, and a write stopped by
an exception, Ctrl-C or SIGTERM leaves no temporary file behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from foldsoup.data.prepared import load_digits_prepared, save_prepared
from foldsoup.training.loop import ResumeStore
from foldsoup.storage.weights import atomic_write_json, save_weights

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}


@pytest.mark.parametrize("umask", [0o002, 0o022])
def test_weights_heads_and_prepared_data_honour_the_umask(tmp_path, umask):
    """Before: weights, heads and the prepared dataset were 0600 whatever the umask
    (safetensors writes 0600 and the mode survived the rename)."""
    data = load_digits_prepared({"name": "digits", "classes": [1, 2], "pretrain_classes": [0], "test_fraction": 0.5,
                                 "max_pool": None, "max_test": None}, seed=0)
    old = os.umask(umask)
    try:
        save_weights(tmp_path / "model.safetensors", {"w": torch.ones(3)})
        save_weights(tmp_path / "lp" / "head.safetensors", {"weight": torch.ones(2, 3), "bias": torch.zeros(2)})
        save_prepared(tmp_path / "dataset.safetensors", data)
        atomic_write_json(tmp_path / "metrics.json", {"acc": 1.0})
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.rglob("*") if p.is_file()}
    assert modes == dict.fromkeys(["model.safetensors", "head.safetensors", "dataset.safetensors", "metrics.json"],
                                  0o666 & ~umask)


def _python(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], env=ENV, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_a_signal_during_a_write_removes_the_temporary_file(tmp_path, sig):
    """The signal arrives while the temporary file is half written (before: SIGTERM and SIGHUP
    killed the process on the spot and left it; SIGINT already raised KeyboardInterrupt)."""
    proc = _python("""
        import os, signal, sys, time
        from foldsoup.storage.weights import atomic_path

        with atomic_path(sys.argv[1]) as tmp:
            tmp.write_bytes(b"half of it")
            os.kill(os.getpid(), getattr(signal, sys.argv[2]))
            time.sleep(60)  # never reached: the signal stops the write
        """, str(tmp_path / "model.safetensors"), sig)
    signum = getattr(signal, sig)
    if sig == "SIGINT":
        assert proc.returncode == -signum and "KeyboardInterrupt" in proc.stderr, proc.stderr
    else:
        assert proc.returncode == 128 + signum, proc.stderr
        assert proc.stderr == (f"foldsoup: {sig} while writing {tmp_path / 'model.safetensors'}; its unfinished "
                               "temporary file was removed (rerun to write it)\n")
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_sigterm_during_a_real_save_leaves_nothing(tmp_path):
    """SIGTERM sent by another thread as soon as the temporary file exists, while safetensors
    writes 128 MB (it writes its own temporary file, then renames it onto ours)."""
    proc = _python("""
        import os, signal, sys, threading, time
        from pathlib import Path
        import torch
        from foldsoup.storage.weights import save_weights

        folder = Path(sys.argv[1])
        state = {"w": torch.ones(32 * 2**20)}

        def watch():
            while not any(p.name.endswith(".tmp") for p in folder.iterdir()):
                time.sleep(0.0005)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=watch, daemon=True).start()
        save_weights(folder / "state.safetensors", state)
        time.sleep(60)  # not reached: SIGTERM ends the process in the save or right after it
        """, str(tmp_path))
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert "SIGTERM while writing" in proc.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name != "state.safetensors"] == []


def test_resume_store_removes_what_a_killed_save_left(tmp_path):
    """SIGKILL cannot be caught: the next use of the resume folder removes the temporary files
    (ours and safetensors' own) that a killed save left, each as large as the state."""
    store = ResumeStore(tmp_path / "resume")
    store.folder.mkdir()
    for name in (".state.safetensors.k2j4h1.tmp", ".tmpAbC123"):
        (store.folder / name).write_bytes(b"x" * 1000)
    (store.folder / "state.safetensors").write_bytes(b"x")
    store.clear()
    assert os.listdir(store.folder) == []
