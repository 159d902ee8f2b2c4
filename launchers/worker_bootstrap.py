"""Worker bootstrap of ``trainkit-run``: bind each worker's life to its launcher, then run the target.

``python -m launchers.worker_bootstrap <launcher pid> script|module|exec <target> [args...]`` asks
Linux to SIGKILL this process when the launcher dies, then runs the target exactly as torchrun
would (``__main__``, the same argv, sys.path and environment). It never imports torch or trainkit.
With ``--fork-server=SOCKET`` first, a target that runs in Python runs in a process forked by
``launchers.fork_server`` (torch already imported) when that server is listening.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import pkgutil
import runpy
import signal
import sys
import zipfile
from collections.abc import Sequence

__all__ = ["MODES", "bootstrap_argv", "die_with_parent", "main", "run_target"]

#: How the target runs: a script path (``python script.py``), a module (``python -m``) or a program.
MODES = ("script", "module", "exec")

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

_FORK_SERVER_OPTION = "--fork-server="


def bootstrap_argv(
    launcher_pid: int,
    mode: str,
    target: str,
    target_args: Sequence[str],
    *,
    fork_server: str | None = None,
) -> list[str]:
    """Arguments after ``python -m launchers.worker_bootstrap`` that run ``target`` in ``mode``;
    ``fork_server``: the socket of a ``launchers.fork_server`` to start it from."""
    if mode not in MODES:
        raise ValueError(f"worker bootstrap: mode {mode!r}; expected one of {', '.join(MODES)}")
    prefix = [] if fork_server is None else [_FORK_SERVER_OPTION + fork_server]
    return [*prefix, str(launcher_pid), mode, target, *target_args]


def die_with_parent(expected_parent_pid: int) -> bool:
    """SIGKILL this process when its parent exits; False where Linux's prctl is unavailable.

    The signal is armed after fork, so a launcher that died in between would be missed: the parent
    pid is compared afterwards and a changed one means it is already gone, so die now.
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"prctl(PR_SET_PDEATHSIG): {os.strerror(error)}")
    if os.getppid() != expected_parent_pid:
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def _run_script(path: str, args: Sequence[str]) -> None:
    # What `python path` does: argv[0] is the path as given, sys.path[0] the script's real directory.
    sys.argv = [path, *args]
    if os.path.isdir(path) or zipfile.is_zipfile(path):
        _run_main_of(path)
        return
    if not sys.flags.safe_path:
        sys.path[0] = os.path.dirname(os.path.realpath(path))
    runpy.run_path(path, run_name="__main__")


def _run_main_of(path: str) -> None:
    # What `python DIR` (or `python app.zip`) does: the absolute DIR is sys.path[0] and DIR's
    # __main__ module runs as __main__ with argv[0] as given. runpy.run_path would rewrite argv[0].
    entry = os.path.abspath(path)
    if sys.flags.safe_path:
        sys.path.insert(0, entry)
    else:
        sys.path[0] = entry
    importer = pkgutil.get_importer(entry)
    spec = None if importer is None else importer.find_spec("__main__")
    if spec is None or spec.loader is None:
        raise SystemExit(f"{sys.executable}: can't find '__main__' module in {path!r}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["__main__"] = module
    spec.loader.exec_module(module)


def _run_module(name: str, args: Sequence[str]) -> None:
    # `python -m` already put the working directory first on sys.path; alter_sys sets argv[0] to
    # the module's file and runs it as a fresh __main__ module, as the interpreter's own -m does.
    sys.argv = [name, *args]
    runpy.run_module(name, run_name="__main__", alter_sys=True)


def run_target(mode: str, target: str, target_args: Sequence[str]) -> None:
    """Run ``target`` in this process as torchrun would (``exec`` replaces the process)."""
    if mode == "exec":
        # The death signal survives execve, so the program stays bound to the launcher.
        os.execvp(target, [target, *target_args])
    elif mode == "module":
        _run_module(target, target_args)
    else:
        _run_script(target, target_args)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    fork_server = None
    if argv and argv[0].startswith(_FORK_SERVER_OPTION):
        fork_server = argv.pop(0)[len(_FORK_SERVER_OPTION) :]
    if len(argv) < 3 or argv[1] not in MODES or not argv[0].isdigit():
        raise SystemExit(
            "usage: python -m launchers.worker_bootstrap <launcher pid> script|module|exec <target> "
            "[args...] (trainkit-run starts workers this way; run your script directly instead)"
        )
    launcher_pid, mode, target, target_args = int(argv[0]), argv[1], argv[2], argv[3:]
    die_with_parent(launcher_pid)
    if fork_server is not None and mode != "exec":
        from launchers.fork_server import run_forked

        run_forked(fork_server, mode, target, target_args)  # returns only if none is listening
    run_target(mode, target, target_args)


if __name__ == "__main__":
    main()
