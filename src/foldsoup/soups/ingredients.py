"""The weight files of one soup job, each read at most once and kept resident.

A greedy soup tries every candidate and, in the budget analysis, re-uses models across cells
and draws; re-reading them would cost the whole grid's size per greedy pass (paper preset: 90
files of 351 MB, 31.6 GB). `Ingredients` reads each file on first use and keeps its state in
the dtype it was saved in, on the job's device when every file fits there next to the model and
accumulators, else in host memory (moved to the device per use). When neither has room the job
stops before evaluating anything, with the sizes and what to change: re-reading from disk would
turn minutes into hours without a word, while a memory error is fixed in seconds (more memory
for the soup jobs, e.g. Snakemake's `--retries` raises `resources.soups.mem_mb` per attempt, or
bfloat16 fine-tunes).

Reads are counted (files and bytes, per path) and `summary()` gives the job log's line, e.g.
"read 90 files, 31.6 GB, each once".
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from foldsoup.errors import MemoryShort

if TYPE_CHECKING:
    import torch

    State = dict[str, torch.Tensor]

# Besides the ingredients, a soup job holds model-sized buffers (the resident model, the running
# sum and the soup with a candidate, in float32 even for bfloat16 files: 4 buffers of the largest
# file) and an evaluation batch's activations.
MODEL_BUFFERS = 4
ACTIVATIONS = 2 << 30



def format_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup memory limit (cgroup v2 or v1; SLURM jobs), None
    without a limit."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            folder, limit_file, usage_file = Path("/sys/fs/cgroup") / path.lstrip("/"), "memory.max", "memory.current"
        elif "memory" in controllers.split(","):
            folder, limit_file, usage_file = (Path("/sys/fs/cgroup/memory") / path.lstrip("/"), "memory.limit_in_bytes",
                                              "memory.usage_in_bytes")
        else:
            continue
        try:
            limit, usage = (folder / limit_file).read_text().strip(), int((folder / usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max" or a huge v1 value: no limit
            return max(int(limit) - usage, 0)
    return None


def host_memory_available() -> int | None:
    """Bytes of host memory this process can still take: MemAvailable, capped by its cgroup's
    room. None where neither can be read."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    room = _cgroup_room()
    known = [v for v in (available, room) if v is not None]
    return min(known) if known else None


def device_memory_free(device: str) -> int | None:
    """Free bytes on a CUDA device; None for the CPU (its memory is the host's)."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    return torch.cuda.mem_get_info(dev)[0]


def residence(device: str, total: int, largest: int, device_free: int | None, host_available: int | None,
              extra_models: int = 0) -> str:
    """Where a job's ingredients (`total` bytes, the largest file `largest`) live: on `device`
    (a GPU) when they fit in its free memory beside the job's own buffers and activations, else
    "cpu" when host memory has room for them (and, on a CPU job, its buffers), else MemoryShort.
    `extra_models`: more model-sized buffers the job keeps (the budget analysis's cached soups).
    A free or available size of None is not checked."""
    buffers = (MODEL_BUFFERS + extra_models) * largest
    on_gpu = device_free is not None
    if on_gpu and total + buffers + ACTIVATIONS <= device_free:
        return device
    host_need = total + (0 if on_gpu else buffers)
    if host_available is None or host_need <= host_available:
        return "cpu"
    where = (f"{format_bytes(device_free)} free on {device} (needs {format_bytes(total + buffers + ACTIVATIONS)}), "
             if on_gpu else "") + f"{format_bytes(host_available)} of host memory available (needs {format_bytes(host_need)})"
    raise MemoryShort(
        f"the soup job's {format_bytes(total)} of weight files do not fit in memory: {where}; give the soup jobs more "
        f"memory (resources.soups.mem_mb; --retries raises it per attempt) or a larger GPU, or halve the files with "
        f"finetune.save_dtype: bfloat16")


class Ingredients:
    """The weight files of one soup job: `get(path)` reads a file once and keeps its state
    resident; `stream(path)` reads it without keeping it (a file the job uses once). Both count.

    `read(path, device)` reads one file onto `device` (pipeline.Context.load: checked against
    the configured model). The residence is chosen at construction from the files' sizes;
    `keep=False` (a job that only streams) keeps nothing and needs no room.
    """

    def __init__(self, read: Callable[[str, str], State], paths: Iterable[str | os.PathLike], device: str,
                 extra_models: int = 0, log: Callable[[str], None] | None = None, keep: bool = True) -> None:
        self._read, self.device = read, str(device)
        self.paths = list(dict.fromkeys(os.fspath(p) for p in paths))
        # A missing file counts 0 here: reading it raises the loader's error naming it.
        sizes = [os.path.getsize(p) if os.path.isfile(p) else 0 for p in self.paths]
        self.total = sum(sizes)
        self.keep = keep
        self.where = residence(self.device, self.total, max(sizes, default=0), device_memory_free(self.device),
                               host_memory_available(), extra_models) if keep else self.device
        self.reads: Counter[str] = Counter()  # path -> times read
        self.bytes_read = 0
        self._states: dict[str, State] = {}
        if log is not None and self.where != self.device:
            log(f"{len(self.paths)} weight files ({format_bytes(self.total)}) do not fit on {self.device} beside the "
                f"model: kept in host memory and moved to {self.device} per use")

    def _count(self, path: str, device: str) -> State:
        state = self._read(path, device)
        self.reads[path] += 1
        self.bytes_read += os.path.getsize(path)
        return state

    def get(self, path: str | os.PathLike) -> State:
        """The file's state on the job's device, read on first use only."""
        path = os.fspath(path)
        if not self.keep:
            raise ValueError("Ingredients(keep=False) only streams: use stream()")
        if path not in self._states:
            self._states[path] = self._count(path, self.where)
        state = self._states[path]
        if self.where != self.device:
            return {k: v.to(self.device, non_blocking=True) for k, v in state.items()}
        return state

    def stream(self, path: str | os.PathLike) -> State:
        """The file's state on the job's device, not kept (for files a job uses once)."""
        path = os.fspath(path)
        return self._states[path] if path in self._states else self._count(path, self.device)

    def summary(self) -> str:
        """The job log's line: files and bytes read, and whether each was read once."""
        n, reads = len(self.reads), sum(self.reads.values())
        again = [f"{Path(p).parent.name}/{Path(p).name} {k}x" for p, k in self.reads.items() if k > 1]
        tail = "each once" if reads == n else f"{reads} reads: {', '.join(again)}"
        kept = f", kept on {self.where}" if self._states else ""
        return f"read {n} files, {format_bytes(self.bytes_read)}, {tail}{kept}"
