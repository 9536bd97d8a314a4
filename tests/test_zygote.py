"""The local job server: a job run through it behaves like the plain process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
CFG = {"seed": 0, "data": {"name": "digits", "classes": [1, 2, 3], "pretrain_classes": [0, 4], "test_fraction": 0.5,
                          "max_pool": None, "max_test": None}, "folds": {"k": 3}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    sock = str(tmp_path_factory.mktemp("server") / "jobs.sock")
    proc = subprocess.Popen([sys.executable, "-m", "foldsoup.zygote", sock, "--idle-timeout", "120"], env=ENV,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not os.path.exists(sock):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "job server did not start"
        time.sleep(0.1)
    yield sock, proc.pid
    proc.terminate()
    proc.wait(10)


def run(args, tmp_path, sock=None, log="job.log"):
    env = {**ENV, "FOLDSOUP_JOB_SERVER": sock} if sock else ENV
    with open(tmp_path / log, "w") as err:
        return subprocess.run([sys.executable, "-m", "foldsoup", *args], env=env, stderr=err, cwd=tmp_path).returncode


def test_outputs_logs_and_status_equal_the_plain_process(server, tmp_path):
    server, _ = server
    cfg = json.dumps(CFG)
    for name, sock in (("plain", None), ("served", server)):
        d = tmp_path / name
        d.mkdir()
        assert run(["prepare", "--config-json", cfg, "--out", "data.safetensors"], d, sock) == 0
        assert run(["folds", "--config-json", cfg, "--data", "data.safetensors", "--out", "folds.csv"], d, sock) == 0
        assert "3 stratified folds" in (d / "job.log").read_text()  # the job's stderr reached its log
    assert (tmp_path / "plain" / "folds.csv").read_bytes() == (tmp_path / "served" / "folds.csv").read_bytes()
    # A failing step: same exit status, same message in the log.
    bad = json.dumps({**CFG, "folds": {"k": 10_000}})
    for name, sock in (("plain", None), ("served", server)):
        d = tmp_path / name
        assert run(["folds", "--config-json", bad, "--data", "data.safetensors", "--out", "x.csv"], d, sock) == 1
        assert "folds.k = 10000 is larger than class" in (d / "job.log").read_text()
        assert not (d / "x.csv").exists()


def test_no_server_means_the_client_runs_the_step_itself(tmp_path):
    cfg = json.dumps(CFG)
    assert run(["prepare", "--config-json", cfg, "--out", "d.safetensors"], tmp_path, str(tmp_path / "none.sock")) == 0
    assert (tmp_path / "d.safetensors").is_file()


def test_killing_the_client_kills_its_job(server, tmp_path):
    """kill -9 of a job must not leave its work running (a rerun would race with it)."""
    sock, server_pid = server
    cfg = {**CFG, "device": "cpu", "model": {"name": "digits_cnn", "width": 8}, "pretrain": {"epochs": 1},
           "lp": {"epochs": 2}, "finetune": {"epochs": 100000, "batch_size": 8}, "grid": {"lr": [0.001], "aug": ["minimal"],
           "mixup": [False]}}
    from foldsoup.config import validate

    cfg = json.dumps(validate(cfg, check_paths=False))
    steps = [["prepare", "--out", "d.st"], ["folds", "--data", "d.st", "--out", "f.csv"],
             ["pretrain", "--data", "d.st", "--out", "b.st"],
             ["lp", "--data", "d.st", "--folds", "f.csv", "--backbone", "b.st", "--fold", "0", "--out", "h.st"]]
    for step in steps:
        assert run([step[0], "--config-json", cfg, *step[1:]], tmp_path, sock) == 0, (tmp_path / "job.log").read_text()
    log = tmp_path / "finetune.log"
    env = {**ENV, "FOLDSOUP_JOB_SERVER": sock}
    client = subprocess.Popen([sys.executable, "-m", "foldsoup", "finetune", "--config-json", cfg, "--data", "d.st",
                               "--folds", "f.csv", "--backbone", "b.st", "--head", "h.st", "--hp", "lr0.001_minimal_nomix",
                               "--fold", "0", "--out-dir", "out", "--resume-dir", "resume"], env=env, cwd=tmp_path,
                              stderr=open(log, "w"))
    deadline = time.monotonic() + 60
    while "epoch 2/" not in log.read_text():
        assert client.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    assert _children(server_pid), "the job should run as a child of the server"
    client.send_signal(signal.SIGKILL)
    client.wait()
    deadline = time.monotonic() + 10
    while _children(server_pid):
        assert time.monotonic() < deadline, "the job outlived its killed client"
        time.sleep(0.1)


def _children(pid: int) -> list[str]:
    """Live (non-zombie) children of `pid`."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [c for c in out if _state(c) not in ("Z", "gone")]


def _state(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return "gone"


def test_server_stops_when_its_starter_is_already_gone(tmp_path):
    """A workflow that fails within a second ends while the server still imports torch; the
    server must notice and stop (before: it waited out its 600 s idle timeout, holding the
    stderr pipe of whoever ran Snakemake)."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    proc = subprocess.run([sys.executable, "-m", "foldsoup.zygote", str(tmp_path / "jobs.sock"), "--parent-pid",
                           str(gone.pid)], env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "jobs.sock").exists()  # cleaned up on the way out
