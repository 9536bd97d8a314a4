"""Which device a job computes on, and one GPU per running job on a workstation.

`snakemake --resources gpu=2` only counts GPU jobs; it never says which GPU a job gets, so two
jobs would both land on device 0. Each job here takes a non-blocking `flock` on one per-device
lock file and holds it for the life of the process (the kernel frees it if the job is killed).
Under SLURM (or when the user narrowed CUDA_VISIBLE_DEVICES) the visible devices are already
the job's own and slots are taken among them.

FOLDSOUP_FAKE_GPUS=N pretends N devices exist (computing on the CPU) so the slot logic can be
tested on machines without GPUs.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

_held = []  # open lock files, kept for the process lifetime


@dataclass(frozen=True)
class Placement:
    device: str  # torch device string: "cpu" or "cuda:<i>"
    slot: int | None  # index of the held lock (GPU number among the visible ones), None on CPU
    note: str


def _lock_dir() -> Path:
    default = Path(tempfile.gettempdir()) / f"foldsoup-gpu-locks-{os.getuid()}"
    path = Path(os.environ.get("FOLDSOUP_GPU_LOCK_DIR", default))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _visible_ids(count: int) -> list[str]:
    """Names of the visible devices, used to name lock files so two jobs that see the same
    physical GPU under different indices still exclude each other."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        if len(ids) >= count:
            return ids[:count]
    return [str(i) for i in range(count)]


def acquire_slot(count: int, wait_s: float = 3600.0, poll_s: float = 0.5) -> int:
    """Take the first free of `count` device locks; wait (polling) if all are held."""
    ids = _visible_ids(count)
    lock_dir = _lock_dir()
    deadline = time.monotonic() + wait_s
    while True:
        for slot, dev_id in enumerate(ids):
            handle = open(lock_dir / f"gpu-{dev_id}.lock", "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            _held.append(handle)
            return slot
        if time.monotonic() > deadline:
            raise TimeoutError(f"no free GPU among {ids} after {wait_s:.0f} s (locks in {lock_dir})")
        time.sleep(poll_s)


def place(preference: str = "auto") -> Placement:
    """Decide where this job computes; on GPUs, hold a device slot for the process lifetime."""
    fake = int(os.environ.get("FOLDSOUP_FAKE_GPUS", "0") or 0)
    if fake > 0 and preference != "cpu":
        slot = acquire_slot(fake)
        return Placement("cpu", slot, f"fake GPU slot {slot} of {fake} (FOLDSOUP_FAKE_GPUS), computing on CPU")
    import torch

    if preference == "cpu" or not torch.cuda.is_available():
        if preference == "cuda":
            raise RuntimeError("device: cuda was asked for, but torch sees no GPU")
        return Placement("cpu", None, "CPU")
    count = torch.cuda.device_count()
    if os.environ.get("SLURM_JOB_ID") and count == 1:
        return Placement("cuda:0", 0, f"GPU {os.environ.get('CUDA_VISIBLE_DEVICES', '0')} given by SLURM")
    slot = acquire_slot(count)
    return Placement(f"cuda:{slot}", slot, f"GPU slot {slot} of {count} ({torch.cuda.get_device_name(slot)})")
