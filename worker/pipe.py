"""Messages between a worker and its task subprocesses: length-prefixed pickles.

Parent to child: ``("function", sha, bytes)`` installs a function;
``("run", [(seq, sha, payload, merge), ...])`` runs a batch in order (``merge``: the
payload holds the inputs' results and the function takes their list).
Child to parent: ``("done", [(seq, outcome, error, data, seconds, info), ...])`` (``info``
a :class:`coffea_hq.messages.TaskInfo`), flushed
every few milliseconds and at the end of each batch; ``("modules", [name, ...])`` before a
few of those: the top-level modules it has imported (see :mod:`.zygote`).
"""

from __future__ import annotations

import pickle
import struct
from typing import Any, BinaryIO

HEADER = struct.Struct("!Q")
FLUSH_EVERY = 0.02  # seconds: results of short tasks travel together

# The marker file a slot shares with its subprocess (an unlinked temporary file): the
# sequence number of the task running, then that task's own limits (memory bytes, wall
# seconds; 0 for none), which the worker's slot watches the subprocess against.
MARKER = struct.Struct("!q")
LIMITS = struct.Struct("!qd")
MARKER_SIZE = MARKER.size + LIMITS.size


def task_limits(function: Any) -> tuple[int, float]:
    """The limits a job's function asks for (``task_limits``, set by HQExecutor's
    wrapper, possibly under other wrappers that keep the wrapped one as ``function``)."""
    for _ in range(8):
        limits = getattr(function, "task_limits", None)
        if limits is not None:
            memory, walltime = limits
            return int(memory or 0), float(walltime or 0.0)
        function = getattr(function, "function", None)
        if function is None:
            break
    return 0, 0.0


def encode(message: Any) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(data)) + data


def write_blocking(stream: BinaryIO, message: Any) -> None:
    """Write one message whole. A raw pipe's write may take only part of a large message
    when a signal handler (one a task installed, say) interrupts it; the rest follows."""
    view = memoryview(encode(message))
    while view:
        view = view[stream.write(view) or 0 :]


def decode(data: bytes) -> Any:
    return pickle.loads(data)


def read_blocking(stream: BinaryIO) -> Any | None:
    """Read one message; None at end of stream."""
    head = stream.read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    (size,) = HEADER.unpack(head)
    data = stream.read(size)
    if len(data) < size:
        return None
    return pickle.loads(data)
