"""A local job server that pays Python and torch start-up once per workflow run.

A CPU run of the embedded default has about 130 short jobs; importing torch (2-3 s here) would
be most of each one. With `FOLDSOUP_JOB_SERVER=<socket path>` set, `python -m foldsoup <step>`
becomes a thin client: it hands its arguments, working directory, whole environment and its
stdout/stderr file descriptors to a server that imported everything once, and the server
forks a child that runs the step exactly as the plain command would. The client waits, relays
SIGTERM/SIGINT to the child and exits with the child's status, so Snakemake sees an ordinary
process (logs, exit codes, --keep-going and resume behave the same).

A forked child keeps its parent's interpreter, libraries and whatever they read once at start.
So the server first tells the client who it is (`identity()`), and the client uses it only when
it would itself be the same (`use_server`): same Python executable and prefix (a conda env, a
venv or a container's Python is not), same foldsoup source, same mount namespace (a container),
same start-up variables (PYTHON*, LD_*, locale, TORCH_*). Otherwise, or if the server is
unreachable, the client runs the step itself. In the child, os.environ becomes the job's
environment; of what the server's imports read once, torch's thread count is set again from
the job's OMP_NUM_THREADS/MKL_NUM_THREADS (Snakemake sets them per job) and numpy's OpenBLAS
keeps the server's (torch does the heavy math).

Only for jobs on the machine that runs Snakemake: the Snakefile starts the server for local
runs and never under a cluster executor. The server never runs torch ops, so no torch thread
pool or CUDA context exists before fork (CUDA_VISIBLE_DEVICES, PYTORCH_CUDA_ALLOC_CONF and
TORCHINDUCTOR_* are read later, from the job's environment).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import sys
import tempfile
import time

_HEADER = struct.Struct("!I")
# Read once when the interpreter starts or torch is imported (PYTHONPATH, PYTHONHASHSEED,
# LD_LIBRARY_PATH, the locale, TORCH_LOGS, ...): a forked child cannot take the job's values.
_STARTUP_ENV_PREFIXES = ("PYTHON", "LD_", "LC_", "LANG", "TORCH_")


def _send_msg(sock: socket.socket, obj, fds=()) -> None:
    data = json.dumps(obj).encode()
    payload = _HEADER.pack(len(data)) + data
    if fds:
        socket.send_fds(sock, [payload], list(fds))
    else:
        sock.sendall(payload)


def _recv_exact(sock: socket.socket, n: int, fds_out: list | None = None) -> bytes:
    buf = b""
    while len(buf) < n:
        if fds_out is not None and not buf:
            data, fds, _, _ = socket.recv_fds(sock, n - len(buf), 4)
            fds_out.extend(fds)
        else:
            data = sock.recv(n - len(buf))
        if not data:
            raise ConnectionError("job server connection closed")
        buf += data
    return buf


def _recv_msg(sock: socket.socket, with_fds: bool = False):
    fds: list[int] = []
    (length,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size, fds if with_fds else None))
    obj = json.loads(_recv_exact(sock, length))
    return (obj, fds) if with_fds else obj


def _mount_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/mnt")
    except OSError:
        return None  # not Linux


def identity() -> dict:
    """What a process forked from this one would run with and could not change: the
    interpreter, the foldsoup source, the filesystem view and the start-up variables."""
    return {
        "executable": os.path.realpath(sys.executable),
        # A venv's python is a symlink to its base interpreter: the prefix tells them apart.
        "prefix": sys.prefix,
        "foldsoup": os.path.dirname(os.path.realpath(__file__)),
        "mount_namespace": _mount_namespace(),
        "startup_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(_STARTUP_ENV_PREFIXES)},
    }


def use_server(job: dict, server: dict) -> bool:
    """True when a job with identity `job` may run forked from a server with identity `server`
    (both from `identity()`): only then does the forked child equal the job's own process."""
    return job == server


# ---------------------------------------------------------------- client


def run_via_server(path: str, argv: list[str]) -> int | None:
    """Run `argv` in the server; None when no server answers or the server runs another
    interpreter than this one (the caller runs the step itself)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    with sock:
        try:
            server = _recv_msg(sock)["identity"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not use_server(identity(), server):
            return None
        request = {"argv": argv, "argv0": sys.argv[0], "cwd": os.getcwd(), "env": dict(os.environ)}
        _send_msg(sock, request, fds=(1, 2))
        pid = _recv_msg(sock)["pid"]

        def relay(signum, frame):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

        signal.signal(signal.SIGTERM, relay)
        signal.signal(signal.SIGINT, relay)
        try:
            status = _recv_msg(sock)["status"]
        except ConnectionError:
            return 1  # server died: the job failed, Snakemake may retry it
    return status


# ---------------------------------------------------------------- server


def adopt_environment(env: dict[str, str], default_threads: int | None = None) -> None:
    """Make this (forked) process's environment exactly `env`, the job's, including what was
    read from the old one and kept: tempfile's cached $TMPDIR and torch's thread count (from
    OMP_NUM_THREADS or MKL_NUM_THREADS, as torch reads them at import; else `default_threads`,
    the count a process without them gets)."""
    os.environ.clear()
    os.environ.update(env)
    tempfile.tempdir = None
    import torch

    threads = env.get("OMP_NUM_THREADS") or env.get("MKL_NUM_THREADS")
    try:
        threads = int(threads) if threads else default_threads
    except ValueError:
        threads = default_threads  # torch ignores a malformed value too
    if threads and threads > 0:
        torch.set_num_threads(threads)


def _child(request: dict, fds: list[int], default_threads: int | None) -> None:
    """In the forked child: become the job, run the step, exit with its status."""
    os.setsid()
    # The signal dispositions of a plain `python -m foldsoup` process.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.dup2(fds[0], 1)
    os.dup2(fds[1], 2)
    for fd in fds:
        os.close(fd)
    os.chdir(request["cwd"])
    sys.argv = [request["argv0"], *request["argv"]]
    status = 1
    try:
        adopt_environment(request["env"], default_threads)
        from foldsoup.cli import main

        status = main(request["argv"])
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    except KeyboardInterrupt:
        import traceback

        traceback.print_exc()
        status = 128 + signal.SIGINT
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        # os._exit skips atexit handlers: give back a held GPU slot (and log it) first.
        from foldsoup.devices import release_slots

        release_slots()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def serve(path: str, idle_timeout_s: float = 600.0, parent: int | None = None, remove_dir: bool = False) -> None:
    """Import once, then fork one child per request. Stops when the process that started it
    (Snakemake, pid `parent`: default this process's parent now) is gone, after
    `idle_timeout_s` without jobs, or on SIGTERM; then removes its socket and, with
    `remove_dir`, the socket's folder (made for this server by the Snakefile).

    Single-threaded on purpose (fork in a threaded process can copy a held lock): one select
    loop accepts requests, notices clients that went away (their job is killed with them, as
    if it had been the client's own process) and polls finished children with WNOHANG.
    """
    import selectors

    try:
        import torch

        # torch.optim's first optimizer imports torch._dynamo (about 2 s; starts no thread): once
        # here rather than in every digits_cnn job (open_clip and timm import it anyway).
        import torch._dynamo  # noqa: F401

        from foldsoup import (
            cli,  # noqa: F401
            steps,  # noqa: F401
        )
        from foldsoup.training import loop as train  # noqa: F401  (the point of the server)

        # What a job without OMP_NUM_THREADS/MKL_NUM_THREADS would get; unknown if this
        # process had them.
        default_threads = None if {"OMP_NUM_THREADS", "MKL_NUM_THREADS"} & set(os.environ) else torch.get_num_threads()
        me = identity()
        stopping = []
        # A flag, checked by the loop: raising here could leave a just-forked child unrecorded.
        signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))

        if os.path.exists(path):
            os.unlink(path)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(path)
        server.listen(64)
    except BaseException:
        _remove_dir(path, remove_dir)
        raise
    selector = selectors.DefaultSelector()
    selector.register(server, selectors.EVENT_READ, None)
    running: dict[int, socket.socket] = {}
    last_activity = time.monotonic()
    print(f"foldsoup job server on {path} (pid {os.getpid()})", file=sys.stderr, flush=True)

    # Given by the starter: a workflow that ends while torch is still importing here has already
    # left this process to init, and os.getppid() would then name init, not the starter.
    parent = parent or os.getppid()

    def parent_alive() -> bool:
        return os.getppid() == parent  # reparented once the starter exits (even as a zombie)

    try:
        while not stopping and parent_alive() and (running or time.monotonic() - last_activity < idle_timeout_s):
            for key, _ in selector.select(timeout=0.05):
                if key.data is None:
                    _start_job(server, selector, running, me, default_threads)
                    last_activity = time.monotonic()
                elif not key.fileobj.recv(1, socket.MSG_PEEK):
                    selector.unregister(key.fileobj)  # client killed: kill its job too
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(key.data, signal.SIGKILL)
            for pid in list(running):
                done, raw = os.waitpid(pid, os.WNOHANG)
                if done:
                    conn = running.pop(pid)
                    with contextlib.suppress(KeyError):
                        selector.unregister(conn)
                    try:
                        _send_msg(conn, {"status": os.waitstatus_to_exitcode(raw)})
                    except OSError:
                        pass  # the client is gone; nothing to tell
                    conn.close()
                    last_activity = time.monotonic()
    finally:
        for pid in running:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)
        server.close()
        if os.path.exists(path):
            os.unlink(path)
        _remove_dir(path, remove_dir)


def _remove_dir(path: str, remove_dir: bool) -> None:
    """The socket's folder, if asked and empty (never anything else that may be in it)."""
    if remove_dir:
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(os.path.abspath(path)))


def _start_job(server: socket.socket, selector, running: dict, me: dict, default_threads: int | None) -> None:
    import selectors

    conn, _ = server.accept()
    try:
        _send_msg(conn, {"identity": me})
        # A client of another interpreter closes here instead (use_server) and runs the step itself.
        request, fds = _recv_msg(conn, with_fds=True)
    except (OSError, ValueError):
        conn.close()
        return
    pid = os.fork()
    if pid == 0:
        server.close()
        conn.close()
        _child(request, fds, default_threads)
    for fd in fds:
        os.close(fd)
    _send_msg(conn, {"pid": pid})
    running[pid] = conn
    selector.register(conn, selectors.EVENT_READ, pid)


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m foldsoup.zygote", description="local job server (see module docstring)")
    p.add_argument("socket")
    p.add_argument("--idle-timeout", type=float, default=600.0)
    p.add_argument("--parent-pid", type=int, help="the starter's pid: the server stops when it is gone (default: the parent)")
    p.add_argument("--remove-dir", action="store_true", help="the socket's folder was made for this server: remove it on exit")
    args = p.parse_args(argv)
    serve(args.socket, args.idle_timeout, args.parent_pid, args.remove_dir)


if __name__ == "__main__":
    main()
