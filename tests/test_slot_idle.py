"""What kept an AGC worker slot idle between a run's chunks (issue 15's locality goal):
the next task leased only after the last one's report, and each job's first task
importing the submodules a zygote that preloads only top-level packages lacks."""

from __future__ import annotations

import sys
import time

import cloudpickle
from coffea_hq.worker.leaseahead import MARGIN_MAX, MARGIN_MIN, LeaseAhead

from coffea_hq import Client

from .conftest import Processes
from .test_zygote import parent_cmdline, wait_preloaded, worker_stats

cloudpickle.register_pickle_by_value(sys.modules[__name__])

SUBMODULE = "coffea_hq.sizes"  # imported by no part of a slot subprocess but the task


def test_lease_ahead_asks_for_a_busy_slot_s_next_task_just_before_it_ends() -> None:
    ahead = LeaseAhead()
    assert ahead.due(None, 0, now=0.0) == (0, None)  # runtimes unknown: no guess
    ahead.started(0, now=10.0)
    ahead.started(1, now=10.1)
    n, wait = ahead.due(1.0, 0, now=10.0)
    assert n == 0 and wait is not None and 1.0 - MARGIN_MAX <= wait <= 1.0 - MARGIN_MIN
    n, wait = ahead.due(1.0, 0, now=10.0 + wait)  # slot 0 due, slot 1 later
    assert n == 1 and wait is None
    assert ahead.due(1.0, 1, now=11.09)[0] == 1  # both due, one task pending already
    assert ahead.due(1.0, 2, now=11.09) == (0, None)  # both covered: wait for a lease end
    ahead.stopped(0)
    ahead.stopped(1)
    assert ahead.due(1.0, 0, now=11.0) == (0, None)  # idle slots are the room's business
    # The margin follows the lease round trip, within bounds, and never half a task.
    for _ in range(50):
        ahead.observe(0.03)
    assert abs(ahead.margin(1.0) - 0.06) < 1e-3
    assert ahead.margin(0.05) == 0.025
    ahead.observe(10.0)
    assert ahead.margin(1.0) == MARGIN_MAX


def waits_for_its_successor(url: str, bound: float) -> tuple[float, bool]:
    """A task that runs until the server counts two of its job's tasks leased (itself and
    the one leased ahead for after it), for at most ``bound`` seconds; (its run time,
    whether it saw that)."""
    start = time.monotonic()
    with Client(url) as client:
        while time.monotonic() - start < bound:
            if client.queue()["running"] >= 2:
                return time.monotonic() - start, True
            time.sleep(0.02)
    return time.monotonic() - start, False


def test_a_one_slot_worker_leases_the_next_chunk_before_the_running_one_ends(
    server_url: str, processes: Processes
) -> None:
    processes.worker(server_url, "--slots", "1")
    with Client(server_url) as client:
        # Tasks of 0.3 s teach the worker the mean runtime; then each running task must
        # see its successor leased, by the server's own count.
        warm = client.map(time.sleep, [0.3] * 2).result(timeout=60)
        assert warm == [None] * 2
        seen = client.map(waits_for_its_successor, [server_url] * 4, [1.5] * 4).result(timeout=90)
        counters = client.queue()["counters"]
    # The last task has no successor; each of the others saw one leased.
    assert all(saw for _, saw in seen[:-1]), seen
    assert not seen[-1][1]
    assert counters.get("requeued", 0) == 0 and counters.get("duplicates", 0) == 0


def imports_a_submodule(x: int) -> tuple[bool, str]:
    warm = SUBMODULE in sys.modules
    import coffea_hq.sizes  # noqa: F401

    return warm, parent_cmdline()


def test_the_zygote_learns_submodules_of_packages_it_has(
    server_url: str, processes: Processes
) -> None:
    processes.worker(server_url, "--slots", "1")
    wait_preloaded(server_url, "coffea_hq")  # the package, not the submodule
    assert SUBMODULE not in worker_stats(server_url)["zygote_preloaded"]
    with Client(server_url) as client:
        for _ in range(2):  # two jobs imported it: the next zygote preloads it
            [(was_warm, _)] = client.map(imports_a_submodule, [0]).result(timeout=60)
            assert not was_warm
        wait_preloaded(server_url, SUBMODULE)
        [(was_warm, parent)] = client.map(imports_a_submodule, [0]).result(timeout=60)
    assert was_warm and "coffea_hq.worker.zygote" in parent
