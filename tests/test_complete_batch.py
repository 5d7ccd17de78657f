"""complete.lua's per-batch telemetry: the histogram and the job's totals count exactly the
reports accepted or requeued, whether the batch's precomputed sums serve (every report
counts) or the script sums what counts itself (a refused or duplicate report in the
batch), against a real Redis-protocol server."""

from __future__ import annotations

import json
from bisect import bisect_left
from typing import Any

import pytest
from coffea_hq.server.store import Report, Store

from coffea_hq import protocol
from coffea_hq.protocol import CompleteStatus, Outcome

from .conftest import FUNCTION_BLOB

FN = protocol.blob_name(FUNCTION_BLOB)
RSS = 30_000_000


async def new_job(store: Store, job: str, n: int, **options: Any) -> None:
    """A sealed job of ``n`` tasks; ``options`` for ``create_job`` (resources, reducer)."""
    await store.create_job(
        job, function=FN, max_attempts=3, fail_fast=False, label="", user="", **options
    )
    await store.submit(job, [str(i) for i in range(n)], [b"p%d" % i for i in range(n)])
    await store.seal(job, n)


def report(job: str, task: str, wall: float | None, attempt: int = 1) -> Report:
    if wall is None:
        return Report(job, task, attempt, Outcome.OK, None, b"r")
    return Report(job, task, attempt, Outcome.OK, None, b"r", wall=wall, cpu=wall / 2, max_rss=RSS)


async def telemetry(store: Store, job: str) -> tuple[dict[str, int], dict[str, str]]:
    raw = await store.redis.hgetall(store.keys.durations)
    durations = {k.decode(): int(v) for k, v in raw.items()}
    meta = await store.redis.hgetall(store.keys.job(job).meta)
    return durations, {k.decode(): v.decode() for k, v in meta.items()}


def expected(walls: list[float]) -> dict[str, int]:
    """The histogram the server should hold for these counted attempts."""
    out: dict[str, int] = {}
    for w in walls:
        b = str(bisect_left(protocol.TASK_DURATION_BUCKETS, w) + 1)
        out[b] = out.get(b, 0) + 1
    out["count"] = len(walls)
    out["sum_us"] = round(sum(walls) * 1e6)
    return out


WALLS = [0.0001, 0.02, 0.3, 0.3, 7.0, 1e4]  # buckets 1, 2, 4, 4, past 5 s, past the last


async def test_a_batch_that_all_counts_uses_its_sums(queue_store: Store) -> None:
    await new_job(queue_store, "j", len(WALLS) + 1)
    leased = await queue_store.lease("w1", 100)
    walls: list[float | None] = [*WALLS, None]  # the last one's figures are unknown
    statuses = await queue_store.complete(
        "w1", [report("j", t.task, w) for t, w in zip(leased, walls, strict=True)]
    )
    assert statuses == [CompleteStatus.ACCEPTED] * len(walls)
    durations, meta = await telemetry(queue_store, "j")
    want = expected(WALLS)
    assert {k: durations.get(k) for k in want} == want
    assert int(meta["timed"]) == len(WALLS)
    assert int(meta["wall_us"]) == want["sum_us"]
    assert abs(int(meta["cpu_us"]) - want["sum_us"] / 2) <= 1
    assert int(meta["rss_max"]) == RSS


async def test_refused_and_duplicate_reports_are_not_counted(queue_store: Store) -> None:
    await new_job(queue_store, "j", 4)
    leased = {t.task: t for t in await queue_store.lease("w1", 100)}
    assert len(leased) == 4
    first = await queue_store.complete("w1", [report("j", "0", 0.02)])
    assert first == [CompleteStatus.ACCEPTED]
    # One batch: a duplicate of task 0, a report of an attempt never leased, another
    # worker's report, and two accepted ones: only the last two count.
    batch = [
        report("j", "0", 0.3),
        report("j", "1", 0.3, attempt=2),
        report("j", "2", 7.0),  # sent by w2 below
        report("j", "2", 0.0001),
        report("j", "3", 0.0001),
    ]
    mixed = await queue_store.complete("w1", [batch[0], batch[1], batch[3], batch[4]])
    assert mixed == [
        CompleteStatus.DUPLICATE,
        CompleteStatus.NOT_LEASED,
        CompleteStatus.ACCEPTED,
        CompleteStatus.ACCEPTED,
    ]
    assert await queue_store.complete("w2", [batch[2]]) == [CompleteStatus.NOT_LEASED]
    durations, meta = await telemetry(queue_store, "j")
    want = expected([0.02, 0.0001, 0.0001])
    assert {k: durations.get(k) for k in want} == want
    assert sum(durations.get(str(i), 0) for i in range(1, 30)) == 3
    assert int(meta["timed"]) == 3 and int(meta["wall_us"]) == want["sum_us"]


async def test_a_job_that_keeps_resources_gets_a_note_per_task(queue_store: Store) -> None:
    await new_job(queue_store, "j", 3, resources=True)
    leased = await queue_store.lease("w1", 100)
    walls: list[float | None] = [0.25, None, 0.5]
    await queue_store.complete(
        "w1", [report("j", t.task, w) for t, w in zip(leased, walls, strict=True)]
    )
    raw = await queue_store.redis.hgetall(queue_store.keys.job("j").notes)
    notes: dict[str, Any] = {k.decode(): json.loads(v) for k, v in raw.items()}
    assert sorted(notes) == ["0", "2"]
    assert notes["0"] == {"worker": "w1", "wall": 0.25, "cpu": 0.125, "max_rss": RSS}
    assert notes["2"]["wall"] == 0.5


async def test_inconsistent_packed_notes_are_refused_and_change_nothing(
    queue_store: Store,
) -> None:
    await new_job(queue_store, "j", 2)
    leased = await queue_store.lease("w1", 100)
    call = queue_store.scripts.complete(
        queue_store.keys.job("j"),
        "j",
        worker="w1",
        tasks=[t.task for t in leased],
        attempts=[1, 1],
        outcomes=[Outcome.OK, Outcome.OK],
        values=[b"r", b"r"],
        errors=[],
        notes=[b"{}"],  # one note for two tasks
        outputs=[b"", b""],
    )
    with pytest.raises(Exception, match="packed argument lengths differ"):
        await call.run()
    assert (
        await queue_store.complete("w1", [report("j", t.task, 0.1) for t in leased])
        == [CompleteStatus.ACCEPTED] * 2
    )


async def test_ack_frees_the_notes_of_what_the_client_holds(queue_store: Store) -> None:
    for job, resources in (("with", True), ("without", False)):
        await new_job(queue_store, job, 3, resources=resources)
        leased = await queue_store.lease("w1", 100)
        await queue_store.complete("w1", [report(job, t.task, 0.1) for t in leased])
        batch = await queue_store.results(job, after="0", ack=None, wait=0, max_bytes=1 << 20)
        assert len(batch.items) == 3
        notes = queue_store.keys.job(job).notes
        assert await queue_store.redis.hlen(notes) == (3 if resources else 0)
        await queue_store.results(job, after=batch.cursor, ack=batch.cursor, wait=0, max_bytes=1)
        assert await queue_store.redis.hlen(notes) == 0
        assert await queue_store.redis.hlen(queue_store.keys.job(job).results) == 0
