"""What tasks told on the workers, told again in the analysis session.

The server hands each task's note (:class:`coffea_hq.messages.TaskNote`: the warnings and
log records the task raised, its wall and CPU time, its peak memory) to the client with the
task's result. :class:`TaskNotes` re-emits the warnings as the same category (imported by
name here; :class:`RemoteWarning` when that fails) and the log records through
:mod:`logging` under their original logger's name, each naming the worker, and keeps the
resources for ``HQExecutor(savemetrics=True)``.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RemoteWarning", "TaskNotes", "TaskResources"]


class RemoteWarning(UserWarning):
    """A task's warning whose category cannot be imported in the analysis session."""


def warning_category(name: str) -> type[Warning] | None:
    """The warning class named ``module.qualname``, if it can be imported here."""
    module, _, qualname = name.rpartition(".")
    if not module:
        module = "builtins"
    try:
        value: Any = importlib.import_module(module)
        for part in qualname.split("."):
            value = getattr(value, part)
    except Exception:  # a module missing here, a class defined in a function
        return None
    return value if isinstance(value, type) and issubclass(value, Warning) else None


@dataclass(slots=True)
class TaskResources:
    """Totals and maxima over the tasks of a job (``count`` of them): seconds of wall and
    CPU time, and the largest peak resident set of a task's subprocess (bytes)."""

    count: int = 0
    wall: float = 0.0
    cpu: float = 0.0
    wall_max: float = 0.0
    cpu_max: float = 0.0
    max_rss: int = 0

    def add(self, wall: float, cpu: float, max_rss: int) -> None:
        self.count += 1
        self.wall += wall
        self.cpu += cpu
        self.wall_max = max(self.wall_max, wall)
        self.cpu_max = max(self.cpu_max, cpu)
        self.max_rss = max(self.max_rss, max_rss)


@dataclass(slots=True)
class TaskNotes:
    """One job's notes as they arrive: warnings shown once each (by category, text and
    place, as Python's default filter does), log records passed on, resources added up
    (``chunks`` for the job's own tasks, ``merges`` for merges on workers)."""

    chunks: TaskResources = field(default_factory=TaskResources)
    merges: TaskResources = field(default_factory=TaskResources)
    # task id -> (wall s, CPU s, peak RSS bytes, worker) of each of the job's own tasks
    tasks: dict[str, tuple[float, float, int, str]] = field(default_factory=dict)
    _seen: set[tuple[Any, ...]] = field(default_factory=set)

    def take(self, task: str, note: dict[str, Any], merge: bool) -> None:
        worker = str(note.get("worker", "?"))
        wall, cpu = float(note.get("wall", 0.0)), float(note.get("cpu", 0.0))
        rss = int(note.get("max_rss", 0))
        (self.merges if merge else self.chunks).add(wall, cpu, rss)
        if not merge:
            self.tasks[task] = (wall, cpu, rss, worker)
        for w in note.get("warnings", ()):
            self._warn(worker, *w)
        for record in note.get("logs", ()):
            _log(worker, *record)

    def _warn(
        self,
        worker: str,
        category: str,
        message: str,
        filename: str = "",
        lineno: int = 0,
        module: str = "",
        count: int = 1,
    ) -> None:
        key = (category, message, filename, lineno)
        if key in self._seen:
            return
        self._seen.add(key)
        cls = warning_category(category)
        text = f"{message} [on worker {worker}]"
        if cls is None:
            cls, text = RemoteWarning, f"{category}: {text}"
        try:
            warning = cls(text)
        except Exception:  # a category whose constructor wants more than a message
            warning = RemoteWarning(f"{category}: {text}")
        where: dict[str, Any] = {"module": module} if module else {}  # None would mute it
        warnings.warn_explicit(warning, type(warning), filename or "<worker>", lineno, **where)


def _log(
    worker: str,
    name: str,
    level: int,
    message: str,
    pathname: str = "",
    lineno: int = 0,
    created: float = 0.0,
) -> None:
    logger = logging.getLogger(None if name == "root" else name)
    if not logger.isEnabledFor(level):
        return
    record = logger.makeRecord(
        name,
        level,
        pathname,
        lineno,
        "%s [on worker %s]",
        (message, worker),
        None,
        extra={"worker": worker},
    )
    if created:
        record.created = created
    logger.handle(record)
