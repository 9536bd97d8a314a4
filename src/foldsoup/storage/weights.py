"""Weight files (safetensors, never pickle) and atomic text/JSON writes.

Every writer here goes through a temporary file in the destination folder, is fsync'ed and then
renamed over the final name with `os.replace`, so a crash or a killed job never leaves a
half-written file under a name that Snakemake (or a resumed run) would trust. An exception,
Ctrl-C or SIGTERM during the write removes the temporary file; only SIGKILL can leave one.

torch and safetensors are imported inside the functions that need them: CSV/JSON writers use
this module too and must stay cheap to import.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from foldsoup.errors import WeightsError

if TYPE_CHECKING:
    import torch

PathLike = str | os.PathLike

# Metadata key listing the keys whose values were JSON-encoded on save (safetensors metadata
# only holds strings). A dotted name keeps it apart from ordinary user keys.
JSON_KEYS_MARKER = "foldsoup.json_keys"



# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------


def _fsync_dir(folder: Path) -> None:
    """Persist the rename itself; best effort because not every filesystem allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class SignalExit(SystemExit):
    """SIGTERM, SIGINT or SIGHUP arrived during an atomic write (exit status 128 + signal)."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_replaced: dict[int, Any] = {}  # signal -> the handler it had before _signals_raise
_held: list[int] | None = None  # signals waiting for the end of _hold_signals (None: not holding)


def _stop(signum: int, frame) -> None:
    if _held is not None:
        _held.append(signum)
    elif _replaced.get(signum) is signal.default_int_handler:
        raise KeyboardInterrupt
    else:
        raise SignalExit(signum)


@contextlib.contextmanager
def _hold_signals() -> Iterator[None]:
    """Signals that arrive within wait until its end. (Python runs handlers in the main thread
    whichever thread the kernel picked, so a signal mask cannot do this in a threaded process.)"""
    global _held
    _held = []
    try:
        yield
    finally:
        held, _held = _held, None
        for signum in held:
            signal.raise_signal(signum)


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """Within it, SIGTERM/SIGINT/SIGHUP that would kill the process on the spot raise
    SignalExit, and Ctrl-C KeyboardInterrupt as usual, so the write's cleanup runs. Other
    handlers (the training loop's SIGTERM flag, an ignored SIGHUP) are kept."""
    if threading.current_thread() is not threading.main_thread() or _replaced:
        yield  # only the main thread may set handlers; a nested write is covered by the outer one
        return
    for sig in _STOP_SIGNALS:
        if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):
            _replaced[sig] = signal.signal(sig, _stop)
    try:
        yield
    finally:
        with _hold_signals():  # one arriving now goes to the restored handler
            for sig, handler in _replaced.items():
                signal.signal(sig, handler)
            _replaced.clear()


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success fsync it and rename it to `path`.

    On any exception, and on SIGTERM/SIGHUP/SIGINT (which then end the process with
    SignalExit, or KeyboardInterrupt for Ctrl-C, after the cleanup), the temporary file is
    removed and `path` is left untouched. The file gets the permissions a plain open() would
    (0666 less the umask).
    """
    final = Path(path)
    if final.is_dir():  # else os.replace fails naming the temporary file
        raise IsADirectoryError(errno.EISDIR, "is a folder", str(final))
    final.parent.mkdir(parents=True, exist_ok=True)
    with _signals_raise():
        tmp = None
        try:
            with _hold_signals():  # until `tmp` names the file mkstemp made
                # Same folder as the target: os.replace is only atomic within one filesystem.
                fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
                os.close(fd)
                tmp = Path(tmp_name)
            yield tmp
            # After the writer: mkstemp makes 0600, and writers that replace the file (safetensors
            # writes its own temporary file and renames it) make 0600 too.
            os.chmod(tmp, 0o666 & ~_current_umask())
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException as exc:
            try:
                if tmp is not None:
                    tmp.unlink()  # gone if the signal came just after the rename: then the file is whole
                    if isinstance(exc, SignalExit):
                        print(f"foldsoup: {signal.Signals(exc.signum).name} while writing {final}; its unfinished "
                              "temporary file was removed (rerun to write it)", file=sys.stderr, flush=True)
            except FileNotFoundError:
                pass
            raise
    _fsync_dir(final.parent)


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding=encoding, newline="") as f:
            f.write(text)


def atomic_write_json(path: PathLike, obj: Any, indent: int | None = 2) -> None:
    """Write `obj` as JSON to `path` atomically (serialised first, so a bad object writes nothing)."""
    text = json.dumps(obj, indent=indent, sort_keys=False) + "\n"
    atomic_write_text(path, text)


# --------------------------------------------------------------------------------------------
# Metadata encoding
# --------------------------------------------------------------------------------------------


def _encode_metadata(metadata: Mapping[str, Any] | None) -> dict[str, str] | None:
    """Strings stay as they are; anything else is JSON-encoded and its key recorded."""
    if not metadata:
        return None
    if JSON_KEYS_MARKER in metadata:
        raise ValueError(f"metadata key {JSON_KEYS_MARKER!r} is reserved")
    out: dict[str, str] = {}
    json_keys: list[str] = []
    for key, value in metadata.items():
        if not isinstance(key, str):
            raise TypeError(f"metadata keys must be strings, got {key!r}")
        if isinstance(value, str):
            out[key] = value
        else:
            out[key] = json.dumps(value)
            json_keys.append(key)
    if json_keys:
        out[JSON_KEYS_MARKER] = json.dumps(json_keys)
    return out


def _decode_metadata(raw: Mapping[str, str] | None) -> dict[str, Any]:
    meta = dict(raw or {})
    json_keys = json.loads(meta.pop(JSON_KEYS_MARKER, "[]"))
    for key in json_keys:
        if key in meta:
            meta[key] = json.loads(meta[key])
    return meta


# --------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------


def _prepare_for_save(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, detached; tensors sharing storage (tied weights) get their own copy,
    because safetensors refuses shared storage."""
    import torch

    out: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for key, value in state.items():
        if not isinstance(key, str):
            raise TypeError(f"state keys must be strings, got {key!r}")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state[{key!r}] is a {type(value).__name__}, not a tensor")
        t = value.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen_storages:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        if t.numel():
            seen_storages.add(ptr)
        out[key] = t
    return out


def save_weights(
    path: PathLike,
    state: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Save a state dict as safetensors, atomically. Non-string metadata values are JSON-encoded."""
    from safetensors.torch import save_file

    tensors = _prepare_for_save(state)
    meta = _encode_metadata(metadata)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def _listed(keys: list[str], most: int = 5) -> str:
    return ", ".join(repr(k) for k in keys[:most]) + (f", ... ({len(keys)} in all)" if len(keys) > most else "")


def state_mismatch(state: Mapping[str, Any], expected: Mapping[str, Any], expected_by: str = "the configured model",
                   hint: str | None = None, dtypes: str | None = None) -> str | None:
    """None when `state` has exactly the keys of `expected` (a state dict or {key: shape}) with
    the same shapes; else what differs, naming the first differing tensor (the first missing one
    in `expected`'s order, else the first unexpected one, else the first of another shape, else
    of another dtype), for the caller to raise with its context (which file or ingredient) in
    front. `expected_by` names the reference ("the backbone of this model.arch"); `hint` ends a
    key mismatch. `dtypes`: None, not compared (a model saved in bfloat16 fits an fp32 model);
    "kind", floating point or not; "exact". The one check of every loader and of the soups
    (storage, models, soups.average)."""

    def shape(v: Any) -> list[int]:
        return list(v.shape) if hasattr(v, "shape") else list(v)

    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    end = f"; {hint})" if hint else ")"
    if missing:
        also = f": {_listed(missing)}" if len(missing) > 1 else ""
        unexpected = f"; unexpected instead: {_listed(extra)}" if extra else ""
        return (f"tensor {missing[0]!r} of {expected_by} is missing ({len(missing)} of {len(expected)} missing{also}"
                f"{unexpected}{end}")
    if extra:
        return f"unexpected tensor {extra[0]!r} ({len(extra)} not in {expected_by}: {_listed(extra)}{end}"
    for key, ref in expected.items():
        if shape(state[key]) != shape(ref):
            return f"tensor {key!r} has shape {shape(state[key])}, {expected_by} expects {shape(ref)}"
    if dtypes is not None:  # `expected` then holds tensors
        for key, ref in expected.items():
            have, want = state[key].dtype, ref.dtype
            differs = have != want if dtypes == "exact" else have.is_floating_point != want.is_floating_point
            if differs:
                return f"tensor {key!r} has dtype {have}, {expected_by} expects {want}"
    return None


def load_weights(
    path: PathLike, device: str | torch.device = "cpu", expect: Mapping[str, Any] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load `(state, metadata)` from a safetensors file written by `save_weights` (or any other).

    Raises WeightsError naming the file when it is missing, truncated or corrupt, and, with
    `expect` (a model's state dict or {key: shape}), naming the file and the tensor when its
    keys or shapes differ.
    """
    from safetensors import safe_open

    from foldsoup.storage.files import folder_given, missing, unreadable_safetensors

    p = Path(path)
    if p.is_dir():
        raise WeightsError(f"weight file {p} {folder_given(p, ('model.safetensors', '*.safetensors'), 'a .safetensors file')}")
    if not p.is_file():
        raise WeightsError(f"weight file {p} {missing(p)}")
    try:
        with safe_open(str(p), framework="pt", device=str(device)) as f:
            raw_meta = f.metadata()
            state = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # SafetensorError, OSError, RuntimeError: all mean "unreadable"
        what, damaged = unreadable_safetensors(p, exc)
        raise WeightsError(f"weight file {p} is {what}; copy it again, or delete it and rerun the step that wrote it" if damaged
                           else f"weight file {p} is {what}, not a safetensors file; give a .safetensors file written by foldsoup"
                           ) from exc
    try:
        metadata = _decode_metadata(raw_meta)
    except (json.JSONDecodeError, TypeError) as exc:
        raise WeightsError(f"corrupt metadata in weight file {p}: {exc}") from exc
    problem = None if expect is None else state_mismatch(state, expect)
    if problem:
        raise WeightsError(f"weight file {p}: {problem}")
    return state, metadata
