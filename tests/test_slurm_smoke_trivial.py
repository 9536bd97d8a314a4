"""End-to-end: profiles/slurm drives a real (local, single-node) SLURM cluster.

A throwaway two-rule Snakefile: three `resources: gpu=1` jobs, each of which
must run as its own SLURM job and be given one (fake) GPU, and one local
gather rule. Skipped when no cluster can be had, except under CI.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from slurm_cluster import REPO_ROOT

# Workflow runs (Snakemake, a SLURM cluster or served jobs): outside the fast lane.
pytestmark = pytest.mark.slow

PROFILE = REPO_ROOT / "profiles" / "slurm"
N_GPU_JOBS = 3
TIME_BUDGET_S = 120

SNAKEFILE = textwrap.dedent(
    """
    localrules: gather

    rule all:
        input: "gather.txt"

    rule gpu_job:
        output: "gpu/{i}.txt"
        resources: gpu=1, runtime=5, mem_mb=200
        shell:
            '''
            {{
              echo "CUDA_VISIBLE_DEVICES=${{CUDA_VISIBLE_DEVICES:-}}"
              echo "SLURM_JOB_ID=${{SLURM_JOB_ID:-}}"
              echo "I={wildcards.i}"
              scontrol show job "${{SLURM_JOB_ID:-none}}" | tr ' ' '\\n' | grep -iE 'gres|tres|gpu'
            }} > {output}
            '''

    rule gather:
        input: expand("gpu/{i}.txt", i=range(%d))
        output: "gather.txt"
        shell:
            '''
            {{
              echo "GATHER_SLURM_JOB_ID=${{SLURM_JOB_ID:-}}"
              grep -h '^I=' {input}
            }} > {output}
            '''
    """
    % N_GPU_JOBS
)


def _parse(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key.isupper():
            out.setdefault(key, value)
    return out


def test_gpu_jobs_run_as_slurm_jobs_with_a_gpu(local_slurm, tmp_path):
    (tmp_path / "Snakefile").write_text(SNAKEFILE)
    snakemake = Path(sys.executable).with_name("snakemake")
    cmd = [
        str(snakemake) if snakemake.exists() else "snakemake",
        "--profile", str(PROFILE),
        "--workflow-profile", "none",
        # Test-only overrides: keep the SLURM logs of successful jobs (the
        # profile deletes them) and poll sooner (a 2 s job, not hours).
        "--slurm-keep-successful-logs",
        "--slurm-init-seconds-before-status-checks", "3",
        "--latency-wait", "5",
        "--verbose",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    t0 = time.monotonic()
    res = subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIME_BUDGET_S
    )
    wall = time.monotonic() - t0
    log = res.stdout + res.stderr
    (tmp_path / "snakemake.log").write_text(log)
    sbatch_lines = [line.strip() for line in log.splitlines() if "sbatch call:" in line]
    print(f"\nsnakemake wall time: {wall:.1f}s")
    print("\n".join(sbatch_lines))
    assert res.returncode == 0, log[-4000:]
    assert wall < TIME_BUDGET_S

    # Three submissions, each for one GPU, none for the local gather rule.
    assert len(sbatch_lines) == N_GPU_JOBS, log[-4000:]
    assert all("--gpus=1" in line for line in sbatch_lines)
    assert not any("rule_gather" in line for line in sbatch_lines)

    job_ids = set()
    for i in range(N_GPU_JOBS):
        out = tmp_path / "gpu" / f"{i}.txt"
        info = _parse(out)
        text = out.read_text()
        assert re.fullmatch(r"\d+", info.get("SLURM_JOB_ID", "")), text
        assert info.get("CUDA_VISIBLE_DEVICES") in {"0", "1"}, text
        assert info.get("I") == str(i)
        assert re.search(r"gres[:/]gpu", text, re.IGNORECASE), text
        job_ids.add(info["SLURM_JOB_ID"])
    assert len(job_ids) == N_GPU_JOBS  # one SLURM job per Snakemake job

    # Each job's SLURM log is <jobid>.log under .snakemake/slurm_logs/rule_gpu_job/.
    logs = list((tmp_path / ".snakemake" / "slurm_logs" / "rule_gpu_job").rglob("*.log"))
    assert {p.stem for p in logs} == job_ids, [str(p) for p in logs]

    # The gather ran on the submit host, not as a SLURM job, and saw all inputs.
    gather = (tmp_path / "gather.txt").read_text().splitlines()
    assert gather[0] == "GATHER_SLURM_JOB_ID="
    assert gather[1:] == [f"I={i}" for i in range(N_GPU_JOBS)]
