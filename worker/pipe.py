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


def encode(message: Any) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(data)) + data


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
