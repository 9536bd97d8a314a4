"""The real workflow on a real (local, single-node) SLURM cluster, against a local run.

`presets/smoke.yaml` (2 grid points x 2 folds x 1 epoch on digits, CPU) runs twice, at the same
time, each from its own scratch working directory (its own .snakemake/, so no lock clashes with
other runs in the checkout) with results in a tmp folder:

* through `--workflow-profile profiles/slurm` on the cluster that scripts/slurm-local.sh
  starts (2 fake GPUs through gres.conf);
* locally with `--cores 2` (profiles/default, as a workstation user runs it).

Asserted: every GPU rule (pretrain, lp, finetune, uniform_subsets, greedy_fold, soup_all, gsgs)
ran as its own SLURM job that was granted one GPU (sbatch `--gpus=1`; slurmctld's record of the
job, polled while it runs: JOB_GRES=gpu:1 and the device index GRES=gpu:1(IDX:n), which SLURM
exports as CUDA_VISIBLE_DEVICES; and, where the job log records it, the job's own
SLURM_JOB_ID/CUDA_VISIBLE_DEVICES); `-t`/`--mem` came from the config's `resources.*`; the
`localrules` were not submitted; and the results equal the local run's exactly (CPU training
is deterministic). The wall times and the sbatch lines are printed (`pytest -s`).

Skipped when no cluster can be had (not root, no apt-get, ...), except under CI (CI=true),
where that fails. A cluster this test started is stopped again at the end.
"""

from __future__ import annotations

import csv
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from slurm_cluster import REPO_ROOT

# Workflow runs (Snakemake, a SLURM cluster or served jobs): outside the fast lane.
pytestmark = pytest.mark.slow

SNAKEFILE = REPO_ROOT / "Snakefile"
BASE_CONFIG = REPO_ROOT / "config.yaml"
PRESET = REPO_ROOT / "presets" / "smoke.yaml"
PROFILE = REPO_ROOT / "profiles" / "slurm"
RUN_TIMEOUT_S = 480  # per snakemake run; the whole test takes ~3-4 min on 2 busy cores

# Test-only `resources` overlay (both runs get it). Distinct values per kind, so the sbatch
# lines show which kind each rule used; small enough for any CI node (the schema defaults ask
# 16 GB for the soups rules: fine for a real cluster, more than a small CI VM's node has).
RESOURCES = {
    "default": {"runtime": 11, "mem_mb": 1500},
    "finetune": {"runtime": 12, "mem_mb": 1600},
    "soups": {"runtime": 13, "mem_mb": 1700},
}
# GPU rule -> its `resources` kind (workflow/rules/*.smk).
GPU_RULES = {
    "pretrain": "default",
    "lp": "default",
    "finetune": "finetune",
    "uniform_subsets": "soups",
    "greedy_fold": "soups",
    "soup_all": "soups",
    "gsgs": "soups",
    "budget": "soups",
}
LOCAL_RULES = {"prepare", "folds", "models_table", "methods", "ship", "reliability", "figures", "summary", "budget_table"}
# Tables that must match the local run's byte for byte (models.csv holds no timings: they are in
# each model's metrics.json).
EXACT_TABLES = ["models.csv", "methods.csv", "uniform_subsets.csv", "reliability.csv"]


def _expected_job_counts() -> dict[str, int]:
    base, preset = (yaml.safe_load(p.read_text()) for p in (BASE_CONFIG, PRESET))
    k = preset["folds"]["k"]
    holdout = {**base.get("folds", {}), **preset.get("folds", {})}.get("holdout_fraction", 0) > 0
    n_hp = math.prod(len(v) for v in preset["grid"].values())
    return {
        "pretrain": 1,
        "lp": k,
        "finetune": n_hp * k,
        "uniform_subsets": n_hp,
        "greedy_fold": k,
        "soup_all": 3 if holdout else 2,  # uniform, greedy (+ greedy on the outer holdout)
        "gsgs": 1,
        "budget": k,  # one job per fold count
    }


def _clean_env() -> dict[str, str]:
    """The test's environment without anything that would steer device choice or SLURM."""
    drop_prefixes = ("SLURM_", "SBATCH_", "SRUN_", "FOLDSOUP_")  # FOLDSOUP_: fake GPUs, job server
    return {k: v for k, v in os.environ.items() if not k.startswith(drop_prefixes) and k != "CUDA_VISIBLE_DEVICES"}


def _snakemake() -> str:
    exe = Path(sys.executable).with_name("snakemake")
    return str(exe) if exe.exists() else "snakemake"


def _start(cmd: list[str], cwd: Path, log_path: Path, niceness: int = 0) -> subprocess.Popen:
    log = open(log_path, "w")
    try:
        return subprocess.Popen(cmd, cwd=cwd, env=_clean_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, text=True,
                                preexec_fn=(lambda: os.nice(niceness)) if niceness else None)
    finally:
        log.close()


def _wait_all(procs: dict[str, subprocess.Popen], t0: float, timeout: float) -> tuple[dict, dict]:
    """Wait for the runs; return their exit codes and wall times (s since t0). Past the
    timeout, interrupt what still runs (snakemake then scancels its SLURM jobs)."""
    rcs: dict[str, int] = {}
    walls: dict[str, float] = {}
    while len(rcs) < len(procs):
        for name, proc in procs.items():
            if name not in rcs and proc.poll() is not None:
                rcs[name], walls[name] = proc.returncode, time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            for name, proc in procs.items():
                if name not in rcs:
                    os.killpg(proc.pid, signal.SIGINT)
                    try:
                        proc.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait()
                    rcs[name], walls[name] = -1, time.monotonic() - t0
        time.sleep(0.5)
    return rcs, walls


class JobRecorder(threading.Thread):
    """Polls `scontrol -d -o show job` (slurmctld's own record) while the workflow runs.

    A finished job's record loses the device index, so the index is kept from the polls that
    saw the job running (every job runs for several seconds: Snakemake starts inside it).
    """

    FIELD = re.compile(r"(?:^|\s)([A-Za-z_/:]+)=(\S*)")

    def __init__(self, interval: float = 1.0):
        super().__init__(daemon=True)
        self.interval = interval
        self.jobs: dict[str, dict[str, str]] = {}
        self.gpu_index: dict[str, str] = {}
        self._stop_event = threading.Event()

    def poll(self) -> None:
        try:
            res = subprocess.run(["scontrol", "-d", "-o", "show", "job"], capture_output=True, text=True,
                                 timeout=20, check=False)
        except subprocess.TimeoutExpired:
            return
        for line in res.stdout.splitlines():
            fields = dict(self.FIELD.findall(line))
            job_id = fields.get("JobId")
            if not job_id:
                continue
            self.jobs.setdefault(job_id, {}).update(fields)
            idx = re.search(r"gpu(?::[^(\s]*)?\(IDX:([\d,\-]+)\)", fields.get("GRES", ""))
            if idx:
                self.gpu_index[job_id] = idx.group(1)

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.poll()
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=30)
        self.poll()  # final states (finished jobs stay listed for MinJobAge = 300 s)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _tensors(path: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(path))


def _job_env(log_text: str) -> dict[str, str]:
    """SLURM_JOB_ID / CUDA_VISIBLE_DEVICES as a foldsoup job log records them (if it does)."""
    found = {}
    for key in ("SLURM_JOB_ID", "CUDA_VISIBLE_DEVICES"):
        m = re.search(rf"\b{key}=([^\s,;)]*)", log_text)
        if m:
            found[key] = m.group(1)
    return found


def test_smoke_preset_on_slurm_equals_local_run(local_slurm, tmp_path):
    overlay = tmp_path / "test-resources.yaml"
    overlay.write_text(yaml.safe_dump({"resources": RESOURCES}))
    configfiles = [str(BASE_CONFIG), str(PRESET), str(overlay)]
    results = {"slurm": tmp_path / "slurm", "local": tmp_path / "local"}
    workdirs = {name: tmp_path / f"wd-{name}" for name in results}
    for wd in workdirs.values():
        wd.mkdir()
    # The Snakefile's `configfile: "config.yaml"` is relative to the working directory, hence
    # the explicit --configfile of the checkout's config.yaml first.
    base = [_snakemake(), "-s", str(SNAKEFILE), "--configfile", *configfiles]
    slurm_cmd = [
        *base, "--config", f"results={results['slurm']}",
        "--workflow-profile", str(PROFILE),
        # Test-only: keep the SLURM logs of successful jobs (the profile deletes them); poll
        # sooner than the profile's 20 s: the plugin waits this long after a check that saw a
        # job finish, +10 s after each check that saw none (checks 1, 12, 33 s on), which suits
        # these 10-30 s jobs best; print the sbatch calls (--verbose); a failure is a failure
        # (no retries).
        "--slurm-keep-successful-logs",
        "--slurm-init-seconds-before-status-checks", "1",
        "--latency-wait", "5",
        "--retries", "0",
        "--verbose",
    ]  # fmt: skip
    local_cmd = [*base, "--config", f"results={results['local']}", "--cores", "2"]
    logs = {name: tmp_path / f"snakemake-{name}.log" for name in results}

    # Both at once: the SLURM run mostly waits (job start-up, status polls), the local run
    # fills the gaps, niced, as the SLURM jobs are the critical path. Each run has its own
    # working directory, hence its own .snakemake/ and locks.
    recorder = JobRecorder()
    recorder.start()
    t0 = time.monotonic()
    procs = {
        "slurm": _start(slurm_cmd, workdirs["slurm"], logs["slurm"]),
        "local": _start(local_cmd, workdirs["local"], logs["local"], niceness=10),
    }
    rcs, walls = _wait_all(procs, t0, RUN_TIMEOUT_S)
    recorder.stop()
    text = {name: logs[name].read_text() for name in results}

    sbatch_lines = [line.split("sbatch call:", 1)[1].strip() for line in text["slurm"].splitlines()
                    if "sbatch call:" in line]
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+) \(log: (\S+?)\)", text["slurm"])
    print(f"\nwall time: SLURM run {walls['slurm']:.0f} s, local run {walls['local']:.0f} s (concurrently)")
    print(f"{len(sbatch_lines)} sbatch calls (the --wrap'ed snakemake command cut off):")
    for line in sbatch_lines:
        print("  " + line.split(" --wrap=", 1)[0])
    for job_id, log_path in submitted:
        rec = recorder.jobs.get(job_id, {})
        print(f"  job {job_id}: {Path(log_path).parent.relative_to(workdirs['slurm'] / '.snakemake' / 'slurm_logs')}"
              f"  {rec.get('JobState', '?')} JOB_GRES={rec.get('JOB_GRES', '?')} IDX={recorder.gpu_index.get(job_id, '?')}"
              f" {rec.get('StartTime', '?')[11:]}-{rec.get('EndTime', '?')[11:]} ({rec.get('RunTime', '?')})")
    for name in results:
        assert rcs[name] == 0, f"{name} run failed (rc {rcs[name]}); log {logs[name]}:\n{text[name][-6000:]}"

    # --- Every GPU rule ran as SLURM jobs, one per Snakemake job, each asking for one GPU and
    # the config's runtime/memory; the localrules were not submitted.
    expected = _expected_job_counts()
    by_rule: dict[str, list[str]] = {}
    for line in sbatch_lines:
        m = re.search(r"slurm_logs/rule_([^/\s]+)/", line)
        assert m, line
        rule = m.group(1)
        by_rule.setdefault(rule, []).append(line)
        assert rule in GPU_RULES, f"rule {rule} was submitted to SLURM but should be a localrule: {line}"
        res = RESOURCES[GPU_RULES[rule]]
        assert "--gpus=1" in line.split(" --wrap=", 1)[0], line
        assert re.search(rf"(?:^|\s)-t {res['runtime']}(?:\s|$)", line), f"{rule}: not -t {res['runtime']}: {line}"
        assert re.search(rf"(?:^|\s)--mem {res['mem_mb']}(?:\s|$)", line), f"{rule}: not --mem {res['mem_mb']}: {line}"
    assert {r: len(v) for r, v in by_rule.items()} == expected
    assert not LOCAL_RULES & set(by_rule)
    for rule in LOCAL_RULES:
        assert re.search(rf"^localrule {rule}:", text["slurm"], re.MULTILINE), f"{rule} did not run on the submit host"

    # --- slurmctld's record: each job completed and was granted one GPU (by index).
    assert len(submitted) == sum(expected.values()), submitted
    for job_id, log_path in submitted:
        rule = re.search(r"slurm_logs/rule_([^/\s]+)/", log_path).group(1)
        rec = recorder.jobs.get(job_id)
        assert rec, f"job {job_id} ({rule}) never seen by scontrol"
        assert rec.get("JobState") == "COMPLETED", (job_id, rule, rec.get("JobState"))
        assert rec.get("JOB_GRES") == "gpu:1", (job_id, rule, rec.get("JOB_GRES"), rec.get("TresPerJob"))
        assert recorder.gpu_index.get(job_id) in {"0", "1"}, (job_id, rule, "no GPU index seen while running")
        # The plugin's per-job log, kept by --slurm-keep-successful-logs.
        slurm_log = Path(log_path)
        assert slurm_log.is_file() and slurm_log.stem == job_id, log_path
        assert "1 of 1 steps (100%) done" in slurm_log.read_text(), slurm_log

    # Two jobs that ran at the same time never held the same GPU (times to the second).
    spans = [(recorder.jobs[j]["StartTime"], recorder.jobs[j]["EndTime"], recorder.gpu_index[j], j) for j, _ in submitted]
    for s1, e1, g1, j1 in spans:
        for s2, e2, g2, j2 in spans:
            if j1 < j2 and g1 == g2:
                assert e1 <= s2 or e2 <= s1, f"jobs {j1} and {j2} overlapped on GPU {g1}"

    # --- The foldsoup job logs: each GPU job logged where it computes; where the log also
    # records SLURM's job id and CUDA_VISIBLE_DEVICES, they must be the job's and its GPU's.
    gpu_log_names = {"pretrain", "lp", "finetune", "uniform_subsets", "greedy_fold", "uniform_soup", "greedy_soup",
                     "greedy_soup_holdout", "gsgs", "budget"}
    gpu_logs = [p for p in (results["slurm"] / "logs").rglob("*.log")
                if p.relative_to(results["slurm"] / "logs").parts[0].removesuffix(".log") in gpu_log_names]
    assert len(gpu_logs) == sum(expected.values()), sorted(map(str, gpu_logs))
    recorded = 0
    for p in gpu_logs:
        log_text = p.read_text()
        assert "device: " in log_text, f"{p} does not say where the job computed"
        env = _job_env(log_text)
        if env:
            recorded += 1
            job_id = env.get("SLURM_JOB_ID", "")
            assert job_id in recorder.jobs, f"{p}: SLURM_JOB_ID={job_id!r} is not one of this run's jobs"
            assert env.get("CUDA_VISIBLE_DEVICES") == recorder.gpu_index.get(job_id), (p, env)
    assert recorded == len(gpu_logs), f"only {recorded} of {len(gpu_logs)} job logs record SLURM_JOB_ID/CUDA_VISIBLE_DEVICES"

    # --- The same results as the local run.
    slurm_tables, local_tables = results["slurm"] / "tables", results["local"] / "tables"
    slurm_models, local_models = _read_csv(slurm_tables / "models.csv"), _read_csv(local_tables / "models.csv")
    assert len(slurm_models) == expected["finetune"]

    accs = {name: [(r["hp"], r["fold"], r["val_acc"], r["test_acc"]) for r in rows]
            for name, rows in (("slurm", slurm_models), ("local", local_models))}
    assert accs["slurm"] == accs["local"], (
        "val_acc/test_acc differ between the SLURM and the local run (hp, fold, val_acc, test_acc):\n"
        f"SLURM: {accs['slurm']}\nlocal: {accs['local']}")
    for name in EXACT_TABLES:
        assert (slurm_tables / name).read_text() == (local_tables / name).read_text(), f"tables/{name} differs"
    # The weights themselves, bit for bit: every fine-tune and every soup.
    weight_files = sorted(p.relative_to(results["local"]) for p in results["local"].rglob("*.safetensors"))
    weight_files = [p for p in weight_files if ".resume" not in p.parts]
    assert {p for p in weight_files if p.parts[0] == "models"}, weight_files
    for rel in weight_files:
        a, b = _tensors(results["slurm"] / rel), _tensors(results["local"] / rel)
        assert a.keys() == b.keys(), rel
        for key in a:
            assert a[key].dtype == b[key].dtype and (a[key] == b[key]).all(), f"{rel}: tensor {key} differs"
    print(f"identical: {', '.join(EXACT_TABLES)}, {len(weight_files)} weight files")
