"""Fair share between users, and priorities within one user's jobs.

Store-level tests drive the lease script directly (deterministic shares); the others run
a real hq-server and hq-worker and read the server's own accounting (each job's meta
hash: tasks done so far), never what the client saw.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest
import redis
from coffea_hq.server.keys import Keys
from coffea_hq.server.store import Report, Store

from coffea_hq import Client, messages, protocol
from coffea_hq.embedded import EmbeddedRedis
from coffea_hq.errors import ServerError
from coffea_hq.protocol import Outcome

from .conftest import FUNCTION_BLOB, Processes
from .tasks import nap
from .util import poll_until

FN = protocol.blob_name(FUNCTION_BLOB)


async def _job(
    store: Store,
    job: str,
    n: int,
    *,
    share: str = "",
    user: str = "",
    priority: int = 0,
    keys: list[str] | None = None,
) -> None:
    """A sealed job of ``n`` tasks (``keys``: their locality keys, or none)."""
    await store.create_job(
        job,
        function=FN,
        max_attempts=3,
        fail_fast=True,
        label="",
        user=user,
        share=share,
        priority=priority,
    )
    await store.submit(job, [str(i) for i in range(n)], [b"p"] * n, keys or ())
    await store.seal(job, n)


async def _serve(
    store: Store, tasks: int, walls: dict[str, float] | None = None, batch: int = 8
) -> Counter[str]:
    """One worker leasing ``batch`` tasks at a time (one lease is shared between groups a
    task at a time) and reporting them at once, until it got ``tasks``: how many each job
    got. ``walls``: seconds each job's tasks take (default 1)."""
    got: Counter[str] = Counter()
    while sum(got.values()) < tasks:
        leased = await store.lease("w", min(batch, tasks - sum(got.values())))
        assert leased, f"nothing left to lease after {got}"
        got.update(t.job for t in leased)
        reports = [
            Report(
                t.job, t.task, t.attempt, Outcome.OK, None, b"r", wall=(walls or {}).get(t.job, 1)
            )
            for t in leased
        ]
        await store.complete("w", reports)
    return got


async def test_a_later_small_job_of_another_user_is_served_at_once(queue_store: Store) -> None:
    await _job(queue_store, "big", 20_000, share="alice")
    await _serve(queue_store, 48)  # alice alone: she has run up worker time
    await _job(queue_store, "small", 10, share="bob")
    got = await _serve(queue_store, 20, batch=2)
    # FIFO would give all 20 to the older job; fair share alternates from bob's arrival.
    assert got == {"big": 10, "small": 10}
    assert (await queue_store.summary("small"))["state"] == "done"


async def test_weights_set_the_shares(queue_store: Store) -> None:
    await _job(queue_store, "a", 1000, share="a")
    await _job(queue_store, "b", 1000, share="b")
    await queue_store.set_shares({"a": 1.0, "b": 3.0})
    got = await _serve(queue_store, 160)
    assert got["a"] + got["b"] == 160
    assert abs(got["b"] / got["a"] - 3) < 0.2, got
    shares = await queue_store.shares()
    assert shares["a"][0] == 1.0 and shares["b"][0] == 3.0


async def test_worker_time_not_task_count_is_shared(queue_store: Store) -> None:
    """A group whose tasks take 4x longer gets a quarter as many of them."""
    await _job(queue_store, "short", 1000, share="s")
    await _job(queue_store, "long", 1000, share="l")
    got = await _serve(queue_store, 200, {"long": 4.0, "short": 1.0})
    assert abs(got["short"] / got["long"] - 4) < 0.5, got


async def test_an_idle_group_does_not_save_up_credit(queue_store: Store) -> None:
    await _job(queue_store, "first", 300, share="a")
    await _serve(queue_store, 96)  # b is idle meanwhile
    await _job(queue_store, "late", 300, share="b")
    got = await _serve(queue_store, 48)
    # b starts level with a (not 200 tasks ahead): the two alternate.
    assert abs(got["first"] - got["late"]) <= 2, got


async def test_priority_first_then_age_within_a_group(queue_store: Store) -> None:
    await _job(queue_store, "low", 5, share="a", priority=0)
    await _job(queue_store, "high", 3, share="a", priority=5)
    await _job(queue_store, "high2", 3, share="a", priority=5)
    order = [t.job for t in await queue_store.lease("w", 11)]
    assert order == ["high"] * 3 + ["high2"] * 3 + ["low"] * 5


async def test_under_auth_the_user_is_the_group(queue_store: Store) -> None:
    """The share label a client sends cannot move its job into another user's group."""
    await _job(queue_store, "a1", 100, user="alice", share="bob")
    await _job(queue_store, "b1", 100, user="bob")
    got = await _serve(queue_store, 40)
    assert got == {"a1": 20, "b1": 20}, got
    assert set(await queue_store.shares()) == {"alice", "bob"}


def test_bad_weights_are_refused_and_change_nothing(server_url: str) -> None:
    with Client(server_url, retry_for=5) as client:
        for bad in ({"a": 0}, {"a": -1}, {"a b": 2}, {"x:y": 2}):
            with pytest.raises(ServerError, match="weights"):
                client.run(client.api.set_shares(messages.SetShares(weights=bad)))
        assert client.run(client.api.shares()).shares == {}
        got = client.run(client.api.set_shares(messages.SetShares(weights={"alice": 2.5})))
        assert got.shares["alice"].weight == 2.5


def _done(r: redis.Redis, keys: Keys, job: str) -> int:
    return int(r.hget(keys.job(job).meta, "done") or 0)


@pytest.fixture
def one_worker(
    store: EmbeddedRedis, processes: Processes, prefix: str
) -> tuple[str, redis.Redis, Keys]:
    url, _ = processes.server(store.url, "--lease-timeout", "10", prefix=prefix)
    processes.worker(url, "--slots", "2")
    return url, redis.Redis.from_url(store.url), Keys(prefix)


def _small_job_latency(
    one_worker: tuple[str, redis.Redis, Keys], big_tasks: int, big_seconds: float
) -> tuple[float, int]:
    url, r, keys = one_worker
    with Client(url) as client:
        big = client.map(nap, [big_seconds] * big_tasks, share="alice")
        poll_until(lambda: _done(r, keys, big.id) >= 4, 60, "alice's big job runs")
        start = time.monotonic()
        small = client.map(nap, [0.0] * 10, share="bob")
        assert small.result(timeout=60) == [0.0] * 10
        latency = time.monotonic() - start
        big_done = _done(r, keys, big.id)
        big.cancel()
    return latency, big_done


@pytest.mark.slow
def test_a_small_job_finishes_while_a_big_one_runs(
    one_worker: tuple[str, redis.Redis, Keys],
) -> None:
    """(FIFO: bob's 10 tasks would wait for all of alice's 150 x 50 ms on 2 slots, ~4 s.)"""
    latency, big_done = _small_job_latency(one_worker, 150, 0.05)
    print(f"small job of another user: done {latency:.2f}s after its submission")
    assert big_done < 150 - 20, "alice's job was not still running when bob's finished"
    assert latency < 30


@pytest.mark.slow
def test_a_small_job_finishes_while_20000_tasks_wait(
    one_worker: tuple[str, redis.Redis, Keys],
) -> None:
    latency, big_done = _small_job_latency(one_worker, 20_000, 0.01)
    print(f"small job behind 20,000 tasks of another user: done {latency:.2f}s after it")
    assert big_done < 20_000 - 1000
    assert latency < 30


@pytest.mark.slow
def test_weighted_users_share_one_worker(one_worker: tuple[str, redis.Redis, Keys]) -> None:
    url, r, keys = one_worker
    with Client(url) as client:
        client.run(client.api.set_shares(messages.SetShares(weights={"w1": 1, "w3": 3})))
        # Both jobs created before the worker leases either: submitted back to back.
        a = client.map(nap, [0.02] * 400, share="w1")
        b = client.map(nap, [0.02] * 400, share="w3")
        poll_until(lambda: _done(r, keys, b.id) >= 120, 60, "both users' jobs run")
        done_a, done_b = _done(r, keys, a.id), _done(r, keys, b.id)
        a.cancel()
        b.cancel()
    print(f"weights 1:3 -> completed {done_a}:{done_b}")
    assert done_b < 400, "w3's job must still be backlogged when measured"
    assert 2.0 <= done_b / max(done_a, 1) <= 4.5, (done_a, done_b)


@pytest.mark.slow
def test_priority_within_a_user_on_a_worker(one_worker: tuple[str, redis.Redis, Keys]) -> None:
    url, r, keys = one_worker
    with Client(url) as client:
        low = client.map(nap, [0.05] * 100, share="alice")
        high = client.map(nap, [0.0] * 10, share="alice", priority=10)
        assert high.result(timeout=60) == [0.0] * 10
        low_done = _done(r, keys, low.id)
        low.cancel()
    assert low_done < 80, f"the low-priority job ran {low_done} tasks before the high one ended"
