"""Fault injection on the worker itself: hung and resumed, drained while a slot crashes.

Marked slow: run with ``pytest -m slow``.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import cloudpickle
import pytest

from coffea_hq import Client, protocol
from coffea_hq.embedded import EmbeddedRedis

from .conftest import Processes
from .tasks import nap
from .util import get_json, poll_until

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def wait_for_worker(url: str, timeout: float = 10.0) -> None:
    poll_until(lambda: get_json(url + protocol.WORKERS), timeout, "a worker registers", 0.1)


def test_a_hung_worker_resumed_keeps_the_attempt_it_was_given_meanwhile(
    store: EmbeddedRedis, processes: Processes, prefix: str
) -> None:
    """Attempt 1 expires while the worker is stopped; attempt 2 lands in its parked long
    poll. On resume, the notice that attempt 1 is lost must not kill attempt 2."""
    url, _ = processes.server(store.url, "--lease-timeout", "3", prefix=prefix)
    worker = processes.worker(url, "--slots", "2")
    with Client(url) as client:
        wait_for_worker(url)
        time.sleep(0.5)  # its second slot's lease request is parked on the server now
        job = client.map(nap, [6.0], max_attempts=2)
        started = time.monotonic()
        time.sleep(1.2)
        worker.send_signal(signal.SIGSTOP)  # the agent only: its task subprocess runs on
        time.sleep(5.7 - (time.monotonic() - started))
        worker.send_signal(signal.SIGCONT)
        assert job.result(timeout=60) == [6.0]  # and the server counts a task once
    assert worker.poll() is None


def exit_once_when_told(x: int, go: str, crashed: str) -> int:
    """Short, except x == 0 the first time: it waits for the file ``go``, then kills its
    subprocess, taking the rest of its batch down with it."""
    if x == 0 and not os.path.exists(crashed):
        deadline = time.monotonic() + 30
        while not os.path.exists(go) and time.monotonic() < deadline:
            time.sleep(0.01)
        Path(crashed).touch()
        os._exit(3)
    return x


def test_a_drain_ends_even_when_a_slot_crashes_after_it_began(
    store: EmbeddedRedis, processes: Processes, prefix: str, tmp_path: Path
) -> None:
    url, _ = processes.server(store.url, "--lease-timeout", "3", prefix=prefix)
    leaving = processes.worker(url)
    go, crashed = str(tmp_path / "go"), str(tmp_path / "crashed")
    n = 2000
    with Client(url) as client:
        # Learn that these tasks are short, so the next job runs in batches.
        assert client.map(nap, [0.0] * 50).result(timeout=30) == [0.0] * 50
        order = [*range(1, 300), 0, *range(300, n)]  # 0 sits inside a batch
        job = client.map(exit_once_when_told, order, [go] * n, [crashed] * n)
        poll_until(lambda: job.status()["done"] >= 250, 30, "250 tasks are done")
        leaving.send_signal(signal.SIGTERM)
        time.sleep(1.0)  # the drain has handed back what was queued in the worker
        Path(go).touch()  # now the slot dies: the rest of its batch comes back to the agent
        processes.worker(url)
        assert leaving.wait(timeout=20) == 0
        assert job.result(timeout=60) == order
        assert os.path.exists(crashed)


def test_a_drain_out_of_time_hands_back_the_running_task(
    store: EmbeddedRedis, processes: Processes, prefix: str
) -> None:
    url, _ = processes.server(store.url, "--lease-timeout", "3", prefix=prefix)
    leaving = processes.worker(url, "--drain-timeout", "1")
    with Client(url) as client:
        wait_for_worker(url)
        # max_attempts=1: handed back, not expired, or the task would fail for good.
        job = client.map(nap, [4.0], max_attempts=1)
        poll_until(lambda: client_leased(url), 10, "the task is leased")
        time.sleep(0.5)  # running now
        leaving.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert leaving.wait(timeout=15) == 0
        assert time.monotonic() - started < 6  # 1 s of drain, then out at once
        processes.worker(url)
        assert job.result(timeout=30) == [4.0]


def client_leased(url: str) -> int:
    return int(get_json(url + protocol.QUEUE)["running"])


def test_a_drain_ends_in_time_when_the_server_is_gone(
    store: EmbeddedRedis, processes: Processes, prefix: str
) -> None:
    """Every request of a drain retries only as long as the drain has left."""
    url, server = processes.server(store.url, "--lease-timeout", "5", prefix=prefix)
    worker = processes.worker(url, "--drain-timeout", "2")
    with Client(url) as client:
        wait_for_worker(url)
        client.map(nap, [30.0])
        poll_until(lambda: worker_busy(url), 20, "the task starts", every=0.2)
        server.kill()
        server.wait()
        worker.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        # 2 s of drain, a few short retries past it, the slot's stop: well under 30 s.
        assert worker.wait(timeout=30) == 0
        assert time.monotonic() - stopped < 20


def worker_busy(url: str) -> bool:
    workers = get_json(url + protocol.WORKERS)
    return any(w["stats"].get("busy_slots", 0) > 0 for w in workers.values())
