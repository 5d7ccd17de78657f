"""Functions the dask scheduler tests put in their graphs (pickled by value: the workers
cannot import the tests)."""

from __future__ import annotations

import sys
import time

import cloudpickle

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def inverse_shifted(x: int, at: int = 5) -> float:
    """Raises ZeroDivisionError for ``x == at``."""
    return 1 / (x - at)


def slow_cube(x: int) -> int:
    time.sleep(0.1)
    return x**3


def sleepy(x: int, seconds: float) -> int:
    time.sleep(seconds)
    return x


def odd(x: int) -> bool:
    return x % 2 == 1


def cube(x: int) -> int:
    return x**3
