"""Per-chunk limits, and splitting a chunk that needs more memory than its limit.

``HQExecutor(memory="2GiB", walltime=600)`` wraps coffea's work function in
:class:`LimitedTask`, which carries the limits to the slot subprocess that runs each chunk:
the worker watches that subprocess's resident memory and wall time and stops it when it
goes over, and the chunk fails as ``memory_exceeded`` or ``walltime_exceeded``
(:data:`coffea_hq.protocol.MEMORY_EXCEEDED_TYPE`, ``WALLTIME_EXCEEDED_TYPE``), without
being retried as it is. ``HQExecutor`` then runs each chunk that went over its memory
limit again as two halves by entry range (:func:`halves`), as a follow-up job, halving
again down to ``min_entries``; the halves' outputs add up to the chunk's, so the analysis
sees the same result as unsplit. A chunk over its wall-time limit is not split (a slow
chunk is more often a slow file or node than a large one): it fails with its reason.
"""

from __future__ import annotations

import dataclasses
import resource
from collections.abc import Callable
from typing import Any

from . import protocol
from .errors import MemoryExceeded, TaskFailed

__all__ = ["LimitedTask", "halves", "is_memory_exceeded", "restore_processed"]

# The address-space backstop under the worker's RSS watch (RLIMIT_DATA): far above the
# limit, so that only a runaway allocation the watch cannot see in time meets it.
BACKSTOP_FACTOR = 4
BACKSTOP_MIN_EXTRA = 2 * 1024**3


class LimitedTask:
    """``function`` with per-task limits (``memory`` bytes, ``walltime`` seconds; 0: none),
    read by the slot subprocess from ``task_limits``. In the subprocess it also sets a
    data-segment limit well above ``memory``, and turns a ``MemoryError`` raised there
    into :class:`~coffea_hq.errors.MemoryExceeded` (the chunk is split as well)."""

    def __init__(self, function: Callable[..., Any], memory: int = 0, walltime: float = 0.0):
        self.function = function
        self.task_limits = (memory, walltime)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        memory = self.task_limits[0]
        if memory:
            _backstop(memory)
        try:
            return self.function(*args, **kwargs)
        except Exception as e:
            if memory and _caused_by_memory_error(e):
                raise MemoryExceeded(
                    f"the task ran out of memory under its limit of {memory} bytes: {e}"
                ) from e
            raise


def _backstop(memory: int) -> None:
    soft = max(BACKSTOP_FACTOR * memory, memory + BACKSTOP_MIN_EXTRA)
    try:
        current, hard = resource.getrlimit(resource.RLIMIT_DATA)
        if hard != resource.RLIM_INFINITY:
            soft = min(soft, hard)
        if current != soft:
            resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))
    except (ValueError, OSError):  # not on this platform: the worker's RSS watch remains
        pass


def _caused_by_memory_error(e: BaseException) -> bool:
    seen = 0
    chain: BaseException | None = e
    while chain is not None and seen < 32:
        if isinstance(chain, MemoryError):
            return True
        chain = chain.__cause__ or chain.__context__
        seen += 1
    return False


def is_memory_exceeded(failure: TaskFailed) -> bool:
    """Whether a chunk failed by going over its memory limit."""
    return failure.exc_type == protocol.MEMORY_EXCEEDED_TYPE or isinstance(
        failure.exception, MemoryExceeded
    )


def entries(item: Any) -> int | None:
    """How many entries a coffea work item spans (None: not a chunk of a file)."""
    start, stop = getattr(item, "entrystart", None), getattr(item, "entrystop", None)
    if start is None or stop is None:
        return None
    return int(stop) - int(start)


def halves(item: Any) -> list[Any]:
    """``item`` (a coffea ``WorkItem``) as two work items of half its entry range each."""
    start, stop = int(item.entrystart), int(item.entrystop)
    middle = start + (stop - start) // 2
    return [
        dataclasses.replace(item, entrystart=start, entrystop=middle),
        dataclasses.replace(item, entrystart=middle, entrystop=stop),
    ]


def restore_processed(output: Any, split: dict[Any, list[Any]]) -> Any:
    """Put each split chunk back into the ``processed`` set of coffea's output in place of
    its halves, so the output is the one the unsplit run gives."""
    processed = output.get("processed") if isinstance(output, dict) else None
    if not isinstance(processed, set):
        return output
    for item, parts in split.items():
        if all(p in processed for p in parts):
            processed.difference_update(parts)
            processed.add(item)
    return output
