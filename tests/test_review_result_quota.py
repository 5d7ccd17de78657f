"""Review: ``--quota-result-bytes`` refuses a user's submits while their uncollected
results pass it. ``Client.map`` submits every batch before it returns the job (nobody
collects meanwhile), so a map whose first tasks' results pass the quota while its later
batches are still being sent can never finish submitting: it waits on its own results.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import cloudpickle
import pytest
import redis
from coffea_hq.server import tokens
from coffea_hq.server.keys import Keys

from coffea_hq import Client
from coffea_hq.embedded import EmbeddedRedis
from coffea_hq.protocol import Role

from .conftest import Processes

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def echo(data: bytes) -> bytes:
    return data


@pytest.mark.slow
def test_a_map_is_not_blocked_by_its_own_uncollected_results(
    embedded_store: EmbeddedRedis, processes: Processes, prefix: str, tmp_path: Path
) -> None:
    keys = Keys(prefix)
    r = redis.Redis.from_url(embedded_store.url)
    try:
        alice, _ = tokens.create(r, keys, user="alice", role=Role.USER)
        worker, _ = tokens.create(r, keys, user="pool", role=Role.WORKER)
        url, _ = processes.server(
            embedded_store.url,
            "--auth",
            "--quota-result-bytes=20000",
            "--max-request-size=200000",  # small submit batches: many of them
            prefix=prefix,
        )
        processes.worker(url, "--lease-wait", "1", env={"HQ_TOKEN": worker})
        items = [os.urandom(6000) for _ in range(1500)]  # incompressible: ~6 KB results
        with Client(url, token=alice, retry_for=20) as client:
            job = client.map(echo, items)
            assert job.result() == items
    finally:
        r.close()
