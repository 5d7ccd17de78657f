"""The event loop of the long-running processes (hq-server, hq-worker).

uvloop (libuv under asyncio's API) does the per-request work asyncio does in Python -
scheduling callbacks, reading and writing sockets - in C. Where it is installed (Linux and
macOS, a dependency there) hq-worker uses it. hq-server does not by default: measured
with benchmarks/scale.py (benchmarks/README.md), aiohttp + redis-py on uvloop cost the
server 7-17% more CPU per request than on the standard loop. ``HQ_EVENT_LOOP=asyncio``
selects the standard loop for both (to rule uvloop out when debugging),
``HQ_EVENT_LOOP=uvloop`` uvloop for both.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

from .protocol import ENV_EVENT_LOOP

__all__ = ["new_event_loop", "run", "using_uvloop"]

T = TypeVar("T")


def using_uvloop(prefer: bool = True) -> bool:
    """Whether new loops from this module are uvloop's (``prefer`` False: only when
    ``HQ_EVENT_LOOP=uvloop`` asks for it)."""
    asked = os.environ.get(ENV_EVENT_LOOP, "").strip().lower()
    if asked == "asyncio" or (not prefer and asked != "uvloop"):
        return False
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def new_event_loop(prefer_uvloop: bool = True) -> asyncio.AbstractEventLoop:
    """A fresh event loop: uvloop's where available (and preferred, or asked for by
    ``HQ_EVENT_LOOP=uvloop``), else asyncio's."""
    if using_uvloop(prefer_uvloop):
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on a loop from :func:`new_event_loop`."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)
