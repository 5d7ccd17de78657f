"""Each task state change (one Lua script each), against a real Redis-protocol server."""

from __future__ import annotations

import asyncio
import hashlib
import time

import pytest
from coffea_hq.server.store import Conflict, Report, Store, UnknownBlob, UnknownJob

from coffea_hq import protocol
from coffea_hq.protocol import CompleteStatus, Outcome

from .conftest import FUNCTION_BLOB

FN = protocol.blob_name(FUNCTION_BLOB)


async def new_job(
    store: Store, n: int, *, max_attempts: int = 3, fail_fast: bool = True, job: str = "j1"
) -> str:
    await store.create_job(
        job, function=FN, max_attempts=max_attempts, fail_fast=fail_fast, label="", user=""
    )
    await store.submit(job, [str(i) for i in range(n)], [b"p%d" % i for i in range(n)])
    await store.seal(job, n)
    return job


def merge_name(*inputs: str) -> str:
    return protocol.MERGE_PREFIX + hashlib.sha1(",".join(inputs).encode()).hexdigest()


def ok(job: str, task: str, attempt: int = 1, data: bytes = b"r") -> Report:
    return Report(job, task, attempt, Outcome.OK, None, data)


async def test_create_is_idempotent_and_refuses_another_function(queue_store: Store) -> None:
    first = await queue_store.create_job(
        "j", function=FN, max_attempts=3, fail_fast=True, label="a", user=""
    )
    again = await queue_store.create_job(
        "j", function=FN, max_attempts=3, fail_fast=True, label="a", user=""
    )
    assert first == again and first["state"] == "running"
    other = protocol.blob_name(b"other")
    await queue_store.put_blob(other, b"other")
    with pytest.raises(Conflict, match="another function"):
        await queue_store.create_job(
            "j", function=other, max_attempts=3, fail_fast=True, label="", user=""
        )
    with pytest.raises(UnknownBlob, match="upload it first"):
        await queue_store.create_job(
            "k", function="0" * 64, max_attempts=3, fail_fast=True, label="", user=""
        )


async def test_submit_retry_adds_nothing_and_seal_checks_the_count(queue_store: Store) -> None:
    await queue_store.create_job(
        "j", function=FN, max_attempts=3, fail_fast=True, label="", user=""
    )
    assert await queue_store.submit("j", ["0", "1"], [b"a", b"b"]) == 2
    assert await queue_store.submit("j", ["0", "1", "2"], [b"a", b"b", b"c"]) == 1
    with pytest.raises(Conflict, match="submit the rest first"):
        await queue_store.seal("j", 4)
    assert (await queue_store.seal("j", 3))["total"] == 3
    with pytest.raises(Conflict, match="sealed"):
        await queue_store.submit("j", ["9"], [b"z"])
    assert await queue_store.submit("j", ["2"], [b"c"]) == 0  # a retried batch is still fine
    assert (await queue_store.summary("j"))["submitted"] == 3
    with pytest.raises(UnknownJob):
        await queue_store.submit("nope", ["0"], [b"a"])


async def test_lease_hands_out_each_task_once_in_order(queue_store: Store) -> None:
    await new_job(queue_store, 5)
    a = await queue_store.lease("w1", 3)
    b = await queue_store.lease("w2", 10)
    assert [t.task for t in a] == ["0", "1", "2"] and [t.task for t in b] == ["3", "4"]
    assert {t.payload for t in a + b} == {b"p%d" % i for i in range(5)}
    assert all(t.attempt == 1 and t.function == FN for t in a + b)
    assert await queue_store.lease("w3", 10) == []
    stats = await queue_store.queue_stats()
    assert (stats["queued"], stats["running"], stats["work"]) == (0, 5, 5)


async def test_complete_counts_once_and_rejects_other_workers(queue_store: Store) -> None:
    job = await new_job(queue_store, 2)
    await queue_store.lease("w1", 2)
    assert await queue_store.complete("w1", [ok(job, "0")]) == [CompleteStatus.ACCEPTED]
    assert await queue_store.complete("w1", [ok(job, "0")]) == [CompleteStatus.DUPLICATE]
    assert await queue_store.complete("w2", [ok(job, "1")]) == [CompleteStatus.NOT_LEASED]
    assert await queue_store.complete("w1", [ok(job, "1", attempt=2)]) == [
        CompleteStatus.NOT_LEASED
    ]
    assert await queue_store.complete("w1", [ok(job, "7")]) == [CompleteStatus.UNKNOWN]
    summary = await queue_store.summary(job)
    assert (summary["done"], summary["state"]) == (1, "running")
    assert await queue_store.complete("w1", [ok(job, "1")]) == [CompleteStatus.ACCEPTED]
    assert (await queue_store.summary(job))["state"] == "done"
    batch = await queue_store.results(job, after="0", ack=None, wait=0, max_bytes=1 << 20)
    assert sorted(batch.items) == [("0", "ok"), ("1", "ok")] and batch.end


@pytest.mark.lease_timeout(0.1)
async def test_expired_lease_is_requeued_with_attempt_raised_then_fails(queue_store: Store) -> None:
    job = await new_job(queue_store, 1, max_attempts=2)
    first = await queue_store.lease("w1", 1)
    await asyncio.sleep(0.15)
    assert await queue_store.reap() == (1, 0)
    second = await queue_store.lease("w2", 1)
    assert (first[0].attempt, second[0].attempt) == (1, 2)
    # The first worker's late result does not count.
    assert await queue_store.complete("w1", [ok(job, "0")]) == [CompleteStatus.NOT_LEASED]
    await asyncio.sleep(0.15)
    assert await queue_store.reap() == (0, 1)
    summary = await queue_store.summary(job)
    assert (summary["state"], summary["failed"]) == ("failed", 1)
    batch = await queue_store.results(job, after="0", ack=None, wait=0, max_bytes=1 << 20)
    error = batch.errors["0"]
    assert error["worker"] == "w2" and "2 attempts" in error["message"]


@pytest.mark.lease_timeout(0.25)
async def test_heartbeat_extends_only_the_holders_leases(queue_store: Store) -> None:
    job = await new_job(queue_store, 2)
    await queue_store.lease("w1", 2)
    for _ in range(4):
        await asyncio.sleep(0.1)
        lost = await queue_store.heartbeat("w1", {}, [(job, "0", 1), (job, "1", 1)])
        assert lost == []
    assert await queue_store.reap() == (0, 0)  # 0.4 s > lease timeout, but heartbeats kept them
    assert await queue_store.heartbeat("w2", {}, [(job, "0", 1)]) == [(job, "0", 1)]
    assert await queue_store.heartbeat("w1", {}, [(job, "0", 7)]) == [(job, "0", 7)]


async def test_crash_is_requeued_until_the_limit(queue_store: Store) -> None:
    job = await new_job(queue_store, 1, max_attempts=2)
    crash = {
        "type": "coffea_hq.errors.WorkerLost",
        "message": "killed by SIGSEGV",
        "traceback": "",
    }
    await queue_store.lease("w1", 1)
    r = Report(job, "0", 1, Outcome.CRASHED, crash, b"")
    assert await queue_store.complete("w1", [r]) == [CompleteStatus.REQUEUED]
    (again,) = await queue_store.lease("w1", 1)
    assert again.attempt == 2
    r = Report(job, "0", 2, Outcome.CRASHED, crash, b"")
    assert await queue_store.complete("w1", [r]) == [CompleteStatus.ACCEPTED]
    batch = await queue_store.results(job, after="0", ack=None, wait=0, max_bytes=1 << 20)
    assert batch.items == [("0", "error")]
    assert "SIGSEGV" in batch.errors["0"]["message"] and batch.summary["state"] == "failed"


async def test_task_error_fails_fast_or_lets_the_rest_run(queue_store: Store) -> None:
    error = {"type": "builtins.ValueError", "message": "bad", "traceback": "Traceback..."}
    fast = await new_job(queue_store, 3, job="fast")
    await queue_store.lease("w", 1)
    await queue_store.complete("w", [Report(fast, "0", 1, Outcome.ERROR, error, b"exc")])
    assert (await queue_store.summary(fast))["state"] == "failed"
    assert await queue_store.lease("w", 5) == []  # the rest was dropped
    slow = await new_job(queue_store, 2, job="slow", fail_fast=False)
    await queue_store.lease("w", 2)
    await queue_store.complete("w", [Report(slow, "0", 1, Outcome.ERROR, error, b"exc")])
    assert (await queue_store.summary(slow))["state"] == "running"
    await queue_store.complete("w", [ok(slow, "1")])
    summary = await queue_store.summary(slow)
    assert (summary["state"], summary["done"], summary["failed"]) == ("failed", 1, 1)


async def test_release_returns_tasks_without_counting_an_attempt(queue_store: Store) -> None:
    job = await new_job(queue_store, 2)
    await queue_store.lease("w1", 2)
    assert await queue_store.release("w2", [(job, "0", 1)]) == 0  # not its lease
    assert await queue_store.release("w1", [(job, "0", 1), (job, "1", 1)]) == 2
    again = await queue_store.lease("w2", 2)
    assert sorted((t.task, t.attempt) for t in again) == [("0", 1), ("1", 1)]


async def test_cancel_drops_the_queue_and_refuses_results(queue_store: Store) -> None:
    job = await new_job(queue_store, 3)
    await queue_store.lease("w", 1)
    assert (await queue_store.cancel(job))["state"] == "cancelled"
    assert await queue_store.lease("w", 3) == []
    assert await queue_store.complete("w", [ok(job, "0")]) == [CompleteStatus.JOB_FINISHED]
    assert (await queue_store.queue_stats())["work"] == 0
    with pytest.raises(UnknownJob):
        await queue_store.cancel("nope")


async def test_finished_job_keys_expire_and_ack_frees_results(queue_store: Store) -> None:
    job = await new_job(queue_store, 3)
    await queue_store.lease("w", 3)
    await queue_store.complete("w", [ok(job, "0", data=b"x" * 100)])
    first = await queue_store.results(job, after="0", ack=None, wait=0, max_bytes=1 << 20)
    assert first.items == [("0", "ok")] and first.parts == [b"x" * 100]
    await queue_store.complete("w", [ok(job, "1"), ok(job, "2")])
    second = await queue_store.results(
        job, after=first.cursor, ack=first.cursor, wait=0, max_bytes=1 << 20
    )
    assert sorted(t for t, _ in second.items) == ["1", "2"] and second.end
    keys = queue_store.keys.job(job)
    assert not await queue_store.redis.hexists(keys.results, "0")  # acked: freed
    ttls = [await queue_store.redis.ttl(k) for k in keys.owned]
    assert all(0 < t <= 60 for t in ttls if t != -2), ttls
    await queue_store.delete_job(job)
    assert await queue_store.redis.exists(*keys.owned) == 0


async def test_results_long_poll_waits_for_a_completion(queue_store: Store) -> None:
    job = await new_job(queue_store, 1)
    await queue_store.lease("w", 1)

    async def later() -> None:
        await asyncio.sleep(0.3)
        await queue_store.complete("w", [ok(job, "0")])

    start = time.monotonic()
    task = asyncio.create_task(later())
    batch = await queue_store.results(job, after="0", ack=None, wait=5, max_bytes=1 << 20)
    await task
    assert batch.items == [("0", "ok")]
    assert 0.25 < time.monotonic() - start < 4


async def test_eviction_policy_is_reported(queue_store: Store) -> None:
    assert await queue_store.eviction_policy() == "noeviction"


async def test_reducing_job_merges_on_workers_until_one_result_is_left(queue_store: Store) -> None:
    reducer = protocol.blob_name(b"reducer")
    await queue_store.put_blob(reducer, b"reducer")
    await queue_store.create_job(
        "r",
        function=FN,
        max_attempts=3,
        fail_fast=True,
        label="",
        user="",
        reducer=reducer,
        fanin=2,
    )
    await queue_store.submit("r", ["0", "1", "2"], [b"a", b"b", b"c"])
    await queue_store.seal("r", 3)
    chunks = await queue_store.lease("w", 10)
    assert [t.function for t in chunks] == [FN] * 3
    await queue_store.complete("w", [ok("r", "0", data=b"A"), ok("r", "1", data=b"BB")])
    # Two results wait: a merge task goes to the front of the queue, its payload the
    # inputs' results, each after its u32 length.
    (merge,) = await queue_store.lease("w", 10)
    # A merge is named by its inputs.
    assert merge.task == merge_name("0", "1") and merge.function == reducer
    assert [bytes(p) for p in protocol.split_merge_payload(merge.payload)] == [b"A", b"BB"]
    await queue_store.complete("w", [ok("r", "2", data=b"C"), ok("r", merge.task, data=b"AB")])
    keys = queue_store.keys.job("r")
    assert not await queue_store.redis.hexists(keys.results, "0")  # consumed by the merge
    (final,) = await queue_store.lease("w", 10)
    assert final.task == merge_name("2", merge.task)
    assert [bytes(p) for p in protocol.split_merge_payload(final.payload)] == [b"C", b"AB"]
    assert (await queue_store.summary("r"))["state"] == "running"
    await queue_store.complete("w", [ok("r", final.task, data=b"ABC")])
    batch = await queue_store.results("r", after="0", ack=None, wait=0, max_bytes=1 << 20)
    assert batch.end and batch.summary["state"] == "done"
    assert sorted(t for t, o in batch.items if o == "merged") == ["0", "1", "2"]
    assert [(t, p) for (t, o), p in zip(batch.items, batch.parts, strict=True) if o == "ok"] == [
        (final.task, b"ABC")
    ]


async def test_a_task_twice_in_one_report_counts_once(queue_store: Store) -> None:
    job = await new_job(queue_store, 1)
    await queue_store.lease("w", 1)
    statuses = await queue_store.complete("w", [ok(job, "0"), ok(job, "0")])
    assert statuses == [CompleteStatus.ACCEPTED, CompleteStatus.DUPLICATE]
    summary = await queue_store.summary(job)
    assert (summary["done"], summary["state"]) == (1, "done")
