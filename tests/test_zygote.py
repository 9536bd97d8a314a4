"""The local job server: a job run through it behaves like the plain process."""

import json
import os
import re
import signal
import site
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

# Workflow runs (Snakemake, a SLURM cluster or served jobs): outside the fast lane.
pytestmark = pytest.mark.slow

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


@pytest.fixture(scope="module")
def trained(server, tmp_path_factory):
    """A folder with data, folds, a backbone and a head made through the server, and the config."""
    sock, _ = server
    d = tmp_path_factory.mktemp("trained")
    cfg = {**CFG, "device": "cpu", "model": {"name": "digits_cnn", "width": 8}, "pretrain": {"epochs": 1},
           "lp": {"max_iter": 2}, "finetune": {"epochs": 100000, "batch_size": 8}, "grid": {"lr": [0.001], "aug": ["minimal"],
           "mixup": [False]}}
    from foldsoup.config.schema import validate

    cfg = json.dumps(validate(cfg, check_paths=False))
    steps = [["prepare", "--out", "d.st"], ["folds", "--data", "d.st", "--out", "f.csv"],
             ["pretrain", "--data", "d.st", "--out", "b.st"],
             ["lp", "--data", "d.st", "--folds", "f.csv", "--backbone", "b.st", "--fold", "0", "--out", "h.st"]]
    for step in steps:
        assert run([step[0], "--config-json", cfg, *step[1:]], d, sock) == 0, (d / "job.log").read_text()
    return d, cfg


def _start_finetune(trained, sock, name: str) -> tuple[subprocess.Popen, Path]:
    """A served fine-tune that runs until stopped; returns once it finished its second epoch."""
    d, cfg = trained
    log = d / f"{name}.log"
    client = subprocess.Popen([sys.executable, "-m", "foldsoup", "finetune", "--config-json", cfg, "--data", "d.st",
                               "--folds", "f.csv", "--backbone", "b.st", "--head", "h.st", "--hp", "lr0.001_minimal_nomix",
                               "--fold", "0", "--out-dir", f"{name}-out", "--resume-dir", f"{name}-resume",
                               "--runtime-json", json.dumps({"device": "cpu", "finetune": {"resume_every_s": 0}})],
                              env={**ENV, "FOLDSOUP_JOB_SERVER": sock}, cwd=d, stderr=open(log, "w"))
    deadline = time.monotonic() + 60
    while "epoch 2/" not in log.read_text():
        assert client.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    return client, log


def test_killing_the_client_kills_its_job(server, trained):
    """kill -9 of a job must not leave its work running (a rerun would race with it)."""
    sock, server_pid = server
    client, _ = _start_finetune(trained, sock, "killed")
    assert _children(server_pid), "the job should run as a child of the server"
    client.send_signal(signal.SIGKILL)
    client.wait()
    deadline = time.monotonic() + 10
    while _children(server_pid):
        assert time.monotonic() < deadline, "the job outlived its killed client"
        time.sleep(0.1)


def test_ctrl_c_reaches_a_served_job_as_in_a_plain_process(server, trained):
    """SIGINT becomes KeyboardInterrupt in the job (before: the forked child died on the spot,
    so a save in progress left its temporary file); the client exits 130."""
    sock, _ = server
    client, log = _start_finetune(trained, sock, "interrupted")
    client.send_signal(signal.SIGINT)
    assert client.wait(30) == 128 + signal.SIGINT
    assert "KeyboardInterrupt" in log.read_text()
    resume = trained[0] / "interrupted-resume"
    assert [p.name for p in resume.iterdir()] == ["state.safetensors"]  # saved before each step; no temporary file


def test_the_job_sees_its_own_environment(server, trained, tmp_path):
    """A served job's TMPDIR (and every other variable) is the client's (before: only a few
    prefixes were passed on; TMPDIR stayed the server's)."""
    sock, _ = server
    d, cfg = trained
    cfg = json.dumps({**json.loads(cfg), "device": "auto"})  # auto: FOLDSOUP_FAKE_GPUS gives it a device slot
    jobtmp = tmp_path / "jobtmp"
    jobtmp.mkdir()
    env = {k: v for k, v in ENV.items() if k != "FOLDSOUP_GPU_LOCK_DIR"}
    env.update(FOLDSOUP_JOB_SERVER=sock, FOLDSOUP_FAKE_GPUS="1", TMPDIR=str(jobtmp))
    log = tmp_path / "pretrain.log"
    client = subprocess.Popen([sys.executable, "-m", "foldsoup", "pretrain", "--config-json", cfg, "--data", "d.st",
                               "--out", str(tmp_path / "b.st")], env=env, cwd=d, stderr=open(log, "w"))
    assert client.wait(120) == 0, log.read_text()
    job_pid = int(re.search(r"device slot 0 \(gpu-0.lock\) acquired .* \(pid (\d+)\)", log.read_text()).group(1))
    assert job_pid != client.pid  # it ran in the server
    # devices.py keeps its GPU slot locks in $TMPDIR/foldsoup-gpu-locks-<uid>.
    lock = jobtmp / f"foldsoup-gpu-locks-{os.getuid()}" / "gpu-0.lock"
    assert lock.read_text() == f"{job_pid}\n"

    # A variable the standard library reads at run time: COLUMNS sets argparse's line width.
    helps = {}
    for columns, sock_or_none in (("50", None), ("50", sock), ("200", None)):
        out = subprocess.run([sys.executable, "-m", "foldsoup", "--help"], capture_output=True, text=True, cwd=d,
                             env={**ENV, "COLUMNS": columns, **({"FOLDSOUP_JOB_SERVER": sock} if sock_or_none else {})})
        assert out.returncode == 0, out.stderr
        helps[columns, bool(sock_or_none)] = out.stdout
    assert helps["50", True] == helps["50", False] != helps["200", False]


def test_adopting_the_job_environment_is_exact(tmp_path):
    """What the forked child does first: its environment becomes exactly the job's (server-only
    variables gone), tempfile's cached $TMPDIR and torch's thread count follow."""
    script = """
import json, os, sys, tempfile
import torch
from foldsoup.zygote import adopt_environment

tempfile.gettempdir()  # cached, as the server's imports may have done
job = json.loads(sys.argv[1])
adopt_environment(job, default_threads=2)
first = {"env": dict(os.environ), "tmp": tempfile.gettempdir(), "threads": torch.get_num_threads()}
adopt_environment({k: v for k, v in job.items() if k != "OMP_NUM_THREADS"}, default_threads=2)
print(json.dumps([first, torch.get_num_threads()]))
"""
    job = {"TMPDIR": str(tmp_path), "HF_HOME": str(tmp_path / "hf"), "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
           "ARBITRARY_SETTING": "x y", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script, json.dumps(job)], capture_output=True, text=True,
                         env={**ENV, "SERVER_ONLY": "1", "HF_HOME": "/elsewhere", "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr
    first, threads_without = json.loads(out.stdout)
    assert first == {"env": job, "tmp": str(tmp_path), "threads": 1}
    assert threads_without == 2  # no OMP_NUM_THREADS: the count a plain process would get


def test_only_the_same_interpreter_uses_the_server(monkeypatch):
    """The decision (`use_server`): --sdm conda, a venv, a container, another checkout of
    foldsoup or other start-up variables make a job run itself; Snakemake's per-job variables
    (threads, TMPDIR) do not."""
    from foldsoup.zygote import identity, use_server

    server = identity()
    assert use_server(identity(), server)
    others = {
        "conda env": {"executable": "/opt/conda/envs/foldsoup/bin/python3.11", "prefix": "/opt/conda/envs/foldsoup"},
        "venv on the same python": {"prefix": "/home/u/venv"},
        "container": {"mount_namespace": "mnt:[4026532999]"},
        "other checkout": {"foldsoup": "/home/u/other/src/foldsoup"},
        "other PYTHONPATH": {"startup_env": {**server["startup_env"], "PYTHONPATH": "/elsewhere"}},
        "LD_LIBRARY_PATH": {"startup_env": {**server["startup_env"], "LD_LIBRARY_PATH": "/opt/cuda/lib64"}},
    }
    for name, change in others.items():
        assert not use_server({**server, **change}, server), name
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TMPDIR", "TMP", "HF_HOME"):
        monkeypatch.setenv(key, "3")
    assert use_server(identity(), server)


def test_a_client_of_another_interpreter_runs_the_step_itself(server, trained, tmp_path):
    """A real client in another interpreter (a venv on the same Python, as `--sdm conda` is
    another interpreter): the step runs in the client's own process, not in the server
    (before: the server ran it in its own interpreter)."""
    sock, _ = server
    d, cfg = trained
    cfg = json.dumps({**json.loads(cfg), "device": "auto"})  # auto: FOLDSOUP_FAKE_GPUS gives it a device slot
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    assert os.path.realpath(python) == os.path.realpath(sys.executable)  # the same binary: only the prefix differs
    # The venv sees this environment's packages (torch, ...) through a .pth file.
    site_dir = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    (site_dir / "parent.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    pids = {}
    for name, interpreter in (("venv", python), ("same", sys.executable)):
        env = {**ENV, "FOLDSOUP_JOB_SERVER": sock, "FOLDSOUP_FAKE_GPUS": "1",
               "FOLDSOUP_GPU_LOCK_DIR": str(tmp_path / "locks")}
        log = tmp_path / f"{name}.log"
        client = subprocess.Popen([str(interpreter), "-m", "foldsoup", "pretrain", "--config-json", cfg, "--data", "d.st",
                                   "--out", str(tmp_path / f"{name}.st")], env=env, cwd=d, stderr=open(log, "w"))
        assert client.wait(120) == 0, log.read_text()
        job_pid = int(re.search(r"acquired .* \(pid (\d+)\)", log.read_text()).group(1))
        pids[name] = job_pid == client.pid
    assert pids == {"venv": True, "same": False}  # ran itself / ran in the server
    from foldsoup.storage.weights import load_weights

    (venv_state, venv_meta), (same_state, same_meta) = (load_weights(tmp_path / f"{n}.st") for n in ("venv", "same"))
    assert venv_meta == same_meta and venv_state.keys() == same_state.keys()
    assert all(torch.equal(venv_state[k], same_state[k]) for k in venv_state)  # the same step, the same result


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


def test_server_removes_its_socket_folder_when_it_stops(tmp_path):
    """The Snakefile makes a /tmp/foldsoup-* folder for the socket; the server removes it when
    its starter is gone or on SIGTERM (before: every run left an empty folder)."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    folder = tmp_path / "foldsoup-a"
    folder.mkdir()
    proc = subprocess.run([sys.executable, "-m", "foldsoup.zygote", str(folder / "jobs.sock"), "--parent-pid",
                           str(gone.pid), "--remove-dir"], env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert not folder.exists()

    folder = tmp_path / "foldsoup-b"
    folder.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "foldsoup.zygote", str(folder / "jobs.sock"), "--remove-dir"],
                            env=ENV, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (folder / "jobs.sock").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.1)
    proc.terminate()
    assert proc.wait(10) == 0
    assert not folder.exists()


def test_a_workflow_run_leaves_no_socket_folder(tmp_path):
    """The real thing: Snakemake's onstart starts the server in a new $TMPDIR/foldsoup-* folder;
    after the run it is gone (the server stops within moments of Snakemake)."""
    from conftest import clean_env, snakemake

    tmp, results = tmp_path / "tmp", tmp_path / "results"
    tmp.mkdir()
    run = snakemake("--cores", "1", f"{results}/prepared/dataset.safetensors", "--config", f"results={results}",
                    env=clean_env(TMPDIR=str(tmp)))
    assert run.returncode == 0, run.tail()
    deadline = time.monotonic() + 60
    while list(tmp.glob("foldsoup-*")):
        assert time.monotonic() < deadline, f"left behind: {list(tmp.glob('foldsoup-*'))}"
        time.sleep(0.2)
