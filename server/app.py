"""The aiohttp application: thin handlers over :mod:`.store`."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.metadata
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from importlib import resources
from typing import Any, TypeVar

import msgspec
import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError as RedisResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from coffea_hq import messages as m
from coffea_hq import openapi as openapi_document
from coffea_hq import protocol
from coffea_hq.protocol import FRAMES_CONTENT_TYPE, CompleteStatus, FrameError, Outcome, Role
from coffea_hq.routes import ROUTES

from . import validate as v
from .auth import Principal, TokenCache, auth_middleware, principal
from .config import ServerConfig
from .dispatch import Beacon, LeaseDispatcher
from .fastredis import Direct, packed_pool
from .keys import Keys
from .limits import LongPolls, MemoryGauge, QuotaExceeded, TooManyTasks
from .metrics import LeaseWait, exposition, read_telemetry
from .presence import PresenceTracker
from .scripts import JOB_ENDED_MESSAGE
from .store import NO_JOB, Report, Store, StoreError, UnknownJob, UnsupportedStore

log = logging.getLogger("coffea_hq.server")

CONFIG = web.AppKey("config", ServerConfig)
STORE = web.AppKey("store", Store)
DISPATCHER = web.AppKey("dispatcher", LeaseDispatcher)
GAUGE = web.AppKey("gauge", MemoryGauge)
LONG_POLLS = web.AppKey("long_polls", LongPolls)
TOKENS = web.AppKey("tokens", TokenCache)
PRESENCE = web.AppKey("presence", PresenceTracker)
ENDED = web.AppKey("ended", Beacon)
LEASE_WAIT = web.AppKey("lease_wait", LeaseWait)

# Policies under which Redis never deletes a key on its own.
SAFE_EVICTION_POLICIES = {"noeviction"}
PRUNE_EVERY = 10.0  # seconds between sweeps of workers gone silent

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")

try:
    VERSION = importlib.metadata.version("coffea-hq")
except importlib.metadata.PackageNotFoundError:  # run from a source tree
    VERSION = "unknown"


def _error(status: int, code: str, message: str, retry_after: int | None = None) -> web.Response:
    reply = _json_reply(m.ErrorReply(code, message), status)
    if retry_after is not None:
        reply.headers["Retry-After"] = str(retry_after)
    return reply


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn domain errors, bad frames and store outages into JSON errors, once."""
    try:
        return await handler(request)
    except StoreError as e:
        return _error(e.status, e.code, e.message, getattr(e, "retry_after", None))
    except FrameError as e:
        return _error(400, "bad_frames", str(e))
    except msgspec.ValidationError as e:
        return _error(400, "bad_request", f"invalid request body: {e}")
    except msgspec.DecodeError as e:
        return _error(400, "bad_request", f"request body must be JSON: {e}")
    except RecursionError:
        return _error(400, "bad_request", "request body is JSON nested too deeply")
    except (RedisConnectionError, RedisTimeoutError, OSError) as e:
        log.warning("store unavailable: %s", e)
        return _error(503, "store_unavailable", f"the queue's Redis is unreachable: {e}")
    except RedisResponseError as e:
        # OOM, MISCONF, LOADING, BUSY: the store refuses writes for now. 503, so that
        # clients and workers retry rather than give up or drop results.
        log.error("store refused a command: %s", e)
        return _error(503, "store_error", f"the queue's Redis refused the request: {e}")
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[CONFIG].max_request_size
        return _error(
            413,
            "too_large",
            f"request body exceeds the server's limit of {limit} bytes "
            "(hq-server --max-request-size)",
        )
    except web.HTTPException as e:
        if e.status >= 400:
            return _error(e.status, "http_error", e.reason)
        raise


async def _body(request: web.Request, kind: type[T]) -> T:
    """The JSON body as message ``kind`` (a 400 naming the field if it is not one)."""
    return m.decode(await request.read(), kind)


async def _frames(request: web.Request, kind: type[T]) -> tuple[T, list[memoryview]]:
    if request.content_type != FRAMES_CONTENT_TYPE:
        raise v.BadRequest(f"request body must be {FRAMES_CONTENT_TYPE}")
    return protocol.unpack(await request.read(), kind)


def _json_reply(message: msgspec.Struct | m.Workers, status: int = 200) -> web.Response:
    return web.Response(body=m.encode(message), status=status, content_type="application/json")


def _frames_response(header: msgspec.Struct, parts: list[bytes]) -> web.Response:
    return web.Response(body=protocol.pack(header, parts), content_type=FRAMES_CONTENT_TYPE)


def _stored(raw: Any, kind: type[T]) -> T:
    """Data the store holds (a worker's heartbeat, a task's error) as reply type ``kind``.
    Not the client's fault if it does not fit: a 500, never the middleware's 400."""
    try:
        return msgspec.convert(raw, kind)
    except msgspec.ValidationError as e:
        raise RuntimeError(f"stored data is not a {kind.__name__}: {e}") from None


def _job_id(request: web.Request) -> str:
    return v.ident(request.match_info["job"], "job id")


async def _own_job(request: web.Request) -> str:
    """The job id of the path, once the caller may touch that job: a job of another user
    answers exactly as a job that does not exist (404), so ids leak nothing."""
    job = _job_id(request)
    who = principal(request)
    # One answer for "not yours" and "not there", whatever the route would say.
    if not who.admin and await request.app[STORE].owner(job) != who.user:
        raise UnknownJob(NO_JOB.format(job=job))
    return job


def _client_key(request: web.Request, who: Principal) -> str:
    return who.token_id if who.token_id != "open" else f"addr:{request.remote}"


# ---------------------------------------------------------------------- service


async def health(request: web.Request) -> web.Response:
    try:
        await request.app[STORE].redis.ping()
        store = "ok"
    except Exception as e:  # health must answer whatever the store does
        store = f"unreachable: {e}"
    reply = m.Health("ok", store, VERSION, request.app[CONFIG].max_request_size)
    return _json_reply(reply)


async def queue(request: web.Request) -> web.Response:
    return _json_reply(m.QueueStats(**await request.app[STORE].queue_stats()))


async def workers(request: web.Request) -> web.Response:
    found = await request.app[STORE].workers()
    return _json_reply({w: _stored(info, m.WorkerInfo) for w, info in found.items()})


async def telemetry(request: web.Request) -> web.Response:
    found = await request.app[STORE].telemetry(protocol.JOBS_LIST_MAX)
    return _json_reply(msgspec.convert(found, m.Telemetry))


async def _dashboard_state(store: Any) -> bytes:
    jobs = await store.unfinished(protocol.JOBS_LIST_MAX)
    failing = [j["job"] for j in jobs if j["failed"]]
    state = m.DashboardState(
        queue=m.QueueStats(**await store.queue_stats()),
        workers={w: _stored(info, m.WorkerInfo) for w, info in (await store.workers()).items()},
        jobs=[m.JobSummary(**j) for j in jobs],
        failures=msgspec.convert(
            await store.failures(failing, protocol.EVENTS_FAILURES_MAX),
            dict[str, list[m.FailureNote]],
        ),
        telemetry=msgspec.convert(await store.telemetry(protocol.JOBS_LIST_MAX), m.Telemetry),
    )
    return m.encode(state)


async def events(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events for the dashboard: a :class:`~coffea_hq.messages.DashboardState`
    every ``EVENTS_EVERY`` seconds until the browser goes away."""
    raw = request.query.get("count", "1")
    if not (raw.isascii() and raw.isdigit() and 1 <= int(raw) <= protocol.EVENTS_MAX):
        raise v.BadRequest(
            f"query parameter 'count' must be an integer from 1 to {protocol.EVENTS_MAX}"
        )
    count = int(raw)
    response = web.StreamResponse(
        headers={"Content-Type": protocol.EVENTS_CONTENT_TYPE, "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    store = request.app[STORE]
    try:
        await response.write(b"retry: 1000\n\n")  # reconnect after a second when it ends
        for i in range(count):
            if i:
                await asyncio.sleep(protocol.EVENTS_EVERY)
            if not _connected(request):
                break
            await response.write(b"data: " + await _dashboard_state(store) + b"\n\n")
        await response.write_eof()
    except (ConnectionError, RuntimeError):  # the page was closed or reloaded
        pass
    return response


async def shares(request: web.Request) -> web.Response:
    found = await request.app[STORE].shares()
    return _json_reply(m.Shares({n: m.ShareInfo(w, u) for n, (w, u) in found.items()}))


async def set_shares(request: web.Request) -> web.Response:
    body = await _body(request, m.SetShares)
    await request.app[STORE].set_shares(body.weights)
    return await shares(request)


DASHBOARD_PAGE = resources.files(__package__).joinpath("dashboard.html").read_bytes()


async def dashboard(request: web.Request) -> web.Response:
    return web.Response(body=DASHBOARD_PAGE, content_type="text/html", charset="utf-8")


async def metrics(request: web.Request) -> web.Response:
    telemetry = await read_telemetry(request.app[STORE])
    return web.Response(
        body=exposition(telemetry, request.app[LEASE_WAIT]),
        headers={"Content-Type": protocol.METRICS_CONTENT_TYPE},
    )


async def list_jobs(request: web.Request) -> web.Response:
    jobs = await request.app[STORE].unfinished(protocol.JOBS_LIST_MAX)
    return _json_reply(m.JobList([m.JobSummary(**j) for j in jobs]))


async def openapi(request: web.Request) -> web.Response:
    return web.Response(
        body=openapi_document.encoded(request.app[CONFIG].auth), content_type="application/json"
    )


# ---------------------------------------------------------------------- blobs


def _blob_sha(request: web.Request) -> str:
    sha = request.match_info["sha"]
    if not protocol.valid_blob_name(sha):
        raise v.BadRequest("a blob's name is the hex sha256 of its bytes (64 lowercase hex digits)")
    return sha


async def put_blob(request: web.Request) -> web.Response:
    sha = _blob_sha(request)
    data = await request.read()
    if protocol.blob_name(data) != sha:
        raise v.BadRequest(f"blob bytes do not match their name {sha}: corrupted upload?")
    store, user = request.app[STORE], principal(request).user
    await request.app[GAUGE].check()
    limit = request.app[CONFIG].limits.blob_bytes_per_user
    if limit and user:
        usage = await store.usage(user)
        # A blob this user holds already adds nothing (a PUT retried after a lost reply).
        held = usage.blob_bytes - usage.blobs.get(sha, 0)
        if held + len(data) > limit:
            raise QuotaExceeded(
                f"user {user} holds {held:,} bytes of blobs; this one ({len(data):,}) would "
                f"pass the quota of {limit:,} (hq-server --quota-blob-bytes)"
            )
    await store.put_blob(sha, data, user)
    return _json_reply(m.BlobStored(sha, len(data)), 201)


async def head_blob(request: web.Request) -> web.Response:
    found = await request.app[STORE].has_blob(_blob_sha(request))
    return web.Response(status=200 if found else 404)


async def get_blob(request: web.Request) -> web.Response:
    data = await request.app[STORE].get_blob(_blob_sha(request))
    return web.Response(body=data, content_type=protocol.BLOB_CONTENT_TYPE)


# ---------------------------------------------------------------------- jobs (client)


async def create_job(request: web.Request) -> web.Response:
    job = _job_id(request)
    body = await _body(request, m.CreateJob)
    await request.app[GAUGE].check()
    summary = await request.app[STORE].create_job(
        job,
        function=body.function,
        max_attempts=body.max_attempts,
        fail_fast=body.fail_fast,
        label=body.label,
        user=principal(request).user,
        reducer=body.reducer or "",
        fanin=body.fanin,
        resources=body.resources,
        share=body.share,
        priority=body.priority,
    )
    return _json_reply(m.JobSummary(**summary))


async def get_job(request: web.Request) -> web.Response:
    return _json_reply(m.JobSummary(**await request.app[STORE].summary(await _own_job(request))))


async def delete_job(request: web.Request) -> web.Response:
    await request.app[STORE].delete_job(await _own_job(request))
    return _json_reply(m.Deleted(True))


async def _check_submit_quotas(request: web.Request, job: str, n: int) -> None:
    limits = request.app[CONFIG].limits
    if limits.max_tasks_per_request and n > limits.max_tasks_per_request:
        raise TooManyTasks(
            f"{n} tasks in one request; this server takes at most "
            f"{limits.max_tasks_per_request} (hq-server --max-tasks-per-request): send "
            "smaller batches"
        )
    await request.app[GAUGE].check()
    user = principal(request).user
    if not user or not (limits.queued_tasks_per_user or limits.result_bytes_per_user):
        return
    usage = await request.app[STORE].usage(user, filling=job)
    if limits.queued_tasks_per_user and usage.tasks + n > limits.queued_tasks_per_user:
        raise QuotaExceeded(
            f"user {user} has {usage.tasks:,} tasks queued or running; {n:,} more would pass "
            f"the quota of {limits.queued_tasks_per_user:,} (hq-server --quota-queued-tasks)"
        )
    if limits.result_bytes_per_user and usage.result_bytes >= limits.result_bytes_per_user:
        raise QuotaExceeded(
            f"user {user}'s uncollected results of other jobs take {usage.result_bytes:,} "
            "bytes, the quota "
            f"is {limits.result_bytes_per_user:,} (hq-server --quota-result-bytes): collect "
            "or delete finished jobs' results first"
        )


async def submit_tasks(request: web.Request) -> web.Response:
    job = await _own_job(request)
    header, parts = await _frames(request, m.SubmitTasks)
    ids = header.tasks
    if len(ids) != len(parts):
        raise v.BadRequest("'tasks' needs exactly one payload part per task")
    if any(protocol.is_merge(t) for t in ids):
        raise v.BadRequest(f"task ids starting with {protocol.MERGE_PREFIX!r} are reserved")
    if len(set(ids)) != len(ids):
        raise v.BadRequest("task ids within one batch must be distinct")
    if header.localities and len(header.localities) != len(ids):
        raise v.BadRequest("'localities' needs exactly one key per task (or none at all)")
    if header.keep and not set(header.keep) <= set(ids):
        raise v.BadRequest("'keep' names only tasks of the same request")
    await _check_submit_quotas(request, job, len(ids))
    added = await request.app[STORE].submit(
        job, ids, [bytes(p) for p in parts], header.localities, header.keep
    )
    return _json_reply(m.Submitted(added))


async def seal_job(request: web.Request) -> web.Response:
    job = await _own_job(request)
    body = await _body(request, m.Seal)
    return _json_reply(m.JobSummary(**await request.app[STORE].seal(job, body.total)))


async def cancel_job(request: web.Request) -> web.Response:
    return _json_reply(m.JobSummary(**await request.app[STORE].cancel(await _own_job(request))))


async def job_results(request: web.Request) -> web.Response:
    job = await _own_job(request)
    q = request.query
    after = v.cursor(q.get("after", "0"), "'after'") or "0"
    ack = v.cursor(q.get("ack"), "'ack'")
    wait = v.query_number(q, "wait", 0.0, 0.0, protocol.LONG_POLL_MAX)
    config = request.app[CONFIG]
    polls = request.app[LONG_POLLS]
    key = _client_key(request, principal(request))
    with polls.hold(key) if wait > 0 else contextlib.nullcontext():
        batch = await request.app[STORE].results(
            job, after=after, ack=ack, wait=wait, max_bytes=config.max_request_size // 2
        )
    header = m.ResultsHeader(
        **batch.summary,
        cursor=batch.cursor,
        # (task, outcome) pairs encode as ResultItem does, without building 4,096 of them.
        items=batch.items,  # type: ignore[arg-type]
        errors={task: _stored(e, m.TaskError) for task, e in batch.errors.items()},
        end=batch.end,
        notes=batch.notes,  # type: ignore[arg-type]  # Raw JSON of TaskNote, passed through
        sizes=[],
    )
    return _frames_response(header, batch.parts)


async def job_logs(request: web.Request) -> web.Response:
    lines = await request.app[STORE].job_logs(await _own_job(request))
    return _json_reply(m.LogsReply(msgspec.convert(lines, list[m.LogLine])))


async def worker_logs(request: web.Request) -> web.Response:
    worker = v.ident(request.match_info["worker"], "worker id")
    lines = await request.app[STORE].worker_logs(worker)
    return _json_reply(m.LogsReply(msgspec.convert(lines, list[m.LogLine])))


# ---------------------------------------------------------------------- tasks (worker)


def _connected(request: web.Request) -> bool:
    return request.transport is not None and not request.transport.is_closing()


def _lease_users(who: Principal, asked: list[str]) -> tuple[str, ...]:
    """The users whose jobs this lease may take (empty: anyone's): what the worker asks
    for, narrowed to what its token allows."""
    if who.role is not Role.WORKER or not who.users:
        return tuple(asked)
    if not asked:
        return who.users
    kept = tuple(u for u in asked if u in who.users)
    if not kept:
        raise v.Forbidden(
            f"this worker token serves only the jobs of {', '.join(who.users)}, "
            f"not of {', '.join(asked)}"
        )
    return kept


async def _check_pool_jobs(request: web.Request, jobs: Any) -> None:
    """A worker token limited to some users' jobs names only leases of their jobs: refused
    before anything changes otherwise, as the lease route narrows what it may take (a
    hostile task on one pool must not report into, or hand back, another user's work)."""
    who = principal(request)
    if who.role is not Role.WORKER or not who.users:
        return
    store = request.app[STORE]
    for job in dict.fromkeys(jobs):
        if await store.owner(job) not in who.users:
            raise v.Forbidden(
                f"this worker token serves only the jobs of {', '.join(who.users)}: "
                f"job {job} is not one of theirs"
            )


async def kept_result(request: web.Request) -> web.Response:
    job = _job_id(request)
    task = v.ident(request.match_info["task"], "task id")
    await _check_pool_jobs(request, [job])
    data = await request.app[STORE].kept_result(job, task)
    return web.Response(body=data, content_type=protocol.BLOB_CONTENT_TYPE)


async def lease(request: web.Request) -> web.StreamResponse:
    body = await _body(request, m.LeaseRequest)
    worker = body.worker
    who = principal(request)
    users = _lease_users(who, body.users)
    polls = request.app[LONG_POLLS]
    with (
        polls.hold(f"{_client_key(request, who)}/{worker}")
        if body.wait > 0
        else (contextlib.nullcontext())
    ):
        started = time.monotonic()
        tasks = await request.app[DISPATCHER].lease(
            worker, body.max, body.wait, connected=lambda: _connected(request), users=users
        )
    if tasks:
        request.app[LEASE_WAIT].observe(time.monotonic() - started)
    # Tuples encode as LeasedTask does, at half the cost of building them: the hot path.
    header = m.LeaseReply([(t.job, t.task, t.attempt, t.function) for t in tasks])  # type: ignore[misc]
    if not tasks:
        return _frames_response(header, [])
    # Written here rather than by aiohttp, so that a reply that cannot reach the worker
    # hands its tasks back instead of costing them an attempt at lease expiry.
    data = protocol.pack(header, [t.payload for t in tasks])
    response = _OneWrite(headers={"Content-Type": FRAMES_CONTENT_TYPE})
    response.content_length = len(data)
    try:
        if not _connected(request):
            raise ConnectionResetError("the worker closed its connection")
        await response.prepare(request)
        await response.write_eof(data)
    except (ConnectionError, RuntimeError) as e:
        back = await request.app[STORE].release(worker, [(t.job, t.task, t.attempt) for t in tasks])
        log.info("lease reply to worker %s lost (%s): %d task(s) handed back", worker, e, back)
    return response


class _OneWrite(web.StreamResponse):
    """A streamed reply whose headers go out with its body, in one socket send (a
    StreamResponse sends them at ``prepare``: two sends per lease reply)."""

    _send_headers_immediately = False


def _report(worker: str, item: m.ReportItem, part: memoryview) -> Report:
    error = msgspec.structs.asdict(item.error) if item.error is not None else None
    info = item.info
    if info is None:
        return Report(item.job, item.task, item.attempt, item.outcome, error, bytes(part))
    note = None  # the common case: the script writes the note if the job keeps resources
    if info.warnings or info.logs:
        note = m.TaskNote(worker, info.wall, info.cpu, info.max_rss, info.warnings, info.logs)
    return Report(
        item.job,
        item.task,
        item.attempt,
        item.outcome,
        error,
        bytes(part),
        None if note is None else m.encode(note),
        info.output,
        info.wall,
        info.cpu,
        info.max_rss,
    )


def _rejected(item: Any, index: int, status: CompleteStatus, reason: str | None) -> m.Rejected:
    ref = item if isinstance(item, list) else []
    job = str(ref[0]) if len(ref) > 0 else "?"
    task = str(ref[1]) if len(ref) > 1 else "?"
    return m.Rejected(index, job, task, status, reason)


async def _kept_within_quota(request: web.Request, reports: list[Report]) -> list[Report]:
    """A result kept in the store for other tasks (SubmitTasks.keep) larger than a user's
    whole result quota becomes the task's error, saying so (it would hold the quota for the
    job's whole life)."""
    limit = request.app[CONFIG].limits.result_bytes_per_user
    big = [r for r in reports if limit and r.outcome is Outcome.OK and len(r.data) > limit]
    if not big:
        return reports
    kept = await request.app[STORE].kept_among([(r.job, r.task) for r in big])
    over = {id(r) for r, k in zip(big, kept, strict=True) if k}
    return [
        dataclasses.replace(
            r,
            outcome=Outcome.ERROR,
            data=b"",
            error={
                "type": "coffea_hq.errors.KeptResultTooLarge",
                "message": f"task {r.task}'s result is {len(r.data):,} bytes, over the result "
                f"quota of {limit:,} bytes (hq-server --quota-result-bytes), and it is to be "
                "kept in the store for the job's other tasks: return less, or split the work",
                "traceback": "",
            },
        )
        if id(r) in over
        else r
        for r in reports
    ]


async def complete(request: web.Request) -> web.Response:
    """Judge a report item by item: a malformed item is refused, the others stand."""
    header, parts = await _frames(request, m.Complete)
    worker, items = header.worker, header.items
    if len(items) != len(parts):
        raise v.BadRequest("'items' needs exactly one result part per item")
    await _check_pool_jobs(request, (str(i[0]) for i in items if isinstance(i, list) and i))
    reports: list[Report] = []
    where: list[int] = []
    statuses = [CompleteStatus.INVALID] * len(items)
    reasons: dict[int, str] = {}
    try:  # the common case in one pass; item by item only when something is wrong
        checked = m.report_items(items)
    except msgspec.ValidationError:
        checked = None
    for i, (item, part) in enumerate(zip(items, parts, strict=True)):
        try:
            reports.append(_report(worker, checked[i] if checked else m.report_item(item), part))
            where.append(i)
        except msgspec.ValidationError as e:
            reasons[i] = f"'items'[{i}]: {e}"
    reports = await _kept_within_quota(request, reports)
    for i, status in zip(where, await request.app[STORE].complete(worker, reports), strict=True):
        statuses[i] = status
    refused = [i for i, s in enumerate(statuses) if s.refused]
    if not refused:
        return _json_reply(m.CompleteReply(statuses))
    # The accepted ones stand; the refused ones changed nothing.
    said = []
    if len(refused) > len(reasons):
        said.append(
            f"{len(refused) - len(reasons)} task(s) are not leased to worker {worker} "
            "(lease expired, job gone, or never leased to it)"
        )
    if reasons:
        first = min(reasons)
        said.append(f"{len(reasons)} item(s) are malformed ({reasons[first]})")
    reply = m.CompleteReply(
        statuses,
        error="invalid_items" if reasons else "not_leased",
        message="; ".join(said) + ": their results were dropped, the other items stand",
        rejected=[_rejected(items[i], i, statuses[i], reasons.get(i)) for i in refused[:20]],
    )
    return _json_reply(reply, 409)


async def release(request: web.Request) -> web.Response:
    body = await _body(request, m.Release)
    refs = [(r.job, r.task, r.attempt) for r in body.items]
    await _check_pool_jobs(request, (job for job, _, _ in refs))
    released = await request.app[STORE].release(body.worker, refs)
    request.app[DISPATCHER].notify()
    return _json_reply(m.Released(released))


async def heartbeat(request: web.Request) -> web.Response:
    body = await _body(request, m.Heartbeat)
    refs = [(r.job, r.task, r.attempt) for r in body.leases]
    await _check_pool_jobs(request, (job for job, _, _ in refs))
    # A beat may leave out leases taken moments ago (their deadline is far off): the
    # worker's own count of what it holds says whether it is busy (autoscaling reads it).
    held = body.stats.get("held")
    held = held if isinstance(held, int) and not isinstance(held, bool) else 0
    info = {"slots": body.slots, "host": body.host, "stats": body.stats}
    info["leases"] = max(len(refs), held)
    store = request.app[STORE]
    if body.draining:
        request.app[DISPATCHER].wake_worker(body.worker)  # end its parked long poll now
    sample = None if body.sample is None else msgspec.structs.asdict(body.sample)
    lost = await store.heartbeat(body.worker, info, refs, body.logs, sample)
    if body.exiting:
        await store.forget_worker(body.worker)
    elif body.wait > 0 and refs and not lost and not body.draining:
        lost = await _until_a_lease_is_lost(request, body, refs)
    reply = m.HeartbeatReply(
        lost=[m.LeaseRef(*x) for x in lost],
        interval=request.app[CONFIG].lease_timeout / 3,
        max_request_size=request.app[CONFIG].max_request_size,
        ended=await store.ended_jobs(job for job, _, _ in lost) if lost else [],
    )
    return _json_reply(reply)


async def presence(request: web.Request) -> web.StreamResponse:
    """Held open for a worker's life: its request body is newline-delimited
    :class:`~coffea_hq.messages.Presence` lines (a hello, keep-alive empty lines, a
    goodbye); the reply streams keep-alive lines back. See :mod:`.presence`."""
    hello = m.decode(await request.content.readline(), m.Presence)
    tracker = request.app[PRESENCE]
    await request.app[STORE].open_session(hello.worker, hello.session)
    tracker.opened()
    clean = False
    response = web.StreamResponse(headers={"Content-Type": protocol.PRESENCE_CONTENT_TYPE})

    async def ping() -> None:
        while True:
            await response.write(b"\n")
            await asyncio.sleep(protocol.PRESENCE_PING)

    pinger: asyncio.Task[None] | None = None
    try:
        await response.prepare(request)
        pinger = asyncio.create_task(ping())
        while line := await request.content.readline():
            if line.strip():
                said = m.decode(line, m.Presence)
                if said.worker == hello.worker and said.session == hello.session and said.bye:
                    clean = True
                    break
    except (ConnectionError, OSError, ValueError, msgspec.DecodeError, msgspec.ValidationError):
        pass  # a broken stream is a dropped one
    except Exception as e:  # aiohttp's payload errors: the connection broke mid-body
        log.debug("presence of worker %s ended: %r", hello.worker, e)
    finally:
        if pinger is not None:
            pinger.cancel()
        who = principal(request)
        # A pool token's dropped presence ends only leases it could have taken itself.
        users = who.users if who.role is Role.WORKER else ()
        tracker.ended(hello.worker, hello.session, clean=clean, users=users)
    with contextlib.suppress(ConnectionError, RuntimeError):
        await response.write_eof()
    return response


async def _until_a_lease_is_lost(
    request: web.Request, body: m.Heartbeat, refs: list[tuple[str, str, int]]
) -> list[tuple[str, str, int]]:
    """Hold a heartbeat up to ``body.wait`` seconds; whenever a job ends, look again at the
    worker's leases and answer at once if one is lost (its task should stop now)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + body.wait
    store, ended = request.app[STORE], request.app[ENDED]
    while (left := deadline - loop.time()) > 0 and _connected(request):
        if not await ended.wait(left):
            break
        lost = await store.lost_leases(body.worker, refs)
        if lost:
            return lost
    return []


# ---------------------------------------------------------------------- lifecycle


async def check_store(store: Store, config: ServerConfig) -> None:
    """Refuse a store that may evict keys (unless told otherwise) or is a Redis Cluster."""
    await store.redis.ping()
    if await store.is_cluster():
        raise UnsupportedStore(
            "the store is a Redis Cluster: coffea-hq's job scripts touch keys of one job and "
            "the global queue indices at once, which a cluster refuses (CROSSSLOT). Point "
            "hq-server at one primary (replicas and Sentinel for availability are fine)."
        )
    policy = await store.eviction_policy()
    if policy is None:
        log.warning("the store does not report maxmemory-policy; make sure it never evicts keys")
    elif policy not in SAFE_EVICTION_POLICIES:
        message = (
            f"the Redis store's maxmemory-policy is {policy!r}: it may evict keys, and an evicted "
            "key is a lost task. Set `maxmemory-policy noeviction` on the store, or start "
            "hq-server with --allow-eviction to run anyway."
        )
        if not config.allow_eviction:
            raise UnsupportedStore(message)
        log.warning(message)


async def _listen_for_wakeups(store: Store, dispatcher: LeaseDispatcher, ended: Beacon) -> None:
    """Follow the wake-up channel; reconnect with backoff when the store goes away."""
    ended_message = JOB_ENDED_MESSAGE.encode()
    delay = 0.1
    while True:
        try:
            async with store.redis.pubsub() as pubsub:
                await pubsub.subscribe(store.keys.wake)
                dispatcher.notify()  # anything published while we were away
                ended.ring()
                delay = 0.1
                async for message in pubsub.listen():
                    if message["type"] != "message":
                        continue
                    if message["data"] == ended_message:
                        ended.ring()
                    dispatcher.notify()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning("wake-up channel lost (%s); resubscribing in %.1fs", e, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def _reap_forever(store: Store, dispatcher: LeaseDispatcher, interval: float) -> None:
    """Requeue tasks with expired leases, end abandoned jobs, forget silent workers. Also
    nudges parked leases, a safety net for a wake-up lost while the channel reconnected."""
    last_prune = 0.0
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(interval)
        try:
            requeued, failed = await store.reap()
            if requeued or failed:
                log.info("expired leases: %d requeued, %d failed for good", requeued, failed)
            if loop.time() - last_prune > PRUNE_EVERY:
                last_prune = loop.time()
                await store.prune_workers()
            dispatcher.notify()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning("reaping expired leases failed (%s); retrying", e)


def _background(
    run: Callable[[web.Application], Coroutine[Any, Any, None]],
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context that runs ``run(app)`` for the application's life."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(run(app))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return context


# Operation id (coffea_hq.routes) -> its handler.
HANDLERS: dict[str, Handler] = {
    "health": health,
    "openapi": openapi,
    "dashboard": dashboard,
    "queue": queue,
    "workers": workers,
    "telemetry": telemetry,
    "events": events,
    "metrics": metrics,
    "shares": shares,
    "set_shares": set_shares,
    "list_jobs": list_jobs,
    "put_blob": put_blob,
    "head_blob": head_blob,
    "get_blob": get_blob,
    "create_job": create_job,
    "get_job": get_job,
    "delete_job": delete_job,
    "submit_tasks": submit_tasks,
    "seal_job": seal_job,
    "cancel_job": cancel_job,
    "job_results": job_results,
    "kept_result": kept_result,
    "lease": lease,
    "complete": complete,
    "release": release,
    "heartbeat": heartbeat,
    "presence": presence,
    "job_logs": job_logs,
    "worker_logs": worker_logs,
}


def add_routes(router: web.UrlDispatcher) -> None:
    """Register a handler for every route of the table, and refuse a table and handlers
    that disagree (a route without a handler, or a handler no route names)."""
    named = {route.operation for route in ROUTES}
    if named != HANDLERS.keys():
        raise RuntimeError(
            f"routes without a handler: {sorted(named - HANDLERS.keys())}; "
            f"handlers without a route: {sorted(HANDLERS.keys() - named)}"
        )
    own_head = {route.path for route in ROUTES if route.method == "HEAD"}
    for route in ROUTES:
        if route.method == "GET":
            # HEAD too (unless the table gives the path its own): load balancers and `curl -I`
            # probe with it.
            router.add_get(
                route.path, HANDLERS[route.operation], allow_head=route.path not in own_head
            )
        else:
            router.add_route(route.method, route.path, HANDLERS[route.operation])


def make_app(config: ServerConfig) -> web.Application:
    async def lookup(sha: str) -> Any:
        return await app[STORE].redis.hget(app[STORE].keys.tokens, sha)

    static = {}
    if config.worker_token_digest:
        static[config.worker_token_digest] = Principal("workers", Role.WORKER, "worker-file")
    tokens = TokenCache(lookup, config.token_cache_ttl, static) if config.auth else None
    app = web.Application(
        client_max_size=config.max_request_size,
        middlewares=[errors_middleware, auth_middleware(tokens)],
    )
    app[CONFIG] = config
    app[LONG_POLLS] = LongPolls(config.limits.long_polls_per_client)
    if tokens is not None:
        app[TOKENS] = tokens
    app[ENDED] = Beacon()
    app[LEASE_WAIT] = LeaseWait()

    async def store(app: web.Application) -> AsyncIterator[None]:
        # A blocking pool: a request beyond STORE_CONNECTIONS in flight waits for a
        # connection (redis-py's default pool refuses past 100: 503s under many workers).
        pool = aioredis.BlockingConnectionPool.from_url(
            config.redis_url,
            max_connections=protocol.STORE_CONNECTIONS,
            timeout=protocol.STORE_CONNECTION_WAIT,
            decode_responses=False,
            socket_connect_timeout=5,
            # Results long polls block in XREAD for up to LONG_POLL_MAX: never time them out.
            socket_timeout=protocol.LONG_POLL_MAX + 30,
            health_check_interval=30,
            retry_on_timeout=False,
            **config.store_options(),
        )
        redis = aioredis.Redis.from_pool(packed_pool(pool))
        direct = Direct(pool, protocol.STORE_CONNECTIONS)
        try:
            app[STORE] = Store(
                redis,
                Keys(config.prefix),
                lease_timeout=config.lease_timeout,
                result_ttl=config.result_ttl,
                unsealed_timeout=config.unsealed_timeout,
                direct=direct,
            )
            app[GAUGE] = MemoryGauge(redis, config.limits.store_full_at)
            await check_store(app[STORE], config)
            yield
        finally:
            await direct.aclose()
            await redis.aclose()

    async def dispatcher(app: web.Application) -> AsyncIterator[None]:
        app[DISPATCHER] = LeaseDispatcher(app[STORE])
        app[PRESENCE] = PresenceTracker(app[STORE], config.presence_grace)
        yield
        await app[DISPATCHER].close()

    app.cleanup_ctx.extend(
        [
            store,
            dispatcher,
            _background(lambda app: _listen_for_wakeups(app[STORE], app[DISPATCHER], app[ENDED])),
            _background(
                lambda app: _reap_forever(app[STORE], app[DISPATCHER], config.reap_interval)
            ),
        ]
    )

    async def release_parked(app: web.Application) -> None:
        # Shutdown waits for running handlers: end parked long polls now, not at their timeout.
        app[ENDED].close()
        if DISPATCHER in app:
            await app[DISPATCHER].close()
        if PRESENCE in app:  # presence streams never end on their own
            await app[PRESENCE].close()

    app.on_shutdown.append(release_parked)
    add_routes(app.router)
    return app
