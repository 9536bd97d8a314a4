"""One device per running GPU job on a workstation (foldsoup.devices), tested without a GPU:
FOLDSOUP_FAKE_GPUS=N pretends N devices exist and jobs take flock slots among them.

Direct tests use small holder processes; the workflow tests run fine-tunes under Snakemake with
two fake GPUs, once with `--resources gpu=2` (the smoke run) and once with more GPU jobs at a
time than devices, and check from the job logs that no two jobs overlapping in time held the
same device."""

from __future__ import annotations

import re
import select
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import SMOKE, clean_env, copy_upstream, jobs_of, snakemake

HOLD = (
    "import sys\n"
    "from foldsoup.devices import place\n"
    "p = place('auto')\n"
    "print(p.slot, p.device, flush=True)\n"
    "sys.stdin.read()\n"  # hold the slot until stdin closes
)


class Holder:
    """A process that takes a device slot and holds it until release() or kill()."""

    def __init__(self, tmp_path: Path, name: str, **env: str):
        self.log = tmp_path / f"{name}.log"
        self._err = open(self.log, "w")
        self.proc = subprocess.Popen([sys.executable, "-c", HOLD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._err, text=True, env=clean_env(**env))

    def slot(self, timeout: float = 30) -> int | None:
        """The slot once taken; None if none was taken within `timeout` seconds."""
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        assert line, f"holder exited without a slot:\n{self.log.read_text()}"
        slot, device = line.split()
        assert device == "cpu"  # fake GPUs compute on the CPU
        return int(slot)

    def release(self) -> int:
        self.proc.stdin.close()
        return self.wait()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.wait()

    def wait(self) -> int:
        rc = self.proc.wait(timeout=30)
        self._err.close()
        return rc


@pytest.fixture
def holders(tmp_path):
    started: list[Holder] = []
    lock_dir = tmp_path / "locks"

    def start(name: str, fake: int = 2, **env: str) -> Holder:
        h = Holder(tmp_path, name, FOLDSOUP_FAKE_GPUS=str(fake), FOLDSOUP_GPU_LOCK_DIR=str(lock_dir), **env)
        started.append(h)
        return h

    start.lock_dir = lock_dir
    yield start
    for h in started:
        if h.proc.poll() is None:
            h.kill()


def test_two_jobs_get_different_slots(holders):
    a, b = holders("a"), holders("b")
    assert {a.slot(), b.slot()} == {0, 1}
    pids = {(holders.lock_dir / f"gpu-{i}.lock").read_text().strip() for i in (0, 1)}
    assert pids == {str(a.proc.pid), str(b.proc.pid)}
    assert a.release() == 0 and b.release() == 0
    text = a.log.read_text()
    assert re.search(r"device slot \d \(gpu-\d\.lock\) acquired at t=\d+\.\d{6}", text), text
    assert re.search(r"device slot \d \(gpu-\d\.lock\) released at t=\d+\.\d{6}", text), text


def test_a_killed_job_frees_its_slot(holders):
    a = holders("a")
    assert a.slot() == 0
    b = holders("b")
    assert b.slot() == 1
    a.kill()  # SIGKILL: no clean-up code runs, the kernel drops the lock
    c = holders("c")
    assert c.slot() == 0
    assert "released" not in a.log.read_text()


def test_a_third_job_waits_for_a_free_slot(holders):
    a, b = holders("a"), holders("b")
    slots = {a.slot(): a, b.slot(): b}
    c = holders("c", FOLDSOUP_GPU_WAIT_S="60")
    assert c.slot(timeout=2) is None  # both slots held: it waits
    assert "waiting for one to free" in c.log.read_text()
    assert slots[1].release() == 0
    assert c.slot() == 1
    assert re.search(r"acquired after waiting \d+\.\d s", c.log.read_text())


def test_the_wait_has_a_limit_and_a_clear_error(holders):
    a, b = holders("a"), holders("b")
    assert {a.slot(), b.slot()} == {0, 1}
    c = holders("c", FOLDSOUP_GPU_WAIT_S="0.5")
    assert c.wait() != 0
    assert "no free GPU among ['0', '1'] after 0.5 s (FOLDSOUP_GPU_WAIT_S" in c.log.read_text()


def test_cuda_visible_devices_name_the_lock_files(holders):
    a = holders("a", CUDA_VISIBLE_DEVICES="5,3")
    assert a.slot() == 0
    b = holders("b", CUDA_VISIBLE_DEVICES="5,3")
    assert b.slot() == 1
    assert sorted(p.name for p in holders.lock_dir.iterdir()) == ["gpu-3.lock", "gpu-5.lock"]
    assert (holders.lock_dir / "gpu-5.lock").read_text().strip() == str(a.proc.pid)
    # A job that sees physical GPU 3 as its only device still excludes the job holding it.
    c = holders("c", fake=1, CUDA_VISIBLE_DEVICES="3")
    assert c.slot(timeout=1.5) is None
    b.release()
    assert c.slot() == 0


@pytest.mark.slow
def test_one_slot_per_process_and_a_slurm_job_has_its_own_lock_folder(monkeypatch, tmp_path):
    from foldsoup import devices

    monkeypatch.setenv("FOLDSOUP_FAKE_GPUS", "2")
    monkeypatch.setenv("FOLDSOUP_GPU_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.setattr(devices, "_placement", None)  # forget what earlier tests in this process placed
    try:
        assert devices.place("cpu").slot is None  # an explicit CPU job takes no slot ...
        first, again = devices.place(), devices.place()  # ... and does not stop "auto" from taking one
        assert first == again and first.slot == 0 and len(devices._held) == 1
    finally:
        devices.release_slots()
    assert not devices._held
    monkeypatch.delenv("FOLDSOUP_GPU_LOCK_DIR")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert devices._lock_dir().name.endswith("-slurm4242")


# ------------------------------------------------------------------------ under Snakemake


@dataclass
class Hold:
    job: str
    slot: int
    lock: str
    start: float
    end: float
    waited: bool


def _holds(logs: list[Path]) -> list[Hold]:
    """Slot, lock file and [acquired, released] Unix times from each job log. The acquire line
    is written after the lock is taken and the release line before it is dropped, so each
    interval lies inside the real hold. Without a release line (a process that ended without
    running its exit handlers) the log's last write, also before the lock drops, ends it."""
    holds = []
    for log in logs:
        text = log.read_text()
        acq = re.search(r"device slot (\d+) \((\S+)\) acquired.* at t=(\d+\.\d+)", text)
        assert acq, f"{log}: no slot acquired\n{text}"
        rel = re.search(r"device slot \d+ \(\S+\) released at t=(\d+\.\d+)", text)
        end = float(rel.group(1)) if rel else log.stat().st_mtime
        holds.append(Hold(str(log), int(acq.group(1)), acq.group(2), float(acq.group(3)), end,
                          "waiting for one to free" in text))
    return holds


def _assert_no_shared_device(holds: list[Hold]) -> None:
    for i, a in enumerate(holds):
        assert a.start <= a.end, a
        for b in holds[i + 1 :]:
            if a.lock == b.lock:
                assert a.end <= b.start or b.end <= a.start, f"two jobs held {a.lock} at once:\n{a}\n{b}"


@pytest.mark.slow
def test_gpu_jobs_of_the_smoke_run_never_share_a_device(smoke_run):
    gpu_logs = [j.log for j in smoke_run.jobs if j.gpu]
    # pretrain, 2 lp, 4 finetune, 2 uniform_subsets, 2 greedy_fold, 3 soup_all (with the holdout's), gsgs, 2 budget
    assert len(gpu_logs) == 17
    holds = _holds(gpu_logs)
    assert {h.lock for h in holds} <= {"gpu-0.lock", "gpu-1.lock"}
    _assert_no_shared_device(holds)
    for job in (j for j in smoke_run.jobs if not j.gpu and j.rule != "all"):
        assert "device slot" not in job.log.read_text(), job  # CPU-only gather rules take no slot


@pytest.mark.slow
def test_more_gpu_jobs_than_devices_wait_for_a_free_one(smoke_run, tmp_path):
    results, lock_dir = tmp_path / "results", tmp_path / "locks"
    copy_upstream(smoke_run.results, results)
    overlay = tmp_path / "longer.yaml"
    overlay.write_text("finetune:\n  epochs: 20\n")  # hold each device long enough for jobs to queue
    targets = [str(results / "models" / hp / f"fold{i}" / "metrics.json")
               for hp in ("lr0.001_minimal_mixup", "lr0.001_minimal_nomix") for i in (0, 1)]
    env = clean_env(FOLDSOUP_FAKE_GPUS="2", FOLDSOUP_GPU_LOCK_DIR=str(lock_dir), FOLDSOUP_GPU_WAIT_S="300")
    run = snakemake(*targets, "--cores", "3", "--resources", "gpu=3", "--configfile", str(SMOKE), str(overlay),
                    "--config", f"results={results}", env=env)
    assert run.returncode == 0, run.tail()
    assert run.stats == {"finetune": 4, "total": 4}
    assert "Execute 3 jobs" in run.output  # three GPU jobs at once, two devices
    holds = _holds([j.log for j in jobs_of(run.output)])
    assert len(holds) == 4
    _assert_no_shared_device(holds)
    assert any(h.waited for h in holds), holds  # the third job waited for a device to free
    assert {h.slot for h in holds} == {0, 1}
