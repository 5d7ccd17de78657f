"""The task runner inside a job's own environment:
``PYTHON -I foreign.py MARKER_FD LABEL LOG_LEVEL``.

Run by an interpreter that is not the worker's (a pixi or uv environment, one on CVMFS),
with ``-I`` so that nothing of the worker (its site-packages, PYTHONPATH, this directory)
is on ``sys.path``. It needs only the standard library and ``cloudpickle``: the worker
decompresses payloads and functions before sending them and compresses results after, and
builds the task notes from the plain tuples this sends back. Messages are worker/pipe.py's
(loaded by file path, not put on ``sys.path``), and so is the marker file's layout.

Parent to child: ``("function", sha, pickle)``; ``("run", [(seq, sha, args_pickle or
[result pickles] for a merge, merge), ...])``. Child to parent: ``("done", [(seq, outcome,
error, data_pickle, seconds, (wall, cpu, max_rss, warnings, logs)), ...])``, where a log
is ``(logger, level, message, pathname, lineno, created)`` for each record at LOG_LEVEL
and above (the worker passes ``protocol.TASK_LOG_LEVEL``).
"""

from __future__ import annotations

import importlib.util
import logging
import mmap
import os
import pickle
import resource
import signal
import sys
import time
import traceback
import warnings
from collections import OrderedDict
from typing import Any

FUNCTION_CACHE = 16
TEXT_MAX = 8192
WARNINGS_MAX = 64
LOGS_MAX = 64  # the worker keeps protocol.TASK_LOGS_MAX of them
FLUSH_EVERY = 0.02


def _load_pipe() -> Any:
    where = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pipe.py")
    spec = importlib.util.spec_from_file_location("_hq_pipe", where)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cut(text: str) -> str:
    if len(text) <= TEXT_MAX:
        return text
    return text[: TEXT_MAX // 2] + "\n[...]\n" + text[-TEXT_MAX // 2 :]


def _dumps(value: Any) -> bytes:
    try:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, AttributeError, TypeError):
        import cloudpickle

        return cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def _error(exc: BaseException, label: str) -> tuple[dict[str, str], bytes]:
    message = _text(exc)
    if isinstance(exc, ImportError) and exc.name:
        top = exc.name.partition(".")[0]
        message = (
            f"{message} -- the task's environment {label} has no module {top!r}: "
            f"add the package that provides it to the environment"
        )
    error = {
        "type": _cut(f"{type(exc).__module__}.{type(exc).__qualname__}"),
        "message": _cut(message),
        "traceback": _cut("".join(traceback.format_exception(exc))),
    }
    try:
        pickled = _dumps(exc)
    except Exception:  # an exception that cannot travel still has its text
        pickled = b""
    return error, pickled


def _text(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception as e:
        return f"<exception str() failed: {type(e).__name__}>"


class _Records(logging.Handler):
    """Root-logger handler that keeps the current task's records (bounded), as tuples."""

    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.records: list[tuple[str, int, str, str, int, float]] = []
        self._formatter = logging.Formatter()

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) >= LOGS_MAX:
            return
        try:
            text = record.getMessage()
        except Exception as e:  # a bad format string still says something
            text = f"{record.msg!r} (message formatting failed: {e})"
        if record.exc_info:
            text += "\n" + self._formatter.formatException(record.exc_info)
        self.records.append(
            (
                _cut(record.name),
                record.levelno,
                _cut(text),
                _cut(record.pathname),
                max(record.lineno, 0),
                record.created,
            )
        )


def _capture_logs(level: int) -> _Records:
    records = _Records(level)
    root = logging.getLogger()
    root.addHandler(records)
    # Records also go to stderr (the worker's log), as Python's last-resort handler would
    # have printed them without ours.
    echo = logging.StreamHandler()
    echo.setLevel(level)
    root.addHandler(echo)
    return records


class _Unloadable:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def __call__(self, *args: Any) -> Any:
        raise self.exc


def _run_one(function: Any, payload: Any, merge: bool, label: str) -> tuple[str, Any, bytes]:
    try:
        if merge:
            value = function([pickle.loads(part) for part in payload])
        else:
            value = function(*pickle.loads(payload))
    except BaseException as exc:
        error, pickled = _error(exc, label)
        return "error", error, pickled
    try:
        return "ok", None, _dumps(value)
    except Exception as exc:
        error, pickled = _error(exc, label)
        error["message"] = _cut(f"the task's return value cannot be pickled: {error['message']}")
        return "error", error, pickled


def _warnings(caught: list[warnings.WarningMessage]) -> list[tuple[str, str, str, int, int]]:
    seen: dict[tuple[str, str, str, int], int] = {}
    for w in caught:
        category = f"{w.category.__module__}.{w.category.__qualname__}"
        key = (category, _cut(str(w.message)), _cut(w.filename or ""), w.lineno or 0)
        if key in seen or len(seen) < WARNINGS_MAX:
            seen[key] = seen.get(key, 0) + 1
    return [(*key, count) for key, count in seen.items()]


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the worker's to handle
    pipe = _load_pipe()
    label = sys.argv[2] if len(sys.argv) > 2 else "?"
    records = _capture_logs(int(sys.argv[3]) if len(sys.argv) > 3 else logging.WARNING)
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # a task's prints must not corrupt the pipe: they go to the worker's log
    sys.stdout = sys.stderr
    inp = sys.stdin.buffer
    marker = mmap.mmap(int(sys.argv[1]), pipe.MARKER_SIZE)
    functions: OrderedDict[str, Any] = OrderedDict()
    limits: dict[str, tuple[int, float]] = {}  # HQExecutor(memory=, walltime=) per function
    while True:
        message = pipe.read_blocking(inp)
        if message is None:
            return
        if message[0] == "function":
            _, sha, data = message
            try:
                functions[sha] = pickle.loads(data)
            except Exception as exc:  # a module the environment lacks
                functions[sha] = _Unloadable(exc)
            limits[sha] = pipe.task_limits(functions[sha])
            while len(functions) > FUNCTION_CACHE:
                limits.pop(functions.popitem(last=False)[0], None)
            continue
        done: list[Any] = []
        last_flush = time.monotonic()
        for seq, sha, payload, merge in message[1]:
            pipe.LIMITS.pack_into(marker, pipe.MARKER.size, *limits.get(sha, (0, 0.0)))
            pipe.MARKER.pack_into(marker, 0, seq)
            t0 = time.perf_counter()
            u0 = resource.getrusage(resource.RUSAGE_SELF)
            records.records = []
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("default")
                outcome, error, data = _run_one(functions[sha], payload, merge, label)
            wall = time.perf_counter() - t0
            u1 = resource.getrusage(resource.RUSAGE_SELF)
            cpu = max(u1.ru_utime + u1.ru_stime - u0.ru_utime - u0.ru_stime, 0.0)
            info = (wall, cpu, u1.ru_maxrss * 1024, _warnings(caught), records.records)
            done.append((seq, outcome, error, data, wall, info))
            now = time.monotonic()
            if now - last_flush > FLUSH_EVERY:
                pipe.write_blocking(out, ("done", done))
                done, last_flush = [], now
        pipe.MARKER.pack_into(marker, 0, 0)
        if done:
            pipe.write_blocking(out, ("done", done))


if __name__ == "__main__":
    main()
