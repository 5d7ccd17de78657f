"""Tie child processes to their owner: when the owner dies, even by SIGKILL, they die too.

Two layered mechanisms, so that nothing a LocalCluster started outlives it:

- On Linux, ``PR_SET_PDEATHSIG``: the kernel sends the child SIGKILL when the thread
  that forked it exits. The flag is set in the child before ``exec`` and checked
  against ``getppid()`` (the owner may have died in between). All cluster children
  are forked from one daemon thread that lives as long as the process, so a child is
  never killed because the (user's) thread that asked for it ended.
- Everywhere (macOS has no PDEATHSIG): a *lifeline pipe*. The child's stdin is a pipe
  whose write end only the owner holds; the child (an hq-server or hq-worker, which
  call :func:`watch_stdin`) stops itself when it reads end-of-file.

Children are also started in their own session, so the terminal's Ctrl-C reaches the
owner only: it decides how to stop them (cancel the job first, then shut down).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

ENV: str = "HQ_LIFELINE"  # set to "stdin" in a child that should watch its stdin
_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        return libc.prctl
    except (OSError, AttributeError):
        return None


_prctl = _load_prctl()  # looked up before any fork: nothing to load between fork and exec


def pdeathsig_available() -> bool:
    """Whether the kernel can kill children when their parent dies (Linux)."""
    return _prctl is not None


def _preexec(parent: int) -> Callable[[], None]:
    def tie() -> None:
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent:  # the owner died before the flag was set
                os._exit(1)

    return tie


_requests: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
_spawner: threading.Thread | None = None
_spawner_lock = threading.Lock()


def _serve() -> None:
    while True:
        call, future = _requests.get()
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(call())
            except BaseException as e:
                future.set_exception(e)


def _on_spawner(call: Callable[[], Any]) -> Any:
    global _spawner
    with _spawner_lock:
        if _spawner is None or not _spawner.is_alive():
            _spawner = threading.Thread(target=_serve, name="coffea-hq-spawner", daemon=True)
            _spawner.start()
    future: Future[Any] = Future()
    _requests.put((call, future))
    return future.result()


def spawn(argv: list[str], *, lifeline: bool = False, **kwargs: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen(argv, **kwargs)`` for a child that must die with this process:
    its own session, PDEATHSIG on Linux and, with ``lifeline``, a stdin pipe that it
    watches (see :func:`watch_stdin`)."""
    parent = os.getpid()
    if lifeline:
        kwargs["stdin"] = subprocess.PIPE
        kwargs["env"] = {**(kwargs.get("env") or os.environ), ENV: "stdin"}

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(argv, start_new_session=True, preexec_fn=_preexec(parent), **kwargs)

    return _on_spawner(start)


def tie_to_parent() -> Callable[[], None]:
    """A ``preexec_fn`` that sets PDEATHSIG (Linux) for a child forked by this thread."""
    return _preexec(os.getpid())


def _terminate_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def watch_stdin(stop: Callable[[], None] = _terminate_self) -> None:
    """In a child started with ``lifeline=True``: call ``stop`` (default: SIGTERM to
    itself) from a thread when the owner's end of stdin closes, and again (for a
    worker: abort the drain) if the process still runs 5 s later."""
    if os.environ.get(ENV) != "stdin":
        return
    os.environ.pop(ENV, None)  # not inherited by this process's own children

    def watch() -> None:
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        stop()
        threading.Event().wait(5.0)
        stop()

    threading.Thread(target=watch, name="coffea-hq-lifeline", daemon=True).start()


def main(argv: list[str]) -> int:
    """``python -m coffea_hq.lifeline PROGRAM ARGS...``: run a program that cannot watch
    a pipe itself (valkey-server where there is no PDEATHSIG) and stop it when this
    wrapper's stdin closes or it gets SIGTERM. Both share a process group: SIGKILL the
    group to kill both."""
    if not argv:
        print("usage: python -m coffea_hq.lifeline PROGRAM [ARGS...]", file=sys.stderr)
        return 2
    child = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the owner decides
    signal.signal(signal.SIGTERM, lambda *_: child.terminate())
    os.environ[ENV] = "stdin"
    watch_stdin(child.terminate)
    code = child.wait()
    return code if code >= 0 else 128 - code  # the shell's way to say "killed by signal"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
