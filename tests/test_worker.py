"""The worker against a real server: what it reports when a task or its inputs go wrong."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import urllib.request
from pathlib import Path

import cloudpickle
import pytest
import redis
from coffea_hq.server.keys import Keys

from coffea_hq import Client, TaskFailed, protocol
from coffea_hq.embedded import EmbeddedRedis

from .conftest import Processes
from .tasks import exit_on

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def huge_error_on(x: int, bad: int) -> int:
    if x == bad:
        raise ValueError("x" * 2**20)
    return x


def test_a_huge_error_message_is_cut_and_the_rest_of_its_batch_counts(
    server_url: str, processes: Processes
) -> None:
    processes.worker(server_url)
    with Client(server_url) as client:
        # max_attempts=1: a report refused as a whole would fail every task at once.
        job = client.map(huge_error_on, range(100), [60] * 100, fail_fast=False, max_attempts=1)
        got = {}
        with pytest.raises(TaskFailed) as info:
            for index, value in job.as_completed(timeout=30):
                got[index] = value
    assert got == {i: i for i in range(100) if i != 60}
    failure = info.value
    assert failure.index == 60 and failure.exc_type == "builtins.ValueError"
    assert len(failure.message) <= protocol.ERROR_TEXT_MAX
    assert failure.message.startswith("xxxx") and failure.message.endswith("xxxx")
    assert "characters cut" in failure.message
    assert len(failure.traceback) <= protocol.ERROR_TEXT_MAX
    assert "in huge_error_on" in failure.traceback and "characters cut" in failure.traceback


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


def unprintable_on(x: int, bad: int) -> int:
    if x == bad:
        raise Unprintable()
    return x


def test_an_exception_whose_str_raises_fails_its_task_once_not_its_slot(
    server_url: str, processes: Processes
) -> None:
    processes.worker(server_url)
    with Client(server_url) as client:
        job = client.map(unprintable_on, range(50), [7] * 50, fail_fast=False)
        with pytest.raises(TaskFailed) as info:
            job.result(timeout=30)
    failure = info.value
    assert failure.index == 7 and failure.exc_type.endswith("Unprintable")
    assert "str() failed" in failure.message and failure.attempt == 1
    counted = json.loads(urllib.request.urlopen(server_url + protocol.QUEUE).read())["counters"]
    assert (counted["tasks_ok"], counted["tasks_failed"], counted["requeued"]) == (49, 1, 0)


class Heavy(Exception):
    """An exception that drags a large, incompressible payload along."""


def heavy_error(x: int) -> int:
    raise Heavy("too heavy to travel", os.urandom(4 * 1024 * 1024))


def test_an_exception_too_large_to_ship_keeps_its_text(
    store: EmbeddedRedis, processes: Processes, prefix: str
) -> None:
    url, _ = processes.server(store.url, "--max-request-size", str(6 * 1024 * 1024), prefix=prefix)
    processes.worker(url)
    with Client(url) as client:
        job = client.map(heavy_error, [1], max_attempts=1)
        with pytest.raises(TaskFailed) as info:
            job.result(timeout=30)
    failure = info.value
    assert failure.exc_type.endswith("Heavy") and "too heavy to travel" in failure.message
    assert "in heavy_error" in failure.traceback
    assert failure.exception is None  # dropped on the worker, the text kept


def double(x: int) -> int:
    return 2 * x


def triple(x: int) -> int:
    return 3 * x


@pytest.mark.parametrize("damage", ["deleted", "corrupted"])
def test_a_function_blob_that_cannot_be_fetched_fails_its_tasks_clearly(
    server_url: str,
    processes: Processes,
    redis_client: redis.Redis,
    prefix: str,
    damage: str,
) -> None:
    with Client(server_url) as client:
        job = client.map(double, range(5))
        blobs = list(redis_client.scan_iter(match=Keys(prefix).blob("*")))
        assert len(blobs) == 1
        sha = blobs[0].decode().rsplit(":", 1)[1]
        if damage == "deleted":
            redis_client.delete(Keys(prefix).blob(sha))
        else:
            redis_client.set(Keys(prefix).blob(sha), b"not the function")
        worker = processes.worker(server_url, "--slots", "2")
        started = time.monotonic()
        with pytest.raises(TaskFailed) as info:
            job.result(timeout=20)
        assert time.monotonic() - started < 15
        assert sha in info.value.message and "could not be fetched" in info.value.message
        # The worker is still there and serves the next job.
        assert client.map(triple, range(5)).result(timeout=20) == [3 * i for i in range(5)]
        assert worker.poll() is None


def test_slot_temp_files_do_not_outlive_a_slot_or_its_worker(
    server_url: str, processes: Processes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    worker = processes.worker(server_url, "--slots", "2")
    with Client(server_url) as client:
        job = client.map(exit_on, range(20), [3] * 20, max_attempts=1, fail_fast=False)
        with pytest.raises(TaskFailed, match="code 3"):
            job.result(timeout=30)
    assert [p.name for p in tmp.glob("hq-slot*")] == []  # restarted slot: nothing left over
    worker.send_signal(signal.SIGKILL)  # not even a chance to clean up
    worker.wait(timeout=10)
    assert [p.name for p in tmp.glob("hq-slot*")] == []
