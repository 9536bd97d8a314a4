"""Which device a job computes on, and one GPU per running job on a workstation.

`snakemake --resources gpu=2` only counts GPU jobs; it never says which GPU a job gets, so two
jobs would both land on device 0. Each job here takes a non-blocking `flock` on one per-device
lock file and holds it for the life of the process (the kernel frees it if the job is killed).
Under SLURM (or when the user narrowed CUDA_VISIBLE_DEVICES) the visible devices are already
the job's own and slots are taken among them.

FOLDSOUP_FAKE_GPUS=N pretends N devices exist (computing on the CPU) so the slot logic can be
tested on machines without GPUs.

Environment:
  FOLDSOUP_GPU_LOCK_DIR  folder of the lock files (default: $TMPDIR/foldsoup-gpu-locks-<uid>,
                         with -slurm<jobid> appended inside a SLURM job, whose devices are its own)
  FOLDSOUP_GPU_WAIT_S    give up (error) after this many seconds without a free device
                         (default: wait as long as it takes, e.g. more jobs than GPUs)
  FOLDSOUP_FAKE_GPUS     pretend this many GPUs exist (tests), computing on the CPU

The job log gets one line when a slot is taken and one when it is given back (at process exit),
each with the Unix time to the microsecond, so overlaps between jobs can be checked afterwards.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from foldsoup.errors import ConfigError, NoFreeDevice

_held: list[tuple[int, str, object]] = []  # (slot, lock file, open handle), kept for the process lifetime
_placement: "Placement | None" = None  # this process's placement: place() decides once


@dataclass(frozen=True)
class Placement:
    device: str  # torch device string: "cpu" or "cuda:<i>"
    slot: int | None  # index of the held lock (GPU number among the visible ones), None on CPU
    note: str


def _lock_dir() -> Path:
    default = Path(tempfile.gettempdir()) / f"foldsoup-gpu-locks-{os.getuid()}"
    if os.environ.get("SLURM_JOB_ID"):
        # Inside a SLURM job the visible devices are the job's own (often renumbered from 0), so
        # slots are shared only among the processes of this job, never with other jobs on the node.
        default = default.with_name(f"{default.name}-slurm{os.environ['SLURM_JOB_ID']}")
    path = Path(os.environ.get("FOLDSOUP_GPU_LOCK_DIR") or default)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _stamp(msg: str) -> None:
    """A line for the job log with wall-clock time to the microsecond (Unix time for scripts)."""
    now = time.time()
    clock = time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1e6):06d}"
    print(f"[{clock}] {msg} at t={now:.6f} (pid {os.getpid()})", file=sys.stderr, flush=True)


def _wait_limit() -> float | None:
    value = os.environ.get("FOLDSOUP_GPU_WAIT_S", "").strip()
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"FOLDSOUP_GPU_WAIT_S={value!r}: expected a number of seconds") from None


def _visible_ids(count: int) -> list[str]:
    """Names of the visible devices, used to name lock files so two jobs that see the same
    physical GPU under different indices still exclude each other."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        if len(ids) >= count:
            return ids[:count]
    return [str(i) for i in range(count)]


def acquire_slot(count: int, wait_s: float | None = None, poll_s: float = 0.2) -> int:
    """Take the first free of `count` device locks and hold it until the process ends (or
    release_slots()); wait, polling, while all are held. wait_s: None reads FOLDSOUP_GPU_WAIT_S
    (unset: no limit); NoFreeDevice when it passes without a free device."""
    if count < 1:
        raise ValueError(f"acquire_slot: count must be at least 1, got {count}")
    if wait_s is None:
        wait_s = _wait_limit()
    ids = _visible_ids(count)
    lock_dir = _lock_dir()
    start = time.monotonic()
    waiting = False
    while True:
        for slot, dev_id in enumerate(ids):
            lock_path = lock_dir / f"gpu-{dev_id}.lock"
            handle = open(lock_path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            if not _held:
                atexit.register(release_slots)
            _held.append((slot, str(lock_path), handle))
            waited = f" after waiting {time.monotonic() - start:.1f} s" if waiting else ""
            _stamp(f"device slot {slot} ({lock_path.name}) acquired{waited}")
            return slot
        if wait_s is not None and time.monotonic() - start >= wait_s:
            raise NoFreeDevice(f"no free GPU among {ids} after {wait_s:g} s (FOLDSOUP_GPU_WAIT_S; locks in {lock_dir})")
        if not waiting:
            waiting = True
            _stamp(f"all {count} device slots {ids} are held (locks in {lock_dir}); waiting for one to free")
        time.sleep(poll_s)


def release_slots() -> None:
    """Give back the slots this process holds (runs by itself at exit; the kernel frees the
    locks of a killed process). The line is written before the lock is dropped."""
    global _placement
    while _held:
        slot, lock_path, handle = _held.pop()
        _stamp(f"device slot {slot} ({Path(lock_path).name}) released")
        try:
            fcntl.flock(handle, fcntl.LOCK_UN)
        finally:
            handle.close()
    _placement = None


def place(preference: str = "auto") -> Placement:
    """Decide where this job computes; on GPUs, hold a device slot for the process lifetime.
    Called again in the same process, it returns the same placement (one slot per process)."""
    global _placement
    if preference == "cpu":
        return _decide("cpu")  # not kept: a later "auto" in this process still looks for a GPU
    if _placement is None:
        _placement = _decide(preference)
    return _placement


def _decide(preference: str) -> Placement:
    fake = int(os.environ.get("FOLDSOUP_FAKE_GPUS", "0") or 0)
    if fake > 0 and preference != "cpu":
        slot = acquire_slot(fake)
        return Placement("cpu", slot, f"fake GPU slot {slot} of {fake} (FOLDSOUP_FAKE_GPUS), computing on CPU")
    import torch

    if preference == "cpu" or not torch.cuda.is_available():
        if preference == "cuda":
            raise ConfigError("device: cuda was asked for, but torch sees no GPU")
        return Placement("cpu", None, "CPU")
    count = torch.cuda.device_count()
    if os.environ.get("SLURM_JOB_ID") and count == 1:
        return Placement("cuda:0", 0, f"GPU {os.environ.get('CUDA_VISIBLE_DEVICES', '0')} given by SLURM")
    slot = acquire_slot(count)
    return Placement(f"cuda:{slot}", slot, f"GPU slot {slot} of {count} ({torch.cuda.get_device_name(slot)})")


def start_check(preference: str, gpu_slots: int | None) -> tuple[str | None, str | None]:
    """(warning, error) for a local run, once at workflow start, before any job: GPU slots asked
    for (`--resources gpu=N`) or `device: cuda` on a machine where torch sees no GPU. With
    `device: auto` every job would quietly train on the CPU (a ViT-B/32 fine-tune: days), which
    only each job's log would say; with `device: cuda` every job would fail one by one."""
    if preference == "cpu" or not (gpu_slots or preference == "cuda"):
        return None, None
    if int(os.environ.get("FOLDSOUP_FAKE_GPUS", "0") or 0) > 0:
        return None, None
    import torch

    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        if gpu_slots and gpu_slots > count:
            return (f"--resources gpu={gpu_slots} but torch sees {count} GPU(s): at most {count} GPU jobs run at once, "
                    f"the others wait for a free device"), None
        return None, None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if torch.version.cuda is None:
        why = f"this torch ({torch.__version__}) is a CPU-only build"
    elif visible is not None and not [v for v in visible.split(",") if v.strip() not in ("", "-1")]:
        why = f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"
    else:
        why = "torch finds no usable CUDA device or driver (nvidia-smi tells whether the driver sees one)"
    asked = f"--resources gpu={gpu_slots}" if gpu_slots else "device: cuda"
    if preference == "cuda":
        return None, (f"{asked} asks for GPUs, but {why}; fix the GPU set-up, or set device: cpu (or auto) to run "
                      f"on the CPU")
    return (f"{asked} asks for GPUs, but {why}: every job will run on the CPU (device: auto). Set device: cuda to "
            f"stop instead, or leave out --resources gpu=N on a CPU machine"), None
