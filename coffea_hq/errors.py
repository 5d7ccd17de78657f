"""The errors a user of coffea-hq can meet, each with a sentence saying what to do.

Every one is an :class:`HQError`, so ``except HQError`` catches whatever coffea-hq
raises. This module imports nothing of coffea_hq: the transport (which the worker loads)
imports its error classes from here.
"""

from __future__ import annotations

import linecache
import re
from typing import Any, Final

__all__ = [
    "HQError",
    "JobCancelled",
    "EnvironmentFailed",
    "MemoryExceeded",
    "ServerError",
    "ServerUnreachable",
    "SubmitFailed",
    "TLSError",
    "TaskFailed",
    "WalltimeExceeded",
    "WorkerLost",
]


class HQError(Exception):
    """Base class of coffea-hq's errors."""


class ServerError(HQError):
    """The server refused a request; ``status`` and ``code`` say why."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{message} (HTTP {status}, {code})")
        self.status = status
        self.code = code
        self.message = message


class ServerUnreachable(HQError, ConnectionError):
    """The server did not answer within the retry budget (``url`` is the server's;
    ``reason`` what the last attempt met)."""

    def __init__(self, message: str, *, url: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.url = url
        self.reason = reason


class TLSError(HQError, ConnectionError):
    """A TLS connection to the server failed in a way retrying cannot fix: a certificate
    not trusted, plaintext on one side, a client certificate missing. Never retried."""

    def __init__(self, message: str, *, url: str = "") -> None:
        super().__init__(message)
        self.url = url


class TaskFailed(HQError):
    """A task raised, or lost its worker on every attempt.

    ``item`` is the task's input (``index`` is -1 for a failed merge of results),
    ``exc_type``/``message``/``traceback`` describe the remote error, ``worker`` names the
    worker it last ran on, and ``exception`` holds the original exception object when it
    could be transported.
    """

    def __init__(
        self,
        job: str,
        index: int,
        item: Any,
        error: dict[str, Any],
        exception: BaseException | None = None,
    ) -> None:
        self.job = job
        self.index = index
        self.item = item
        self.exc_type = str(error.get("type", "unknown"))
        self.message = str(error.get("message", ""))
        self.traceback = fill_source_lines(str(error.get("traceback", "")))
        self.worker = str(error.get("worker", "?"))
        self.attempt = error.get("attempt")
        self.exception = exception
        text = (
            f"task {index} of job {job} failed on worker {self.worker}: "
            f"{self.exc_type}: {self.message}\n  work item: {_short(item)}"
        )
        if self.traceback:
            text += "\n\nRemote traceback:\n" + self.traceback
        self._text = text
        super().__init__(text)

    def __str__(self) -> str:
        # Ours, not the remote class's (KeyError's would quote the whole text).
        return self._text

    @classmethod
    def like(cls, remote: type[BaseException] | None) -> type[TaskFailed]:
        """A subclass of both :class:`TaskFailed` and ``remote`` (made once per class), so
        that ``except KeyError`` catches a task's ``KeyError`` as ``except TaskFailed``
        does; :class:`TaskFailed` itself where no such class can be made."""
        if remote is None or not issubclass(remote, Exception) or issubclass(remote, HQError):
            return cls
        made = _LIKE.get(remote)
        if made is None:
            try:
                made = type(
                    f"TaskFailed[{remote.__qualname__}]",
                    (cls, remote),
                    {"__module__": __name__, "__reduce__": _as_plain_task_failed},
                )
            except TypeError:  # incompatible layouts (some C exception types)
                made = cls
            _LIKE[remote] = made
        return made


_LIKE: dict[type[BaseException], type[TaskFailed]] = {}


def _as_plain_task_failed(self: TaskFailed) -> tuple[Any, ...]:
    # A class made at run time cannot be pickled by name: travel as a plain TaskFailed.
    return (_rebuild, (self.__dict__,))


def _rebuild(state: dict[str, Any]) -> TaskFailed:
    failure = TaskFailed.__new__(TaskFailed)
    failure.__dict__.update(state)
    failure.args = (state.get("_text", ""),)
    return failure


class WorkerLost(HQError):
    """Type name the server gives tasks whose worker died or hung on every attempt."""


class EnvironmentFailed(HQError):
    """A task's software environment could not be made or used on a worker.

    ``step`` names what failed (``'uv pip install'``, ``'rattler install'``, ``'unpack'``,
    ``'check interpreter'``...), ``why`` says what it met (the tool's last lines of output),
    ``environment`` names the environment (its name or short content hash; the worker fills
    it in when the backend raising this does not know it).
    """

    def __init__(self, step: str, why: str, environment: str = "") -> None:
        self.step = step
        self.why = why
        self.environment = environment
        super().__init__(step, why, environment)

    def __str__(self) -> str:
        where = f"environment {self.environment}: " if self.environment else ""
        return f"{where}step {self.step!r} failed: {self.why}"


class MemoryExceeded(HQError, MemoryError):
    """A task went over its memory limit (``HQExecutor(memory=...)`` or ``hq-worker
    --task-memory``); for a coffea chunk, even once split down to the smallest size."""


class WalltimeExceeded(HQError, TimeoutError):
    """A task ran longer than its wall-time limit (``HQExecutor(walltime=...)`` or
    ``hq-worker --task-walltime``)."""


class SubmitFailed(HQError):
    """Submitting a job failed part way; what was created on the server has been deleted."""


class JobCancelled(HQError):
    """The job was cancelled before all its results arrived."""


def _short(item: Any, limit: int = 300) -> str:
    text = repr(item)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_FRAME: Final = re.compile(r'(?P<margin>[ |]*)  File "(?P<file>[^"]+)", line (?P<line>\d+), in ')


def fill_source_lines(traceback_text: str) -> str:
    """The remote traceback with the source lines the worker could not show filled in from
    this process's ``linecache``: the worker had no such file, but this process wrote the
    code (a Jupyter cell, code compiled here), so the physicist sees their own line."""
    lines = traceback_text.splitlines(keepends=True)
    out: list[str] = []
    for i, text in enumerate(lines):
        out.append(text)
        frame = _FRAME.match(text)
        if frame is None:
            continue
        margin = frame["margin"]
        following = lines[i + 1] if i + 1 < len(lines) else ""
        if following.startswith(margin + "    "):
            continue  # the worker showed the line
        source = linecache.getline(frame["file"], int(frame["line"])).strip()
        if source:
            out.append(f"{margin}    {source}\n")
    return "".join(out)
