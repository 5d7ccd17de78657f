"""A reducing job's results long poll woken by progress alone (chunks merged on the
workers, nothing to fetch) gathers more progress before it answers, while a result, a
failure or the job's end answers at once, and so does a kept result (the tasks that need it
wait for that news: a dask graph's next level), against a real Redis-protocol server."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from coffea_hq.server import store as store_module
from coffea_hq.server.store import Report, Store

from coffea_hq import protocol
from coffea_hq.protocol import CompleteStatus, Outcome

from .conftest import FUNCTION_BLOB
from .test_complete_batch import new_job

FN = protocol.blob_name(FUNCTION_BLOB)
N = 4


async def reducing_job(store: Store, job: str) -> list[object]:
    """A sealed reducing job of N tasks, every one leased by worker w1."""
    await new_job(store, job, N, reducer=FN, fanin=64)
    leased = await store.lease("w1", N)
    assert len(leased) == N
    return leased


async def done(store: Store, task: object, value: bytes = b"r") -> None:
    t = task  # a leased task
    statuses = await store.complete(
        "w1",
        [Report(t.job, t.task, t.attempt, Outcome.OK, None, value)],  # type: ignore[attr-defined]
    )
    assert statuses == [CompleteStatus.ACCEPTED]


async def first_chunk_in(
    store: Store, monkeypatch: pytest.MonkeyPatch, job: str, window: float
) -> list[object]:
    """A reducing job with its first chunk reported, polls gathering for ``window`` s."""
    monkeypatch.setattr(store_module, "PROGRESS_GATHER", window)
    leased = await reducing_job(store, job)
    await done(store, leased[0])
    return leased


def poll(store: Store, job: str, wait: float) -> asyncio.Future[object]:
    return asyncio.ensure_future(
        store.results(job, after="0", ack=None, wait=wait, max_bytes=1 << 20)
    )


async def test_progress_is_gathered_into_one_answer(
    queue_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    leased = await first_chunk_in(queue_store, monkeypatch, "g", 1.5)
    answer = poll(queue_store, "g", 10.0)
    await asyncio.sleep(0.2)  # the poll has seen the first chunk and is gathering
    await done(queue_store, leased[1])
    batch: Any = await answer
    # One answer for both chunks: without gathering it holds the first alone.
    assert batch.items == [("0", "merged"), ("1", "merged")]
    assert not batch.end and batch.summary["done"] == 2
    assert batch.parts == [b"", b""]


async def test_the_end_answers_at_once(queue_store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    leased = await first_chunk_in(queue_store, monkeypatch, "e", 30.0)
    started = time.monotonic()
    answer = poll(queue_store, "e", 60.0)
    for task in leased[1:]:
        await done(queue_store, task)
    (merge,) = await queue_store.lease("w1", 1)  # every chunk in: one merge of all four
    assert protocol.is_merge(merge.task)
    await done(queue_store, merge, b"merged value")
    batch: Any = await answer
    # The merged value ends the gathering: far sooner than the 30 s window.
    assert time.monotonic() - started < 15.0
    assert batch.end and batch.summary["state"] == "done"
    assert batch.items[-1] == (merge.task, "ok")
    assert batch.parts[-1] == b"merged value"
    assert [task for task, outcome in batch.items if outcome == "merged"] == ["0", "1", "2", "3"]


async def test_a_poll_without_wait_does_not_gather(
    queue_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    await first_chunk_in(queue_store, monkeypatch, "n", 30.0)
    started = time.monotonic()
    batch = await queue_store.results("n", after="0", ack=None, wait=0.0, max_bytes=1 << 20)
    assert time.monotonic() - started < 15.0
    assert batch.items == [("0", "merged")]


async def test_a_kept_result_answers_at_once(
    queue_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "PROGRESS_GATHER", 30.0)
    await queue_store.create_job(
        "k", function=FN, max_attempts=3, fail_fast=False, label="", user=""
    )
    await queue_store.submit("k", ["a", "b"], [b"pa", b"pb"], keep=["a"])
    leased = {t.task: t for t in await queue_store.lease("w1", 2)}
    answer = poll(queue_store, "k", 60.0)
    started = time.monotonic()
    await done(queue_store, leased["a"])
    batch: Any = await answer
    # Listed as merged (its value stays in the store), and answered without gathering.
    assert time.monotonic() - started < 15.0
    assert batch.items == [("a", "merged")]
