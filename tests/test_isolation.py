"""No state shared between jobs in a slot: a job's tasks cannot change what another job's
tasks see, because a slot subprocess serves one job and is replaced before the next."""

from __future__ import annotations

import json
import os
import sys

import cloudpickle

from coffea_hq import Client

from .conftest import Processes

cloudpickle.register_pickle_by_value(sys.modules[__name__])


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
