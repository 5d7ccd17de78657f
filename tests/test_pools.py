"""Worker pools per user: a worker limited to some users' jobs (``hq-worker --users``, or a
worker token that names users) runs only their tasks; the server's own record of which
worker ran each task (the job's holder hash) is what the test reads."""

from __future__ import annotations

import asyncio
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis
from coffea_hq.server import tokens
from coffea_hq.server.dispatch import LeaseDispatcher
from coffea_hq.server.keys import Keys
from coffea_hq.server.store import Store

from coffea_hq import Client, protocol
from coffea_hq.embedded import EmbeddedRedis
from coffea_hq.protocol import Role

from .conftest import FUNCTION_BLOB, Processes
from .tasks import square
from .util import poll_until

SHA = protocol.blob_name(FUNCTION_BLOB)


def _ran_on(client: redis.Redis, keys: Keys, job: str) -> set[str]:
    """The workers the server recorded as having run the job's tasks."""
    holders = client.hgetall(keys.job(job).holder)
    assert holders and all(v.endswith(b"|D") for v in holders.values())
    return {v.decode().split("|")[1] for v in holders.values()}


def _state(client: redis.Redis, keys: Keys, job: str) -> str:
    return (client.hget(keys.job(job).meta, "state") or b"").decode()


def test_each_users_tasks_run_only_on_their_pool(
    store: EmbeddedRedis,
    processes: Processes,
    prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    keys = Keys(prefix)
    r = redis.Redis.from_url(store.url)
    try:
        alice, _ = tokens.create(r, keys, user="alice", role=Role.USER)
        bob, _ = tokens.create(r, keys, user="bob", role=Role.USER)
        any_worker, _ = tokens.create(r, keys, user="pool-a", role=Role.WORKER)
        bobs_worker, _ = tokens.create(r, keys, user="pool-b", role=Role.WORKER, users=["bob"])
        url, _ = processes.server(store.url, "--auth", "--lease-timeout", "5", prefix=prefix)
        # Pool A: any worker token, limited by its flag; read from a token file.
        token_file = tmp_path / "worker-token"
        token_file.write_text(any_worker + "\n")
        monkeypatch.setenv(protocol.ENV_TOKEN_FILE, str(token_file))
        processes.worker(url, "--name", "pool-a", "--users", "alice", "--lease-wait", "1")
        monkeypatch.delenv(protocol.ENV_TOKEN_FILE)
        # Pool B: a token that serves bob's jobs only, no flag; read from $HQ_TOKEN.
        monkeypatch.setenv(protocol.ENV_TOKEN, bobs_worker)
        processes.worker(url, "--name", "pool-b", "--lease-wait", "1")
        monkeypatch.setenv(protocol.ENV_TOKEN, bob)
        bobs_client = Client(url)
        monkeypatch.delenv(protocol.ENV_TOKEN)
        with Client(url, token=alice) as alices_client, bobs_client:
            jobs = {
                "alice": alices_client.map(square, range(12)),
                "bob": bobs_client.map(square, range(12)),
            }
            for job in jobs.values():
                poll_until(lambda j=job: _state(r, keys, j.id) == "done", 60, f"{job.id} done")
            assert _ran_on(r, keys, jobs["alice"].id) == {"pool-a"}
            assert _ran_on(r, keys, jobs["bob"].id) == {"pool-b"}
            for job in jobs.values():
                assert job.result() == [i * i for i in range(12)]
        # A worker token for bob's jobs cannot be stretched to alice's by the flag.
        body = json.dumps({"worker": "sneaky", "users": ["alice"]}).encode()
        request = urllib.request.Request(
            url + protocol.LEASE,
            data=body,
            method="POST",
            headers={"Authorization": f"Bearer {bobs_worker}", "Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 403
        assert "bob" in json.loads(refused.value.read())["message"]
    finally:
        r.close()
        os.environ.pop(protocol.ENV_TOKEN, None)


async def test_a_parked_pool_worker_does_not_hold_up_the_workers_behind_it(
    queue_store: Store,
) -> None:
    """Parked lease requests are served in arrival order; one limited to bob's jobs that
    finds nothing must not end the round before alice's worker behind it is served."""
    dispatcher = LeaseDispatcher(queue_store)
    try:
        for worker in ("bobs", "alices"):
            await queue_store.heartbeat(worker, {}, [])
        bobs = asyncio.create_task(dispatcher.lease("bobs", 4, 5.0, users=("bob",)))
        await asyncio.sleep(0.05)
        alices = asyncio.create_task(dispatcher.lease("alices", 4, 5.0, users=("alice",)))
        await asyncio.sleep(0.05)
        await queue_store.create_job(
            "j", function=SHA, max_attempts=1, fail_fast=True, label="", user="alice"
        )
        await queue_store.submit("j", ["a", "b"], [b"x", b"y"])
        dispatcher.notify()  # what the wake-up channel does on a submit
        got = await asyncio.wait_for(alices, 1.0)
        assert sorted(t.task for t in got) == ["a", "b"]
        assert not bobs.done()
    finally:
        await dispatcher.close()
    assert await bobs == []


async def test_the_lease_script_checks_the_jobs_user_itself(queue_store: Store) -> None:
    await queue_store.create_job(
        "k", function=SHA, max_attempts=1, fail_fast=True, label="", user="alice"
    )
    await queue_store.submit("k", ["a"], [b"x"])
    # Straight to the script (it picks the job among the ready ones itself): bob's pool
    # gets nothing, and the job stays ready for the others.
    reply = await queue_store.scripts.lease(
        queue_store.keys, worker="w", maximum=4, lease_ms=1000, users=("bob",), scan=1024
    ).run()
    assert reply == []
    assert await queue_store.redis.zscore(queue_store.keys.ready, "k") is not None
    assert [t.task for t in await queue_store.lease("w", 4, ("alice",))] == ["a"]
