"""Each task state change (one Lua script each), against a real Redis-protocol server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from coffea_hq.server.keys import Keys
from coffea_hq.server.store import Conflict, Report, Store, UnknownBlob, UnknownJob

from coffea_hq import protocol
from coffea_hq.embedded import EmbeddedRedis
from coffea_hq.protocol import CompleteStatus, Outcome

FN = protocol.blob_name(b"function")


def run(
    store_server: EmbeddedRedis,
    prefix: str,
    body: Callable[[Store], Awaitable[Any]],
    lease_timeout: float = 30.0,
) -> Any:
    async def main() -> Any:
        client = aioredis.Redis.from_url(store_server.url)
        try:
            store = Store(client, Keys(prefix), lease_timeout=lease_timeout, result_ttl=60)
            await store.put_blob(FN, b"function")
            return await body(store)
        finally:
            await client.aclose()

    return asyncio.run(main())


async def new_job(
    store: Store, n: int, *, max_attempts: int = 3, fail_fast: bool = True, job: str = "j1"
) -> str:
    await store.create_job(
        job, function=FN, max_attempts=max_attempts, fail_fast=fail_fast, label="", owner=""
    )
    await store.submit(job, [str(i) for i in range(n)], [b"p%d" % i for i in range(n)])
    await store.seal(job, n)
    return job


def ok(job: str, task: str, attempt: int = 1, data: bytes = b"r") -> Report:
    return Report(job, task, attempt, Outcome.OK, None, data)


def test_create_is_idempotent_and_refuses_another_function(
    store: EmbeddedRedis, prefix: str
) -> None:
    async def body(s: Store) -> None:
        first = await s.create_job(
            "j", function=FN, max_attempts=3, fail_fast=True, label="a", owner=""
        )
        again = await s.create_job(
            "j", function=FN, max_attempts=3, fail_fast=True, label="a", owner=""
        )
        assert first == again and first["state"] == "running"
        other = protocol.blob_name(b"other")
        await s.put_blob(other, b"other")
        with pytest.raises(Conflict, match="another function"):
            await s.create_job(
                "j", function=other, max_attempts=3, fail_fast=True, label="", owner=""
            )
        with pytest.raises(UnknownBlob, match="upload it first"):
            await s.create_job(
                "k", function="0" * 64, max_attempts=3, fail_fast=True, label="", owner=""
            )

    run(store, prefix, body)


def test_submit_retry_adds_nothing_and_seal_checks_the_count(
    store: EmbeddedRedis, prefix: str
) -> None:
    async def body(s: Store) -> None:
        await s.create_job("j", function=FN, max_attempts=3, fail_fast=True, label="", owner="")
        assert await s.submit("j", ["0", "1"], [b"a", b"b"]) == 2
        assert await s.submit("j", ["0", "1", "2"], [b"a", b"b", b"c"]) == 1
        with pytest.raises(Conflict, match="submit the rest first"):
            await s.seal("j", 4)
        assert (await s.seal("j", 3))["total"] == 3
        with pytest.raises(Conflict, match="sealed"):
            await s.submit("j", ["9"], [b"z"])
        assert await s.submit("j", ["2"], [b"c"]) == 0  # a retried batch is still fine
        assert (await s.summary("j"))["submitted"] == 3
        with pytest.raises(UnknownJob):
            await s.submit("nope", ["0"], [b"a"])

    run(store, prefix, body)


def test_lease_hands_out_each_task_once_in_order(store: EmbeddedRedis, prefix: str) -> None:
    async def body(s: Store) -> None:
        await new_job(s, 5)
        a = await s.lease("w1", 3)
        b = await s.lease("w2", 10)
        assert [t.task for t in a] == ["0", "1", "2"] and [t.task for t in b] == ["3", "4"]
        assert {t.payload for t in a + b} == {b"p%d" % i for i in range(5)}
        assert all(t.attempt == 1 and t.function == FN for t in a + b)
        assert await s.lease("w3", 10) == []
        stats = await s.queue_stats()
        assert (stats["queued"], stats["running"], stats["work"]) == (0, 5, 5)

    run(store, prefix, body)


def test_complete_counts_once_and_rejects_other_workers(store: EmbeddedRedis, prefix: str) -> None:
    async def body(s: Store) -> None:
        job = await new_job(s, 2)
        await s.lease("w1", 2)
        assert await s.complete("w1", [ok(job, "0")]) == [CompleteStatus.ACCEPTED]
        assert await s.complete("w1", [ok(job, "0")]) == [CompleteStatus.DUPLICATE]
        assert await s.complete("w2", [ok(job, "1")]) == [CompleteStatus.NOT_LEASED]
        assert await s.complete("w1", [ok(job, "1", attempt=2)]) == [CompleteStatus.NOT_LEASED]
        assert await s.complete("w1", [ok(job, "7")]) == [CompleteStatus.UNKNOWN]
        summary = await s.summary(job)
        assert (summary["done"], summary["state"]) == (1, "running")
        assert await s.complete("w1", [ok(job, "1")]) == [CompleteStatus.ACCEPTED]
        assert (await s.summary(job))["state"] == "done"
        batch = await s.results(job, after="0", ack=None, wait=0, max_bytes=1 << 20)
        assert sorted(batch.items) == [("0", "ok"), ("1", "ok")] and batch.end

    run(store, prefix, body)


def test_expired_lease_is_requeued_with_attempt_raised_then_fails(
    store: EmbeddedRedis, prefix: str
) -> None:
    async def body(s: Store) -> None:
        job = await new_job(s, 1, max_attempts=2)
        first = await s.lease("w1", 1)
        await asyncio.sleep(0.15)
        assert await s.reap() == (1, 0)
        second = await s.lease("w2", 1)
        assert (first[0].attempt, second[0].attempt) == (1, 2)
        # The first worker's late result does not count.
        assert await s.complete("w1", [ok(job, "0")]) == [CompleteStatus.NOT_LEASED]
        await asyncio.sleep(0.15)
        assert await s.reap() == (0, 1)
        summary = await s.summary(job)
        assert (summary["state"], summary["failed"]) == ("failed", 1)
        batch = await s.results(job, after="0", ack=None, wait=0, max_bytes=1 << 20)
        error = batch.errors["0"]
        assert error["worker"] == "w2" and "2 attempts" in error["message"]

    run(store, prefix, body, lease_timeout=0.1)


def test_heartbeat_extends_only_the_holders_leases(store: EmbeddedRedis, prefix: str) -> None:
    async def body(s: Store) -> None:
        job = await new_job(s, 2)
        await s.lease("w1", 2)
        for _ in range(4):
            await asyncio.sleep(0.1)
            lost = await s.heartbeat("w1", {}, [(job, "0", 1), (job, "1", 1)])
            assert lost == []
        assert await s.reap() == (0, 0)  # 0.4 s > lease timeout, but heartbeats kept them
        assert await s.heartbeat("w2", {}, [(job, "0", 1)]) == [(job, "0", 1)]
        assert await s.heartbeat("w1", {}, [(job, "0", 7), (job, "1", 1)]) == [(job, "0", 7)]

    run(store, prefix, body, lease_timeout=0.25)


def test_crash_is_requeued_until_the_limit(store: EmbeddedRedis, prefix: str) -> None:
    async def body(s: Store) -> None:
        job = await new_job(s, 1, max_attempts=2)
        crash = {
            "type": "coffea_hq.errors.WorkerLost",
            "message": "killed by SIGSEGV",
            "traceback": "",
        }
        await s.lease("w1", 1)
        r = Report(job, "0", 1, Outcome.CRASHED, crash, b"")
        assert await s.complete("w1", [r]) == [CompleteStatus.REQUEUED]
        (again,) = await s.lease("w1", 1)
        assert again.attempt == 2
        r = Report(job, "0", 2, Outcome.CRASHED, crash, b"")
        assert await s.complete("w1", [r]) == [CompleteStatus.ACCEPTED]
        batch = await s.results(job, after="0", ack=None, wait=0, max_bytes=1 << 20)
        assert batch.items == [("0", "error")]
        assert "SIGSEGV" in batch.errors["0"]["message"] and batch.summary["state"] == "failed"

    run(store, prefix, body)


def test_task_error_fails_fast_or_lets_the_rest_run(store: EmbeddedRedis, prefix: str) -> None:
    error = {"type": "builtins.ValueError", "message": "bad", "traceback": "Traceback..."}

    async def body(s: Store) -> None:
        fast = await new_job(s, 3, job="fast")
        await s.lease("w", 1)
        await s.complete("w", [Report(fast, "0", 1, Outcome.ERROR, error, b"exc")])
        assert (await s.summary(fast))["state"] == "failed"
        assert await s.lease("w", 5) == []  # the rest was dropped
        slow = await new_job(s, 2, job="slow", fail_fast=False)
        await s.lease("w", 2)
        await s.complete("w", [Report(slow, "0", 1, Outcome.ERROR, error, b"exc")])
        assert (await s.summary(slow))["state"] == "running"
        await s.complete("w", [ok(slow, "1")])
        summary = await s.summary(slow)
        assert (summary["state"], summary["done"], summary["failed"]) == ("failed", 1, 1)

    run(store, prefix, body)


def test_release_returns_tasks_without_counting_an_attempt(
    store: EmbeddedRedis, prefix: str
) -> None:
    async def body(s: Store) -> None:
        job = await new_job(s, 2)
        await s.lease("w1", 2)
        assert await s.release("w2", [(job, "0", 1)]) == 0  # not its lease
        assert await s.release("w1", [(job, "0", 1), (job, "1", 1)]) == 2
        again = await s.lease("w2", 2)
        assert sorted((t.task, t.attempt) for t in again) == [("0", 1), ("1", 1)]

    run(store, prefix, body)


def test_cancel_drops_the_queue_and_refuses_results(store: EmbeddedRedis, prefix: str) -> None:
    async def body(s: Store) -> None:
        job = await new_job(s, 3)
        await s.lease("w", 1)
        assert (await s.cancel(job))["state"] == "cancelled"
        assert await s.lease("w", 3) == []
        assert await s.complete("w", [ok(job, "0")]) == [CompleteStatus.JOB_FINISHED]
        assert (await s.queue_stats())["work"] == 0
        with pytest.raises(UnknownJob):
            await s.cancel("nope")

    run(store, prefix, body)


def test_finished_job_keys_expire_and_ack_frees_results(store: EmbeddedRedis, prefix: str) -> None:
    async def body(s: Store) -> None:
        job = await new_job(s, 3)
        await s.lease("w", 3)
        await s.complete("w", [ok(job, "0", data=b"x" * 100)])
        first = await s.results(job, after="0", ack=None, wait=0, max_bytes=1 << 20)
        assert first.items == [("0", "ok")] and first.parts == [b"x" * 100]
        await s.complete("w", [ok(job, "1"), ok(job, "2")])
        second = await s.results(
            job, after=first.cursor, ack=first.cursor, wait=0, max_bytes=1 << 20
        )
        assert sorted(t for t, _ in second.items) == ["1", "2"] and second.end
        keys = s.keys.job(job)
        assert not await s.redis.hexists(keys.results, "0")  # acked: freed
        ttls = [await s.redis.ttl(k) for k in keys.owned]
        assert all(0 < t <= 60 for t in ttls if t != -2), ttls
        await s.delete_job(job)
        assert await s.redis.exists(*keys.owned) == 0

    run(store, prefix, body)


def test_results_long_poll_waits_for_a_completion(store: EmbeddedRedis, prefix: str) -> None:
    async def body(s: Store) -> float:
        job = await new_job(s, 1)
        await s.lease("w", 1)

        async def later() -> None:
            await asyncio.sleep(0.3)
            await s.complete("w", [ok(job, "0")])

        start = time.monotonic()
        task = asyncio.create_task(later())
        batch = await s.results(job, after="0", ack=None, wait=5, max_bytes=1 << 20)
        await task
        assert batch.items == [("0", "ok")]
        return time.monotonic() - start

    elapsed = run(store, prefix, body)
    assert 0.25 < elapsed < 4


def test_eviction_policy_is_reported(store: EmbeddedRedis, prefix: str) -> None:
    async def body(s: Store) -> str | None:
        return await s.eviction_policy()

    assert run(store, prefix, body) == "noeviction"


def test_reducing_job_merges_on_workers_until_one_result_is_left(
    store: EmbeddedRedis, prefix: str
) -> None:
    reducer = protocol.blob_name(b"reducer")

    async def body(s: Store) -> None:
        await s.put_blob(reducer, b"reducer")
        await s.create_job(
            "r",
            function=FN,
            max_attempts=3,
            fail_fast=True,
            label="",
            owner="",
            reducer=reducer,
            fanin=2,
        )
        await s.submit("r", ["0", "1", "2"], [b"a", b"b", b"c"])
        await s.seal("r", 3)
        chunks = await s.lease("w", 10)
        assert [t.function for t in chunks] == [FN] * 3
        await s.complete("w", [ok("r", "0", data=b"A"), ok("r", "1", data=b"BB")])
        # Two results wait: a merge task goes to the front of the queue, its payload the
        # inputs' results, each after its u32 length.
        (merge,) = await s.lease("w", 10)
        assert merge.task == "m1" and merge.function == reducer
        assert [bytes(p) for p in protocol.split_merge_payload(merge.payload)] == [b"A", b"BB"]
        await s.complete("w", [ok("r", "2", data=b"C"), ok("r", "m1", data=b"AB")])
        keys = s.keys.job("r")
        assert not await s.redis.hexists(keys.results, "0")  # consumed by the merge
        (final,) = await s.lease("w", 10)
        assert final.task == "m2"
        assert [bytes(p) for p in protocol.split_merge_payload(final.payload)] == [b"C", b"AB"]
        assert (await s.summary("r"))["state"] == "running"
        await s.complete("w", [ok("r", "m2", data=b"ABC")])
        batch = await s.results("r", after="0", ack=None, wait=0, max_bytes=1 << 20)
        assert batch.end and batch.summary["state"] == "done"
        assert sorted(t for t, o in batch.items if o == "merged") == ["0", "1", "2"]
        assert [
            (t, p) for (t, o), p in zip(batch.items, batch.parts, strict=True) if o == "ok"
        ] == [("m2", b"ABC")]

    run(store, prefix, body)


def test_a_task_twice_in_one_report_counts_once(store: EmbeddedRedis, prefix: str) -> None:
    async def body(s: Store) -> None:
        job = await new_job(s, 1)
        await s.lease("w", 1)
        statuses = await s.complete("w", [ok(job, "0"), ok(job, "0")])
        assert statuses == [CompleteStatus.ACCEPTED, CompleteStatus.DUPLICATE]
        summary = await s.summary(job)
        assert (summary["done"], summary["state"]) == (1, "done")

    run(store, prefix, body)
