"""The HTTP API of hq-server as async methods: one per route, in the order of ``server/app.py``.

>>> api = API("http://localhost:8786")
>>> (await api.health()).status
'ok'

Requests are built from the message types of :mod:`coffea_hq.messages`, and every
reply is decoded into its type there (the routes and their types are listed in
:mod:`coffea_hq.routes`). Every call goes through
:class:`~coffea_hq.transport.Transport`, so it rides out restarts and network cuts for
``retry_for`` seconds and raises :class:`~coffea_hq.errors.ServerError` on a 4xx.

Both the client and the worker talk to the server only through this module, which
imports nothing beyond the wire protocol and the transport (the worker imports it).
Use an :class:`API` within one event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Sequence

from . import messages as m
from . import protocol
from .protocol import BLOB_CONTENT_TYPE, FRAMES_CONTENT_TYPE
from .transport import Transport

__all__ = ["API", "Frames"]

Frames = tuple[m.ResultsHeader, list[memoryview]]


class API:
    """The routes of one hq-server, at ``url``: one URL, or several of its replicas (a list
    or a comma-separated string, failed over in turn). ``token`` authenticates;
    ``retry_for`` is how long each call retries an unreachable server (a call may lower
    it with its own); ``tls`` verifies an ``https://`` server (default:
    :func:`coffea_hq.tls.client_context`)."""

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        retry_for: float = 300.0,
        token: str | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.transport = Transport(url, retry_for=retry_for, token=token, tls=tls)

    @property
    def url(self) -> str:
        """The server URL requests go to now (of several: the one that last answered)."""
        return self.transport.url

    async def close(self) -> None:
        """Close the HTTP session (open a new one on the next call)."""
        await self.transport.close()

    # ------------------------------------------------------------------ service

    async def health(
        self,
        *,
        retry_for: float | None = None,
        warn: bool = True,
        attempt_timeout: float | None = None,
    ) -> m.Health:
        """``GET HEALTH``: status, store, version, max_request_size. ``attempt_timeout``:
        seconds before a replica that does not answer counts as down (the next is asked)."""
        response = await self.transport.call(
            "GET", protocol.HEALTH, retry_for=retry_for, warn=warn, attempt_timeout=attempt_timeout
        )
        return m.decode(response.body, m.Health)

    async def queue(self) -> m.QueueStats:
        """``GET QUEUE``: queued and running task counts, jobs, workers, counters."""
        return m.decode((await self.transport.call("GET", protocol.QUEUE)).body, m.QueueStats)

    async def workers(self) -> m.Workers:
        """``GET WORKERS``: each live worker's last heartbeat (slots, host, telemetry)."""
        return m.decode((await self.transport.call("GET", protocol.WORKERS)).body, m.Workers)

    async def telemetry(self) -> m.Telemetry:
        """``GET TELEMETRY``: the rolling windows of heartbeat samples, per worker and job."""
        return m.decode((await self.transport.call("GET", protocol.TELEMETRY)).body, m.Telemetry)

    async def shares(self) -> m.Shares:
        """``GET SHARES``: each fair-share group's weight and worker time served."""
        return m.decode((await self.transport.call("GET", protocol.SHARES)).body, m.Shares)

    async def set_shares(self, request: m.SetShares) -> m.Shares:
        """``POST SHARES``: set fair-share weights."""
        response = await self.transport.call("POST", protocol.SHARES, json_body=request)
        return m.decode(response.body, m.Shares)

    async def metrics(self) -> str:
        """``GET METRICS``: the Prometheus text exposition."""
        return bytes((await self.transport.call("GET", protocol.METRICS)).body).decode()

    async def list_jobs(self) -> m.JobList:
        """``GET JOBS``: the newest unfinished jobs' summaries, oldest first."""
        return m.decode((await self.transport.call("GET", protocol.JOBS)).body, m.JobList)

    async def worker_logs(self, worker: str) -> m.LogsReply:
        """``GET WORKER_LOGS``: the worker's log ring buffer (tasks' output, its own lines)."""
        path = protocol.WORKER_LOGS.format(worker=worker)
        return m.decode((await self.transport.call("GET", path)).body, m.LogsReply)

    # ------------------------------------------------------------------ blobs

    async def has_blob(self, sha: str) -> bool:
        """``HEAD BLOB``: whether the server holds the blob named ``sha``."""
        found = await self.transport.call("HEAD", protocol.BLOB.format(sha=sha), accept=(200, 404))
        return found.status == 200

    async def put_blob(self, data: bytes) -> str:
        """``PUT BLOB``: store ``data`` under its content address; returns that name."""
        sha = protocol.blob_name(data)
        await self.transport.call(
            "PUT", protocol.BLOB.format(sha=sha), body=data, content_type=BLOB_CONTENT_TYPE
        )
        return sha

    async def get_blob(self, sha: str) -> bytes:
        """``GET BLOB``: the blob's bytes (the caller checks them against ``sha``)."""
        return (await self.transport.call("GET", protocol.BLOB.format(sha=sha))).body

    async def upload(self, data: bytes) -> str:
        """Store ``data`` unless the server has it already; returns its name."""
        sha = protocol.blob_name(data)
        if not await self.has_blob(sha):
            await self.put_blob(data)
        return sha

    # ------------------------------------------------------------------ jobs (client)

    async def create_job(self, job: str, spec: m.CreateJob) -> m.JobSummary:
        """``PUT JOB``: create ``job`` (idempotent for the same spec); its summary."""
        response = await self.transport.call("PUT", protocol.JOB.format(job=job), json_body=spec)
        return m.decode(response.body, m.JobSummary)

    async def submit_tasks(self, job: str, header: m.SubmitTasks, payloads: Sequence[bytes]) -> int:
        """``POST JOB_TASKS``: add tasks ``header.tasks``, one payload each; how many were
        new (a retried batch adds nothing)."""
        response = await self.transport.call(
            "POST",
            protocol.JOB_TASKS.format(job=job),
            body=protocol.pack(header, payloads),
            content_type=FRAMES_CONTENT_TYPE,
        )
        return m.decode(response.body, m.Submitted).added

    async def seal(self, job: str, seal: m.Seal) -> m.JobSummary:
        """``POST JOB_SEAL``: no more tasks come; the job's summary."""
        path = protocol.JOB_SEAL.format(job=job)
        response = await self.transport.call("POST", path, json_body=seal)
        return m.decode(response.body, m.JobSummary)

    async def cancel(self, job: str, *, retry_for: float | None = None) -> m.JobSummary:
        """``POST JOB_CANCEL``: drop the queued tasks, stop the running ones; the summary."""
        path = protocol.JOB_CANCEL.format(job=job)
        response = await self.transport.call("POST", path, retry_for=retry_for)
        return m.decode(response.body, m.JobSummary)

    async def get_job(self, job: str) -> m.JobSummary:
        """``GET JOB``: the job's summary (state, done, failed, total, merges, ...)."""
        response = await self.transport.call("GET", protocol.JOB.format(job=job))
        return m.decode(response.body, m.JobSummary)

    async def delete_job(self, job: str, *, retry_for: float | None = None) -> None:
        """``DELETE JOB``: cancel if running and drop every key (an unknown job is fine)."""
        await self.transport.call(
            "DELETE", protocol.JOB.format(job=job), accept=(200, 404), retry_for=retry_for
        )

    async def results(self, job: str, after: str, wait: float) -> Frames:
        """``GET JOB_RESULTS``: results past cursor ``after`` (acknowledging those up to
        it), waiting up to ``wait`` seconds for one: the header (cursor, items,
        errors, end and the job's summary) and one part per item."""
        response = await self.transport.call(
            "GET",
            protocol.JOB_RESULTS.format(job=job),
            params={"after": after, "ack": after, "wait": str(wait)},
        )
        return response.frames(m.ResultsHeader)

    async def job_logs(self, job: str) -> m.LogsReply:
        """``GET JOB_LOGS``: the job's log ring buffer (what its tasks printed)."""
        path = protocol.JOB_LOGS.format(job=job)
        return m.decode((await self.transport.call("GET", path)).body, m.LogsReply)

    # ------------------------------------------------------------------ tasks (worker)

    async def kept_result(self, job: str, task: str) -> bytes:
        """``GET JOB_KEPT``: the stored result of ``task`` (submitted with ``keep``)."""
        return (await self.transport.call("GET", protocol.JOB_KEPT.format(job=job, task=task))).body

    async def lease(self, request: m.LeaseRequest) -> tuple[m.LeaseReply, list[memoryview]]:
        """``POST LEASE``: up to ``request.max`` tasks, long-polling ``request.wait``
        seconds; the leased tasks and their payloads, in the same order."""
        response = await self.transport.call("POST", protocol.LEASE, json_body=request)
        return response.frames(m.LeaseReply)

    async def complete(self, report: m.Complete, results: Sequence[bytes]) -> m.CompleteReply:
        """``POST COMPLETE``: report finished tasks, one result part per item. A reply
        with ``error`` set (HTTP 409) names the items refused; the others stand."""
        response = await self.transport.call(
            "POST",
            protocol.COMPLETE,
            body=protocol.pack(report, results),
            content_type=FRAMES_CONTENT_TYPE,
            accept=(200, 409),
        )
        return m.decode(response.body, m.CompleteReply)

    async def presence(self, hello: m.Presence, goodbye: asyncio.Event) -> None:
        """``POST PRESENCE``: hold the worker's presence open until ``goodbye`` is set
        (then end it cleanly) or the connection drops (returns or raises: reconnect)."""

        async def lines() -> AsyncIterator[bytes]:
            yield m.encode(hello) + b"\n"
            while not goodbye.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(goodbye.wait(), protocol.PRESENCE_PING)
                yield b"\n"
            yield m.encode(m.Presence(hello.worker, hello.session, bye=True)) + b"\n"

        await self.transport.hold(
            protocol.PRESENCE,
            lines(),
            content_type=protocol.PRESENCE_CONTENT_TYPE,
            idle=3 * protocol.PRESENCE_PING,
        )

    async def release(self, request: m.Release, *, retry_for: float | None = None) -> int:
        """``POST RELEASE``: hand leases back unstarted; how many the server took back."""
        response = await self.transport.call(
            "POST", protocol.RELEASE, json_body=request, retry_for=retry_for
        )
        return m.decode(response.body, m.Released).released

    async def heartbeat(
        self, beat: m.Heartbeat, *, retry_for: float | None = None
    ) -> m.HeartbeatReply:
        """``POST HEARTBEAT``: extend ``beat.leases`` and send telemetry; the reply names
        the leases lost and when to beat next."""
        response = await self.transport.call(
            "POST", protocol.HEARTBEAT, json_body=beat, retry_for=retry_for
        )
        return m.decode(response.body, m.HeartbeatReply)
