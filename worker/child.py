"""The task subprocess: ``python -m coffea_hq.worker.child MARKER_FD``.

Long-lived, one per slot. It reads batches of tasks from stdin, runs them in
order and writes results to the original stdout, which is moved away from fd 1
first so that a task's own prints go to stderr instead of corrupting the pipe.
Before each task it writes the task's sequence number into the shared marker
file (an unlinked temporary file, inherited as file descriptor MARKER_FD), so
that if this process dies the worker knows which task killed it.
"""

from __future__ import annotations

import mmap
import os
import signal
import sys
import time
import traceback
from collections import OrderedDict
from typing import Any

from coffea_hq import protocol
from coffea_hq.protocol import Outcome

from . import pipe
from .capture import TaskCapture
from .pipe import LIMITS, MARKER, MARKER_SIZE, task_limits

FUNCTION_CACHE = 16
# How many times a subprocess tells the worker which modules it has imported (each time
# sys.modules has grown): the worker's zygote preloads those of installed distributions.
MODULE_REPORTS = 4
_NOT_REPORTED = frozenset(sys.stdlib_module_names) | frozenset(sys.builtin_module_names)


_AT_START: frozenset[str] = frozenset()  # sys.modules when main() began (after the fork)


def imported_modules() -> list[str]:
    """Top-level names of the non-standard-library modules this process has imported, and
    the submodules it imported since it started whose packages it had already: a zygote
    that preloads ``coffea`` still lacks ``coffea.processor`` (0.2-0.4 s in each job's
    first task, for unpickling coffea's work function)."""
    loaded = list(sys.modules)
    names = {name.partition(".")[0] for name in loaded}
    new = {name for name in loaded if name not in _AT_START}
    # The imports that brought in the rest: new modules whose parent package is not new.
    names |= {name for name in new if "." in name and name.rpartition(".")[0] not in new}
    return sorted(
        n
        for n in names
        if n.partition(".")[0] not in _NOT_REPORTED
        and not any(p.startswith("_") for p in n.split("."))
    )


def _error(exc: BaseException) -> tuple[dict[str, str], bytes]:
    text = "".join(traceback.format_exception(exc))
    try:
        pickled = protocol.dumps(exc)
    except Exception:  # an exception that cannot travel still has its text
        pickled = b""
    if len(pickled) > protocol.ERROR_PICKLE_MAX:
        pickled = b""  # too heavy to ship in a report: the text says what happened
    return protocol.error_info(exc, text), pickled


class _Unloadable:
    """Stands in for a function that cannot be unpickled here: each task fails with why."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def __call__(self, *args: Any) -> Any:
        raise self.exc


def _run_one(
    function: Any, payload: bytes, merge: bool
) -> tuple[Outcome, dict[str, str] | None, bytes]:
    try:
        if merge:
            value = function(
                [protocol.loads(part) for part in protocol.split_merge_payload(payload)]
            )
        else:
            value = function(*protocol.loads(payload))
    except BaseException as exc:  # SystemExit and KeyboardInterrupt in a task fail the task
        error, pickled = _error(exc)
        return Outcome.ERROR, error, pickled
    try:
        return Outcome.OK, None, protocol.dumps(value)
    except Exception as exc:
        error, pickled = _error(exc)
        error["message"] = protocol.cut_text(
            f"the task's return value cannot be pickled: {error['message']}"
        )
        return Outcome.ERROR, error, pickled


def main() -> None:
    global _AT_START
    _AT_START = frozenset(sys.modules)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the worker's to handle
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    capture = TaskCapture(os.dup(2))
    try:
        _serve(out, capture)
    finally:
        capture.close()


def _serve(out: Any, capture: TaskCapture) -> None:
    inp = sys.stdin.buffer
    marker = mmap.mmap(int(sys.argv[1]), MARKER_SIZE)
    functions: OrderedDict[str, Any] = OrderedDict()
    limits: dict[str, tuple[int, float]] = {}
    reports, modules_seen = 0, len(sys.modules)
    while True:
        message = pipe.read_blocking(inp)
        if message is None:
            return
        if message[0] == "function":
            _, sha, data = message
            try:
                functions[sha] = protocol.loads(data)
            except Exception as exc:  # a module missing on this worker, say
                functions[sha] = _Unloadable(exc)
            limits[sha] = task_limits(functions[sha])
            while len(functions) > FUNCTION_CACHE:
                limits.pop(functions.popitem(last=False)[0], None)
            continue
        done: list[tuple[int, str, Any, bytes, float, Any]] = []
        last_flush = time.monotonic()

        def flush() -> None:
            nonlocal done, reports, modules_seen
            if reports < MODULE_REPORTS and len(sys.modules) != modules_seen:
                modules_seen, reports = len(sys.modules), reports + 1
                pipe.write_blocking(out, ("modules", imported_modules()))
            pipe.write_blocking(out, ("done", done))
            done = []

        for seq, sha, payload, merge in message[1]:
            LIMITS.pack_into(marker, MARKER.size, *limits.get(sha, (0, 0.0)))
            MARKER.pack_into(marker, 0, seq)
            with capture:
                outcome, error, data = _run_one(functions[sha], payload, merge)
            info = capture.info
            done.append((seq, outcome.value, error, data, info.wall, info))
            now = time.monotonic()
            if now - last_flush > pipe.FLUSH_EVERY:
                flush()
                last_flush = now
        MARKER.pack_into(marker, 0, 0)
        if done:
            flush()


if __name__ == "__main__":
    main()
