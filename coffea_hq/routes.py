"""Every route of the HTTP API, once: the table the server registers its handlers from
and the OpenAPI document (:mod:`coffea_hq.openapi`, docs/api.md) is generated from.

A :class:`Route` names its method, path (a constant of :mod:`coffea_hq.protocol`), the
operation id (the name of its handler in ``server/app.py``), what its request body is
and what it answers with each status. Adding a route is adding one entry to
:data:`ROUTES` and a handler of that name (the server refuses to start if the two
disagree), then pasting ``python -m coffea_hq.openapi --markdown`` into docs/api.md (a
test checks it is there). Fields added later (an auth role, say) get a default, so
entries need not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Final

import msgspec

from . import messages as m
from . import protocol
from .protocol import Role

__all__ = [
    "Bytes",
    "Frames",
    "Json",
    "Lines",
    "Query",
    "Reply",
    "Route",
    "Text",
    "ROUTES",
    "PATH_PARAMETERS",
]


@dataclass(frozen=True, slots=True)
class Json:
    """An ``application/json`` body: one message of :mod:`coffea_hq.messages`."""

    type: Any


@dataclass(frozen=True, slots=True)
class Frames:
    """An ``application/x-hq-frames`` body (see :func:`coffea_hq.protocol.pack`): a JSON
    header of type ``header`` and raw byte parts, each holding what ``parts`` says."""

    header: Any
    parts: str


@dataclass(frozen=True, slots=True)
class Bytes:
    """An ``application/octet-stream`` body: raw bytes, ``what`` they are."""

    what: str


@dataclass(frozen=True, slots=True)
class Lines:
    """An ``application/x-ndjson`` stream held open: one JSON message of type ``type`` per
    line (None: empty lines only), empty lines keeping the connection alive."""

    type: Any
    what: str


@dataclass(frozen=True, slots=True)
class Text:
    """A text body of media type ``media_type``: ``what`` it holds."""

    media_type: str
    what: str


Body = Json | Frames | Bytes | Lines | Text


@dataclass(frozen=True, slots=True)
class Reply:
    """One status a route answers with, its body (None: empty) and when it comes."""

    status: int
    body: Body | None
    description: str


@dataclass(frozen=True, slots=True)
class Query:
    """A query parameter: its name, type (with its limits as :class:`msgspec.Meta`)."""

    name: str
    type: Any
    description: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    """One operation of the API."""

    method: str
    path: str
    operation: str  # operation id, and the name of the server's handler
    # The roles besides admin that may call it (hq-server --auth); None: anyone, no token.
    # No default: a new route says who may call it.
    roles: frozenset[Role] | None
    summary: str
    body: Body | None = None
    replies: tuple[Reply, ...]
    query: tuple[Query, ...] = ()
    tag: str = "service"

    @property
    def path_parameters(self) -> tuple[str, ...]:
        """The names of the path's ``{parameters}``, in order."""
        return tuple(p[1:-1] for p in self.path.split("/") if p.startswith("{"))


# Who may call a route (admin tokens may call every one).
ANYONE: Final = None
USERS: Final = frozenset({Role.USER})
WORKERS: Final = frozenset({Role.WORKER})
USERS_AND_WORKERS: Final = USERS | WORKERS
ADMINS: Final[frozenset[Role]] = frozenset()

# Path parameters, by name: every route that has one means the same thing by it.
PATH_PARAMETERS: Final[dict[str, Any]] = {
    "job": m.Id,
    "sha": m.BlobName,
    "worker": m.Id,
    "task": m.Id,
}

Cursor = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[0-9]{1,20}(-[0-9]{1,20})?\Z",
        description="a result cursor: '0' (the start) or a 'cursor' of an earlier reply",
    ),
]
Wait = Annotated[float, msgspec.Meta(ge=0.0, le=protocol.LONG_POLL_MAX)]


def _error(status: int, when: str) -> Reply:
    return Reply(status, Json(m.ErrorReply), when)


NO_JOB: Final = _error(
    404, "no such job (never created, deleted, or expired), or another user's job"
)
JOB_CONFLICT: Final = _error(409, "the job is finished, sealed, or exists with another spec")
NO_BLOB: Final = _error(404, "no blob of that name")
ACCEPTED_PARTS: Final = (
    "one per task: the task's arguments, pickled and compressed (see 'Payloads' in docs/api.md)"
)

ROUTES: Final[tuple[Route, ...]] = (
    Route(
        method="GET",
        path=protocol.HEALTH,
        operation="health",
        roles=ANYONE,
        summary="Whether the server and its store answer (always 200 while the server runs).",
        replies=(Reply(200, Json(m.Health), "the server's health"),),
    ),
    Route(
        method="GET",
        path=protocol.DASHBOARD,
        operation="dashboard",
        roles=ANYONE,  # (the routes it reads need an admin token under --auth: it asks)
        summary="The dashboard: a page showing the queue, workers and jobs, live.",
        replies=(Reply(200, Text("text/html", "the page"), "the page"),),
    ),
    Route(
        method="GET",
        path=protocol.OPENAPI,
        operation="openapi",
        roles=ANYONE,
        summary="This API's OpenAPI 3.1 document.",
        replies=(Reply(200, Json(dict[str, Any]), "the document"),),
    ),
    Route(
        method="GET",
        path=protocol.QUEUE,
        operation="queue",
        roles=ADMINS,
        summary="Queued and running tasks over all jobs, live workers and task counters.",
        replies=(Reply(200, Json(m.QueueStats), "the queue's state"),),
    ),
    Route(
        method="GET",
        path=protocol.WORKERS,
        operation="workers",
        roles=ADMINS,
        summary="Each live worker's last heartbeat.",
        replies=(Reply(200, Json(m.Workers), "workers by id"),),
    ),
    Route(
        method="GET",
        path=protocol.TELEMETRY,
        operation="telemetry",
        roles=ADMINS,
        summary=(
            "The heartbeats' rolling windows: each live worker's last samples (throughput, "
            "CPU, busy slots, memory) and each unfinished job's share of them."
        ),
        replies=(Reply(200, Json(m.Telemetry), "windows by worker and by job"),),
    ),
    Route(
        method="GET",
        path=protocol.EVENTS,
        operation="events",
        roles=ADMINS,
        summary=(
            "Server-Sent Events for the dashboard, held open: each event's data is a "
            "DashboardState (queue, workers, jobs with their failures, heartbeat windows), "
            "one a second."
        ),
        query=(
            Query(
                "count",
                Annotated[int, msgspec.Meta(ge=1, le=protocol.EVENTS_MAX)],
                "events to send before the stream ends (default 1)",
            ),
        ),
        replies=(
            Reply(
                200,
                Text(protocol.EVENTS_CONTENT_TYPE, "'data: <DashboardState JSON>' events"),
                "the stream",
            ),
        ),
    ),
    Route(
        method="GET",
        path=protocol.SHARES,
        operation="shares",
        roles=ADMINS,
        summary="Fair share between users: each group's weight and worker time served.",
        replies=(Reply(200, Json(m.Shares), "the groups"),),
    ),
    Route(
        method="POST",
        path=protocol.SHARES,
        operation="set_shares",
        roles=ADMINS,
        summary="Set fair-share weights (workers are shared between users in proportion).",
        body=Json(m.SetShares),
        replies=(Reply(200, Json(m.Shares), "the groups, after the change"),),
    ),
    Route(
        method="GET",
        path=protocol.METRICS,
        operation="metrics",
        roles=ADMINS,
        summary=(
            "Prometheus metrics: task counters, queue, workers, the task duration histogram "
            "(the same from every replica) and this replica's lease waits."
        ),
        replies=(
            Reply(
                200,
                Text(protocol.METRICS_CONTENT_TYPE, "the Prometheus text exposition format"),
                "the metrics",
            ),
        ),
    ),
    Route(
        method="GET",
        path=protocol.JOBS,
        operation="list_jobs",
        roles=ADMINS,
        summary="The newest unfinished jobs' summaries (what coffea-hq status shows).",
        tag="jobs",
        replies=(Reply(200, Json(m.JobList), "the jobs, oldest first"),),
    ),
    Route(
        method="GET",
        path=protocol.WORKER_LOGS,
        operation="worker_logs",
        roles=ADMINS,
        summary="A worker's own log lines and its tasks' output, a bounded ring buffer.",
        replies=(Reply(200, Json(m.LogsReply), "the buffer's lines, oldest first"),),
    ),
    Route(
        method="PUT",
        path=protocol.BLOB,
        operation="put_blob",
        roles=USERS,
        summary="Store a blob (a pickled function) under its content address.",
        tag="blobs",
        body=Bytes("the blob; its hex sha256 must be the path's {sha}"),
        replies=(Reply(201, Json(m.BlobStored), "stored (again: blobs are immutable)"),),
    ),
    Route(
        method="HEAD",
        path=protocol.BLOB,
        operation="head_blob",
        roles=USERS_AND_WORKERS,
        summary="Whether the server holds a blob.",
        tag="blobs",
        replies=(Reply(200, None, "held"), Reply(404, None, "not held")),
    ),
    Route(
        method="GET",
        path=protocol.BLOB,
        operation="get_blob",
        roles=WORKERS,
        summary="A blob's bytes.",
        tag="blobs",
        replies=(Reply(200, Bytes("the blob"), "the blob"), NO_BLOB),
    ),
    Route(
        method="PUT",
        path=protocol.JOB,
        operation="create_job",
        roles=USERS,
        summary="Create a job (idempotent: the same spec again answers the same job).",
        tag="jobs",
        body=Json(m.CreateJob),
        replies=(
            Reply(200, Json(m.JobSummary), "the job, created or already there"),
            _error(404, "the function or reducer blob is not on the server"),
            _error(409, "the job exists with another spec"),
        ),
    ),
    Route(
        method="GET",
        path=protocol.JOB,
        operation="get_job",
        roles=USERS,
        summary="A job's summary.",
        tag="jobs",
        replies=(Reply(200, Json(m.JobSummary), "the job"), NO_JOB),
    ),
    Route(
        method="DELETE",
        path=protocol.JOB,
        operation="delete_job",
        roles=USERS,
        summary="Cancel a job if it runs and drop everything of it.",
        tag="jobs",
        replies=(Reply(200, Json(m.Deleted), "deleted"), NO_JOB),
    ),
    Route(
        method="POST",
        path=protocol.JOB_TASKS,
        operation="submit_tasks",
        roles=USERS,
        summary="Add a batch of tasks to an unsealed job (a retried batch adds nothing).",
        tag="jobs",
        body=Frames(m.SubmitTasks, ACCEPTED_PARTS),
        replies=(Reply(200, Json(m.Submitted), "the batch is in the queue"), NO_JOB, JOB_CONFLICT),
    ),
    Route(
        method="POST",
        path=protocol.JOB_SEAL,
        operation="seal_job",
        roles=USERS,
        summary="Say how many tasks the job has: it ends when they have all finished.",
        tag="jobs",
        body=Json(m.Seal),
        replies=(Reply(200, Json(m.JobSummary), "sealed"), NO_JOB, JOB_CONFLICT),
    ),
    Route(
        method="POST",
        path=protocol.JOB_CANCEL,
        operation="cancel_job",
        roles=USERS,
        summary="Cancel a job: queued tasks are dropped, workers stop running ones.",
        tag="jobs",
        replies=(Reply(200, Json(m.JobSummary), "cancelled (or already finished)"), NO_JOB),
    ),
    Route(
        method="GET",
        path=protocol.JOB_RESULTS,
        operation="job_results",
        roles=USERS,
        summary="Results past a cursor, long-polling up to 'wait' seconds for the first.",
        tag="jobs",
        query=(
            Query("after", Cursor, "answer the results after this cursor (default '0')"),
            Query("ack", Cursor, "the client holds every result up to here: free them"),
            Query("wait", Wait, "seconds to wait for a result when none is there (default 0)"),
        ),
        replies=(
            Reply(
                200,
                Frames(
                    m.ResultsHeader,
                    "one per item: the pickled value ('ok'), the pickled exception or "
                    "nothing ('error'), nothing ('merged')",
                ),
                "the next results (none if 'wait' ran out)",
            ),
            NO_JOB,
        ),
    ),
    Route(
        method="GET",
        path=protocol.JOB_LOGS,
        operation="job_logs",
        roles=USERS,
        summary="What the job's tasks printed (stdout, stderr), a bounded ring buffer.",
        tag="jobs",
        replies=(Reply(200, Json(m.LogsReply), "the buffer's lines, oldest first"), NO_JOB),
    ),
    Route(
        method="GET",
        path=protocol.JOB_KEPT,
        operation="kept_result",
        roles=WORKERS,
        summary="A kept result (of a task submitted with 'keep'), for a task that takes it.",
        tag="workers",
        replies=(
            Reply(200, Bytes("the task's result, as its worker reported it"), "the result"),
            _error(404, "the job holds no such kept result (gone with its job, or not done)"),
            _error(403, "a worker token of a pool that does not serve the job's user"),
        ),
    ),
    Route(
        method="POST",
        path=protocol.LEASE,
        operation="lease",
        roles=WORKERS,
        summary="Lease up to 'max' tasks, long-polling up to 'wait' seconds for one.",
        tag="workers",
        body=Json(m.LeaseRequest),
        replies=(
            Reply(
                200,
                Frames(m.LeaseReply, "one per task: its payload, as submitted"),
                "the leased tasks (none if 'wait' ran out)",
            ),
        ),
    ),
    Route(
        method="POST",
        path=protocol.COMPLETE,
        operation="complete",
        roles=WORKERS,
        summary="Report finished tasks; items are judged one by one.",
        tag="workers",
        body=Frames(
            m.Complete,
            "one per item: the pickled value ('ok'), the pickled exception or nothing "
            "('error'), nothing ('crashed')",
        ),
        replies=(
            Reply(200, Json(m.CompleteReply), "every item was taken"),
            Reply(409, Json(m.CompleteReply), "some items were refused; the others stand"),
        ),
    ),
    Route(
        method="POST",
        path=protocol.RELEASE,
        operation="release",
        roles=WORKERS,
        summary="Hand leases back unstarted (they go back to the queue at once).",
        tag="workers",
        body=Json(m.Release),
        replies=(Reply(200, Json(m.Released), "released"),),
    ),
    Route(
        method="POST",
        path=protocol.HEARTBEAT,
        operation="heartbeat",
        roles=WORKERS,
        summary="Extend a worker's leases and record its telemetry.",
        tag="workers",
        body=Json(m.Heartbeat),
        replies=(Reply(200, Json(m.HeartbeatReply), "the leases lost, and when to beat next"),),
    ),
    Route(
        method="POST",
        path=protocol.PRESENCE,
        operation="presence",
        roles=WORKERS,
        summary=(
            "Held open for a worker's life: a connection that drops without a goodbye "
            "requeues the worker's tasks after a short grace."
        ),
        tag="workers",
        body=Lines(
            m.Presence,
            "a hello naming the worker and a fresh session, empty keep-alive lines, and "
            "optionally a goodbye (bye: true) once the worker handed back what it held",
        ),
        replies=(Reply(200, Lines(None, "keep-alive empty lines until either side ends"), "held"),),
    ),
)

# Answers any route may give besides its own replies, and when (the OpenAPI document
# lists them on each route they apply to).
BAD_REQUEST: Final = _error(400, "a path or query parameter, or the body, is malformed")
TOO_LARGE: Final = _error(413, "the body exceeds the server's --max-request-size")
STORE_DOWN: Final = _error(503, "the store is unreachable or refuses writes: retry")
NO_STORE: Final = frozenset(
    {protocol.HEALTH, protocol.OPENAPI, protocol.DASHBOARD}
)  # these answer without one
# With hq-server --auth (docs/security.md):
NO_TOKEN: Final = _error(401, "no access token, or one the server does not know (revoked?)")
WRONG_ROLE: Final = _error(403, "the token's role may not call this route")
OVER_QUOTA: Final = _error(429, "a quota or limit is reached: retry after Retry-After seconds")
STORE_FULL: Final = _error(507, "the store is near its maxmemory: retry after Retry-After")
# Which routes a quota or a full store can refuse (server/limits.py).
QUOTA_CHECKED: Final = frozenset({"put_blob", "submit_tasks", "job_results", "lease"})
STORE_FULL_CHECKED: Final = frozenset({"put_blob", "create_job", "submit_tasks"})


def replies(route: Route, auth: bool = True) -> tuple[Reply, ...]:
    """Everything ``route`` may answer: its own replies and the shared errors (those of
    tokens only with ``auth``: hq-server --auth)."""
    extra = []
    if route.body is not None or route.query or route.path_parameters:
        extra.append(BAD_REQUEST)
    if route.body is not None:
        extra.append(TOO_LARGE)
    if route.path not in NO_STORE:
        extra.append(STORE_DOWN)
    if auth and route.roles is not None:
        extra.append(NO_TOKEN)
        if not route.roles >= USERS_AND_WORKERS:
            extra.append(WRONG_ROLE)
    if route.operation in QUOTA_CHECKED:
        extra.append(OVER_QUOTA)
    if route.operation in STORE_FULL_CHECKED:
        extra.append(STORE_FULL)
    own = {r.status for r in route.replies}
    return route.replies + tuple(r for r in extra if r.status not in own)
