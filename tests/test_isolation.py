"""No state shared between jobs in a slot: a job's tasks cannot change what another job's
tasks see, because a slot subprocess serves one job and is replaced before the next."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator

import cloudpickle
import pytest

from coffea_hq import Client
from coffea_hq.embedded import EmbeddedRedis

from .conftest import Processes
from .util import poll_until

cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def one_store() -> Iterator[EmbeddedRedis]:
    """One store for the module: what a worker's slots share is the worker's business."""
    server = EmbeddedRedis().start()
    yield server
    server.stop()


@pytest.fixture
def server_url(one_store: EmbeddedRedis, processes: Processes, prefix: str) -> str:
    url, _ = processes.server(one_store.url, "--lease-timeout", "3", prefix=prefix)
    return url


def tamper(x: int) -> int:
    """What a careless (or hostile) task does to the interpreter it runs in."""
    json.dumps = lambda *a, **k: "TAMPERED"  # type: ignore[assignment]
    return os.getpid()


def dump(x: int) -> tuple[str, int]:
    return json.dumps({"x": x}), os.getpid()


def test_a_job_that_tampers_with_a_module_does_not_reach_the_next_job(
    server_url: str, processes: Processes
) -> None:
    processes.worker(server_url, "--slots", "1")
    with Client(server_url) as client:
        tamper_pids = client.map(tamper, range(20)).result(timeout=30)
        later = client.map(dump, range(20)).result(timeout=30)
        again = client.map(dump, range(20)).result(timeout=30)
    assert [text for text, _ in later] == [json.dumps({"x": x}) for x in range(20)]
    assert [text for text, _ in again] == [json.dumps({"x": x}) for x in range(20)]
    # The fast path stays: one subprocess serves all of one job's tasks ...
    assert len(set(tamper_pids)) == 1
    assert len({pid for _, pid in later}) == 1
    # ... and each job gets its own.
    assert {pid for _, pid in later}.isdisjoint(tamper_pids)
    assert {pid for _, pid in again}.isdisjoint({pid for _, pid in later} | set(tamper_pids))


def test_two_jobs_interleaved_on_one_slot_never_share_a_subprocess(
    server_url: str, processes: Processes
) -> None:
    processes.worker(server_url, "--slots", "1")
    with Client(server_url) as client:
        tampering = client.map(tamper, range(200))
        clean = client.map(dump, range(200))  # queued while the first runs: leased mixed
        tamper_pids = set(tampering.result(timeout=60))
        dumped = clean.result(timeout=60)

        # The worker's own accounting (its next heartbeat): it switched subprocesses.
        def switches() -> int:
            return sum(w.stats["job_switches"] for w in client.run(client.api.workers()).values())

        poll_until(lambda: switches() >= 1, 10, "a job switch reported")
    assert [text for text, _ in dumped] == [json.dumps({"x": x}) for x in range(200)]
    assert tamper_pids.isdisjoint(pid for _, pid in dumped)
