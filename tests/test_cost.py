"""The per-task cost cuts (issue 13's "Cost"): heartbeats that leave out leases taken a
moment ago, the collector settings of the long-running processes, the results route's
round trips. Each keeps a behaviour the server's own accounting can show."""

from __future__ import annotations

import subprocess
import sys
import time

import cloudpickle
import pytest
from coffea_hq.worker.agent import Leases
from coffea_hq.worker.slots import HeldTask

from coffea_hq import Client, gctune, protocol

from .conftest import Processes
from .util import get_json

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def pause_on(x: int, slow: int, seconds: float) -> int:
    """Quick, except task ``slow``, which outlasts the lease timeout."""
    time.sleep(seconds if x == slow else 0.005)
    return x


def _held(task: str, age: float) -> HeldTask:
    return HeldTask("j", task, 1, "f" * 64, b"", since=time.monotonic() - age)


def test_a_beat_leaves_out_only_pending_leases_taken_a_moment_ago() -> None:
    leases = Leases()
    leases.add([_held("old", 10.0), _held("new", 0.0), _held("newer", 0.0)])
    assert [i.task for i in leases.take(1)] == ["old"]  # oldest first, now running
    assert {r.task for r in leases.refs(fresh_for=5.0)} == {"old"}
    assert [i.task for i in leases.take(1)] == ["new"]  # running: listed however fresh
    assert {r.task for r in leases.refs(fresh_for=5.0)} == {"old", "new"}
    assert {r.task for r in leases.refs()} == {"old", "new", "newer"}


@pytest.mark.slow
def test_pending_leases_are_still_extended_behind_a_slow_task(
    store: object, processes: Processes, prefix: str
) -> None:
    """A short lease timeout and a task that outlasts it while others wait behind it in
    the worker: every lease is extended in time (no requeue, no refused report)."""
    url, _ = processes.server(store.url, "--lease-timeout", "1.5", prefix=prefix)  # type: ignore[attr-defined]
    processes.worker(url, "--slots", "1")
    before = get_json(url + protocol.QUEUE)["counters"]
    with Client(url) as client:
        got = client.map(pause_on, range(120), [40] * 120, [3.0] * 120).result(timeout=60)
    assert sorted(got) == list(range(120))
    after = get_json(url + protocol.QUEUE)["counters"]
    for counter in ("requeued", "refused", "duplicates"):
        assert after.get(counter, 0) == before.get(counter, 0), (counter, before, after)
    workers = get_json(url + protocol.WORKERS)
    assert workers and all(w["stats"]["held"] >= 0 for w in workers.values())


def test_steady_state_freezes_startup_and_collects_less_often() -> None:
    code = (
        "import gc; from coffea_hq import gctune; gctune.steady_state(); "
        "print(gc.get_threshold()[0], gc.get_freeze_count() > 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(gctune.YOUNG_THRESHOLD), "True"]
