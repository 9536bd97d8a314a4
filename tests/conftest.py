"""Shared fixtures: running Snakemake as users do, and one tiny real run of the smoke preset
(2 grid points x 2 folds x 1 epoch) that several test modules read.

Runs go to temporary results folders through `--config results=<tmp>`, from the repository root
with the default workflow profile (profiles/default, loaded by Snakemake itself) and `--cores`
given explicitly. Jobs never talk to a job server started by another run.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"
SMOKE = ROOT / "presets" / "smoke.yaml"
# Inputs of the fine-tunes: copying them gives a results folder where only fine-tunes and what
# follows them are left to run (copied files keep their times and carry no Snakemake metadata).
UPSTREAM = ("prepared", "folds.csv", "pretrained", "lp")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without foldsoup's test and server switches, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FOLDSOUP_")}
    env.update(extra)
    return env


def job_stats(output: str) -> dict[str, int]:
    """The first "Job stats" table of a Snakemake run or dry run, as {rule: count} (with "total")."""
    lines = output.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Job stats:")
    except StopIteration:
        return {}
    stats = {}
    for line in lines[start + 3 :]:  # past "job count" and the dashes
        m = re.fullmatch(r"\s*(\w+)\s+(\d+)\s*", line)
        if not m:
            break
        stats[m.group(1)] = int(m.group(2))
    return stats


@dataclass
class Run:
    args: list[str]
    returncode: int
    output: str  # stdout and stderr together, as a user sees them
    seconds: float
    stats: dict[str, int] = field(default_factory=dict)

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.output.splitlines()[-n:])


def snakemake(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> Run:
    """Run `snakemake <args>` from the repository root (the default profile applies)."""
    cmd = [str(SNAKEMAKE), *args]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env or clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)
    run = Run(cmd, proc.returncode, proc.stdout, time.monotonic() - t0)
    run.stats = job_stats(proc.stdout)
    return run


def copy_upstream(src_results: Path, dest_results: Path) -> None:
    """Copy the data, folds, backbone and heads of a finished run (times kept)."""
    dest_results.mkdir(parents=True, exist_ok=True)
    for name in UPSTREAM:
        src = src_results / name
        if src.is_dir():
            shutil.copytree(src, dest_results / name)
        else:
            shutil.copy2(src, dest_results / name)


@dataclass
class Job:
    rule: str
    log: Path | None
    benchmark: Path | None
    gpu: bool
    wildcards: str
    shell: str | None = None


def jobs_of(output: str) -> list[Job]:
    """The jobs a (non-quiet) Snakemake run printed: rule, log, benchmark, gpu resource, command."""
    jobs: list[Job] = []
    current: dict | None = None
    for line in output.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):$", line)
        if m:
            current = {"rule": m.group(1), "log": None, "benchmark": None, "gpu": False, "wildcards": ""}
            jobs.append(current)  # type: ignore[arg-type]
            continue
        if current is None:
            continue
        m = re.match(r"^\s+(log|benchmark|resources|wildcards): (.*)$", line)
        if m:
            key, value = m.groups()
            if key in ("log", "benchmark"):
                current[key] = Path(value.split(",")[0].strip())
            elif key == "resources":
                current["gpu"] = bool(re.search(r"\bgpu=1\b", value))
            else:
                current["wildcards"] = value
        elif line.startswith("Shell command: "):
            current["shell"] = line[len("Shell command: "):]
    return [Job(**j) if isinstance(j, dict) else j for j in jobs]


def shell_argv(job: Job) -> list[str]:
    """A printed shell command as argv, `$(dirname X)` resolved, without the log redirection."""
    assert job.shell, f"no shell command printed for {job.rule} (printshellcmds off?)"
    text = re.sub(r"\$\(dirname (\S+)\)", lambda m: os.path.dirname(m.group(1)), job.shell)
    argv = shlex.split(text)
    return argv[: argv.index("2>")] if "2>" in argv else argv


@dataclass
class SmokeRun:
    """A finished run of presets/smoke.yaml with two fake GPUs (`--resources gpu=2`)."""

    results: Path
    lock_dir: Path
    run: Run

    @property
    def jobs(self) -> list[Job]:
        return jobs_of(self.run.output)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> SmokeRun:
    base = tmp_path_factory.mktemp("smoke")
    results, lock_dir = base / "results", base / "gpu-locks"
    env = clean_env(FOLDSOUP_FAKE_GPUS="2", FOLDSOUP_GPU_LOCK_DIR=str(lock_dir))
    run = snakemake("--cores", "2", "--resources", "gpu=2", "--printshellcmds", "--configfile", str(SMOKE),
                    "--config", f"results={results}", env=env)
    assert run.returncode == 0, f"smoke run failed:\n{run.tail()}"
    return SmokeRun(results, lock_dir, run)


@pytest.fixture(scope="session")
def local_slurm():
    """A one-node SLURM on localhost for the SLURM tests (skipped with the reason where it
    cannot run, required under CI=true); stopped at the end if this session started it."""
    from slurm_cluster import ensure_local_slurm, skip_or_fail, stop_local_slurm

    reason = ensure_local_slurm()
    if reason:
        skip_or_fail(reason)
    yield
    stop_local_slurm()
