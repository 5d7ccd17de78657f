"""The aiohttp application: thin handlers over :mod:`.store`."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from coffea_hq import protocol
from coffea_hq.protocol import FRAMES_CONTENT_TYPE, CompleteStatus, FrameError, Outcome

from . import validate as v
from .config import ServerConfig
from .dispatch import LeaseDispatcher
from .keys import Keys
from .store import Report, Store, StoreError, UnsupportedStore

log = logging.getLogger("coffea_hq.server")

CONFIG = web.AppKey("config", ServerConfig)
STORE = web.AppKey("store", Store)
DISPATCHER = web.AppKey("dispatcher", LeaseDispatcher)

# Policies under which Redis never deletes a key on its own.
SAFE_EVICTION_POLICIES = {"noeviction"}
PRUNE_EVERY = 10.0  # seconds between sweeps of workers gone silent

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

try:
    VERSION = importlib.metadata.version("coffea-hq")
except importlib.metadata.PackageNotFoundError:  # run from a source tree
    VERSION = "unknown"


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn domain errors, bad frames and store outages into JSON errors, once."""
    try:
        return await handler(request)
    except StoreError as e:
        return _error(e.status, e.code, e.message)
    except FrameError as e:
        return _error(400, "bad_frames", str(e))
    except (RedisConnectionError, RedisTimeoutError, OSError) as e:
        log.warning("store unavailable: %s", e)
        return _error(503, "store_unavailable", f"the queue's Redis is unreachable: {e}")
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


async def _json(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise v.BadRequest(f"request body must be JSON: {e}") from e
    except RecursionError as e:
        raise v.BadRequest("request body is nested too deeply") from e
    return v.obj(body, "request body")


async def _frames(request: web.Request) -> tuple[dict[str, Any], list[memoryview]]:
    if request.content_type != FRAMES_CONTENT_TYPE:
        raise v.BadRequest(f"request body must be {FRAMES_CONTENT_TYPE}")
    return protocol.unpack(await request.read())


def _frames_response(header: dict[str, Any], parts: list[bytes]) -> web.Response:
    return web.Response(body=protocol.pack(header, parts), content_type=FRAMES_CONTENT_TYPE)


def _job_id(request: web.Request) -> str:
    return v.ident(request.match_info["job"], "job id")


# ---------------------------------------------------------------------- service


async def health(request: web.Request) -> web.Response:
    try:
        await request.app[STORE].redis.ping()
        store = "ok"
    except Exception as e:  # health must answer whatever the store does
        store = f"unreachable: {e}"
    return web.json_response(
        {
            "status": "ok",
            "store": store,
            "version": VERSION,
            "max_request_size": request.app[CONFIG].max_request_size,
        }
    )


async def queue(request: web.Request) -> web.Response:
    return web.json_response(await request.app[STORE].queue_stats())


async def workers(request: web.Request) -> web.Response:
    return web.json_response(await request.app[STORE].workers())


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
    await request.app[STORE].put_blob(sha, data)
    return web.json_response({"blob": sha, "size": len(data)}, status=201)


async def head_blob(request: web.Request) -> web.Response:
    found = await request.app[STORE].has_blob(_blob_sha(request))
    return web.Response(status=200 if found else 404)


async def get_blob(request: web.Request) -> web.Response:
    data = await request.app[STORE].get_blob(_blob_sha(request))
    return web.Response(body=data, content_type=protocol.BLOB_CONTENT_TYPE)


# ---------------------------------------------------------------------- jobs (client)


async def create_job(request: web.Request) -> web.Response:
    job = _job_id(request)
    body = await _json(request)
    function = body.get("function")
    if not isinstance(function, str) or not protocol.valid_blob_name(function):
        raise v.BadRequest("'function' must name an uploaded blob (its sha256)")
    reducer = body.get("reducer") or ""
    if reducer and not (isinstance(reducer, str) and protocol.valid_blob_name(reducer)):
        raise v.BadRequest("'reducer' must name an uploaded blob (its sha256) or be null")
    fanin = v.integer(body.get("fanin", protocol.DEFAULT_FANIN), "'fanin'", 2, protocol.MAX_FANIN)
    summary = await request.app[STORE].create_job(
        job,
        function=function,
        max_attempts=v.integer(
            body.get("max_attempts", protocol.DEFAULT_MAX_ATTEMPTS), "'max_attempts'", 1, 100
        ),
        fail_fast=v.boolean(body.get("fail_fast", True), "'fail_fast'"),
        label=v.string(body.get("label", ""), "'label'"),
        user="",
        reducer=reducer,
        fanin=fanin,
    )
    return web.json_response(summary)


async def get_job(request: web.Request) -> web.Response:
    return web.json_response(await request.app[STORE].summary(_job_id(request)))


async def delete_job(request: web.Request) -> web.Response:
    await request.app[STORE].delete_job(_job_id(request))
    return web.json_response({"deleted": True})


async def submit_tasks(request: web.Request) -> web.Response:
    job = _job_id(request)
    header, parts = await _frames(request)
    tasks = v.array(header.get("tasks"), "'tasks'", 1_000_000)
    if len(tasks) != len(parts):
        raise v.BadRequest("'tasks' needs exactly one payload part per task")
    ids = [v.ident(t, "task id") for t in tasks]
    if any(t.startswith(protocol.MERGE_PREFIX) for t in ids):
        raise v.BadRequest(f"task ids starting with {protocol.MERGE_PREFIX!r} are reserved")
    if len(set(ids)) != len(ids):
        raise v.BadRequest("task ids within one batch must be distinct")
    added = await request.app[STORE].submit(job, ids, [bytes(p) for p in parts])
    return web.json_response({"added": added})


async def seal_job(request: web.Request) -> web.Response:
    job = _job_id(request)
    body = await _json(request)
    total = v.integer(body.get("total"), "'total'", 0, 10**9)
    return web.json_response(await request.app[STORE].seal(job, total))


async def cancel_job(request: web.Request) -> web.Response:
    return web.json_response(await request.app[STORE].cancel(_job_id(request)))


async def job_results(request: web.Request) -> web.Response:
    job = _job_id(request)
    q = request.query
    after = v.cursor(q.get("after", "0"), "'after'") or "0"
    ack = v.cursor(q.get("ack"), "'ack'")
    wait = v.query_number(q, "wait", 0.0, 0.0, protocol.LONG_POLL_MAX)
    config = request.app[CONFIG]
    batch = await request.app[STORE].results(
        job, after=after, ack=ack, wait=wait, max_bytes=config.max_request_size // 2
    )
    header = {
        "cursor": batch.cursor,
        "items": batch.items,
        "errors": batch.errors,
        "end": batch.end,
        **batch.summary,
    }
    return _frames_response(header, batch.parts)


# ---------------------------------------------------------------------- tasks (worker)


def _connected(request: web.Request) -> bool:
    return request.transport is not None and not request.transport.is_closing()


async def lease(request: web.Request) -> web.StreamResponse:
    body = await _json(request)
    worker = v.ident(body.get("worker"), "'worker'")
    maximum = v.integer(body.get("max", 1), "'max'", 1, protocol.LEASE_MAX_TASKS)
    wait = v.number(body.get("wait", 0), "'wait'", 0, protocol.LONG_POLL_MAX)
    tasks = await request.app[DISPATCHER].lease(
        worker, maximum, wait, connected=lambda: _connected(request)
    )
    header = {"tasks": [[t.job, t.task, t.attempt, t.function] for t in tasks]}
    if not tasks:
        return _frames_response(header, [])
    # Written here rather than by aiohttp, so that a reply that cannot reach the worker
    # hands its tasks back instead of costing them an attempt at lease expiry.
    data = protocol.pack(header, [t.payload for t in tasks])
    response = web.StreamResponse(headers={"Content-Type": FRAMES_CONTENT_TYPE})
    response.content_length = len(data)
    try:
        if not _connected(request):
            raise ConnectionResetError("the worker closed its connection")
        await response.prepare(request)
        await response.write(data)
        await response.write_eof()
    except (ConnectionError, RuntimeError) as e:
        back = await request.app[STORE].release(worker, [(t.job, t.task, t.attempt) for t in tasks])
        log.info("lease reply to worker %s lost (%s): %d task(s) handed back", worker, e, back)
    return response


def _report(item: Any, part: memoryview, index: int) -> Report:
    what = f"'items'[{index}]"
    if not isinstance(item, list) or len(item) != 5:
        raise v.BadRequest(f"{what} must be [job, task, attempt, outcome, error]")
    job, task, attempt = v.lease_ref(item[:3], what)
    try:
        outcome = Outcome(item[3])
    except ValueError as e:
        raise v.BadRequest(f"{what} outcome must be one of {[o.value for o in Outcome]}") from e
    error = item[4]
    if outcome is Outcome.OK:
        if error is not None:
            raise v.BadRequest(f"{what}: a successful task carries no error")
    else:
        error = v.obj(error, f"{what} error")
        for name in ("type", "message", "traceback"):
            v.string(error.get(name), f"{what} error {name!r}", protocol.ERROR_TEXT_MAX)
    return Report(job, task, attempt, outcome, error, bytes(part))


def _rejected(item: Any, index: int, status: CompleteStatus, reason: str | None) -> Any:
    ref = item if isinstance(item, list) else []
    entry = {
        "index": index,
        "job": str(ref[0]) if len(ref) > 0 else "?",
        "task": str(ref[1]) if len(ref) > 1 else "?",
        "status": status.value,
    }
    return entry | ({"reason": reason} if reason else {})


async def complete(request: web.Request) -> web.Response:
    """Judge a report item by item: a malformed item is refused, the others stand."""
    header, parts = await _frames(request)
    worker = v.ident(header.get("worker"), "'worker'")
    items = v.array(header.get("items"), "'items'", 1_000_000)
    if len(items) != len(parts):
        raise v.BadRequest("'items' needs exactly one result part per item")
    reports: list[Report] = []
    where: list[int] = []
    statuses = [CompleteStatus.INVALID] * len(items)
    reasons: dict[int, str] = {}
    for i, (item, part) in enumerate(zip(items, parts, strict=True)):
        try:
            reports.append(_report(item, part, i))
            where.append(i)
        except v.BadRequest as e:
            reasons[i] = e.message
    for i, status in zip(where, await request.app[STORE].complete(worker, reports), strict=True):
        statuses[i] = status
    body: dict[str, Any] = {"items": [s.value for s in statuses]}
    refused = [i for i, s in enumerate(statuses) if s.refused]
    if not refused:
        return web.json_response(body)
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
    body |= {
        "error": "invalid_items" if reasons else "not_leased",
        "message": "; ".join(said) + ": their results were dropped, the other items stand",
        "rejected": [_rejected(items[i], i, statuses[i], reasons.get(i)) for i in refused[:20]],
    }
    return web.json_response(body, status=409)


async def release(request: web.Request) -> web.Response:
    body = await _json(request)
    worker = v.ident(body.get("worker"), "'worker'")
    items = v.array(body.get("items"), "'items'", 1_000_000)
    refs = [v.lease_ref(item, f"'items'[{i}]") for i, item in enumerate(items)]
    released = await request.app[STORE].release(worker, refs)
    request.app[DISPATCHER].notify()
    return web.json_response({"released": released})


async def heartbeat(request: web.Request) -> web.Response:
    body = await _json(request)
    worker = v.ident(body.get("worker"), "'worker'")
    leases = v.array(body.get("leases", []), "'leases'", 1_000_000)
    refs = [v.lease_ref(item, f"'leases'[{i}]") for i, item in enumerate(leases)]
    info = {
        "slots": v.integer(body.get("slots", 0), "'slots'", 0, 100_000),
        "host": v.string(body.get("host", ""), "'host'"),
        "stats": v.obj(body.get("stats", {}), "'stats'"),
        "leases": len(refs),
    }
    store = request.app[STORE]
    if v.boolean(body.get("draining", False), "'draining'"):
        request.app[DISPATCHER].wake_worker(worker)  # end its parked long poll now
    lost = await store.heartbeat(worker, info, refs)
    if v.boolean(body.get("exiting", False), "'exiting'"):
        await store.forget_worker(worker)
    interval = request.app[CONFIG].lease_timeout / 3
    return web.json_response(
        {
            "lost": [list(x) for x in lost],  # [job, task, attempt]
            "interval": interval,
            "max_request_size": request.app[CONFIG].max_request_size,
        }
    )


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


async def _listen_for_wakeups(store: Store, dispatcher: LeaseDispatcher) -> None:
    """Follow the wake-up channel; reconnect with backoff when the store goes away."""
    delay = 0.1
    while True:
        try:
            async with store.redis.pubsub() as pubsub:
                await pubsub.subscribe(store.keys.wake)
                dispatcher.notify()  # anything published while we were away
                delay = 0.1
                async for message in pubsub.listen():
                    if message["type"] == "message":
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


def make_app(config: ServerConfig) -> web.Application:
    app = web.Application(client_max_size=config.max_request_size, middlewares=[errors_middleware])
    app[CONFIG] = config

    async def store(app: web.Application) -> AsyncIterator[None]:
        redis = aioredis.Redis.from_url(
            config.redis_url,
            decode_responses=False,
            socket_connect_timeout=5,
            # Results long polls block in XREAD for up to LONG_POLL_MAX: never time them out.
            socket_timeout=protocol.LONG_POLL_MAX + 30,
            health_check_interval=30,
            retry_on_timeout=False,
        )
        try:
            app[STORE] = Store(
                redis,
                Keys(config.prefix),
                lease_timeout=config.lease_timeout,
                result_ttl=config.result_ttl,
                unsealed_timeout=config.unsealed_timeout,
            )
            await check_store(app[STORE], config)
            yield
        finally:
            await redis.aclose()

    async def dispatcher(app: web.Application) -> AsyncIterator[None]:
        app[DISPATCHER] = LeaseDispatcher(app[STORE])
        yield
        await app[DISPATCHER].close()

    app.cleanup_ctx.extend(
        [
            store,
            dispatcher,
            _background(lambda app: _listen_for_wakeups(app[STORE], app[DISPATCHER])),
            _background(
                lambda app: _reap_forever(app[STORE], app[DISPATCHER], config.reap_interval)
            ),
        ]
    )

    async def release_parked(app: web.Application) -> None:
        # Shutdown waits for running handlers: end parked long polls now, not at their timeout.
        if DISPATCHER in app:
            await app[DISPATCHER].close()

    app.on_shutdown.append(release_parked)
    r = app.router
    r.add_get(protocol.HEALTH, health)
    r.add_get(protocol.QUEUE, queue)
    r.add_get(protocol.WORKERS, workers)
    r.add_put(protocol.BLOB, put_blob)
    r.add_head(protocol.BLOB, head_blob)
    r.add_get(protocol.BLOB, get_blob, allow_head=False)
    r.add_put(protocol.JOB, create_job)
    r.add_get(protocol.JOB, get_job)
    r.add_delete(protocol.JOB, delete_job)
    r.add_post(protocol.JOB_TASKS, submit_tasks)
    r.add_post(protocol.JOB_SEAL, seal_job)
    r.add_post(protocol.JOB_CANCEL, cancel_job)
    r.add_get(protocol.JOB_RESULTS, job_results)
    r.add_post(protocol.LEASE, lease)
    r.add_post(protocol.COMPLETE, complete)
    r.add_post(protocol.RELEASE, release)
    r.add_post(protocol.HEARTBEAT, heartbeat)
    return app
