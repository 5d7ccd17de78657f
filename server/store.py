"""The domain layer: every queue operation as calls to Redis and its Lua scripts.

The HTTP handlers parse and validate; this module changes state. Each task state
change is one Lua script call (atomic); batches of independent calls are
pipelined.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from coffea_hq.protocol import MERGE_PREFIX, CompleteStatus, Outcome

from .keys import Keys
from .scripts import Scripts

BLOB_TTL = 7 * 24 * 3600  # refreshed whenever a job names the blob
REAP_BATCH = 1000
RESULTS_MAX_TASKS = 8192  # per results response
WORKER_STALE = 60.0  # a worker not heard from for this long no longer counts


class StoreError(Exception):
    """A request the store refuses; ``status`` is the HTTP status it maps to."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnknownJob(StoreError):
    status = 404
    code = "unknown_job"


class UnknownBlob(StoreError):
    status = 404
    code = "unknown_blob"


class Conflict(StoreError):
    status = 409
    code = "conflict"


@dataclass(frozen=True, slots=True)
class LeasedTask:
    job: str
    task: str
    attempt: int
    function: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class Report:
    """One task's outcome as a worker reports it."""

    job: str
    task: str
    attempt: int
    outcome: Outcome
    error: dict[str, Any] | None
    data: bytes


@dataclass(slots=True)
class ResultBatch:
    cursor: str
    items: list[tuple[str, str]]  # (task, "ok" | "error")
    parts: list[bytes]
    errors: dict[str, Any]
    summary: dict[str, Any]
    end: bool = False  # the batch reaches the job's last event: nothing more will come


_OUTCOME_CODES = {Outcome.OK: "o", Outcome.ERROR: "e", Outcome.CRASHED: "c"}


def _s(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


class Store:
    """Queue operations on one Redis-protocol store under one key prefix."""

    def __init__(self, redis: Redis, keys: Keys, *, lease_timeout: float, result_ttl: int) -> None:
        # Any: redis-py types each reply as the union of every RESP shape; the scripts and
        # commands below fix the shapes, and the tests check them.
        self.redis: Any = redis
        self.keys = keys
        self.lease_ms = int(lease_timeout * 1000)
        self.result_ttl = result_ttl
        self.scripts = Scripts.register(redis)

    def _argv(self, job: str, *rest: Any) -> list[Any]:
        return [job, self.keys.wake, self.result_ttl, *rest]

    # ------------------------------------------------------------------ store checks

    async def eviction_policy(self) -> str | None:
        """The store's ``maxmemory-policy``, or None when it does not say."""
        try:
            reply = await self.redis.config_get("maxmemory-policy")
        except Exception:  # Dragonfly and managed services may refuse CONFIG
            return None
        value = reply.get(b"maxmemory-policy") or reply.get("maxmemory-policy")
        return _s(value)

    # ------------------------------------------------------------------ blobs

    async def put_blob(self, sha: str, data: bytes) -> None:
        await self.redis.set(self.keys.blob(sha), data, ex=BLOB_TTL)

    async def has_blob(self, sha: str) -> bool:
        return bool(await self.redis.exists(self.keys.blob(sha)))

    async def get_blob(self, sha: str) -> bytes:
        data = await self.redis.get(self.keys.blob(sha))
        if data is None:
            raise UnknownBlob(f"no blob {sha}: upload it before naming it in a job")
        return bytes(data)

    # ------------------------------------------------------------------ jobs (client side)

    async def create_job(
        self,
        job: str,
        *,
        function: str,
        max_attempts: int,
        fail_fast: bool,
        label: str,
        owner: str,
        reducer: str = "",
        fanin: int = 0,
    ) -> dict[str, Any]:
        for sha in filter(None, (function, reducer)):
            if not await self.redis.expire(self.keys.blob(sha), BLOB_TTL):
                raise UnknownBlob(f"function blob {sha} is not on the server: upload it first")
        status, _ = await self.scripts.create(
            keys=self.keys.job(job).script_keys,
            args=self._argv(
                job, function, max_attempts, int(fail_fast), label, owner, reducer, fanin
            ),
        )
        if status == b"conflict":
            raise Conflict(f"job {job} exists already with another function")
        return await self.summary(job)

    async def summary(self, job: str) -> dict[str, Any]:
        meta = await self.redis.hgetall(self.keys.job(job).meta)
        if not meta:
            raise UnknownJob(f"no job {job} (never created, deleted, or expired)")
        m = {k.decode(): v.decode() for k, v in meta.items()}
        return {
            "job": job,
            "state": m["state"],
            "label": m.get("label", ""),
            "submitted": int(m.get("submitted", 0)),
            "total": int(m["total"]) if "total" in m else None,
            "done": int(m.get("done", 0)),
            "failed": int(m.get("failed", 0)),
            "max_attempts": int(m.get("max_attempts", 0)),
            "fail_fast": m.get("fail_fast") == "1",
            "reducing": bool(m.get("reducer")),
            "merges": int(m.get("merges", 0)),
            "merges_open": int(m.get("merges_open", 0)),
        }

    async def submit(self, job: str, tasks: Sequence[str], payloads: Sequence[bytes]) -> int:
        args: list[Any] = [
            ",".join(tasks),
            ",".join(str(len(p)) for p in payloads),
            b"".join(payloads),
        ]
        status, added = await self.scripts.submit(
            keys=self.keys.job(job).script_keys, args=self._argv(job, *args)
        )
        if status == b"unknown":
            raise UnknownJob(f"no job {job}: create it before submitting tasks")
        if status == b"finished":
            raise Conflict(f"job {job} has finished; it takes no more tasks")
        if status == b"sealed":
            raise Conflict(f"job {job} is sealed; it takes no new tasks")
        return int(added)

    async def seal(self, job: str, total: int) -> dict[str, Any]:
        status, detail = await self.scripts.seal(
            keys=self.keys.job(job).script_keys, args=self._argv(job, total)
        )
        if status == b"unknown":
            raise UnknownJob(f"no job {job}")
        if status == b"conflict":
            raise Conflict(f"job {job} was sealed with another total")
        if status == b"mismatch":
            raise Conflict(
                f"job {job} has {int(detail)} tasks but the seal says {total}: "
                "submit the rest first"
            )
        return await self.summary(job)

    async def cancel(self, job: str) -> dict[str, Any]:
        state = await self.scripts.cancel(keys=self.keys.job(job).script_keys, args=self._argv(job))
        if not state:
            raise UnknownJob(f"no job {job}")
        return await self.summary(job)

    async def delete_job(self, job: str) -> None:
        """Cancel if running, then drop every key of the job (the client has its results)."""
        await self.cancel(job)
        await self.redis.delete(*self.keys.job(job).owned)

    async def results(
        self, job: str, *, after: str, ack: str | None, wait: float, max_bytes: int
    ) -> ResultBatch:
        keys = self.keys.job(job)
        if ack:
            await self.scripts.ack(keys=keys.script_keys, args=self._argv(job, ack))
        summary = await self.summary(job)
        block = int(wait * 1000) if wait > 0 else None
        reply = await self.redis.xread({keys.events: after}, count=64, block=block)
        batch = ResultBatch(cursor=after, items=[], parts=[], errors={}, summary=summary)
        if not reply:
            return batch
        # Whole stream entries only, so the cursor always sits on an entry boundary.
        entries: list[tuple[str, list[tuple[str, str]], bool]] = []
        n_ids = 0
        for entry_id, fields in reply[0][1]:
            if entries and n_ids >= RESULTS_MAX_TASKS:
                break
            items = [
                (task, outcome)
                for name, outcome in ((b"ok", "ok"), (b"err", "error"), (b"done", "merged"))
                for task in fields.get(name, b"").decode().split(",")
                if task
            ]
            entries.append((entry_id.decode(), items, b"end" in fields))
            n_ids += len(items)
        # Merged results stay on the server (the workers consumed them): nothing to fetch.
        ids = [task for _, items, _ in entries for task, outcome in items if outcome != "merged"]
        failed = [task for _, items, _ in entries for task, outcome in items if outcome == "error"]
        pipe = self.redis.pipeline(transaction=False)
        pipe.hmget(keys.results, ids) if ids else pipe.echo(b"")
        pipe.hmget(keys.errors, failed) if failed else pipe.echo(b"")
        values, errors = await pipe.execute()
        fetched = dict(zip(ids, values or [], strict=False))
        size = 0
        for entry_id, items, end in entries:
            if batch.items and size > max_bytes:
                break
            for task, outcome in items:
                value = bytes(fetched.get(task) or b"")
                size += len(value)
                batch.items.append((task, outcome))
                batch.parts.append(value)
            batch.cursor = entry_id
            batch.end = end
        for task, raw in zip(failed, errors if failed else [], strict=True):
            batch.errors[task] = json.loads(raw) if raw else {"type": "unknown", "message": ""}
        batch.summary = await self.summary(job)
        return batch

    # ------------------------------------------------------------------ tasks (worker side)

    async def lease(self, worker: str, maximum: int) -> list[LeasedTask]:
        """Lease up to ``maximum`` tasks, oldest job first."""
        leased: list[LeasedTask] = []
        jobs = await self.redis.zrange(self.keys.ready, 0, 15)
        for raw_job in jobs:
            job = raw_job.decode()
            reply = await self.scripts.lease(
                keys=self.keys.job(job).script_keys,
                args=self._argv(job, worker, maximum - len(leased), self.lease_ms),
            )
            if reply:
                function, reducer = reply[0].decode(), reply[1].decode()
                for i in range(2, len(reply), 3):
                    task = reply[i].decode()
                    leased.append(
                        LeasedTask(
                            job,
                            task,
                            int(reply[i + 1]),
                            reducer if task.startswith(MERGE_PREFIX) else function,
                            reply[i + 2] or b"",
                        )
                    )
            if len(leased) >= maximum:
                break
        return leased

    async def complete(self, worker: str, reports: Sequence[Report]) -> list[CompleteStatus]:
        by_job: dict[str, list[int]] = defaultdict(list)
        for i, report in enumerate(reports):
            by_job[report.job].append(i)
        pipe = self.redis.pipeline(transaction=False)
        order: list[list[int]] = []
        for job, indices in by_job.items():
            batch = [reports[i] for i in indices]
            # A constant number of script arguments whatever the batch size: packing
            # thousands of arguments one by one is most of redis-py's cost here.
            args: list[Any] = [
                worker,
                ",".join(r.task for r in batch),
                ",".join(str(r.attempt) for r in batch),
                "".join(_OUTCOME_CODES[r.outcome] for r in batch),
                ",".join(str(len(r.data)) for r in batch),
                b"".join(r.data for r in batch),
            ]
            args += [
                json.dumps({**(r.error or {}), "worker": worker, "attempt": r.attempt})
                for r in batch
                if r.outcome is not Outcome.OK
            ]
            await self.scripts.complete(
                keys=self.keys.job(job).script_keys, args=self._argv(job, *args), client=pipe
            )
            order.append(indices)
        replies = await pipe.execute()
        statuses: list[CompleteStatus] = [CompleteStatus.UNKNOWN] * len(reports)
        for indices, reply in zip(order, replies, strict=True):
            for i, status in zip(indices, reply, strict=True):
                statuses[i] = CompleteStatus(status.decode())
        return statuses

    async def release(self, worker: str, items: Sequence[tuple[str, str, int]]) -> int:
        by_job: dict[str, list[Any]] = defaultdict(list)
        for job, task, attempt in items:
            by_job[job] += [task, attempt]
        pipe = self.redis.pipeline(transaction=False)
        for job, args in by_job.items():
            await self.scripts.release(
                keys=self.keys.job(job).script_keys,
                args=self._argv(job, worker, *args),
                client=pipe,
            )
        return sum(int(n) for n in await pipe.execute())

    async def heartbeat(
        self, worker: str, info: dict[str, Any], leases: Sequence[tuple[str, str, int]]
    ) -> list[tuple[str, str, int]]:
        """Extend the worker's leases and record its telemetry; returns the leases it lost,
        as (job, task, attempt)."""
        by_job: dict[str, list[Any]] = defaultdict(list)
        for job, task, attempt in leases:
            by_job[job] += [task, attempt]
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(self.keys.workers, worker, json.dumps({**info, "seen": now}))
        pipe.zadd(self.keys.workers_seen, {worker: now})
        jobs = list(by_job)
        for job in jobs:
            await self.scripts.heartbeat(
                keys=self.keys.job(job).script_keys,
                args=self._argv(job, worker, self.lease_ms, *by_job[job]),
                client=pipe,
            )
        replies = await pipe.execute()
        lost = []
        for job, reply in zip(jobs, replies[2:], strict=True):
            lost += [
                (job, t.decode(), int(a)) for t, a in zip(reply[::2], reply[1::2], strict=True)
            ]
        return lost

    async def forget_worker(self, worker: str) -> None:
        await self.redis.hdel(self.keys.workers, worker)
        await self.redis.zrem(self.keys.workers_seen, worker)

    # ------------------------------------------------------------------ housekeeping

    async def reap(self) -> tuple[int, int]:
        """Requeue (or fail) every task whose lease expired; returns (requeued, failed)."""
        jobs = [j.decode() for j in await self.redis.zrange(self.keys.jobs, 0, -1)]
        if not jobs:
            return 0, 0
        pipe = self.redis.pipeline(transaction=False)
        for job in jobs:
            await self.scripts.reap(
                keys=self.keys.job(job).script_keys, args=self._argv(job, REAP_BATCH), client=pipe
            )
        replies = await pipe.execute()
        return sum(int(r[0]) for r in replies), sum(int(r[1]) for r in replies)

    async def queue_stats(self) -> dict[str, int]:
        """Queued and leased task counts over all unfinished jobs (what autoscalers read)."""
        jobs = [j.decode() for j in await self.redis.zrange(self.keys.jobs, 0, -1)]
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        for job in jobs:
            keys = self.keys.job(job)
            pipe.llen(keys.queue)
            pipe.zcard(keys.leases)
        pipe.zremrangebyscore(self.keys.workers_seen, "-inf", now - WORKER_STALE)
        pipe.zcard(self.keys.workers_seen)
        replies = await pipe.execute()
        queued = sum(replies[0:-2:2])
        running = sum(replies[1:-2:2])
        return {
            "queued": queued,
            "running": running,
            "work": queued + running,
            "jobs": len(jobs),
            "workers": int(replies[-1]),
        }

    async def workers(self) -> dict[str, Any]:
        raw = await self.redis.hgetall(self.keys.workers)
        return {k.decode(): json.loads(v) for k, v in raw.items()}
