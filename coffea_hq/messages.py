"""Every message body of the HTTP API: one :class:`msgspec.Struct` each.

The server decodes request bodies into these types (``msgspec`` checks types, bounds,
patterns and nesting in one pass, and its error names the field: "Expected `int`,
got `str` - at `$.max`"); workers and clients build their requests from them. Part
of the wire protocol, with :mod:`coffea_hq.protocol` (routes, framing, limits),
whose constants bound the fields here. Imports nothing else of ours.

Binary payloads never appear here: they travel as frame parts beside a header
(see :func:`coffea_hq.protocol.pack`); a header's ``sizes`` belongs to the framing.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

import msgspec

from . import protocol
from .protocol import Outcome

T = TypeVar("T")

Id = Annotated[
    str,
    msgspec.Meta(
        # \Z, not $: Python's $ also matches before a final newline.
        pattern=rf"^[A-Za-z0-9_.\-]{{1,{protocol.ID_MAX_LENGTH}}}\Z",
        description="a job, task or worker id: 1-64 letters, digits, '-', '_' or '.'",
    ),
]
BlobName = Annotated[
    str, msgspec.Meta(pattern=r"^[0-9a-f]{64}\Z", description="hex sha256 of the blob's bytes")
]
Attempt = Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]
ErrorText = Annotated[str, msgspec.Meta(max_length=protocol.ERROR_TEXT_MAX)]
MAX_ITEMS = 1_000_000  # entries in one request's list


class Message(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=False):
    """Base of request bodies: an unknown field is a client bug, refused by name."""


class LeaseRef(msgspec.Struct, array_like=True, frozen=True):
    """A lease: ``[job, task, attempt]``."""

    job: Id
    task: Id
    attempt: Attempt


# ---------------------------------------------------------------------- client -> server


# A fair-share group: a user name, or '' (the default group).
ShareName = Annotated[
    str, msgspec.Meta(pattern=rf"^[A-Za-z0-9_.\-]{{0,{protocol.ID_MAX_LENGTH}}}\Z")
]


class CreateJob(Message):
    """``PUT JOB``. With ``reducer``, results are merged on workers by merge tasks that
    call ``reducer(list_of_values)``, ``fanin`` at a time."""

    function: BlobName
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=100)] = protocol.DEFAULT_MAX_ATTEMPTS
    fail_fast: bool = True
    label: Annotated[str, msgspec.Meta(max_length=256)] = ""
    reducer: BlobName | None = None
    fanin: Annotated[int, msgspec.Meta(ge=2, le=protocol.MAX_FANIN)] = protocol.DEFAULT_FANIN
    # Keep each task's wall/CPU/peak memory for the client (``Job.resources``, coffea's
    # savemetrics). Off, the server adds them up per job only: a note per task is kept
    # only when the task raised warnings or logged.
    resources: bool = False
    # Workers are shared fairly between groups: the job's user under ``hq-server --auth``
    # (this field is then ignored), else this label (the client sends HQ_USER or the
    # login name). Within a group, higher ``priority`` first, then the older job.
    share: ShareName = ""
    priority: Annotated[int, msgspec.Meta(ge=-protocol.PRIORITY_MAX, le=protocol.PRIORITY_MAX)] = 0


class SubmitTasks(Message):
    """``POST JOB_TASKS`` frame header; one payload part per task."""

    tasks: Annotated[list[Id], msgspec.Meta(max_length=MAX_ITEMS)]
    sizes: list[int] = []  # the framing's: pack() fills it in
    # Each task's locality key (e.g. a digest of the file it reads; '' for none), or none:
    # a worker that ran tasks of a key is given that key's tasks first.
    localities: Annotated[list[ShareName], msgspec.Meta(max_length=MAX_ITEMS)] = []
    # Tasks of this batch whose results stay in the store for other tasks of the job (which
    # name them in a kept-inputs payload) instead of going to the client: the client's
    # stream lists them as done with nothing to fetch. Deleted when the job ends.
    keep: Annotated[list[Id], msgspec.Meta(max_length=MAX_ITEMS)] = []


class KeptInputs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The header of a kept-inputs payload (protocol.KEPT_INPUTS_MAGIC): the tasks of the
    same job whose kept results the task takes, and a name for each, for error messages
    (a dask key, say)."""

    tasks: Annotated[list[Id], msgspec.Meta(max_length=MAX_ITEMS)]
    labels: list[str] = []


class Seal(Message):
    """``POST JOB_SEAL``: the job's final task count."""

    total: Annotated[int, msgspec.Meta(ge=0, le=10**9)]


class EnvironmentSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A per-task software environment, content-addressed: its blob is this struct's JSON
    (``coffea_hq.environments.Environment`` builds one). ``kind`` picks the fields used:

    - ``pixi``: ``manifest`` and ``lock`` (pixi.toml and pixi.lock), ``environment``;
    - ``pixi-pack``: ``archive`` (the blob of a pixi-pack tar);
    - ``pip``: ``requirements`` (requirements.txt lines), ``find_links``/``index``, ``python``;
    - ``interpreter``: ``path`` of an existing interpreter on the workers.
    """

    kind: Annotated[str, msgspec.Meta(pattern=r"^(pixi|pixi-pack|pip|interpreter)\Z")]
    name: Annotated[str, msgspec.Meta(max_length=256)] = ""  # shown in errors and logs
    manifest: str = ""
    lock: str = ""
    environment: Annotated[str, msgspec.Meta(max_length=256)] = "default"
    archive: BlobName | None = None
    requirements: list[str] = []
    find_links: list[str] = []
    index: bool = True
    python: str = ""
    path: str = ""


class ShippedFile(msgspec.Struct, array_like=True, frozen=True):
    """A data file for the task's working directory: ``[name, blob]`` (a basename; not
    ``.`` or ``..``, which name the directory itself or its parent)."""

    name: Annotated[str, msgspec.Meta(pattern=r"^(?!\.\.?\Z)[^/\x00]{1,255}\Z")]
    blob: BlobName


class BoundFunction(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A job's function (or reducer) bound to an environment and files: the function blob
    of such a job is ``protocol.BOUND_FUNCTION_MAGIC`` + this struct's JSON. ``versions``
    are the session's (:data:`coffea_hq.protocol.VERSION_CHECKED`); with ``strict`` a
    mismatch fails the tasks, else it warns once per job."""

    function: BlobName
    environment: BlobName | None = None
    label: Annotated[str, msgspec.Meta(max_length=256)] = ""
    files: Annotated[list[ShippedFile], msgspec.Meta(max_length=protocol.FILES_MAX)] = []
    strict: bool = False
    versions: dict[str, str] = {}


# ---------------------------------------------------------------------- worker -> server


class LeaseRequest(Message):
    """``POST LEASE``: up to ``max`` tasks, waiting up to ``wait`` seconds for work."""

    worker: Id
    max: Annotated[int, msgspec.Meta(ge=1, le=protocol.LEASE_MAX_TASKS)] = 1
    wait: Annotated[float, msgspec.Meta(ge=0, le=protocol.LONG_POLL_MAX)] = 0.0
    # Take only tasks of these users' jobs (``hq-worker --users``); empty: any user's. A
    # worker token that names users narrows this further.
    users: Annotated[list[Id], msgspec.Meta(max_length=1024)] = []


class ErrorInfo(msgspec.Struct):
    """A task's exception as text (the pickled exception travels as the item's part)."""

    type: ErrorText
    message: ErrorText
    traceback: ErrorText = ""


NoteText = Annotated[str, msgspec.Meta(max_length=protocol.TASK_NOTE_TEXT_MAX)]


class TaskWarning(msgspec.Struct, array_like=True, frozen=True):
    """A Python warning a task raised: ``[category, message, filename, lineno, module,
    count]``; ``category`` is the class's ``module.qualname``, ``count`` how many times
    the task raised it (reported once)."""

    category: NoteText
    message: NoteText
    filename: NoteText = ""
    lineno: Annotated[int, msgspec.Meta(ge=0)] = 0
    module: NoteText = ""
    count: Annotated[int, msgspec.Meta(ge=1)] = 1


class TaskLog(msgspec.Struct, array_like=True, frozen=True):
    """A log record a task emitted (``TASK_LOG_LEVEL`` and above): ``[logger, level,
    message, pathname, lineno, created]``; ``message`` is formatted, with any traceback."""

    logger: NoteText
    level: Annotated[int, msgspec.Meta(ge=0, le=100)]
    message: NoteText
    pathname: NoteText = ""
    lineno: Annotated[int, msgspec.Meta(ge=0)] = 0
    created: float = 0.0


class TaskInfo(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True):
    """What a task tells its session beside its result, measured in its slot subprocess.

    ``wall`` and ``cpu`` are the task's seconds (CPU: user + system of the subprocess while
    the task ran); ``max_rss`` the subprocess's peak resident set in bytes during the task
    (the kernel's high-water mark, reset before each task where Linux allows, else the
    subprocess's peak so far); ``output`` the tail of what it printed."""

    wall: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    cpu: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    max_rss: Annotated[int, msgspec.Meta(ge=0)] = 0
    warnings: Annotated[list[TaskWarning], msgspec.Meta(max_length=protocol.TASK_WARNINGS_MAX)] = []
    logs: Annotated[list[TaskLog], msgspec.Meta(max_length=protocol.TASK_LOGS_MAX)] = []
    output: Annotated[str, msgspec.Meta(max_length=protocol.TASK_OUTPUT_MAX)] = ""


class ReportItem(msgspec.Struct, array_like=True, frozen=True):
    """One finished task: ``[job, task, attempt, outcome, error, info]`` (error null for
    ok; ``info`` may be left out)."""

    job: Id
    task: Id
    attempt: Attempt
    outcome: Outcome
    error: ErrorInfo | None
    info: TaskInfo | None = None


class Complete(Message):
    """``POST COMPLETE`` frame header; one result part per item. Items are judged one by
    one (see :func:`report_item`): a malformed one is refused, the others stand."""

    worker: Id
    items: Annotated[list[Any], msgspec.Meta(max_length=MAX_ITEMS)]
    sizes: list[int] = []  # the framing's: pack() fills it in


class Release(Message):
    """``POST RELEASE``: leases handed back unstarted."""

    worker: Id
    items: Annotated[list[LeaseRef], msgspec.Meta(max_length=MAX_ITEMS)] = []


class WorkerSample(msgspec.Struct):
    """One heartbeat's telemetry, over the span since the worker's previous heartbeat:
    tasks finished per second, CPU use of the agent and its slot subprocesses (percent of
    one core), slots busy now, each slot subprocess's resident set, the environment cache
    (``env_cache``: e.g. entries and bytes; empty where the worker keeps none), and the
    tasks finished per job. ``time`` is when the server received it (Unix time)."""

    time: float = 0.0
    slots: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 0
    busy_slots: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 0
    tasks_per_second: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    cpu_percent: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    slot_rss_bytes: Annotated[list[int], msgspec.Meta(max_length=100_000)] = []
    env_cache: Annotated[dict[str, int], msgspec.Meta(max_length=64)] = {}
    jobs: Annotated[dict[Id, int], msgspec.Meta(max_length=1024)] = {}


class JobSample(msgspec.Struct):
    """One heartbeat's share of a job: ``done`` tasks of it finished on ``worker`` since
    that worker's previous heartbeat, received at ``time``."""

    time: float
    worker: str
    done: int


class Telemetry(msgspec.Struct):
    """``GET TELEMETRY``: the rolling windows (the last ``protocol.TELEMETRY_SAMPLES``
    heartbeats, oldest first) of each live worker and each unfinished job."""

    workers: dict[str, list[WorkerSample]]
    jobs: dict[str, list[JobSample]]


class FailureNote(msgspec.Struct):
    """One failed task of a job as the dashboard shows it: the error the store keeps."""

    task: str
    type: str = ""
    message: str = ""
    traceback: str = ""
    worker: str = ""


class DashboardState(msgspec.Struct):
    """One ``GET EVENTS`` event: the queue, the live workers, the unfinished jobs with
    their first failures (``failures``: job -> up to ``protocol.EVENTS_FAILURES_MAX``),
    and the heartbeat windows."""

    queue: QueueStats
    workers: dict[str, WorkerInfo]
    jobs: list[JobSummary]
    failures: dict[str, list[FailureNote]]
    telemetry: Telemetry


class Heartbeat(Message):
    """``POST HEARTBEAT``: extends ``leases`` and carries telemetry."""

    worker: Id
    slots: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 0
    host: Annotated[str, msgspec.Meta(max_length=256)] = ""
    leases: Annotated[list[LeaseRef], msgspec.Meta(max_length=MAX_ITEMS)] = []
    stats: dict[str, Any] = {}
    draining: bool = False
    exiting: bool = False
    # Seconds the server may hold the reply: it answers at once if a lease is lost, else
    # when a job ends (so the worker stops that job's tasks promptly) or ``wait`` passes.
    wait: Annotated[float, msgspec.Meta(ge=0, le=protocol.LONG_POLL_MAX)] = 0.0
    # The worker's own log lines since its last heartbeat (kept in its ring buffer).
    logs: Annotated[
        list[Annotated[str, msgspec.Meta(max_length=protocol.TASK_NOTE_TEXT_MAX)]],
        msgspec.Meta(max_length=protocol.HEARTBEAT_LOG_LINES),
    ] = []
    sample: WorkerSample | None = None  # this heartbeat's entry of the worker's window


class Presence(Message):
    """One line of the ``POST PRESENCE`` request body (newline-delimited JSON): the first
    names the worker and a fresh ``session`` for this connection; empty lines keep it
    alive; ``bye`` ends it cleanly (the worker handed back what it held)."""

    worker: Id
    session: Id
    bye: bool = False


# ---------------------------------------------------------------------- server -> client, worker


class ErrorReply(msgspec.Struct):
    """Any 4xx/5xx answer: ``error`` is a short code, ``message`` one sentence for a person."""

    error: str
    message: str


class Health(msgspec.Struct):
    """``GET HEALTH``: ``store`` is ``"ok"`` or why the store does not answer."""

    status: str
    store: str
    version: str
    max_request_size: int


class JobSummary(msgspec.Struct, omit_defaults=True):
    """``GET JOB`` (and the reply of ``PUT JOB``, ``POST JOB_SEAL``, ``POST JOB_CANCEL``):
    where the job is. ``total`` is null until the job is sealed; ``merges`` counts merge
    tasks made, ``merges_open`` those not finished; ``reason`` says why a job ended early."""

    job: str
    state: protocol.JobState
    label: str
    submitted: int
    total: int | None
    done: int
    failed: int
    max_attempts: int
    fail_fast: bool
    reducing: bool
    merges: int
    merges_open: int
    requeued: int = 0  # attempts handed back to the queue (crashed, lost or expired)
    crashed: int = 0  # attempts whose subprocess died
    reason: str | None = None
    # What the job's attempts cost so far, added up by the server (where workers said):
    # seconds of wall and CPU time, and the largest peak resident set of one (bytes).
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    max_rss: int = 0


class JobList(msgspec.Struct):
    """``GET JOBS``: the newest unfinished jobs (at most ``protocol.JOBS_LIST_MAX``),
    oldest first."""

    jobs: list[JobSummary]


class TaskError(msgspec.Struct, omit_defaults=True):
    """A failed task's error as the results route gives it: what the worker reported
    (:class:`ErrorInfo`), or, for a task whose workers were all lost, the server's
    sentence with the last ``worker`` and ``attempt``."""

    type: str
    message: str
    traceback: str = ""
    worker: str | None = None
    attempt: int | None = None


class ResultItem(msgspec.Struct, array_like=True, frozen=True):
    """``[task, outcome]`` of one result; its value is the matching frame part (empty
    for ``merged``: merged into a merge task's input on a worker)."""

    task: str
    outcome: protocol.ResultOutcome


class ResultsHeader(JobSummary, kw_only=True):
    """``GET JOB_RESULTS`` reply frame header: the results past the request's cursor
    (one part per item: the pickled value, or the pickled exception), ``cursor`` to
    continue from, ``errors`` by task, ``end`` once the job's last event is included,
    and the job's summary."""

    cursor: str
    items: list[ResultItem]
    errors: dict[str, TaskError]
    end: bool
    sizes: list[int]  # the framing's: pack() fills it in (required: omit_defaults is on)
    notes: dict[str, TaskNote] | None = None  # what tasks told their session, by task


class BlobStored(msgspec.Struct):
    """``PUT BLOB`` reply."""

    blob: str
    size: int


class Submitted(msgspec.Struct):
    """``POST JOB_TASKS`` reply: how many of the batch's tasks were new."""

    added: int


class Deleted(msgspec.Struct):
    """``DELETE JOB`` reply."""

    deleted: bool


class Released(msgspec.Struct):
    """``POST RELEASE`` reply: how many leases the server took back."""

    released: int


class SetShares(Message):
    """``POST SHARES``: fair-share weights to set, by group (a user, or an open-mode share
    label; '' is the default group). Unset groups weigh 1."""

    weights: Annotated[
        dict[ShareName, Annotated[float, msgspec.Meta(gt=0, le=protocol.SHARE_WEIGHT_MAX)]],
        msgspec.Meta(max_length=1024),
    ]


class ShareInfo(msgspec.Struct):
    """One fair-share group: its ``weight`` and ``usage``, the seconds of worker time
    leased to it so far divided by its weight (of the groups with work, the lowest is
    served next; one coming back from idle starts level with them)."""

    weight: float
    usage: float = 0.0


class Shares(msgspec.Struct):
    """``GET SHARES`` / ``POST SHARES`` reply: every group that has a weight or was served."""

    shares: dict[str, ShareInfo]


class QueueStats(msgspec.Struct):
    """``GET QUEUE``: tasks queued and leased over all unfinished jobs (``work`` is their
    sum: what autoscalers read), unfinished jobs, live workers, and the server's task
    accounting since its store was created."""

    queued: int
    running: int
    work: int
    jobs: int
    workers: int
    counters: dict[protocol.Counter, int]


class WorkerInfo(msgspec.Struct):
    """One live worker's last heartbeat: ``leases`` held, ``seen`` (Unix time), and the
    worker's own ``stats``."""

    slots: int
    host: str
    stats: dict[str, Any]
    leases: int
    seen: float


Workers = dict[str, WorkerInfo]  # ``GET WORKERS``: by worker id


class LeasedTask(msgspec.Struct, array_like=True):
    """``[job, task, attempt, function_blob]``; its payload is the matching frame part."""

    job: str
    task: str
    attempt: int
    function: str


class LeaseReply(msgspec.Struct):
    """``POST LEASE`` reply frame header; one payload part per task."""

    tasks: list[LeasedTask]
    sizes: list[int] = []  # the framing's: pack() fills it in


class Rejected(msgspec.Struct, omit_defaults=True):
    """A refused item of a complete report: its index, ids, status and why."""

    index: int
    job: str
    task: str
    status: protocol.CompleteStatus
    reason: str | None = None


class CompleteReply(msgspec.Struct, omit_defaults=True):
    """``POST COMPLETE`` reply: one status per item; 409 with ``rejected`` if any was
    refused (the others stand)."""

    items: list[protocol.CompleteStatus]
    error: str | None = None
    message: str | None = None
    rejected: list[Rejected] | None = None


class HeartbeatReply(msgspec.Struct):
    """``POST HEARTBEAT`` reply."""

    lost: list[LeaseRef]  # leases this worker no longer holds: stop them
    interval: float  # seconds until the next heartbeat
    max_request_size: int
    # Jobs of lost leases that have ended (cancelled, failed, done or deleted): drop
    # everything of them. Lost leases of other jobs expired.
    ended: list[str] = []


class TaskNote(msgspec.Struct, omit_defaults=True):
    """What the server keeps of a task's :class:`TaskInfo` for its client (the results
    reply's ``notes``, by task): the info without its output, and the worker."""

    worker: str
    wall: float = 0.0
    cpu: float = 0.0
    max_rss: int = 0
    warnings: list[TaskWarning] = []
    logs: list[TaskLog] = []


class LogLine(msgspec.Struct, omit_defaults=True):
    """One entry of a job's or a worker's log ring buffer: what a task printed (``task``
    set) or a line of the worker's own log."""

    time: float
    worker: str
    text: str
    job: str = ""
    task: str = ""


class LogsReply(msgspec.Struct):
    """``GET JOB_LOGS`` and ``GET WORKER_LOGS``: the buffer's lines, oldest first."""

    lines: list[LogLine]


def decode(body: bytes, kind: type[T]) -> T:
    """A JSON request body as ``kind``; raises :class:`msgspec.ValidationError` or
    :class:`msgspec.DecodeError` with a sentence naming the field."""
    return msgspec.json.decode(body, type=kind)


def convert(header: dict[str, Any], kind: type[T]) -> T:
    """An already-parsed frame header as ``kind`` (same errors as :func:`decode`)."""
    return msgspec.convert(header, type=kind)


def _check(item: ReportItem) -> ReportItem:
    if (item.outcome is Outcome.OK) != (item.error is None):
        raise msgspec.ValidationError(
            "an 'ok' item carries a null error, any other outcome an error object - at `$[4]`"
        )
    return item


def report_item(raw: Any) -> ReportItem:
    """One item of a complete report, checked on its own."""
    return _check(msgspec.convert(raw, type=ReportItem))


def report_items(raw: list[Any]) -> list[ReportItem]:
    """All items of a report at once (raises if any is malformed: then judge each)."""
    return [_check(item) for item in msgspec.convert(raw, type=list[ReportItem])]


def encode(message: Any) -> bytes:
    return msgspec.json.encode(message)
