"""The event loop of the long-running processes (hq-server, hq-worker).

uvloop (libuv under asyncio's API) does the per-request work asyncio does in Python -
scheduling callbacks, reading and writing sockets - in C. hq-server spent about a fifth
of its CPU per request in asyncio itself and a tenth in socket sends, so where uvloop is
installed (Linux and macOS, a dependency there) both processes use it. Elsewhere, or with
``HQ_EVENT_LOOP=asyncio`` (to rule it out when debugging), the standard loop runs.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

from .protocol import ENV_EVENT_LOOP

__all__ = ["new_event_loop", "run", "using_uvloop"]

T = TypeVar("T")


def using_uvloop() -> bool:
    """Whether new loops from this module are uvloop's."""
    if os.environ.get(ENV_EVENT_LOOP, "").strip().lower() == "asyncio":
        return False
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A fresh event loop: uvloop's where available, else asyncio's."""
    if using_uvloop():
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on a loop from :func:`new_event_loop`."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)
