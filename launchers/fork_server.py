"""Fork server of ``trainkit-run --fork-workers``: workers start from a process that imported torch.

Importing torch (and ``torch._dynamo``, which DDP pulls in) takes seconds per process on small
cores, and every restart pays it again. The fork server imports them once per launcher, before
any worker needs them, and holds no threads. Each worker is still started by torch's agent as
``launchers.worker_bootstrap`` (the PID it monitors and signals): the bootstrap hands its stdio
fds, environment, working directory and target to the server, which forks a keeper that forks
the worker. The bootstrap forwards every signal to the worker and exits with its exit code, or
dies of the same signal; the keeper SIGKILLs the worker as soon as the bootstrap is gone. When
the server is not up yet, the bootstrap runs the target itself, as without the flag.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["FORWARDED_SIGNALS", "PRELOADED_MODULES", "ForkServer", "run_forked", "serve"]

#: What the server imports before it forks anything (what a training worker imports first).
PRELOADED_MODULES = (
    "torch",
    "torch.distributed",
    "torch.distributed.checkpoint",
    "torch.nn.parallel",
    "torch._dynamo",
    "pyarrow",
    "fsspec",
)

#: Signals the bootstrap passes on to its forked worker (torch's agent sends SIGTERM, then SIGKILL
#: to the bootstrap, which the keeper turns into a SIGKILL of the worker).
FORWARDED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)

_STDIO = (0, 1, 2)


class ForkServer:
    """The server process of one launcher; ``close()`` stops it (it also dies with the launcher)."""

    def __init__(self, launcher_pid: int, env: Mapping[str, str]) -> None:
        self._directory = Path(tempfile.mkdtemp(prefix="trainkit-fork-"))
        self.socket_path = str(self._directory / "server.sock")
        # The interpreter and flags torchrun starts Python workers with.
        python = env.get("PYTHON_EXEC", sys.executable)
        self._process = subprocess.Popen(
            [python, "-u", "-m", "launchers.fork_server", str(launcher_pid), self.socket_path],
            env=dict(env),
            stdin=subprocess.DEVNULL,
        )

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()
        with contextlib.suppress(OSError):
            os.unlink(self.socket_path)
        with contextlib.suppress(OSError):
            self._directory.rmdir()


def serve(launcher_pid: int, socket_path: str) -> None:
    """The server's loop: import, listen, fork a keeper per request. Never returns in a worker's
    parent; returns (through the target's own exit) only in a forked worker."""
    from launchers.worker_bootstrap import die_with_parent

    die_with_parent(launcher_pid)
    for name in PRELOADED_MODULES:
        with contextlib.suppress(ImportError):
            __import__(name)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # keepers are reaped by the kernel
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    partial = socket_path + ".partial"
    listener.bind(partial)
    listener.listen(64)
    os.rename(partial, socket_path)  # bootstraps connect only once the imports are done
    while True:
        conn, _ = listener.accept()
        if os.fork() == 0:
            listener.close()
            _keep(conn)  # returns only in the worker
            return
        conn.close()


def _keep(conn: socket.socket) -> None:
    """In the keeper: read the request, fork the worker, report its pid and its exit status."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    _, fds, _, _ = socket.recv_fds(conn, 1, len(_STDIO))
    reader = conn.makefile("rb")
    request = json.loads(reader.readline())
    keeper_pid = os.getpid()
    worker = os.fork()
    if worker == 0:
        reader.close()
        conn.close()
        _become_worker(keeper_pid, fds, request)
        return
    for fd in fds:
        os.close(fd)
    conn.sendall(json.dumps({"pid": worker}).encode() + b"\n")
    status = None
    while status is None:
        readable, _, _ = select.select([conn], [], [], 0.2)
        if readable and conn.recv(1) == b"":  # the bootstrap is gone: so is its worker
            os.kill(worker, signal.SIGKILL)
        pid, raw = os.waitpid(worker, os.WNOHANG)
        if pid == worker:
            status = raw
    with contextlib.suppress(OSError):
        conn.sendall(json.dumps({"status": status}).encode() + b"\n")
    os._exit(0)


def _become_worker(keeper_pid: int, fds: list[int], request: dict) -> None:
    from launchers.worker_bootstrap import die_with_parent, run_target

    die_with_parent(keeper_pid)
    for fd, target in zip(fds, _STDIO, strict=True):
        os.dup2(fd, target)
        os.close(fd)
    for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    random.seed()  # the fork copied the server's state; every worker gets its own
    # sys.stdin/stdout/stderr wrap fds 0-2, which now are the bootstrap's; the server runs with
    # -u like torchrun's workers, so nothing is buffered on the way.
    run_target(request["mode"], request["target"], request["args"])


def run_forked(socket_path: str, mode: str, target: str, args: Sequence[str]) -> bool:
    """In the bootstrap: run the target in a worker forked by the server and exit as it exits.

    Returns False, having started nothing, when the server is not listening (yet).
    """
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(socket_path)
    except OSError:
        conn.close()
        return False
    socket.send_fds(conn, [b"\0"], list(_STDIO))
    request = {
        "mode": mode,
        "target": target,
        "args": list(args),
        "env": dict(os.environ),
        "cwd": os.getcwd(),
    }
    conn.sendall(json.dumps(request).encode() + b"\n")
    reader = conn.makefile("rb")
    worker = json.loads(reader.readline())["pid"]
    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, lambda received, _frame: os.kill(worker, received))
    line = reader.readline()
    if not line:  # the keeper died: the worker is gone with it
        os._exit(1)
    code = os.waitstatus_to_exitcode(json.loads(line)["status"])
    if code < 0:  # die of the same signal, so torch's agent sees what the worker saw
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code)


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2])
