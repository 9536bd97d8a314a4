"""A local job server that pays Python and torch start-up once per workflow run.

A CPU run of the embedded default has about 130 short jobs; importing torch (2-3 s here) would
be most of each one. With `FOLDSOUP_JOB_SERVER=<socket path>` set, `python -m foldsoup <step>`
becomes a thin client: it hands its arguments, working directory, environment and its
stdout/stderr file descriptors to a server that imported everything once, and the server
forks a child that runs the step exactly as the plain command would. The client waits, relays
SIGTERM/SIGINT to the child and exits with the child's status, so Snakemake sees an ordinary
process (logs, exit codes, --keep-going and resume behave the same).

Only for jobs on the machine that runs Snakemake: the Snakefile starts the server for local
runs and never under a cluster executor. If the server is unreachable the client runs the step
itself. The server never runs torch ops, so no thread pool or CUDA context exists before fork.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import sys
import time

_HEADER = struct.Struct("!I")
# Environment variables a step reads; everything else stays the server's.
_FORWARD_ENV_PREFIXES = ("FOLDSOUP_", "OMP_", "MKL_", "OPENBLAS_", "CUDA_", "SLURM_", "PYTHONHASHSEED")


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


# ---------------------------------------------------------------- client


def run_via_server(path: str, argv: list[str]) -> int | None:
    """Run `argv` in the server; None when no server answers (the caller runs it itself)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    env = {k: v for k, v in os.environ.items() if k.startswith(_FORWARD_ENV_PREFIXES)}
    sys.stdout.flush()
    sys.stderr.flush()
    with sock:
        _send_msg(sock, {"argv": argv, "cwd": os.getcwd(), "env": env}, fds=(1, 2))
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


def _child(request: dict, fds: list[int]) -> None:
    """In the forked child: become the job, run the step, exit with its status."""
    os.setsid()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.dup2(fds[0], 1)
    os.dup2(fds[1], 2)
    for fd in fds:
        os.close(fd)
    os.chdir(request["cwd"])
    for key in [k for k in os.environ if k.startswith(_FORWARD_ENV_PREFIXES)]:
        del os.environ[key]
    os.environ.update(request["env"])
    threads = request["env"].get("OMP_NUM_THREADS")
    status = 1
    try:
        import torch

        if threads:
            torch.set_num_threads(int(threads))
        from .cli import main

        status = main(request["argv"])
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        # os._exit skips atexit handlers: give back a held GPU slot (and log it) first.
        from .devices import release_slots

        release_slots()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def serve(path: str, idle_timeout_s: float = 600.0, parent: int | None = None) -> None:
    """Import once, then fork one child per request. Stops when the process that started it
    (Snakemake, pid `parent`: default this process's parent now) is gone, or after
    `idle_timeout_s` without jobs.

    Single-threaded on purpose (fork in a threaded process can copy a held lock): one select
    loop accepts requests, notices clients that went away (their job is killed with them, as
    if it had been the client's own process) and polls finished children with WNOHANG.
    """
    import selectors

    import torch  # noqa: F401  (the point of the server)

    from . import cli, pipeline, train  # noqa: F401

    if os.path.exists(path):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(64)
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
        while parent_alive() and (running or time.monotonic() - last_activity < idle_timeout_s):
            for key, _ in selector.select(timeout=0.05):
                if key.data is None:
                    _start_job(server, selector, running)
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


def _start_job(server: socket.socket, selector, running: dict) -> None:
    import selectors

    conn, _ = server.accept()
    try:
        request, fds = _recv_msg(conn, with_fds=True)
    except (ConnectionError, ValueError):
        conn.close()
        return
    pid = os.fork()
    if pid == 0:
        server.close()
        conn.close()
        _child(request, fds)
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
    args = p.parse_args(argv)
    serve(args.socket, args.idle_timeout, args.parent_pid)


if __name__ == "__main__":
    main()
