"""The domain layer: every queue operation as calls to Redis and its Lua scripts.

The HTTP handlers parse and validate; this module changes state. Each task state
change is one Lua script call (atomic); batches of independent calls are
pipelined.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from coffea_hq import protocol
from coffea_hq.protocol import CompleteStatus, Counter, JobState, Outcome

from .fastredis import Direct, run_pipelined
from .keys import Event, JobKeys, Keys, Meta
from .scripts import PASS_FLOOR, Call, CreateReply, Scripts, SealReply, SubmitReply

T = TypeVar("T")
K = TypeVar("K")

BLOB_TTL = 7 * 24 * 3600  # refreshed whenever a job names the blob
REAP_BATCH = 1000
JOB_KEYS_CACHED = 4096  # jobs whose keys are remembered (cleared when full)
RESULTS_MAX_TASKS = 8192  # per results response
# A reducing job's long poll woken by progress alone (chunks merged on the workers:
# nothing to fetch) gathers more of it for this long before it answers; results,
# failures and the job's end still answer at once. One answer per chunk cost the session,
# server and store a round trip and an ack each, 10-20% of the control plane's CPU on
# 50-100 ms chunks.
PROGRESS_GATHER = 0.25
PROGRESS_GATHER_ENTRIES = 256  # stream entries gathered at most
WORKER_STALE = 60.0  # a worker not heard from for this long no longer counts
# Fair-share groups (users) with ready jobs one lease looks at, one lookup each however
# many ready jobs a group has (see lease.lua); groups beyond them (by name) wait.
READY_SCAN = 1024
READY_SCAN_RESTRICTED = 1024  # ... for a worker limited to some users' jobs
USER_JOBS_MAX = 10_000  # jobs remembered per user for the quotas (oldest dropped first)
NO_JOB = "no job {job} (never created, deleted, or expired)"


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


class NoKeptResult(StoreError):
    status = 404
    code = "no_kept_result"


class Conflict(StoreError):
    status = 409
    code = "conflict"


class UnsupportedStore(Exception):
    """The store cannot hold coffea-hq's state safely (it evicts keys, or is a cluster)."""


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
    note: bytes | None = None  # JSON messages.TaskNote for the client, if the worker sent info
    output: str = ""  # what the task printed (its tail), for the log ring buffers
    wall: float | None = None  # seconds the attempt ran, if the worker said (the histogram)
    cpu: float = 0.0  # CPU seconds of the attempt (with ``wall``)
    max_rss: int = 0  # peak resident bytes of its subprocess (with ``wall``)


def _log_line(now: float, worker: str, job: str, r: Report) -> bytes:
    """The JSON messages.LogLine of what ``r``'s task printed (b"" if nothing)."""
    if not r.output:
        return b""
    line = {"time": now, "worker": worker, "job": job, "task": r.task, "text": r.output}
    return json.dumps(line).encode()


@dataclass(slots=True)
class Usage:
    """A user's share of the store."""

    tasks: int = 0  # queued and running, over the user's unfinished jobs
    result_bytes: int = 0  # results stored and not yet collected
    blob_bytes: int = 0
    blobs: dict[str, int] = field(default_factory=dict)  # sha -> bytes, of blobs still held


@dataclass(slots=True)
class ResultBatch:
    cursor: str
    items: list[tuple[str, str]]  # (task, "ok" | "error")
    parts: list[bytes]
    errors: dict[str, Any]
    summary: dict[str, Any]
    end: bool = False  # the batch reaches the job's last event: nothing more will come
    # task -> messages.TaskNote, where one exists: its JSON as stored, passed on unparsed
    notes: dict[str, msgspec.Raw] | None = None


_FAILURE_KEYS = ("type", "message", "traceback", "worker")


def _s(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def by_job(items: Iterable[tuple[str, K]]) -> dict[str, list[K]]:
    """Group ``(job, item)`` pairs by job, keeping their order (one script call per job)."""
    grouped: dict[str, list[K]] = defaultdict(list)
    for job, item in items:
        grouped[job].append(item)
    return grouped


class Store:
    """Queue operations on one Redis-protocol store under one key prefix."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        *,
        lease_timeout: float,
        result_ttl: int,
        unsealed_timeout: float = protocol.DEFAULT_UNSEALED_TIMEOUT,
        direct: Direct | None = None,
    ) -> None:
        # Any: redis-py types each reply as the union of every RESP shape; the scripts and
        # commands below fix the shapes, and the tests check them.
        self.redis: Any = redis
        self.keys = keys
        self.lease_timeout = lease_timeout
        self.lease_ms = int(lease_timeout * 1000)
        self.result_ttl = result_ttl
        self.unsealed_ms = int(unsealed_timeout * 1000)
        self.scripts = Scripts(redis, keys.wake, result_ttl)
        # Connections of its own for the hot calls (lease, report, heartbeat, results ack):
        # see fastredis. Without it, those go through ``redis`` as everything else does.
        self.direct = direct
        self._job_keys: dict[str, JobKeys] = {}

    def job_keys(self, job: str) -> JobKeys:
        """``keys.job(job)``, remembered: every report and heartbeat names its jobs' 21
        keys, and building them is a tenth of a report's own Python work."""
        found = self._job_keys.get(job)
        if found is None:
            if len(self._job_keys) >= JOB_KEYS_CACHED:
                self._job_keys.clear()
            found = self._job_keys[job] = self.keys.job(job)
        return found

    # ------------------------------------------------------------------ store checks

    async def eviction_policy(self) -> str | None:
        """The store's ``maxmemory-policy``, or None when it does not say."""
        try:
            reply = await self.redis.config_get("maxmemory-policy")
        except Exception:  # Dragonfly and managed services may refuse CONFIG
            return None
        value = reply.get(b"maxmemory-policy") or reply.get("maxmemory-policy")
        return _s(value)

    async def is_cluster(self) -> bool:
        """Whether the store runs in Redis Cluster mode (its job scripts need one primary)."""
        try:
            info = await self.redis.info("cluster")
        except Exception:  # servers without the section are not clusters
            return False
        return bool(int(info.get("cluster_enabled", 0) or 0))

    # ------------------------------------------------------------------ blobs

    async def put_blob(self, sha: str, data: bytes, user: str = "") -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.keys.blob(sha), data, ex=BLOB_TTL)
        if user:  # what the blob quota counts (the blobs expire after BLOB_TTL, so does this)
            pipe.hset(self.keys.user_blobs(user), sha, len(data))
            pipe.expire(self.keys.user_blobs(user), BLOB_TTL)
        await pipe.execute()

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
        user: str,
        reducer: str = "",
        fanin: int = 0,
        resources: bool = False,
        share: str = "",
        priority: int = 0,
    ) -> dict[str, Any]:
        """``share``: the fair-share group in open mode (``user``, when set, is the group);
        ``priority``: higher first among the group's jobs."""
        for sha in filter(None, (function, reducer)):
            if not await self.redis.expire(self.keys.blob(sha), BLOB_TTL):
                raise UnknownBlob(f"function blob {sha} is not on the server: upload it first")
        reply = await self.scripts.create(
            self.keys.job(job),
            job,
            function_blob=function,
            max_attempts=max_attempts,
            fail_fast=fail_fast,
            label=label,
            user=user,
            reducer_blob=reducer,
            fanin=fanin,
            share=share,
            priority=priority,
        ).run()
        if reply is CreateReply.CONFLICT:
            raise Conflict(f"job {job} exists already with another function")
        if reply is CreateReply.NOT_YOURS:
            raise UnknownJob(NO_JOB.format(job=job))
        if resources and reply is CreateReply.CREATED:  # before any task is submitted
            await self.redis.hset(self.keys.job(job).meta, Meta.RESOURCES.value, "1")
        if user and reply is CreateReply.CREATED:
            pipe = self.redis.pipeline(transaction=False)
            pipe.zadd(self.keys.user_jobs(user), {job: time.time()})
            # Bounded: usage() drops the jobs gone since; this drops the oldest beyond that.
            pipe.zremrangebyrank(self.keys.user_jobs(user), 0, -USER_JOBS_MAX - 1)
            await pipe.execute()
        return await self.summary(job)

    async def owner(self, job: str) -> str | None:
        """The user who created ``job`` ('' in open mode), or None if there is no such job."""
        return _s(await self.redis.hget(self.keys.job(job).meta, Meta.USER.value))

    async def usage(self, user: str, *, filling: str | None = None) -> Usage:
        """What ``user`` holds in the store now (what the quotas compare against).
        ``filling``: a job being submitted to, whose own results do not count (its
        client collects them once it has sent every task)."""
        jobs = [_s(j) for j in await self.redis.zrange(self.keys.user_jobs(user), 0, -1)]
        pipe = self.redis.pipeline(transaction=False)
        for job in jobs:
            keys = self.keys.job(str(job))
            pipe.exists(keys.meta)
            pipe.llen(keys.queue)
            pipe.zcard(keys.leases)
            pipe.memory_usage(keys.results)
        pipe.hgetall(self.keys.user_blobs(user))
        replies = await pipe.execute()
        recorded = {str(_s(sha)): int(size) for sha, size in replies[-1].items()}
        # Blobs expire on their own (BLOB_TTL): count only those still in the store.
        pipe = self.redis.pipeline(transaction=False)
        for sha in recorded:
            pipe.exists(self.keys.blob(sha))
        held = await pipe.execute() if recorded else []
        blobs = {sha: n for (sha, n), there in zip(recorded.items(), held, strict=True) if there}
        if len(blobs) < len(recorded):
            await self.redis.hdel(self.keys.user_blobs(user), *(recorded.keys() - blobs.keys()))
        usage = Usage(blob_bytes=sum(blobs.values()), blobs=blobs)
        gone = []
        for i, job in enumerate(jobs):
            exists, queued, running, results = replies[4 * i : 4 * i + 4]
            if not exists:
                gone.append(job)
                continue
            usage.tasks += int(queued) + int(running)
            if job != filling:
                usage.result_bytes += int(results or 0)
        if gone:  # expired or deleted jobs leave the index here
            await self.redis.zrem(self.keys.user_jobs(user), *gone)
        return usage

    async def summary(self, job: str) -> dict[str, Any]:
        meta = await self.redis.hgetall(self.keys.job(job).meta)
        if not meta:
            raise UnknownJob(f"no job {job} (never created, deleted, or expired)")
        return _summary(job, meta)

    async def unfinished(self, limit: int) -> list[dict[str, Any]]:
        """Summaries of the newest ``limit`` unfinished jobs, oldest first (two round trips)."""
        jobs = [j.decode() for j in await self.redis.zrange(self.keys.jobs, -limit, -1)]
        pipe = self.redis.pipeline(transaction=False)
        for job in jobs:
            pipe.hgetall(self.keys.job(job).meta)
        metas = await pipe.execute() if jobs else []
        return [_summary(job, meta) for job, meta in zip(jobs, metas, strict=True) if meta]

    async def submit(
        self,
        job: str,
        tasks: Sequence[str],
        payloads: Sequence[bytes],
        localities: Sequence[str] = (),
        keep: Sequence[str] = (),
    ) -> int:
        """``localities``: each task's locality key (the file it reads), or none at all;
        ``keep``: the tasks whose results stay in the store for other tasks."""
        status, added = await self.scripts.submit(
            self.keys.job(job),
            job,
            tasks=tasks,
            payloads=payloads,
            localities=localities,
            keep=keep,
        ).run()
        if status is SubmitReply.UNKNOWN:
            raise UnknownJob(f"no job {job}: create it before submitting tasks")
        if status is SubmitReply.FINISHED:
            raise Conflict(f"job {job} has finished; it takes no more tasks")
        if status is SubmitReply.SEALED:
            raise Conflict(f"job {job} is sealed; it takes no new tasks")
        return added

    async def seal(self, job: str, total: int) -> dict[str, Any]:
        status, submitted = await self.scripts.seal(self.keys.job(job), job, total=total).run()
        if status is SealReply.UNKNOWN:
            raise UnknownJob(f"no job {job}")
        if status is SealReply.CONFLICT:
            raise Conflict(f"job {job} was sealed with another total")
        if status is SealReply.MISMATCH:
            raise Conflict(
                f"job {job} has {submitted} tasks but the seal says {total}: submit the rest first"
            )
        return await self.summary(job)

    async def cancel(self, job: str) -> dict[str, Any]:
        state = await self.scripts.cancel(self.keys.job(job), job).run()
        if state is None:
            raise UnknownJob(f"no job {job}")
        return await self.summary(job)

    async def delete_job(self, job: str) -> None:
        """Cancel if running, then drop every key of the job (the client has its results)."""
        user = await self.owner(job)
        await self.cancel(job)
        await self.redis.delete(*self.keys.job(job).owned)
        if user:
            await self.redis.zrem(self.keys.user_jobs(user), job)

    async def _gather_progress(self, keys: JobKeys, entries: list[Any], left: float) -> list[Any]:
        """``entries`` (progress only), and what follows them within
        :data:`PROGRESS_GATHER` seconds (and ``left``), up to the first entry that is
        more than progress."""
        entries = list(entries)
        deadline = time.monotonic() + min(PROGRESS_GATHER, left)
        while len(entries) < PROGRESS_GATHER_ENTRIES:
            block = int((deadline - time.monotonic()) * 1000)
            if block <= 0:
                break
            more = await self.redis.xread({keys.events: entries[-1][0]}, count=64, block=block)
            if not more:
                break
            entries += more[0][1]
            if not _progress_only(more[0][1]):
                break
        return entries

    async def results(
        self, job: str, *, after: str, ack: str | None, wait: float, max_bytes: int
    ) -> ResultBatch:
        # Three round trips: the ack with a first look at the job (an unknown one answers
        # at once, not after the long poll), the wait with the summary and whether any
        # task notes exist read right after it, then the results themselves.
        keys = self.keys.job(job)
        pipe = self.redis.pipeline(transaction=False)
        pipe.exists(keys.meta)
        found: list[Any] = []
        acks = [self.scripts.ack(keys, job, cursor=ack)] if ack else []
        await run_pipelined(self.redis, acks, pipe, before=found, direct=self.direct)
        if not found[0]:
            raise UnknownJob(f"no job {job} (never created, deleted, or expired)")
        block = int(wait * 1000) if wait > 0 else None
        started = time.monotonic()
        pipe = self.redis.pipeline(transaction=False)
        pipe.xread({keys.events: after}, count=64, block=block)
        pipe.hgetall(keys.meta)
        pipe.exists(keys.notes)  # (EXISTS: the store ACL grants it, not HLEN)
        reply, meta, n_notes = await pipe.execute()
        # (Only a reducing job's: a kept result's entry is news too, the tasks that need
        # it can be submitted now.)
        reducing = bool(meta.get(Meta.REDUCER_BLOB.encode()))
        if reply and wait > 0 and reducing and _progress_only(reply[0][1]):
            gathered = await self._gather_progress(
                keys, reply[0][1], wait - (time.monotonic() - started)
            )
            if len(gathered) > len(reply[0][1]):
                reply = [[reply[0][0], gathered]]
                pipe = self.redis.pipeline(transaction=False)
                pipe.hgetall(keys.meta)
                pipe.exists(keys.notes)
                meta, n_notes = await pipe.execute()
        if not meta:
            raise UnknownJob(f"no job {job} (never created, deleted, or expired)")
        # Read after the events: it counts at least what they say.
        summary = _summary(job, meta)
        batch = ResultBatch(cursor=after, items=[], parts=[], errors={}, summary=summary)
        if not reply:
            return batch
        # Whole stream entries only, so the cursor always sits on an entry boundary.
        fields = [(Event.OK, "ok"), (Event.ERROR, "error"), (Event.MERGED, "merged")]
        entries: list[tuple[str, list[tuple[str, str]], bool]] = []
        n_ids = 0
        for entry_id, entry in reply[0][1]:
            if entries and n_ids >= RESULTS_MAX_TASKS:
                break
            items = [
                (task, outcome)
                for name, outcome in fields
                for task in entry.get(name.encode(), b"").decode().split(",")
                if task
            ]
            entries.append((entry_id.decode(), items, Event.END.encode() in entry))
            n_ids += len(items)
        # Merged results stay on the server (the workers consumed them): nothing to fetch.
        ids = [task for _, items, _ in entries for task, outcome in items if outcome != "merged"]
        failed = [task for _, items, _ in entries for task, outcome in items if outcome == "error"]
        # Most jobs keep no notes: then no HMGET of every task id for nothing.
        every = [task for _, items, _ in entries for task, _ in items] if n_notes else []
        values: list[Any] = []
        errors: list[Any] = []
        notes: list[Any] = []
        if ids or failed or every:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hmget(keys.results, ids) if ids else pipe.echo(b"")
            pipe.hmget(keys.errors, failed) if failed else pipe.echo(b"")
            pipe.hmget(keys.notes, every) if every else pipe.echo(b"")
            values, errors, notes = await pipe.execute()
        noted = {
            task: msgspec.Raw(raw)
            for task, raw in zip(every, notes if every else [], strict=True)
            if raw
        }
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
                if task in noted:
                    batch.notes = batch.notes or {}
                    batch.notes[task] = noted[task]
            batch.cursor = entry_id
            batch.end = end
        for task, raw in zip(failed, errors if failed else [], strict=True):
            batch.errors[task] = json.loads(raw) if raw else {"type": "unknown", "message": ""}
        return batch

    async def kept_among(self, tasks: Sequence[tuple[str, str]]) -> list[bool]:
        """Whether each (job, task) was submitted with ``keep``."""
        pipe = self.redis.pipeline(transaction=False)
        for job, task in tasks:
            pipe.sismember(self.keys.job(job).kept, task)
        return [bool(k) for k in await pipe.execute()]

    async def kept_result(self, job: str, task: str) -> bytes:
        """The stored result of ``task``, submitted with ``keep``, for another task of its
        job to take as input (counted in Counter.KEPT_FETCHED)."""
        keys = self.keys.job(job)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hget(keys.meta, Meta.STATE)
        pipe.sismember(keys.kept, task)
        pipe.hget(keys.results, task)
        pipe.hexists(keys.errors, task)
        state, kept, data, failed = await pipe.execute()
        if state is None:
            raise NoKeptResult(f"job {job} is gone (deleted or expired): task {task}'s result too")
        if failed:
            raise NoKeptResult(f"task {task} of job {job} failed: it has no result to take")
        if not kept or data is None:
            if _s(state) != JobState.RUNNING:
                why = f"the job has ended ({_s(state)}), which deletes its kept results"
            elif kept:
                why = "it has not finished"
            else:
                why = "it was never submitted with 'keep'"
            raise NoKeptResult(f"job {job} holds no kept result of task {task}: {why}")
        await self.redis.hincrby(self.keys.counters, Counter.KEPT_FETCHED, 1)
        return bytes(data)

    # ------------------------------------------------------------------ tasks (worker side)

    async def worker_alive(self, worker: str, within: float) -> bool:
        """Whether ``worker`` heartbeated in the last ``within`` seconds. One never heard
        of (or forgotten after a minute of silence) is not: its parked request gets no
        tasks, and a live worker simply asks again after its heartbeat."""
        seen = await self.redis.zscore(self.keys.workers_seen, worker)
        return seen is not None and time.time() - float(seen) <= within

    async def lease(self, worker: str, maximum: int, users: Sequence[str] = ()) -> list[LeasedTask]:
        """Lease up to ``maximum`` tasks, by fair share between users (see lease.lua), then
        priority and age; with ``users``, only tasks of those users' jobs."""
        scan = READY_SCAN_RESTRICTED if users else READY_SCAN
        call = self.scripts.lease(
            self.keys,
            worker=worker,
            maximum=maximum,
            lease_ms=self.lease_ms,
            users=users,
            scan=scan,
        )
        replies = await (self.direct.call(call) if self.direct else call.run())
        leased: list[LeasedTask] = []
        for reply in replies:
            for t in reply.tasks:
                function = reply.reducer_blob if protocol.is_merge(t.task) else reply.function_blob
                leased.append(LeasedTask(reply.job, t.task, t.attempt, function, t.payload))
        return leased

    async def shares(self) -> dict[str, tuple[float, float]]:
        """Every fair-share group with a weight or worker time served: (weight, usage)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self.keys.shares)
        pipe.hgetall(self.keys.passes)
        weights, passes = await pipe.execute()
        names = {k.decode() for k in weights} | {k.decode() for k in passes}
        names.discard(PASS_FLOOR)
        return {
            n: (float(weights.get(n.encode(), 1)), float(passes.get(n.encode(), 0)))
            for n in sorted(names)
        }

    async def set_shares(self, weights: dict[str, float]) -> None:
        """Set fair-share weights (validated by the route: groups are names, weights > 0)."""
        if weights:
            await self.redis.hset(self.keys.shares, mapping=weights)

    async def _per_job(
        self,
        items: Iterable[tuple[str, K]],
        call: Callable[[str, list[K]], Call[T]],
        pipe: Pipeline | None = None,
    ) -> list[tuple[str, list[K], T]]:
        """One script call per job over ``items`` grouped by job, in one round trip (with
        whatever ``pipe`` already holds)."""
        groups = by_job(items)
        calls = [call(job, group) for job, group in groups.items()]
        replies = await run_pipelined(self.redis, calls, pipe, direct=self.direct)
        return [
            (job, group, reply) for (job, group), reply in zip(groups.items(), replies, strict=True)
        ]

    async def complete(self, worker: str, reports: Sequence[Report]) -> list[CompleteStatus]:
        now = time.time()
        lines = [_log_line(now, worker, r.job, r) for r in reports]  # b"" where none printed

        def call(job: str, batch: list[tuple[int, Report]]) -> Call[list[CompleteStatus]]:
            return self.scripts.complete(
                self.job_keys(job),
                job,
                worker=worker,
                tasks=[r.task for _, r in batch],
                attempts=[r.attempt for _, r in batch],
                outcomes=[r.outcome for _, r in batch],
                values=[r.data for _, r in batch],
                spent=[None if r.wall is None else (r.wall, r.cpu, r.max_rss) for _, r in batch],
                errors=[
                    json.dumps({**(r.error or {}), "worker": worker, "attempt": r.attempt})
                    for _, r in batch
                    if r.outcome is not Outcome.OK
                ],
                notes=[r.note or b"" for _, r in batch],
                outputs=[lines[i] for i, _ in batch],
            )

        statuses: list[CompleteStatus] = [CompleteStatus.UNKNOWN] * len(reports)
        indexed = [(r.job, (i, r)) for i, r in enumerate(reports)]
        pipe = self.redis.pipeline(transaction=False)
        printed = [line for line in lines if line]
        if printed:  # the worker's ring buffer (the job's is the script's, for accepted ones)
            self._push_worker_lines(pipe, worker, printed)
        for _, batch, reply in await self._per_job(indexed, call, pipe):
            for (i, _), status in zip(batch, reply, strict=True):
                statuses[i] = status
        return statuses

    def _push_samples(self, pipe: Pipeline, worker: str, sample: dict[str, Any]) -> None:
        windows = [(self.keys.worker_telemetry(worker), json.dumps(sample))]
        for job, done in sample.get("jobs", {}).items():
            entry = {"time": sample["time"], "worker": worker, "done": done}
            windows.append((self.keys.job_telemetry(job), json.dumps(entry)))
        for key, value in windows:
            pipe.rpush(key, value)
            pipe.ltrim(key, -protocol.TELEMETRY_SAMPLES, -1)
            pipe.expire(key, protocol.TELEMETRY_TTL)

    async def telemetry(self, jobs_limit: int) -> dict[str, dict[str, list[Any]]]:
        """The windows of the live workers, and of the newest ``jobs_limit`` unfinished
        jobs and the jobs those windows name, oldest sample first (three round trips)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hkeys(self.keys.workers)
        pipe.zrange(self.keys.jobs, -jobs_limit, -1)
        workers, jobs = await pipe.execute()
        names = sorted(w.decode() for w in workers)
        for w in names:
            pipe.lrange(self.keys.worker_telemetry(w), 0, -1)
        found = {
            w: [json.loads(x) for x in window]
            for w, window in zip(names, await pipe.execute() if names else [], strict=True)
        }
        # The unfinished jobs, and the jobs the workers' windows name (finished lately).
        job_names = list(dict.fromkeys(j.decode() for j in jobs))
        for window in found.values():
            for sample in window:
                job_names.extend(j for j in sample.get("jobs", {}) if j not in job_names)
        job_names = job_names[: 2 * jobs_limit]
        for j in job_names:
            pipe.lrange(self.keys.job_telemetry(j), 0, -1)
        job_windows = await pipe.execute() if job_names else []
        return {
            "workers": found,
            "jobs": {
                j: [json.loads(x) for x in window]
                for j, window in zip(job_names, job_windows, strict=True)
                if window
            },
        }

    async def failures(self, jobs: Sequence[str], limit: int) -> dict[str, list[dict[str, Any]]]:
        """Up to ``limit`` failed tasks of each of ``jobs`` (those with any) with the
        errors the store keeps (one round trip)."""
        if not jobs:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for job in jobs:
            pipe.hscan(self.keys.job(job).errors, 0, count=limit)
        found: dict[str, list[dict[str, Any]]] = {}
        for job, (_, errors) in zip(jobs, await pipe.execute(), strict=True):
            for task, raw in list(errors.items())[:limit]:
                try:
                    doc = json.loads(raw)
                except ValueError:
                    doc = {}
                doc = doc if isinstance(doc, dict) else {}
                found.setdefault(job, []).append(
                    {"task": task.decode(), **{k: str(doc.get(k, "")) for k in _FAILURE_KEYS}}
                )
        return found

    def _push_worker_lines(self, pipe: Pipeline, worker: str, lines: list[bytes]) -> None:
        key = self.keys.worker_logs(worker)
        pipe.rpush(key, *lines)
        pipe.ltrim(key, -protocol.WORKER_LOG_LINES, -1)
        pipe.expire(key, protocol.WORKER_LOG_TTL)

    async def job_logs(self, job: str) -> list[dict[str, Any]]:
        """The job's log ring buffer, oldest first."""
        keys = self.keys.job(job)
        pipe = self.redis.pipeline(transaction=False)
        pipe.exists(keys.meta)
        pipe.lrange(keys.logs, 0, -1)
        exists, lines = await pipe.execute()
        if not exists:
            raise UnknownJob(f"no job {job} (never created, deleted, or expired)")
        return [json.loads(line) for line in lines]

    async def worker_logs(self, worker: str) -> list[dict[str, Any]]:
        """The worker's log ring buffer, oldest first (empty for a worker never heard of)."""
        return [
            json.loads(x) for x in await self.redis.lrange(self.keys.worker_logs(worker), 0, -1)
        ]

    async def release(self, worker: str, items: Sequence[tuple[str, str, int]]) -> int:
        def call(job: str, leases: list[tuple[str, int]]) -> Call[int]:
            return self.scripts.release(self.job_keys(job), job, worker=worker, leases=leases)

        pairs = [(job, (task, attempt)) for job, task, attempt in items]
        return sum(n for _, _, n in await self._per_job(pairs, call))

    async def heartbeat(
        self,
        worker: str,
        info: dict[str, Any],
        leases: Sequence[tuple[str, str, int]],
        logs: Sequence[str] = (),
        sample: dict[str, Any] | None = None,
    ) -> list[tuple[str, str, int]]:
        """Extend the worker's leases, record its telemetry and its log lines; returns the
        leases it lost. ``sample`` (a messages.WorkerSample) joins the worker's window and
        its per-job counts the jobs' windows, in the same round trip."""
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(self.keys.workers, worker, json.dumps({**info, "seen": now}))
        pipe.zadd(self.keys.workers_seen, {worker: now})
        if sample is not None:
            self._push_samples(pipe, worker, {**sample, "time": now})
        if logs:
            lines = [
                json.dumps({"time": now, "worker": worker, "text": text}).encode() for text in logs
            ]
            self._push_worker_lines(pipe, worker, lines)

        def call(job: str, held: list[tuple[str, int]]) -> Call[list[tuple[str, int]]]:
            return self.scripts.heartbeat(
                self.job_keys(job), job, worker=worker, lease_ms=self.lease_ms, leases=held
            )

        pairs = [(job, (task, attempt)) for job, task, attempt in leases]
        return [
            (job, task, attempt)
            for job, _, lost in await self._per_job(pairs, call, pipe)
            for task, attempt in lost
        ]

    async def open_session(self, worker: str, session: str) -> None:
        """``worker``'s presence is now ``session``: an older session's end changes nothing."""
        await self.redis.hset(self.keys.sessions, worker, session)

    async def end_session(
        self, worker: str, session: str, *, lost: bool, users: Sequence[str] = ()
    ) -> tuple[bool, int, int]:
        """End ``worker``'s presence ``session`` if it is still the current one; if ``lost``,
        forget the worker and requeue (or fail) its leases (of ``users``' jobs only, if
        given). Returns (current, requeued, failed)."""
        return await self.scripts.worker_gone(
            self.keys, worker=worker, session=session, lost=lost, users=users
        ).run()

    async def ended_jobs(self, jobs: Iterable[str]) -> list[str]:
        """Those of ``jobs`` that are no longer running (cancelled, failed, done, deleted)."""
        names = list(dict.fromkeys(jobs))
        pipe = self.redis.pipeline(transaction=False)
        for job in names:
            pipe.hget(self.keys.job(job).meta, Meta.STATE)
        running = JobState.RUNNING.value.encode()
        states = await pipe.execute() if names else []
        return [job for job, state in zip(names, states, strict=True) if state != running]

    async def lost_leases(
        self, worker: str, leases: Sequence[tuple[str, str, int]]
    ) -> list[tuple[str, str, int]]:
        """The leases among ``leases`` whose job is no longer running (cancelled, failed,
        done or deleted). A cheap look that extends nothing (a parked heartbeat's, when a
        job ends); expired leases are the next heartbeat's to find."""
        over = set(await self.ended_jobs(job for job, _, _ in leases))
        return [lease for lease in leases if lease[0] in over]

    async def forget_worker(self, worker: str) -> None:
        await self.redis.hdel(self.keys.workers, worker)
        await self.redis.zrem(self.keys.workers_seen, worker)

    # ------------------------------------------------------------------ housekeeping

    async def reap(self) -> tuple[int, int]:
        """Requeue (or fail) every task whose lease expired and cancel abandoned unsealed
        jobs; returns (requeued, failed)."""
        jobs = [j.decode() for j in await self.redis.zrange(self.keys.jobs, 0, -1)]
        calls = [
            self.scripts.reap(
                self.keys.job(job), job, batch=REAP_BATCH, unsealed_ms=self.unsealed_ms
            )
            for job in jobs
        ]
        replies = await run_pipelined(self.redis, calls)
        return sum(r[0] for r in replies), sum(r[1] for r in replies)

    async def prune_workers(self) -> int:
        """Forget workers not heard from for ``WORKER_STALE`` seconds; returns how many."""
        stale = await self.redis.zrangebyscore(
            self.keys.workers_seen, "-inf", time.time() - WORKER_STALE
        )
        if not stale:
            return 0
        pipe = self.redis.pipeline(transaction=False)
        pipe.hdel(self.keys.workers, *stale)
        pipe.zrem(self.keys.workers_seen, *stale)
        await pipe.execute()
        return len(stale)

    async def counters(self) -> dict[str, int]:
        raw = await self.redis.hgetall(self.keys.counters)
        got = {k.decode(): int(v) for k, v in raw.items()}
        return {c.value: got.get(c.value, 0) for c in Counter}

    async def queue_stats(self) -> dict[str, Any]:
        """Queued and leased task counts over all unfinished jobs (what autoscalers read),
        and the server's task accounting."""
        jobs = [j.decode() for j in await self.redis.zrange(self.keys.jobs, 0, -1)]
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        for job in jobs:
            keys = self.keys.job(job)
            pipe.llen(keys.queue)
            pipe.zcard(keys.leases)
        pipe.zcount(self.keys.workers_seen, now - WORKER_STALE, "+inf")
        replies = await pipe.execute()
        queued = sum(replies[0:-1:2])
        running = sum(replies[1:-1:2])
        return {
            "queued": queued,
            "running": running,
            "work": queued + running,
            "jobs": len(jobs),
            "workers": int(replies[-1]),
            "counters": await self.counters(),
        }

    async def workers(self) -> dict[str, Any]:
        raw = await self.redis.hgetall(self.keys.workers)
        return {k.decode(): json.loads(v) for k, v in raw.items()}


def _progress_only(entries: list[Any]) -> bool:
    """Whether these stream entries only count merged chunks (nothing to fetch, no end)."""
    merged = Event.MERGED.encode()
    for _, entry in entries:
        for name, value in entry.items():
            if name != merged and value:
                return False
    return True


def _summary(job: str, meta: dict[bytes, bytes]) -> dict[str, Any]:
    """A job's summary (messages.JobSummary's fields) from its meta hash."""
    m = {k.decode(): v.decode() for k, v in meta.items()}

    def number(field: Meta) -> int:
        return int(m.get(field, 0))

    summary: dict[str, Any] = {
        "job": job,
        "state": m[Meta.STATE],
        "label": m.get(Meta.LABEL, ""),
        "submitted": number(Meta.SUBMITTED),
        "total": int(m[Meta.TOTAL]) if Meta.TOTAL in m else None,
        "done": number(Meta.DONE),
        "failed": number(Meta.FAILED),
        "max_attempts": number(Meta.MAX_ATTEMPTS),
        "fail_fast": m.get(Meta.FAIL_FAST) == "1",
        "reducing": bool(m.get(Meta.REDUCER_BLOB)),
        "merges": number(Meta.MERGES),
        "merges_open": number(Meta.MERGES_OPEN),
        "requeued": number(Meta.REQUEUED),
        "crashed": number(Meta.CRASHED),
        "wall_seconds": number(Meta.WALL_US) / 1e6,
        "cpu_seconds": number(Meta.CPU_US) / 1e6,
        "max_rss": number(Meta.RSS_MAX),
    }
    if m.get(Meta.REASON):
        summary["reason"] = m[Meta.REASON]
    return summary
