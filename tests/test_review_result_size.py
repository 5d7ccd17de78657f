"""Review: a result refused as too large names the limit it passed. With
``--max-request-size=65536`` every result is refused (the worker keeps 64 KiB of each
report for its header); the message used to say a 6 KB result was over 65536 bytes."""

from __future__ import annotations

import sys

import cloudpickle
import pytest

from coffea_hq import Client
from coffea_hq.embedded import EmbeddedRedis
from coffea_hq.errors import TaskFailed

from .conftest import Processes

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def blob(n: int) -> bytes:
    import os

    return os.urandom(n)


@pytest.mark.slow
def test_a_too_large_result_names_the_limit_it_passed(
    embedded_store: EmbeddedRedis, processes: Processes, prefix: str
) -> None:
    url, _ = processes.server(embedded_store.url, "--max-request-size=70000", prefix=prefix)
    processes.worker(url, "--lease-wait", "1")
    with Client(url, retry_for=20) as client:
        job = client.map(blob, [6000])
        with pytest.raises(TaskFailed) as failed:
            job.result()
    message = str(failed.value)
    assert "ResultTooLarge" in message
    assert "limit for one result: 4464 bytes" in message, message  # 70000 - 65536
