"""Fault injection: real processes killed, hung, restarted mid-job; every result exactly once.

Marked slow: run with ``pytest -m slow`` (CI runs them).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from coffea_hq import Client, protocol
from coffea_hq.embedded import EmbeddedRedis, free_port

from .conftest import Processes
from .tasks import nap, slow_square, slow_sum
from .util import get_json, poll_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def counters(url: str) -> dict[str, int]:
    """The server's own task accounting (the client deduplicates; the server must not
    need it to)."""
    return get_json(url + protocol.QUEUE, timeout=10)["counters"]  # type: ignore[no-any-return]


def collect_while(job: Any, when: int, action: Callable[[], None], url: str) -> dict[int, int]:
    """Gather results, running ``action`` once ``when`` of them have arrived; then check
    that the server accepted exactly one result per task."""
    got: dict[int, int] = {}
    fired = False
    for index, value in job.as_completed(timeout=120):
        got[index] = value
        if not fired and len(got) >= when:
            fired = True
            action()
    assert fired
    counted = counters(url)
    assert counted["tasks_ok"] == len(job), counted
    return got


def busy_worker(processes: Processes, url: str) -> Any:
    return processes.worker(url, "--slots", "2")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_worker_killed_or_hung_mid_job_loses_nothing(
    store: EmbeddedRedis, processes: Processes, prefix: str, sig: signal.Signals
) -> None:
    url, _ = processes.server(store.url, "--lease-timeout", "2", prefix=prefix)
    victim = busy_worker(processes, url)
    busy_worker(processes, url)
    with Client(url) as client:
        job = client.map(slow_square, range(300))
        got = collect_while(job, 50, lambda: victim.send_signal(sig), url)
        assert got == {i: i * i for i in range(300)}
        if sig == signal.SIGKILL:
            assert victim.wait(timeout=5) == -signal.SIGKILL
            return
        # Woken up, the hung worker's late results are refused, and it carries on.
        victim.send_signal(signal.SIGCONT)
        assert client.map(slow_square, range(40)).result(timeout=60) == [i * i for i in range(40)]


def test_server_killed_and_restarted_on_the_same_port(
    store: EmbeddedRedis, processes: Processes, prefix: str
) -> None:
    port = free_port()
    url, server = processes.server(store.url, "--lease-timeout", "5", prefix=prefix, port=port)
    busy_worker(processes, url)
    busy_worker(processes, url)

    def restart() -> None:
        server.send_signal(signal.SIGKILL)
        server.wait()
        time.sleep(1.0)  # clients and workers see connection refused meanwhile
        processes.server(store.url, "--lease-timeout", "5", prefix=prefix, port=port)

    with Client(url) as client:
        job = client.map(slow_square, range(300))
        got = collect_while(job, 50, restart, url)
    assert got == {i: i * i for i in range(300)}


def test_store_restarted_mid_job_with_persistence(
    embedded_store: EmbeddedRedis, processes: Processes
) -> None:
    url, _ = processes.server(embedded_store.url, "--lease-timeout", "5")
    busy_worker(processes, url)
    busy_worker(processes, url)

    def restart() -> None:
        embedded_store.stop(keep_data=True)  # SIGTERM: the store writes its AOF and exits
        time.sleep(1.0)
        embedded_store.start()

    with Client(url) as client:
        job = client.map(slow_square, range(300))
        got = collect_while(job, 50, restart, url)
    assert got == {i: i * i for i in range(300)}


def test_store_killed_mid_job_with_fsync_always(processes: Processes) -> None:
    """SIGKILL, not a clean shutdown: with appendfsync always nothing acknowledged is lost."""
    store = EmbeddedRedis(appendfsync="always").start()
    try:
        url, _ = processes.server(store.url, "--lease-timeout", "5")
        busy_worker(processes, url)

        def crash() -> None:
            store.kill()
            time.sleep(0.5)
            store.start()

        with Client(url) as client:
            job = client.map(slow_square, range(200))
            got = collect_while(job, 40, crash, url)
        assert got == {i: i * i for i in range(200)}
    finally:
        processes.stop_all()
        store.stop()


def test_sigterm_drains_a_worker_without_losing_or_retrying(
    store: EmbeddedRedis, processes: Processes, prefix: str
) -> None:
    url, _ = processes.server(store.url, "--lease-timeout", "3", prefix=prefix)
    leaving = processes.worker(url, "--slots", "2")
    with Client(url) as client:
        # max_attempts=1: a task handed back on drain must not count as a failed attempt.
        job = client.map(slow_square, range(400), max_attempts=1)
        started = time.monotonic()

        def drain() -> None:
            leaving.send_signal(signal.SIGTERM)
            processes.worker(url, "--slots", "2")

        got = collect_while(job, 40, drain, url)
        assert got == {i: i * i for i in range(400)}
        assert leaving.wait(timeout=30) == 0
        assert time.monotonic() - started < 60


def test_sigterm_stops_the_server_cleanly(
    store: EmbeddedRedis, processes: Processes, prefix: str
) -> None:
    url, server = processes.server(store.url, prefix=prefix)
    worker = processes.worker(url)
    with Client(url) as client:
        assert client.map(slow_square, range(10)).result(timeout=30) == [i * i for i in range(10)]
    time.sleep(0.5)  # the idle worker's lease request is now parked on the server
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=15) == 0
    worker.kill()  # it would otherwise keep retrying the server it lost


def test_many_workers_killed_repeatedly(
    store: EmbeddedRedis, processes: Processes, prefix: str
) -> None:
    """A chaos loop, bounded: kill a random worker every 0.5 s, start a fresh one."""
    url, _ = processes.server(store.url, "--lease-timeout", "2", prefix=prefix)
    workers = [busy_worker(processes, url) for _ in range(3)]
    stop = threading.Event()

    def chaos() -> None:
        for i in range(8):
            if stop.wait(0.7):
                return
            victim = workers[i % len(workers)]
            os.kill(victim.pid, signal.SIGKILL)
            workers[i % len(workers)] = busy_worker(processes, url)

    with Client(url) as client:
        job = client.map(slow_square, range(600), max_attempts=10)
        thread = threading.Thread(target=chaos)
        got = collect_while(job, 20, thread.start, url)
        stop.set()
        thread.join()
    assert got == {i: i * i for i in range(600)}


def test_worker_killed_while_merging_loses_nothing(
    store: EmbeddedRedis, processes: Processes, prefix: str
) -> None:
    url, _ = processes.server(store.url, "--lease-timeout", "2", prefix=prefix)
    victim = busy_worker(processes, url)
    busy_worker(processes, url)
    with Client(url) as client:
        job = client.map(slow_square, range(300), reduce=slow_sum, fanin=4)

        def kill_when_merging() -> None:
            poll_until(lambda: job.status()["merges"] >= 5, 30, "5 merges are done")
            victim.send_signal(signal.SIGKILL)

        collect_while(job, 100, kill_when_merging, url)
        assert job.result(timeout=120) == sum(i * i for i in range(300))
    assert victim.wait(timeout=5) == -signal.SIGKILL


def test_second_sigterm_aborts_a_draining_worker(
    store: EmbeddedRedis, processes: Processes, prefix: str
) -> None:
    url, _ = processes.server(store.url, "--lease-timeout", "2", prefix=prefix)
    stubborn = processes.worker(url)
    with Client(url) as client:
        job = client.map(nap, [0.01, 30.0])
        poll_until(lambda: job.status()["done"] >= 1, 20, "the short task is done", every=0.1)
        time.sleep(0.5)  # the 30 s task is running now
        stubborn.send_signal(signal.SIGTERM)  # drain: would wait for the 30 s task
        time.sleep(0.5)
        assert stubborn.poll() is None
        stubborn.send_signal(signal.SIGTERM)  # abort
        assert stubborn.wait(timeout=10) == 0
        job.cancel()


def test_results_long_poll_outlasts_a_quiet_store(
    store: EmbeddedRedis, processes: Processes, prefix: str
) -> None:
    """No result for longer than the store client's default socket timeout (5 s) and
    longer than the client's whole retry budget: the long poll just waits."""
    url, _ = processes.server(store.url, prefix=prefix)
    processes.worker(url)
    with Client(url, retry_for=3) as client:
        assert client.map(nap, [8.0]).result(timeout=60) == [8.0]
