"""Kept results (SubmitTasks.keep), at the store: a kept task's result stays in the store
for the job's other tasks, the client's stream lists it with nothing to fetch, and it is
deleted when the job ends (done, failed or cancelled). Run on every store of
HQ_TEST_STORES."""

from __future__ import annotations

import pytest
from coffea_hq.server.store import NoKeptResult, Report, Store

from coffea_hq import protocol
from coffea_hq.protocol import CompleteStatus, Counter, Outcome

from .conftest import FUNCTION_BLOB

FN = protocol.blob_name(FUNCTION_BLOB)


def ok(job: str, task: str, data: bytes) -> Report:
    return Report(job, task, 1, Outcome.OK, None, data)


async def kept_job(store: Store, job: str = "j1") -> str:
    """Tasks 0 and 1 kept, 2 (their dependent) sent to the client."""
    await store.create_job(job, function=FN, max_attempts=3, fail_fast=True, label="", user="")
    assert await store.submit(job, ["0", "1"], [b"p0", b"p1"], keep=["0", "1"]) == 2
    return job


async def counter(store: Store, name: Counter) -> int:
    return int(await store.redis.hget(store.keys.counters, name) or 0)


async def test_kept_results_stay_for_dependents_and_go_with_the_job(queue_store: Store) -> None:
    job = await kept_job(queue_store)
    keys = queue_store.keys.job(job)
    kept_before = await counter(queue_store, Counter.KEPT)
    await queue_store.lease("w", 2)
    statuses = await queue_store.complete("w", [ok(job, "0", b"a" * 50), ok(job, "1", b"b")])
    assert statuses == [CompleteStatus.ACCEPTED] * 2
    # The client's stream: done, nothing to fetch; the results are in the store.
    batch = await queue_store.results(job, after="0", ack=None, wait=0, max_bytes=1 << 20)
    assert sorted(batch.items) == [("0", "merged"), ("1", "merged")]
    assert batch.parts == [b"", b""]
    acked = await queue_store.results(
        job, after=batch.cursor, ack=batch.cursor, wait=0, max_bytes=1 << 20
    )
    assert acked.items == []
    assert await queue_store.kept_result(job, "0") == b"a" * 50  # an ack frees nothing kept
    assert await counter(queue_store, Counter.KEPT) - kept_before == 2
    assert (await queue_store.summary(job))["done"] == 2
    # The dependent: not kept, its result goes to the client.
    await queue_store.submit(job, ["2"], [b"p2"])
    await queue_store.seal(job, 3)
    await queue_store.lease("w", 1)
    assert await queue_store.complete("w", [ok(job, "2", b"final")]) == [CompleteStatus.ACCEPTED]
    last = await queue_store.results(job, after=batch.cursor, ack=None, wait=0, max_bytes=1 << 20)
    assert last.items == [("2", "ok")] and last.parts == [b"final"] and last.end
    # Ended: the kept results are gone, the client's result is still there.
    assert (await queue_store.summary(job))["state"] == "done"
    assert await queue_store.redis.hkeys(keys.results) == [b"2"]
    assert not await queue_store.redis.exists(keys.kept)
    with pytest.raises(NoKeptResult, match="job has ended"):
        await queue_store.kept_result(job, "0")


async def test_cancel_deletes_kept_results(queue_store: Store) -> None:
    job = await kept_job(queue_store)
    keys = queue_store.keys.job(job)
    await queue_store.lease("w", 2)
    await queue_store.complete("w", [ok(job, "0", b"a")])
    with pytest.raises(NoKeptResult, match="has not finished"):
        await queue_store.kept_result(job, "1")
    with pytest.raises(NoKeptResult, match="never submitted with 'keep'"):
        await queue_store.kept_result(job, "9")
    await queue_store.cancel(job)
    assert not await queue_store.redis.hexists(keys.results, "0")
    assert not await queue_store.redis.exists(keys.kept)
    await queue_store.delete_job(job)
    with pytest.raises(NoKeptResult, match="gone"):
        await queue_store.kept_result(job, "0")


async def test_a_failed_kept_task_keeps_its_exception_for_the_client(queue_store: Store) -> None:
    job = await kept_job(queue_store)
    await queue_store.lease("w", 2)
    error = {"type": "ValueError", "message": "bad", "traceback": ""}
    failed = Report(job, "1", 1, Outcome.ERROR, error, b"pickled-exception")
    await queue_store.complete("w", [ok(job, "0", b"a"), failed])
    batch = await queue_store.results(job, after="0", ack=None, wait=0, max_bytes=1 << 20)
    got = dict(zip((t for t, _ in batch.items), batch.parts, strict=True))
    assert dict(batch.items) == {"0": "merged", "1": "error"} and batch.end  # fail fast
    assert got["1"] == b"pickled-exception"
    with pytest.raises(NoKeptResult, match="failed: it has no result"):
        await queue_store.kept_result(job, "1")
    assert await queue_store.redis.hkeys(queue_store.keys.job(job).results) == [b"1"]
