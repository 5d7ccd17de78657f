"""A task leased ahead for a busy slot waits in the slot's subprocess behind the running
one (worker/slots.py ``Slot.extend``), and a crash of the running task costs the queued
one nothing: it runs once, in the restarted subprocess, by the server's own count."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import cloudpickle

from coffea_hq import Client

from .conftest import Processes
from .test_zygote import worker_stats
from .util import poll_until

cloudpickle.register_pickle_by_value(sys.modules[__name__])

CRASHER = 2


def run_or_crash(i: int, marker: str, seconds: float) -> int:
    """Task ``CRASHER`` kills its own process on its first attempt, long after its
    successor was leased ahead (the mean runtime is ``seconds``)."""
    if i == CRASHER and not os.path.exists(marker):
        Path(marker).touch()
        time.sleep(3 * seconds)
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(seconds)
    return i


def test_a_crash_under_a_queued_task_costs_the_queued_one_nothing(
    server_url: str, processes: Processes, tmp_path: Path
) -> None:
    processes.worker(server_url, "--slots", "1")
    marker = str(tmp_path / "crashed-once")
    with Client(server_url) as client:
        assert client.map(time.sleep, [0.3] * 3).result(timeout=60) == [None] * 3
        before: dict[str, Any] = client.queue()["counters"]
        n = 6
        out = client.map(run_or_crash, range(n), [marker] * n, [0.3] * n).result(timeout=120)
        counters: dict[str, Any] = client.queue()["counters"]
    assert out == list(range(n))
    assert os.path.exists(marker)

    def grew(name: str) -> int:
        return int(counters.get(name, 0)) - int(before.get(name, 0))

    # The crashed task's attempt alone went back to the server; every task was accepted
    # once, the queued one included (a second report would count as a duplicate).
    assert grew("requeued") == 1
    assert grew("tasks_ok") == n
    assert grew("duplicates") == 0 and grew("refused") == 0
    # And tasks did wait in the subprocess behind running ones (the path under test).
    stats: dict[str, Any] = {}

    def queued() -> bool:
        nonlocal stats
        stats = worker_stats(server_url)
        return int(stats.get("queued_ahead", 0)) >= n - 2

    poll_until(queued, 30, "the worker's heartbeat counting queued tasks", every=0.2)
    assert stats.get("crashed", 0) == 1
