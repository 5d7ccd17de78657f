"""Helpers the tests share (not task functions: those are in ``tests/tasks.py``)."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable
from typing import Any


def poll_until(
    condition: Callable[[], object], timeout: float, what: str, every: float = 0.05
) -> float:
    """Call ``condition`` every ``every`` seconds until it is true; fail the test if that
    takes over ``timeout`` seconds. ``what`` says what was awaited. Returns the seconds
    it took."""
    start = time.monotonic()
    while not condition():
        waited = time.monotonic() - start
        assert waited < timeout, f"not within {timeout:g}s: {what}"
        time.sleep(every)
    return time.monotonic() - start


def get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())
