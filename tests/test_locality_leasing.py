"""Locality-aware leasing: tasks carry a locality key (a chunk's file); a worker gets the
tasks of the key it ran last, workers spread over keys, and nothing starves or is leased
twice. Read from the server's own records (the job's holder hash, the queue)."""

from __future__ import annotations

from collections import defaultdict

import pytest
import redis
from coffea_hq.server.keys import Keys
from coffea_hq.server.store import LeasedTask, Report, Store

from coffea_hq import Client, protocol
from coffea_hq.embedded import EmbeddedRedis
from coffea_hq.errors import ServerError
from coffea_hq.protocol import Outcome

from .conftest import FUNCTION_BLOB, Processes
from .tasks import square
from .util import poll_until

FN = protocol.blob_name(FUNCTION_BLOB)


async def _job(store: Store, job: str, keys: list[str]) -> None:
    await store.create_job(job, function=FN, max_attempts=3, fail_fast=True, label="", user="")
    n = len(keys)
    await store.submit(job, [str(i) for i in range(n)], [b"p"] * n, keys)
    await store.seal(job, n)


def _files(n_files: int, chunks: int) -> list[str]:
    return [f"f{i}" for i in range(n_files) for _ in range(chunks)]


async def _done(store: Store, worker: str, leased: list[LeasedTask]) -> None:
    reports = [Report(t.job, t.task, t.attempt, Outcome.OK, None, b"r", wall=1) for t in leased]
    await store.complete(worker, reports)


async def test_workers_stay_on_their_files(queue_store: Store) -> None:
    keys = _files(6, 10)
    await _job(queue_store, "j", keys)
    opened: dict[str, set[str]] = defaultdict(set)
    seen: list[str] = []
    for _ in range(100):
        progressed = False
        for worker in ("w1", "w2", "w3"):
            leased = await queue_store.lease(worker, 2)
            progressed |= bool(leased)
            for t in leased:
                opened[worker].add(keys[int(t.task)])
                seen.append(t.task)
            await _done(queue_store, worker, leased)
        if not progressed:
            break
    assert sorted(seen, key=int) == [str(i) for i in range(60)]  # each leased once
    assert (await queue_store.summary("j"))["state"] == "done"
    # Without locality, three workers taking two chunks in turn would open every file.
    assert all(len(files) <= 3 for files in opened.values()), dict(opened)
    assert sum(len(f) for f in opened.values()) <= 8, dict(opened)


async def test_no_worker_starves_when_every_file_is_taken(queue_store: Store) -> None:
    keys = _files(2, 20)
    await _job(queue_store, "j", keys)
    first = await queue_store.lease("w1", 1)
    second = await queue_store.lease("w2", 1)
    assert {keys[int(first[0].task)], keys[int(second[0].task)]} == {"f0", "f1"}
    third = await queue_store.lease("w3", 3)  # both files held: it takes from the head
    assert len(third) == 3
    again = await queue_store.lease("w1", 5)
    assert {keys[int(t.task)] for t in again} == {keys[int(first[0].task)]}


async def test_tasks_without_a_key_and_other_jobs_lease_as_before(queue_store: Store) -> None:
    await _job(queue_store, "j", ["f0", "", "f1", ""])
    got = await queue_store.lease("w1", 2)
    assert sorted(t.task for t in got) == ["1", "3"]  # keyless first (merges are keyless)
    await queue_store.create_job(
        "plain", function=FN, max_attempts=3, fail_fast=True, label="", user=""
    )
    await queue_store.submit("plain", ["a", "b"], [b"p", b"p"])
    rest = await queue_store.lease("w1", 10)
    assert sorted(t.task for t in rest) == ["0", "2", "a", "b"]


async def test_released_and_expired_tasks_come_back_once(queue_store: Store, prefix: str) -> None:
    keys = _files(3, 4)
    await _job(queue_store, "j", keys)
    held = await queue_store.lease("w1", 4)
    back = await queue_store.release("w1", [(t.job, t.task, t.attempt) for t in held[:2]])
    assert back == 2
    await queue_store.end_session("w1", "s", lost=True)  # (no session: nothing happens)
    leased = [t.task for t in held[2:]]
    for _ in range(20):
        got = await queue_store.lease("w2", 3)
        if not got:
            break
        leased += [t.task for t in got]
        await _done(queue_store, "w2", got)
    await _done(queue_store, "w1", held[2:])
    assert sorted(leased, key=int) == [str(i) for i in range(12)]
    assert (await queue_store.summary("j"))["state"] == "done"


def test_bad_localities_are_refused(server_url: str) -> None:
    with Client(server_url, retry_for=5) as client:
        with pytest.raises(ValueError, match="one key per task"):
            client.map(square, [1, 2], locality=["a"])
        job = client.map(square, [1, 2, 3], locality=["x.root", None, "x.root"])
        bad = protocol.pack({"tasks": ["0", "1"], "localities": ["a"]}, [b"x", b"y"])
        with pytest.raises(ServerError, match="one key per task"):
            client.run(
                client.api.transport.call(
                    "POST",
                    protocol.JOB_TASKS.format(job=job.id),
                    body=bad,
                    content_type=protocol.FRAMES_CONTENT_TYPE,
                    retry_for=0,
                )
            )
        queue = client.run(client.api.queue())
        assert queue.queued == 3  # the refused batch added nothing
        job.cancel()


@pytest.mark.slow
def test_a_real_worker_pair_keeps_to_files(
    store: EmbeddedRedis, processes: Processes, prefix: str
) -> None:
    url, _ = processes.server(store.url, prefix=prefix)
    for _ in range(2):
        processes.worker(url, "--slots", "1")
    files = [f"root://eos/f{i}.root" for i in range(8) for _ in range(12)]
    r = redis.Redis.from_url(store.url)
    holders: dict[bytes, bytes] = {}

    def all_done() -> bool:
        holders.update(r.hgetall(Keys(prefix).job(job.id).holder))
        done = [v for t, v in holders.items() if t.isdigit() and v.endswith(b"|D")]
        return len(done) == len(files)

    with Client(url) as client:
        job = client.map(square, range(len(files)), locality=files)
        # Read before result(): the client deletes the job's keys once it has them.
        poll_until(all_done, 120, "every chunk done", every=0.02)
        assert job.result(timeout=120) == [i * i for i in range(len(files))]
    opened: dict[str, set[str]] = defaultdict(set)
    for task, value in holders.items():
        if task.isdigit():
            opened[value.decode().split("|")[1]].add(files[int(task)])
    print({w: len(f) for w, f in opened.items()})
    assert opened and sum(len(f) for f in opened.values()) <= 8 + 4, dict(opened)
