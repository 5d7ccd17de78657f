"""What one task tells its session besides its result, collected in the slot subprocess.

:class:`TaskCapture` wraps each task: it records the Python warnings and log records
(``TASK_LOG_LEVEL`` and above) the task raises, what it prints (at the file-descriptor
level, so C libraries' output too), its wall and CPU time and the subprocess's peak
resident set during the task, all bounded by the limits in :mod:`coffea_hq.protocol`.
The result is a :class:`coffea_hq.messages.TaskInfo`.
"""

from __future__ import annotations

import contextlib
import faulthandler
import fcntl
import logging
import os
import resource
import sys
import tempfile
import time
import warnings
from typing import Any

from coffea_hq import protocol
from coffea_hq.messages import TaskInfo, TaskLog, TaskWarning

_FORMATTER = logging.Formatter()


def _cut(text: str) -> str:
    return protocol.cut_text(text, protocol.TASK_NOTE_TEXT_MAX)


class _Records(logging.Handler):
    """Root-logger handler that keeps the current task's records (bounded)."""

    def __init__(self) -> None:
        super().__init__(protocol.TASK_LOG_LEVEL)
        self.records: list[TaskLog] = []
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) >= protocol.TASK_LOGS_MAX:
            self.dropped += 1
            return
        try:
            text = record.getMessage()
        except Exception as e:  # a bad format string still says something
            text = f"{record.msg!r} (message formatting failed: {e})"
        if record.exc_info:
            text += "\n" + _FORMATTER.formatException(record.exc_info)
        self.records.append(
            TaskLog(
                _cut(record.name),
                record.levelno,
                _cut(text),
                _cut(record.pathname),
                max(record.lineno, 0),
                record.created,
            )
        )


class _PeakRss:
    """The subprocess's peak RSS during one task.

    Linux keeps a high-water mark that writing ``5`` to /proc/self/clear_refs resets, and
    ``getrusage``'s ``ru_maxrss`` follows it: reset before the task, read after. Where that
    is refused, ``ru_maxrss`` is the lifetime peak: an upper bound for tasks after the first.
    A reset is needed only once a task has raised the mark: until then the mark is still
    what the last reset left (the resident set then), as a reset now would leave it.
    """

    def __init__(self) -> None:
        self._clear = -1
        with contextlib.suppress(OSError):
            self._clear = os.open("/proc/self/clear_refs", os.O_WRONLY)
        self._mark = -1  # ru_maxrss (kB) right after the last reset; -1: reset next time

    def reset(self) -> None:
        if self._clear >= 0 and self._mark < 0:
            try:
                os.write(self._clear, b"5")
            except OSError:
                os.close(self._clear)
                self._clear = -1
                return
            self._mark = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def peak(self) -> int:
        """The peak (bytes) since the task began."""
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
        if kb > self._mark:
            self._mark = -1
        return kb * 1024


class _Output:
    """Fds 1 and 2 point, for good, at an unlinked file opened for appending: what a task
    adds to it is its output. Everything is copied on to the real stderr, so the worker's
    log keeps it; the file is emptied once it grows past ``_ROTATE``. Its end is the offset
    fds 1 and 2 share with it (appending moves it there; pread, sendfile with an offset and
    ftruncate do not): a task that prints nothing costs one lseek, cheaper than fstat."""

    _ROTATE = 1 << 20

    def __init__(self, stderr_fd: int) -> None:
        self._stderr = stderr_fd
        fd, path = tempfile.mkstemp(prefix="hq-output-")
        os.unlink(path)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
        self._fd = fd
        _flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        self._start = self._end = 0  # where the task's output begins; what was copied on

    def _copy(self, start: int, end: int) -> None:
        # (sendfile may send part: to a pipe, what fits in it)
        with contextlib.suppress(OSError):
            while start < end:
                sent = os.sendfile(self._stderr, self._fd, start, end - start)
                if sent <= 0:
                    break
                start += sent

    def _size(self) -> int:
        return os.lseek(self._fd, 0, os.SEEK_CUR)

    def flush(self) -> None:
        """Copy on what was printed since the last task (the subprocess is ending)."""
        _flush()
        size = self._size()
        if size > self._end:
            self._copy(self._end, size)
        self._start = self._end = size

    def start(self) -> None:
        # (No fstat here: what the subprocess prints between tasks, rare, counts as the
        # next task's output.)
        self._start = self._end

    def stop(self) -> str:
        _flush()
        size = self._size()
        start, self._end = self._start, size
        if size == start:
            return ""
        self._copy(start, size)
        cut = max(start, size - protocol.TASK_OUTPUT_MAX)
        text = os.pread(self._fd, size - cut, cut).decode("utf-8", "replace")
        if size > self._ROTATE:
            os.ftruncate(self._fd, 0)
            os.lseek(self._fd, 0, os.SEEK_SET)  # (ftruncate leaves the offset)
            self._end = 0
        if cut > start:
            note = f"[... {cut - start:,} bytes cut ...]\n"
            text = note + text[-(protocol.TASK_OUTPUT_MAX - len(note)) :]
        return text[-protocol.TASK_OUTPUT_MAX :]


def _flush() -> None:
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    if sys.stderr is not sys.stdout:  # the slot subprocess makes them one
        with contextlib.suppress(Exception):
            sys.stderr.flush()


class TaskCapture:
    """``with capture.task(): run()``, then :attr:`info` describes that task."""

    def __init__(self, stderr_fd: int) -> None:
        self._records = _Records()
        root = logging.getLogger()
        root.addHandler(self._records)
        # Records also go to stderr (so to the output and the worker's log), as Python's
        # last-resort handler would have printed them without ours.
        echo = logging.StreamHandler()
        echo.setLevel(protocol.TASK_LOG_LEVEL)
        root.addHandler(echo)
        self._rss = _PeakRss()
        self._output = _Output(stderr_fd)
        # A task that crashes the subprocess never reaches the end of its capture: Python's
        # traceback of a fatal signal goes straight to the worker's log instead.
        self._fault_file = os.fdopen(os.dup(stderr_fd), "w")
        faulthandler.enable(self._fault_file)
        self.info = TaskInfo()
        self._caught: Any = None
        self._log: list[warnings.WarningMessage] = []
        self._t0 = self._cpu0 = 0.0

    def close(self) -> None:
        """The subprocess is ending: pass on what it printed since its last task."""
        self._output.flush()

    def __enter__(self) -> TaskCapture:
        self._records.records = []
        self._rss.reset()
        self._output.start()
        # Entering resets the registries of the "default" action: each task reports each
        # warning it raises once per place, filtered as Python would here.
        self._caught = warnings.catch_warnings(record=True)
        self._log = self._caught.__enter__()
        self._t0 = time.perf_counter()
        self._cpu0 = time.process_time()  # cheaper than getrusage; one of those at the end
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._t0
        cpu = time.process_time() - self._cpu0
        max_rss = self._rss.peak()
        self._caught.__exit__(None, None, None)
        output = self._output.stop()
        self.info = TaskInfo(
            wall=wall,
            cpu=max(cpu, 0.0),
            max_rss=max_rss,
            warnings=_warnings(self._log) if self._log else [],
            logs=self._records.records,
            output=output,
        )


def _warnings(caught: list[warnings.WarningMessage]) -> list[TaskWarning]:
    """Distinct warnings (category, text, place) with how often each came, bounded."""
    seen: dict[tuple[str, str, str, int], int] = {}
    for w in caught:
        category = f"{w.category.__module__}.{w.category.__qualname__}"
        key = (category, _cut(str(w.message)), _cut(w.filename or ""), w.lineno or 0)
        if key not in seen and len(seen) >= protocol.TASK_WARNINGS_MAX:
            continue
        seen[key] = seen.get(key, 0) + 1
    return [TaskWarning(*key, "", count) for key, count in seen.items()]
