"""Review: a worker token limited to some users' jobs (a pool) must not reach the jobs of
other users through the worker routes that name a lease (complete, release, heartbeat).
The lease route narrows what such a token may take; these routes must as well, or a
hostile task on alice's pool reports results into bob's job (which bob's session
unpickles). Read from the server's own record (holder hash, job meta)."""

from __future__ import annotations

import asyncio

import pytest
import redis
from coffea_hq.server import tokens
from coffea_hq.server.keys import Keys

from coffea_hq import messages as m
from coffea_hq import protocol
from coffea_hq.api import API
from coffea_hq.embedded import EmbeddedRedis
from coffea_hq.errors import ServerError
from coffea_hq.protocol import Role

from .conftest import Processes

FUNCTION = b"review-function"


async def _bobs_leased_task(url: str, bob: str, bobs_pool: str) -> tuple[str, int]:
    """Bob's one-task job, leased by bob's pool worker 'wb': (job id, attempt)."""
    job = "review-bob-job"
    bob_api, pool_api = API(url, token=bob, retry_for=5), API(url, token=bobs_pool, retry_for=5)
    try:
        sha = await bob_api.upload(FUNCTION)
        await bob_api.create_job(job, m.CreateJob(function=sha, max_attempts=3))
        await bob_api.submit_tasks(job, m.SubmitTasks(tasks=["t0"]), [b"payload"])
        await bob_api.seal(job, m.Seal(total=1))
        reply, _ = await pool_api.lease(m.LeaseRequest(worker="wb", max=1, wait=5))
        assert [(t.job, t.task) for t in reply.tasks] == [(job, "t0")]
        return job, reply.tasks[0].attempt
    finally:
        await bob_api.close()
        await pool_api.close()


def _setup(store: EmbeddedRedis, processes: Processes, prefix: str) -> tuple[str, str, str, str]:
    keys = Keys(prefix)
    r = redis.Redis.from_url(store.url)
    bob, _ = tokens.create(r, keys, user="bob", role=Role.USER)
    bobs_pool, _ = tokens.create(r, keys, user="pool-b", role=Role.WORKER, users=["bob"])
    alices_pool, _ = tokens.create(r, keys, user="pool-a", role=Role.WORKER, users=["alice"])
    r.close()
    url, _ = processes.server(store.url, "--auth", "--lease-timeout", "30", prefix=prefix)
    return url, bob, bobs_pool, alices_pool


def test_alices_pool_cannot_complete_bobs_task(
    embedded_store: EmbeddedRedis, processes: Processes, prefix: str
) -> None:
    url, bob, bobs_pool, alices_pool = _setup(embedded_store, processes, prefix)
    keys = Keys(prefix)
    r = redis.Redis.from_url(embedded_store.url)

    async def attack() -> int:
        job, attempt = await _bobs_leased_task(url, bob, bobs_pool)
        api = API(url, token=alices_pool, retry_for=5)
        try:
            item = [job, "t0", attempt, "ok", None]
            await api.complete(m.Complete(worker="wb", items=[item]), [b"forged"])
        except ServerError as e:
            return e.status
        finally:
            await api.close()
        return 200

    try:
        assert asyncio.run(attack()) == 403
        jk = keys.job("review-bob-job")
        assert r.hget(jk.results, "t0") is None  # nothing of the forged result was kept
        assert r.hget(jk.meta, "done") in (None, b"0")
    finally:
        r.close()


def test_alices_pool_cannot_release_bobs_lease(
    embedded_store: EmbeddedRedis, processes: Processes, prefix: str
) -> None:
    url, bob, bobs_pool, alices_pool = _setup(embedded_store, processes, prefix)
    keys = Keys(prefix)
    r = redis.Redis.from_url(embedded_store.url)

    async def attack() -> int:
        job, attempt = await _bobs_leased_task(url, bob, bobs_pool)
        api = API(url, token=alices_pool, retry_for=5)
        try:
            ref = m.LeaseRef(job, "t0", attempt)
            await api.release(m.Release(worker="wb", items=[ref]))
        except ServerError as e:
            return e.status
        finally:
            await api.close()
        return 200

    try:
        assert asyncio.run(attack()) == 403
        jk = keys.job("review-bob-job")
        assert r.zscore(jk.leases, "t0") is not None  # still leased to bob's worker
    finally:
        r.close()


@pytest.mark.slow
def test_presence_names_a_worker_its_token_may_not_be(
    embedded_store: EmbeddedRedis, processes: Processes, prefix: str
) -> None:
    """Alice's pool opens a presence as bob's worker 'wb' and drops it: the server ends
    'wb's leases after the grace (an attempt counted) though 'wb' is alive and beating."""
    url, bob, bobs_pool, alices_pool = _setup(embedded_store, processes, prefix)
    keys = Keys(prefix)
    r = redis.Redis.from_url(embedded_store.url)

    async def attack() -> None:
        await _bobs_leased_task(url, bob, bobs_pool)
        api = API(url, token=alices_pool, retry_for=1)
        goodbye = asyncio.Event()
        hello = m.Presence(worker="wb", session="forged-session")
        held = asyncio.create_task(api.presence(hello, goodbye))
        await asyncio.sleep(1.0)
        held.cancel()  # the connection drops without a goodbye
        await asyncio.gather(held, return_exceptions=True)
        await api.close()
        await asyncio.sleep(protocol.PRESENCE_GRACE + 1.5)

    try:
        asyncio.run(attack())
        jk = keys.job("review-bob-job")
        assert r.zscore(jk.leases, "t0") is not None, "bob's worker lost its lease to alice's pool"
        assert r.hget(jk.meta, "requeued") in (None, b"0")
    finally:
        r.close()


def test_alices_pool_cannot_heartbeat_bobs_lease(
    embedded_store: EmbeddedRedis, processes: Processes, prefix: str
) -> None:
    """A heartbeat naming bob's lease would keep it alive past its dead worker's end."""
    url, bob, bobs_pool, alices_pool = _setup(embedded_store, processes, prefix)
    keys = Keys(prefix)
    r = redis.Redis.from_url(embedded_store.url)

    async def attack() -> tuple[int, float | None, float | None]:
        job, attempt = await _bobs_leased_task(url, bob, bobs_pool)
        before = r.zscore(keys.job(job).leases, "t0")
        await asyncio.sleep(0.05)  # a deadline moved by the beat would be later
        api = API(url, token=alices_pool, retry_for=5)
        try:
            beat = m.Heartbeat(worker="wb", leases=[m.LeaseRef(job, "t0", attempt)])
            await api.heartbeat(beat)
        except ServerError as e:
            return e.status, before, r.zscore(keys.job(job).leases, "t0")
        finally:
            await api.close()
        return 200, before, r.zscore(keys.job(job).leases, "t0")

    try:
        status, before, after = asyncio.run(attack())
        assert (status, after) == (403, before)
    finally:
        r.close()
