"""Task functions the tests run on real workers.

Pickled by value (registered below): the workers cannot import the tests.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time

import cloudpickle

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def square(x: int) -> int:
    return x * x


def slow_square(x: int) -> int:
    time.sleep(0.05)
    return x * x


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def add_all(values: list[int]) -> int:
    """A reducer."""
    return sum(values)


def slow_sum(values: list[int]) -> int:
    """A reducer slow enough to be caught merging."""
    time.sleep(0.2)
    return sum(values)


def fail_on(x: int, bad: int) -> int:
    if x == bad:
        raise ValueError(f"cannot take {x}")
    return x


def exit_on(x: int, bad: int) -> int:
    """Ends its own subprocess (``os._exit``) for x == bad."""
    if x == bad:
        os._exit(3)
    return x


def segfault_on(x: int, bad: int) -> int:
    if x == bad:
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    return x


def killed_on(x: int, bad: int) -> int:
    """Dies the way the kernel's out-of-memory killer ends a process: SIGKILL."""
    if x == bad:
        os.kill(os.getpid(), signal.SIGKILL)
    return x
