"""Worker presence: a SIGKILLed worker's tasks are requeued in seconds, not at the lease
timeout; the fence keeps a stale connection from releasing a newer session's leases,
across two server replicas sharing the store."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.request

import aiohttp
import pytest
import redis
from coffea_hq.server.store import Store

from coffea_hq import Client, messages, protocol
from coffea_hq.embedded import EmbeddedRedis
from coffea_hq.protocol import CompleteStatus
from tests.conftest import Processes
from tests.test_transitions import new_job, ok
from tests.util import get_json, poll_until

embedded_only = pytest.mark.parametrize("store", ["embedded"], indirect=True)


def _holder(r: redis.Redis, prefix: str, job: str, task: str) -> str:
    raw = r.hget(f"{prefix}:job:{{{job}}}:holder", task)
    return raw.decode() if raw else ""


def _post(url: str, body: bytes, content_type: str) -> tuple[int, bytes]:
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": content_type}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _malformed_hellos_are_refused(url: str, redis_client: redis.Redis, prefix: str) -> None:
    """Bad input: a malformed hello gets a sentence naming what is wrong, registers nothing."""
    for body, says in [
        (b"not json\n", "JSON"),
        (b'{"worker": "w/1", "session": "s"}\n', "worker"),
        (b'{"worker": "w1"}\n', "session"),
    ]:
        status, reply = _post(url + protocol.PRESENCE, body, protocol.PRESENCE_CONTENT_TYPE)
        doc = json.loads(reply)
        assert status == 400 and doc["error"] == "bad_request" and says in doc["message"], doc
    assert _sessions(redis_client, prefix) == {}


@embedded_only
def test_a_killed_worker_is_requeued_in_seconds_and_its_late_report_refused(
    processes: Processes, store: EmbeddedRedis, prefix: str, redis_client: redis.Redis
) -> None:
    url, _ = processes.server(store.url, "--lease-timeout", "30", prefix=prefix)
    _malformed_hellos_are_refused(url, redis_client, prefix)
    doomed = processes.worker(url, "--name", "doomed")
    with Client(url) as client:
        job = client.map(time.sleep, [3.0])
        poll_until(lambda: _holder(redis_client, prefix, job.id, "0") == "1|doomed", 20, "leased")
        processes.worker(url, "--name", "heir")
        poll_until(lambda: "heir" in get_json(url + "/api/v1/workers"), 20, "heir registered")
        doomed.send_signal(signal.SIGKILL)
        took = poll_until(
            lambda: _holder(redis_client, prefix, job.id, "0") == "2|heir", 10, "re-leased"
        )
        assert took < 5, f"re-leased after {took:.1f}s (lease timeout 30 s)"
        assert "doomed" not in get_json(url + "/api/v1/workers")
        queue = get_json(url + "/api/v1/queue")
        assert queue["running"] == 1 and queue["counters"]["requeued"] == 1
        # Exactly once: the dead worker's attempt, reported late, is refused.
        header = messages.Complete(worker="doomed", items=[[job.id, "0", 1, "ok", None]])
        status, reply = _post(
            url + protocol.COMPLETE,
            protocol.pack(header, [protocol.dumps(None)]),
            protocol.FRAMES_CONTENT_TYPE,
        )
        assert status == 409 and json.loads(reply)["items"] == ["not_leased"], reply
        assert job.result(timeout=30) == [None]
    counters = get_json(url + "/api/v1/queue")["counters"]
    assert counters["tasks_ok"] == 1 and counters["refused"] == 1


async def _hold(url: str, worker: str, session: str) -> tuple[aiohttp.ClientSession, asyncio.Task]:
    """A raw presence connection that never says goodbye; closing the session drops it."""
    http = aiohttp.ClientSession()
    stop = asyncio.Event()

    async def body():  # type: ignore[no-untyped-def]
        yield messages.encode(messages.Presence(worker=worker, session=session)) + b"\n"
        await stop.wait()
        yield b""

    async def run() -> None:
        async with http.post(
            url + protocol.PRESENCE,
            data=body(),
            headers={"Content-Type": protocol.PRESENCE_CONTENT_TYPE},
        ) as resp:
            async for _ in resp.content:
                pass

    task = asyncio.create_task(run())
    return http, task


async def _until(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"not within {timeout:g}s: {what}"
        await asyncio.sleep(0.05)


def _sessions(r: redis.Redis, prefix: str) -> dict[bytes, bytes]:
    return r.hgetall(f"{prefix}:workers:session")


@pytest.mark.slow
@embedded_only
async def test_a_stale_connection_never_releases_a_newer_sessions_leases_across_replicas(
    processes: Processes, store: EmbeddedRedis, prefix: str, redis_client: redis.Redis
) -> None:
    a, _ = processes.server(store.url, "--lease-timeout", "30", prefix=prefix)
    b, _ = processes.server(store.url, "--lease-timeout", "30", prefix=prefix)
    client = Client(a)
    try:
        job = await asyncio.to_thread(client.map, abs, [-1])
        lease = messages.LeaseRequest(worker="w1", max=1)
        status, _ = await asyncio.to_thread(
            _post, a + protocol.LEASE, messages.encode(lease), "application/json"
        )
        assert status == 200 and _holder(redis_client, prefix, job.id, "0") == "1|w1"
        old_http, old = await _hold(a, "w1", "s1")
        await asyncio.sleep(0.5)
        new_http, new = await _hold(b, "w1", "s2")  # reconnected to the other replica
        await _until(lambda: _sessions(redis_client, prefix).get(b"w1") == b"s2", 5, "s2 open")
        await old_http.close()  # the stale connection drops, past its grace
        old.cancel()
        await asyncio.sleep(protocol.PRESENCE_GRACE + 1.5)
        leases = f"{prefix}:job:{{{job.id}}}:leases"
        assert redis_client.zscore(leases, "0") is not None, "a stale close released a lease"
        assert get_json(a + "/api/v1/queue")["counters"]["requeued"] == 0
        await new_http.close()  # now the current session drops: the lease is requeued
        new.cancel()
        await _until(lambda: redis_client.zscore(leases, "0") is None, 5, "lease requeued")
        assert get_json(b + "/api/v1/queue")["counters"]["requeued"] == 1
        assert b"w1" not in _sessions(redis_client, prefix)
    finally:
        await asyncio.to_thread(client.close)


async def test_worker_gone_is_fenced_and_ends_only_that_workers_leases(queue_store: Store) -> None:
    """Store level: the script behind a dropped presence, on two jobs; the last attempt of
    a task fails and ends its job, which must expire that job's keys and nothing global."""
    a = await new_job(queue_store, 2, max_attempts=3, job="ja")
    b = await new_job(queue_store, 1, max_attempts=1, job="jb")
    await queue_store.lease("w", 1)  # a/0
    await queue_store.lease("other", 1)  # a/1
    await queue_store.lease("w", 1)  # b/0
    await queue_store.open_session("w", "s1")
    await queue_store.open_session("w", "s2")  # reconnected
    assert await queue_store.end_session("w", "s1", lost=True) == (False, 0, 0)
    assert await queue_store.redis.zcard(queue_store.keys.job(a).leases) == 2
    assert await queue_store.end_session("w", "s2", lost=True) == (True, 1, 1)
    assert [
        t.decode() for t in await queue_store.redis.zrange(queue_store.keys.job(a).leases, 0, -1)
    ] == ["1"]
    assert (await queue_store.summary(b))["state"] == "failed"
    for key in queue_store.keys.store_keys:
        assert await queue_store.redis.ttl(key) in (-1, -2), key  # no TTL on global keys
    assert await queue_store.redis.ttl(queue_store.keys.job(b).meta) > 0
    (late,) = await queue_store.complete("w", [ok(a, "0")])
    assert late is CompleteStatus.NOT_LEASED
    # A clean goodbye closes the session and releases nothing.
    await queue_store.open_session("other", "s9")
    assert await queue_store.end_session("other", "s9", lost=False) == (True, 0, 0)
    assert await queue_store.redis.zcard(queue_store.keys.job(a).leases) == 1
