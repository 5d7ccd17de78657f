"""Adversarial review of the store-wide lease script (fair share, priorities, locality).

Each test drives the real Lua scripts on a real store and reads the store's own records
(the jobs' meta hashes, queues, claims): what the server did, not what a client saw.
"""

from __future__ import annotations

import os
import random
import struct
from collections import Counter

import pytest
from coffea_hq.server.store import LeasedTask, Report, Store

from coffea_hq import protocol
from coffea_hq.protocol import Outcome

from .conftest import FUNCTION_BLOB
from .test_exactly_once import roll_back, snapshot
from .test_fairness import _job

FN = protocol.blob_name(FUNCTION_BLOB)
REDUCER = protocol.blob_name(b"reducer")


async def _done(store: Store, worker: str, leased: list[LeasedTask]) -> None:
    reports = [Report(t.job, t.task, t.attempt, Outcome.OK, None, b"r", wall=1) for t in leased]
    await store.complete(worker, reports)


async def test_more_ready_jobs_than_the_scan_do_not_starve_another_user(
    queue_store: Store,
) -> None:
    """Alice has more ready jobs than the lease script looked at (64, the oldest): bob's
    job, created after them, was never seen, so he got nothing until hers drained."""
    for i in range(70):
        await _job(queue_store, f"a{i:02d}", 4, share="alice")
    await _job(queue_store, "bob", 4, share="bob")
    got: Counter[str] = Counter()
    for _ in range(8):
        leased = await queue_store.lease("w", 1)
        assert leased
        got["bob" if leased[0].job == "bob" else "alice"] += 1
        await _done(queue_store, "w", leased)
    assert got["bob"] >= 3, got  # alternating from the first lease


async def test_a_high_priority_job_behind_many_older_ones_comes_first(queue_store: Store) -> None:
    for i in range(70):
        await _job(queue_store, f"low{i:02d}", 2, share="alice")
    await _job(queue_store, "high", 2, share="alice", priority=5)
    leased = await queue_store.lease("w", 2)
    assert [t.job for t in leased] == ["high", "high"]


async def test_many_groups_are_all_seen(queue_store: Store) -> None:
    """Seventy users with one small job each: every one is served within seventy leases."""
    for i in range(70):
        await _job(queue_store, f"j{i:02d}", 2, share=f"u{i:02d}")
    served = set()
    for _ in range(70):
        leased = await queue_store.lease("w", 1)
        served.update(t.job for t in leased)
        await _done(queue_store, "w", leased)
    assert len(served) == 70


async def _ready_indices(store: Store) -> tuple[int, int]:
    return await store.redis.zcard(store.keys.ready), await store.redis.zcard(store.keys.ranked)


async def test_the_ready_indices_empty_once_everything_is_done(queue_store: Store) -> None:
    await _job(queue_store, "a", 3, share="alice")
    await _job(queue_store, "b", 3, share="bob", priority=2)
    await _job(queue_store, "c", 3, share="carol")
    await queue_store.cancel("c")  # cancelled while ready
    assert await _ready_indices(queue_store) == (2, 2)
    held = await queue_store.lease("w", 10)
    assert len(held) == 6 and await _ready_indices(queue_store) == (0, 0)
    await queue_store.release("w", [(t.job, t.task, t.attempt) for t in held[:2]])
    assert await _ready_indices(queue_store) != (0, 0)
    held = held[2:] + await queue_store.lease("w", 10)
    await _done(queue_store, "w", held)
    assert await _ready_indices(queue_store) == (0, 0)
    for job in "ab":
        assert (await queue_store.summary(job))["state"] == "done"


async def test_a_ready_job_whose_keys_are_gone_leaves_the_indices(queue_store: Store) -> None:
    """(A store that lost keys, or an operator's DEL): the lease drops it, serves the rest."""
    await _job(queue_store, "gone", 3, share="alice")
    await _job(queue_store, "kept", 3, share="alice")
    await queue_store.redis.delete(*queue_store.keys.job("gone").owned)
    leased = await queue_store.lease("w", 10)
    assert [t.job for t in leased] == ["kept"] * 3
    assert await _ready_indices(queue_store) == (0, 0)


async def _claims(store: Store, job: str) -> dict[str, str]:
    raw = await store.redis.hgetall(store.keys.job(job).claims)
    return {k.decode(): v.decode() for k, v in raw.items()}


async def test_a_dead_workers_file_is_free_for_the_others(queue_store: Store) -> None:
    """A worker that died held a claim on its file: the others kept away from that file
    (its requeued chunk and the rest of it) while any other file had chunks queued."""
    keys = ["f0"] * 12 + ["f1"] * 8
    await _job(queue_store, "j", len(keys), keys=keys)
    (first,) = await queue_store.lease("w1", 1)
    assert keys[int(first.task)] == "f0"
    await queue_store.open_session("w1", "s1")
    assert await queue_store.end_session("w1", "s1", lost=True) == (True, 1, 0)
    assert "k:f0" not in await _claims(queue_store, "j")
    (second,) = await queue_store.lease("w2", 1)
    assert (second.task, second.attempt) == (first.task, 2)  # the retry, at once


async def test_an_expired_or_released_lease_frees_its_claim(queue_store: Store) -> None:
    keys = ["f0"] * 6 + ["f1"] * 4
    await _job(queue_store, "j", len(keys), keys=keys)
    held = await queue_store.lease("w1", 2)
    assert {keys[int(t.task)] for t in held} == {"f0"}
    assert await queue_store.release("w1", [(t.job, t.task, t.attempt) for t in held]) == 2
    assert not await _claims(queue_store, "j")
    held = await queue_store.lease("w2", 2)
    assert {keys[int(t.task)] for t in held} == {"f0"}
    await queue_store.redis.zadd(  # the lease deadline passed (w2 hung)
        queue_store.keys.job("j").leases, {t.task: 0 for t in held}
    )
    assert await queue_store.reap() == (2, 0)
    assert not await _claims(queue_store, "j")


async def test_done_tasks_leave_the_locality_hash(queue_store: Store) -> None:
    keys = ["f0"] * 5 + ["f1"] * 5
    await _job(queue_store, "j", len(keys), keys=keys)
    held = await queue_store.lease("w", 4)
    await _done(queue_store, "w", held)
    left = await queue_store.redis.hlen(queue_store.keys.job("j").locality)
    assert left == len(keys) - 4  # only queued tasks keep their key


async def _serve(store: Store, n: int, users: tuple[str, ...] = ()) -> Counter[str]:
    got: Counter[str] = Counter()
    for _ in range(n):
        leased = await store.lease("pool-w", 1, users)
        assert leased, got
        got[leased[0].job] += 1
        await _done(store, "pool-w", leased)
    return got


async def test_an_idle_user_saves_up_no_credit_on_pool_workers(queue_store: Store) -> None:
    """Only workers limited to some users (pools) serve: the floor never moved, so a user
    idle meanwhile came back with all the worker time of the others owed to her."""
    pool = ("alice", "bob")
    await _job(queue_store, "first", 300, user="alice")
    await _serve(queue_store, 96, pool)  # bob idle meanwhile
    await _job(queue_store, "late", 300, user="bob")
    got = await _serve(queue_store, 48, pool)
    assert abs(got["first"] - got["late"]) <= 2, got


def _unpack_inputs(payload: bytes) -> list[bytes]:
    out, at = [], 0
    while at < len(payload):
        (n,) = struct.unpack(">I", payload[at : at + 4])
        out.append(payload[at + 4 : at + 4 + n])
        at += 4 + n
    return out


@pytest.mark.parametrize("rollbacks", [False, True], ids=["", "store-rollbacks"])
async def test_a_random_mix_of_leases_losses_and_releases_counts_each_task_once(
    queue_store: Store, rollbacks: bool
) -> None:
    """Users with several jobs (plain, reducing, with locality keys, priorities), four
    workers leasing 1 to 40 tasks at a time (some limited to some users), reports that
    crash, hand-backs, expired leases and lost workers, all interleaved at random. The
    store's own records at the end: every job done, each task accepted once, each chunk
    in the reducing job's one result once, the ready indices empty. ``rollbacks``: the
    store also goes back, now and then, to a snapshot taken a few steps before (a crash
    that lost its last writes); workers keep what they held and report it."""
    rng = random.Random(int(os.environ.get("HQ_REVIEW_SEED", "15")))
    s = queue_store
    await s.put_blob(REDUCER, b"reducer")
    jobs: dict[str, int] = {}
    for i, (user, n) in enumerate([("alice", 60), ("alice", 25), ("bob", 40), ("carol", 30)]):
        job = f"{user}{i}"
        keys = [f"f{j % 4}" for j in range(n)] if i % 2 == 0 else None
        await _job(s, job, n, user=user, priority=i % 3, keys=keys)
        jobs[job] = n
    await s.create_job(
        "red", function=FN, max_attempts=50, fail_fast=True, label="", user="bob",
        reducer=REDUCER, fanin=3,
    )  # fmt: skip
    await s.submit(
        "red", [str(i) for i in range(35)], [b"p"] * 35, [f"g{i % 3}" for i in range(35)]
    )
    await s.seal("red", 35)
    for job in jobs:  # attempts enough for the losses below
        await s.redis.hset(s.keys.job(job).meta, "max_attempts", 50)
    workers = ["w1", "w2", "w3", "w4"]
    pools = {"w3": ("alice",), "w4": ("bob", "carol")}
    held: dict[str, list[LeasedTask]] = {w: [] for w in workers}
    holder: dict[tuple[str, str], str] = {}
    snap: dict[bytes, bytes] | None = None
    rolled = False
    for step in range(1500):
        w = rng.choice(workers)
        op = rng.random()
        if rollbacks and step % 25 == 0:
            snap = await snapshot(s)
        if rollbacks and snap is not None and step % 25 == 20 and step < 300 and rng.random() < 0.5:
            await roll_back(s, snap)
            rolled, holder = True, {}
        if op < 0.45:
            got = await s.lease(w, rng.randint(1, 40), pools.get(w, ()))
            for t in got:
                assert (t.job, t.task) not in holder, (
                    f"{t} leased while {holder[t.job, t.task]} holds it"
                )
                holder[t.job, t.task] = w
            held[w] += got
        elif op < 0.85 and held[w]:
            batch = rng.sample(held[w], rng.randint(1, len(held[w])))
            reports = []
            for t in batch:
                held[w].remove(t)
                holder.pop((t.job, t.task), None)
                if rng.random() < 0.1:
                    reports.append(Report(t.job, t.task, t.attempt, Outcome.CRASHED, {}, b""))
                elif protocol.is_merge(t.task):
                    merged = b"".join(_unpack_inputs(t.payload))
                    reports.append(
                        Report(t.job, t.task, t.attempt, Outcome.OK, None, merged, wall=1)
                    )
                else:
                    reports.append(
                        Report(
                            t.job,
                            t.task,
                            t.attempt,
                            Outcome.OK,
                            None,
                            f"{t.job}:{t.task};".encode(),
                            wall=1,
                        )
                    )
            await s.complete(w, reports)
        elif op < 0.9 and held[w]:
            back = held[w][: rng.randint(1, len(held[w]))]
            released = await s.release(w, [(t.job, t.task, t.attempt) for t in back])
            assert rolled or released == len(back)
            for t in back:
                held[w].remove(t)
                holder.pop((t.job, t.task), None)
        elif op < 0.95 and held[w]:
            await s.open_session(w, f"s{step}")
            await s.end_session(w, f"s{step}", lost=True)
            for t in held[w]:
                holder.pop((t.job, t.task), None)
            held[w] = []
        elif rolled and op > 0.98:  # leases the store alone remembers (rolled back) expire
            for job in [*jobs, "red"]:
                leases = s.keys.job(job).leases
                if expired := dict.fromkeys(await s.redis.zrange(leases, 0, -1), 0):
                    await s.redis.zadd(leases, expired)
            await s.reap()
            holder, held = {}, {x: [] for x in workers}  # (as if every worker had hung)
        elif held[w]:  # its leases expire (it hung), the reaper requeues them
            for t in held[w]:
                await s.redis.zadd(s.keys.job(t.job).leases, {t.task: 0}, xx=True)
                holder.pop((t.job, t.task), None)
            held[w] = []
            await s.reap()
        if all([(await s.summary(j))["state"] == "done" for j in [*jobs, "red"]]):
            break
    else:
        pytest.fail(f"not done after 1500 steps: {[await s.summary(j) for j in jobs]}")
    for job, n in jobs.items():
        summary = await s.summary(job)
        assert summary["done"] == n and summary["failed"] == 0, summary
        values = await s.redis.hvals(s.keys.job(job).results)
        assert sorted(values) == sorted(f"{job}:{i};".encode() for i in range(n))
    (final,) = await s.redis.hvals(s.keys.job("red").results)
    chunks = [c for c in final.decode().split(";") if c]
    assert sorted(chunks) == sorted(f"red:{i}" for i in range(35))
    if not rollbacks:  # (a rollback takes counts back too)
        assert (await s.counters())["tasks_ok"] == sum(jobs.values()) + 35
    assert await _ready_indices(s) == (0, 0)


async def test_jobs_an_older_server_made_ready_are_leased(queue_store: Store) -> None:
    """A rolling upgrade: a server of the version before RANKED queued tasks (READY alone)."""
    await _job(queue_store, "old", 3, share="alice")
    await _job(queue_store, "new", 3, share="bob")
    await queue_store.redis.delete(queue_store.keys.ranked)  # as the older server left it
    leased = await queue_store.lease("w", 10)
    assert sorted(t.job for t in leased) == ["new"] * 3 + ["old"] * 3
    assert await _ready_indices(queue_store) == (0, 0)
