"""Helpers for tests that need a real SLURM cluster on localhost.

Not a test module. Use from a test or a session-scoped fixture::

    from slurm_cluster import ensure_local_slurm, skip_or_fail

    reason = ensure_local_slurm()
    if reason:
        skip_or_fail(reason)   # pytest.skip, but pytest.fail under CI

`ensure_local_slurm()` returns None when a usable cluster is up (a node that
is idle/mixed/allocated and offers gpu GRES), starting one with
``scripts/slurm-local.sh`` when that is possible and allowed; otherwise it
returns a human-readable reason.

Starting is allowed when running as root, unless FOLDSOUP_SLURM_AUTOSTART=0.
A cluster this module started can be stopped again with `stop_local_slurm()`
(the test fixtures do that at session end, leaving the machine as found).
Under CI (env CI set and not "false"/"0") a missing cluster is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "slurm-local.sh"

_USABLE_STATES = {"idle", "mix", "alloc", "comp"}
_cache: dict[str, object] = {}


def in_ci() -> bool:
    """True when running under CI, where SLURM tests must not be skipped."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def cluster_problem() -> str | None:
    """None if a SLURM node with gpu GRES is up and usable, else why not."""
    if shutil.which("sinfo") is None or shutil.which("scontrol") is None:
        return "SLURM client tools (sinfo, scontrol) are not installed"
    try:
        # Answers at once; sinfo alone retries a dead controller for ~9 s.
        ping = _run(["scontrol", "ping"], timeout=15)
    except subprocess.TimeoutExpired:
        return "scontrol ping timed out (slurmctld not answering)"
    if "is UP" not in ping.stdout:
        return "slurmctld is not running (scontrol ping: DOWN)"
    try:
        res = _run(["sinfo", "--noheader", "--format=%t|%G"], timeout=15)
    except subprocess.TimeoutExpired:
        return "sinfo timed out (slurmctld not answering)"
    if res.returncode != 0:
        return f"sinfo failed: {(res.stderr or res.stdout).strip()[:200]}"
    rows = [line.split("|", 1) for line in res.stdout.split() if "|" in line]
    usable = [gres for state, gres in rows if state.rstrip("*~#$@^-") in _USABLE_STATES]
    if not usable:
        states = ", ".join(state for state, _ in rows) or "no nodes"
        return f"no usable SLURM node (states: {states})"
    if not any("gpu" in gres for gres in usable):
        return "SLURM is up but no node offers gpu GRES"
    return None


def _start_problem() -> str | None:
    """Why this process may not start the local cluster, or None."""
    if os.name != "posix" or not Path("/proc").is_dir():
        return "the local SLURM cluster needs Linux"
    if os.environ.get("FOLDSOUP_SLURM_AUTOSTART", "1").strip() == "0":
        return "FOLDSOUP_SLURM_AUTOSTART=0 forbids starting a local SLURM cluster"
    if os.geteuid() != 0:
        return (
            "not root, so cannot start a local SLURM cluster "
            f"(run `sudo {SCRIPT}` first, then the tests)"
        )
    if not SCRIPT.is_file():
        return f"{SCRIPT} is missing"
    if shutil.which("bash") is None:
        return "bash is not available"
    have_slurm = all(shutil.which(t) for t in ("slurmctld", "slurmd", "munged"))
    if not have_slurm and shutil.which("apt-get") is None:
        return "SLURM is not installed and apt-get is not available to install it"
    return None


def ensure_local_slurm(timeout: float = 600) -> str | None:
    """Make sure a SLURM cluster is usable; None on success, else the reason.

    The result is cached for the process (session scope).
    """
    if "reason" in _cache:
        return _cache["reason"]  # type: ignore[return-value]
    reason = cluster_problem()
    if reason is not None:
        why_not = _start_problem()
        if why_not is not None:
            reason = f"{reason}; {why_not}"
        else:
            try:
                res = _run(["bash", str(SCRIPT), "start"], timeout=timeout)
            except subprocess.TimeoutExpired:
                res = None
            if res is None:
                reason = f"{SCRIPT} start timed out after {timeout:.0f}s"
            elif res.returncode != 0:
                tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-15:])
                reason = f"{SCRIPT} start failed (exit {res.returncode}):\n{tail}"
            else:
                _cache["started"] = True
                reason = cluster_problem()
    _cache["reason"] = reason
    return reason


def started_by_us() -> bool:
    """True if ensure_local_slurm() started the cluster in this process."""
    return bool(_cache.get("started"))


def stop_local_slurm() -> None:
    """Stop the cluster if this process started it (no-op otherwise)."""
    if started_by_us():
        _run(["bash", str(SCRIPT), "stop"], timeout=120)
        _cache.clear()


def skip_or_fail(reason: str) -> None:
    """pytest.skip(reason), or pytest.fail(reason) under CI."""
    import pytest

    if in_ci():
        pytest.fail(f"SLURM required under CI: {reason}")
    pytest.skip(reason)
