"""Quotas and limits on a real hq-server with small limits: each refusal is a 429 (413
for a too-large batch, 507 for a full store) with a sentence and Retry-After, and
changes nothing in the store; the client waits as told, and says why if it gives up."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from coffea_hq.server import tokens
from coffea_hq.server.keys import Keys

from coffea_hq import protocol
from coffea_hq.embedded import EmbeddedRedis
from coffea_hq.errors import ServerError
from coffea_hq.protocol import Role
from coffea_hq.transport import Transport

from .conftest import Processes
from .test_auth import snapshot

FUNCTION = b"some function"
SHA = protocol.blob_name(FUNCTION)
JSON = "application/json"
FRAMES = protocol.FRAMES_CONTENT_TYPE


def http(
    method: str, url: str, body: bytes | None = None, token: str | None = None, ctype: str = JSON
) -> tuple[int, dict[str, str], Any]:
    headers = {"Content-Type": ctype}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            status, head, raw = r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        status, head, raw = e.code, dict(e.headers), e.read()
    try:
        return status, head, json.loads(raw)
    except ValueError:
        return status, head, raw


@dataclass
class Limited:
    url: str
    redis: redis.Redis
    keys: Keys
    worker: str

    def user(self) -> str:
        """A fresh user's token (each test its own user: quotas are per user)."""
        return self.named_user()[1]

    def named_user(self) -> tuple[str, str]:
        name = "u" + uuid.uuid4().hex[:8]
        return name, tokens.create(self.redis, self.keys, user=name, role=Role.USER)[0]

    def job(self, token: str, tasks: int = 0) -> str:
        job = "j" + uuid.uuid4().hex[:8]
        blob_url = self.url + protocol.BLOB.format(sha=SHA)
        assert http("PUT", blob_url, FUNCTION, token, protocol.BLOB_CONTENT_TYPE)[0] == 201
        body = json.dumps({"function": SHA}).encode()
        assert http("PUT", self.url + protocol.JOB.format(job=job), body, token)[0] == 200
        if tasks:
            assert self.submit(token, job, tasks)[0] == 200
        return job

    def submit(self, token: str, job: str, n: int, first: int = 0) -> tuple[int, dict, Any]:
        ids = [f"t{first + i}" for i in range(n)]
        body = protocol.pack({"tasks": ids}, [b"p"] * n)
        return http("POST", self.url + protocol.JOB_TASKS.format(job=job), body, token, FRAMES)

    def snapshot(self) -> dict[bytes, Any]:
        return snapshot(self.redis, self.keys.prefix)


@pytest.fixture(scope="module")
def limited(store: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Limited]:
    prefix = "q" + uuid.uuid4().hex[:10]
    procs = Processes(Path(tmp_path_factory.mktemp("quotas")))
    client = redis.Redis.from_url(store.url)
    try:
        url, _ = procs.server(
            store.url,
            "--auth",
            "--max-tasks-per-request=5",
            "--quota-queued-tasks=8",
            "--quota-blob-bytes=3000",
            "--quota-result-bytes=2000",
            "--max-long-polls=1",
            prefix=prefix,
        )
        keys = Keys(prefix)
        worker = tokens.create(client, keys, user="pool", role=Role.WORKER)[0]
        yield Limited(url, client, keys, worker)
    finally:
        procs.stop_all()
        client.close()


def test_tasks_per_request(limited: Limited) -> None:
    token = limited.user()
    job = limited.job(token)
    before = limited.snapshot()
    status, _, reply = limited.submit(token, job, 6)
    assert status == 413 and "at most 5" in reply["message"], reply
    assert limited.snapshot() == before
    assert limited.submit(token, job, 5)[0] == 200


def test_queued_tasks_per_user(limited: Limited) -> None:
    token = limited.user()
    job = limited.job(token, tasks=5)
    other = limited.job(token)  # the quota counts over all of the user's jobs
    before = limited.snapshot()
    status, head, reply = limited.submit(token, other, 4)
    assert status == 429 and "quota of 8" in reply["message"], reply
    assert int(head["Retry-After"]) >= 1
    assert limited.snapshot() == before
    assert limited.submit(token, other, 3)[0] == 200
    # Another user is not held back by this one's tasks (and cannot add to their jobs).
    assert limited.submit(limited.user(), other, 1)[0] == 404
    fresh = limited.user()
    assert limited.submit(fresh, limited.job(fresh), 5)[0] == 200
    assert job


def test_blob_bytes_per_user(limited: Limited) -> None:
    token = limited.user()
    big = b"b" * 2500
    url = limited.url + protocol.BLOB.format(sha=protocol.blob_name(big))
    assert http("PUT", url, big, token, protocol.BLOB_CONTENT_TYPE)[0] == 201
    more = b"m" * 1000
    more_url = limited.url + protocol.BLOB.format(sha=protocol.blob_name(more))
    before = limited.snapshot()
    status, head, reply = http("PUT", more_url, more, token, protocol.BLOB_CONTENT_TYPE)
    assert status == 429 and "quota-blob-bytes" in reply["message"], reply
    assert "Retry-After" in head
    assert limited.snapshot() == before


def test_uncollected_result_bytes_per_user(limited: Limited) -> None:
    name, token = limited.named_user()
    job = limited.job(token, tasks=2)
    lease = json.dumps({"worker": "w-results", "max": 2, "users": [name]}).encode()
    status, _, raw = http("POST", limited.url + protocol.LEASE, lease, limited.worker)
    assert status == 200
    header, _ = protocol.unpack(raw)
    assert len(header["tasks"]) == 2
    items = [[j, t, a, "ok", None] for j, t, a, _ in header["tasks"]]
    report = protocol.pack({"worker": "w-results", "items": items}, [b"r" * 3000] * len(items))
    assert http("POST", limited.url + protocol.COMPLETE, report, limited.worker, FRAMES)[0] == 200
    other = limited.job(token)
    before = limited.snapshot()
    status, _, reply = limited.submit(token, other, 1, first=10)
    assert status == 429 and "collect" in reply["message"], reply
    assert limited.snapshot() == before
    # The job's own results do not hold back its own submits (its client collects them
    # once every task is sent): otherwise a map waits on itself.
    assert limited.submit(token, job, 1, first=10)[0] == 200


def test_long_polls_per_client_and_the_client_honours_retry_after(limited: Limited) -> None:
    token = limited.user()
    job = limited.job(token, tasks=1)
    path = protocol.JOB_RESULTS.format(job=job)
    held = threading.Thread(target=http, args=("GET", f"{limited.url}{path}?wait=1", None, token))
    held.start()
    try:
        time.sleep(0.2)  # the first long poll is parked on the server
        status, head, reply = http("GET", f"{limited.url}{path}?wait=0.5", None, token)
        assert status == 429 and "long polls" in reply["message"], reply
        assert head["Retry-After"] == "1"

        async def poll(retry_for: float) -> float:
            transport = Transport(limited.url, token=token, retry_for=retry_for)
            start = time.monotonic()
            try:
                await transport.call("GET", path, params={"wait": "0.2"})
            finally:
                await transport.close()
            return time.monotonic() - start

        with pytest.raises(ServerError, match="long polls.*gave up"):
            asyncio.run(poll(0.3))
        # Told to come back in a second, it does, and gets in once the first poll ends.
        assert asyncio.run(poll(10)) >= 0.5
    finally:
        held.join()


def test_store_near_maxmemory_answers_store_full(
    embedded_store: EmbeddedRedis, processes: Processes, prefix: str
) -> None:
    url, _ = processes.server(embedded_store.url, prefix=prefix)
    client = redis.Redis.from_url(embedded_store.url)
    try:
        blob_url = url + protocol.BLOB.format(sha=SHA)
        assert http("PUT", blob_url, FUNCTION, None, protocol.BLOB_CONTENT_TYPE)[0] == 201
        job_url = url + protocol.JOB.format(job="full")
        assert http("PUT", job_url, json.dumps({"function": SHA}).encode())[0] == 200
        used = int(client.info("memory")["used_memory"])
        client.config_set("maxmemory", str(int(used / 0.95)))
        time.sleep(1.1)  # the server reads INFO memory at most once a second
        before = snapshot(client, prefix)
        body = protocol.pack({"tasks": ["a"]}, [b"x"])
        status, head, reply = http(
            "POST", url + protocol.JOB_TASKS.format(job="full"), body, None, FRAMES
        )
        assert status == 507 and "store is full" in reply["message"], reply
        assert "Retry-After" in head
        assert snapshot(client, prefix) == before
        client.config_set("maxmemory", "0")
        time.sleep(1.1)
        assert (
            http("POST", url + protocol.JOB_TASKS.format(job="full"), body, None, FRAMES)[0] == 200
        )
    finally:
        client.config_set("maxmemory", "0")
        client.close()
