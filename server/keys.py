"""Every Redis key the server uses, and the field names inside them, in one place.

A job's keys share the ``{job-id}`` hash tag. The job scripts also touch global
keys (the ready and unfinished job indices, the counters), so the store must be
one Redis primary: ``hq-server`` refuses a Redis Cluster at start.

The Lua scripts receive these names generated from here (see :mod:`.scripts`):
the KEYS order is the field order of :class:`JobKeys`, the meta fields and
stream fields are :class:`Meta` and :class:`Event`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields


class Meta(enum.StrEnum):
    """Fields of a job's ``meta`` hash."""

    STATE = "state"  # protocol.JobState
    FUNCTION_BLOB = "function_blob"  # sha256 of the pickled task function
    REDUCER_BLOB = "reducer_blob"  # sha256 of the pickled merge function ('' for none)
    FANIN = "fanin"
    MAX_ATTEMPTS = "max_attempts"
    FAIL_FAST = "fail_fast"  # '1' or '0'
    LABEL = "label"
    USER = "user"  # who submitted the job (once tokens exist)
    CREATED = "created"  # ms
    TOUCHED = "touched"  # ms of the last create or submit (abandoned unsealed jobs expire)
    SUBMITTED = "submitted"  # tasks added so far
    TOTAL = "total"  # set by the seal
    DONE = "done"  # client tasks that succeeded
    FAILED = "failed"  # client tasks that failed for good
    MERGES = "merges"  # merge tasks queued so far
    MERGES_OPEN = "merges_open"  # merge tasks queued or running
    REQUEUED = "requeued"  # attempts that crashed or expired and went back to the queue
    CRASHED = "crashed"  # attempts whose subprocess died (segfault, out of memory, os._exit)
    FIRST_ERROR = "first_error"  # the first failed task
    FATAL = "fatal"  # a failed merge (its inputs are gone: the job cannot finish)
    REASON = "reason"  # why the server ended the job, when nobody asked it to
    FINISHED = "finished"  # ms
    RESOURCES = "resources"  # '1': keep every task's wall/CPU/peak RSS note for the client
    WALL_US = "wall_us"  # microseconds the job's attempts ran, added up (where known)
    TIMED = "timed"  # ... and how many attempts those were (fair share's mean task cost)
    CPU_US = "cpu_us"  # CPU microseconds of the job's attempts, added up
    RSS_MAX = "rss_max"  # the largest peak resident set of one attempt, bytes
    SHARE = "share"  # the fair-share group in open mode (the user under --auth)
    PRIORITY = "priority"  # higher first among one fair-share group's jobs
    LOCAL = "local"  # '1' once a task with a locality key was submitted


class Event(enum.StrEnum):
    """Fields of an entry of a job's ``events`` stream (one entry per completed batch)."""

    OK = "ok"  # comma-joined tasks whose results the client fetches
    ERROR = "err"  # comma-joined tasks that failed (result: the pickled exception)
    MERGED = "done"  # comma-joined tasks merged on workers (nothing to fetch)
    END = "end"  # the job's final state: nothing follows


@dataclass(frozen=True, slots=True)
class JobKeys:
    """One job's keys, in the order the Lua scripts receive them as KEYS."""

    meta: str  # hash   see Meta
    payload: str  # hash   task -> pickled arguments (a merge: its inputs, comma-joined)
    queue: str  # list   task ids waiting for a worker
    leases: str  # zset   task -> lease deadline (ms)
    holder: str  # hash   task -> "attempt|worker" while leased, "attempt|worker|D" once done
    results: str  # hash   task -> pickled value (or exception), until the client acks
    errors: str  # hash   task -> JSON error description
    events: str  # stream see Event
    mergeable: str  # list   results of a reducing job waiting to be merged (task ids)
    notes: str  # hash   task -> JSON messages.TaskNote (warnings, logs, resources), until acked
    logs: str  # list   JSON messages.LogLine: the job's task output, a ring buffer (LTRIM)
    locality: str  # hash   task -> its locality key (the file it reads), for tasks that have one
    claims: str  # hash   'k:'key -> the worker that last leased a task of it; 'w:'worker -> key
    kept: str  # set    tasks whose results stay in RESULTS for other tasks (fetched by workers)
    ready: str  # global zset: jobs with queued tasks, scored by creation time
    jobs: str  # global zset: unfinished jobs, scored by creation time
    counters: str  # global hash: protocol.Counter -> count
    durations: str  # global hash: the task duration histogram (see Keys.durations)
    shares: str  # global hash: fair-share group -> weight (see Keys.shares)
    passes: str  # global hash: fair-share group -> worker time served / weight
    ranked: str  # global zset: the ready jobs by group, then priority and age (Keys.ranked)

    OWNED = 14  # the first OWNED keys belong to the job alone

    @classmethod
    def names(cls) -> list[str]:
        """The KEYS names, in order."""
        return [f.name for f in fields(cls)]

    @property
    def owned(self) -> list[str]:
        """The keys that belong to this job alone (deleted or expired with it)."""
        return self.script_keys[: self.OWNED]

    @property
    def script_keys(self) -> list[str]:
        # Not dataclasses.astuple: it deep-copies each field, 4% of the server's CPU.
        return [getattr(self, name) for name in _JOB_KEY_NAMES]


_JOB_KEY_NAMES = tuple(JobKeys.names())


# The KEYS of scripts over the whole store rather than one job (worker_gone): the global
# keys a job script also gets, then the worker registry. They reach a job's own keys
# through the use_job() the prelude generates.
STORE_KEY_NAMES = (
    "ready",
    "jobs",
    "counters",
    "durations",
    "shares",
    "passes",
    "ranked",
    "workers",
    "workers_seen",
    "sessions",
)


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix (``--prefix``, default ``hq``)."""

    prefix: str = "hq"

    @property
    def ready(self) -> str:
        """Jobs with queued tasks, scored by creation time (oldest served first)."""
        return f"{self.prefix}:ready"

    @property
    def jobs(self) -> str:
        """Unfinished jobs, scored by creation time."""
        return f"{self.prefix}:jobs"

    @property
    def counters(self) -> str:
        """The server's task accounting (protocol.Counter -> count)."""
        return f"{self.prefix}:counters"

    @property
    def durations(self) -> str:
        """The task duration histogram: hash, bucket index (1-based, into
        protocol.TASK_DURATION_BUCKETS; one past the end: longer) -> attempts,
        ``count`` -> attempts, ``sum_us`` -> their total in microseconds."""
        return f"{self.prefix}:durations"

    @property
    def shares(self) -> str:
        """Fair-share weights: hash, group (the user, or in open mode the job's share
        label) -> weight (a float > 0; absent: 1). Set by an admin."""
        return f"{self.prefix}:shares"

    @property
    def passes(self) -> str:
        """Fair-share progress: hash, group -> seconds of worker time leased to it divided
        by its weight (the lease script serves the lowest first); field ``PASS_FLOOR``
        holds the lowest pass of the groups that had work at the last lease."""
        return f"{self.prefix}:passes"

    @property
    def ranked(self) -> str:
        """The jobs of :attr:`ready` once more, for the lease script to go group by group:
        zset, every score 0, member ``group NUL rank job`` (``rank``: fixed-width digits of
        PRIORITY_MAX - priority, then the creation time), so ZRANGEBYLEX gives a group's
        best job first and jumps from one group to the next without reading the others'."""
        return f"{self.prefix}:ready:ranked"

    @property
    def wake(self) -> str:
        """Pub/sub channel: published when tasks become leasable."""
        return f"{self.prefix}:wake"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    @property
    def workers_seen(self) -> str:
        return f"{self.prefix}:workers:seen"

    @property
    def tokens(self) -> str:
        """Access tokens: hash, sha256 of the token -> JSON record (see :mod:`.tokens`)."""
        return f"{self.prefix}:tokens"

    @property
    def sessions(self) -> str:
        """worker -> the session id of its current presence connection (the fence)."""
        return f"{self.prefix}:workers:session"

    @property
    def store_keys(self) -> list[str]:
        """The KEYS of a store-wide script, in :data:`STORE_KEY_NAMES` order."""
        return [getattr(self, name) for name in STORE_KEY_NAMES]

    def user_jobs(self, user: str) -> str:
        """A user's jobs: zset, job -> creation time (ms); the quotas read it."""
        return f"{self.prefix}:user:{user}:jobs"

    def user_blobs(self, user: str) -> str:
        """Blobs a user uploaded: hash, sha -> size (the blob quota counts them)."""
        return f"{self.prefix}:user:{user}:blobs"

    def worker_logs(self, worker: str) -> str:
        """List of JSON messages.LogLine: a worker's tasks' output and its own log lines,
        a ring buffer (LTRIM), expiring when the worker stays silent."""
        return f"{self.prefix}:worker:{worker}:logs"

    def worker_telemetry(self, worker: str) -> str:
        """List of JSON messages.WorkerSample: a worker's heartbeats, a capped window."""
        return f"{self.prefix}:worker:{worker}:telemetry"

    def job_telemetry(self, job: str) -> str:
        """List of JSON messages.JobSample: the job's share of heartbeats, a capped window
        (outside the job's keys: it expires rather than being deleted with the job)."""
        return f"{self.prefix}:telemetry:job:{job}"

    def blob(self, sha: str) -> str:
        return f"{self.prefix}:blob:{sha}"

    def job(self, job: str) -> JobKeys:
        base = f"{self.prefix}:job:{{{job}}}"
        return JobKeys(
            meta=base,
            payload=f"{base}:payload",
            queue=f"{base}:queue",
            leases=f"{base}:leases",
            holder=f"{base}:holder",
            results=f"{base}:results",
            errors=f"{base}:errors",
            events=f"{base}:events",
            mergeable=f"{base}:mergeable",
            notes=f"{base}:notes",
            logs=f"{base}:logs",
            locality=f"{base}:locality",
            claims=f"{base}:claims",
            kept=f"{base}:kept",
            ready=self.ready,
            jobs=self.jobs,
            counters=self.counters,
            durations=self.durations,
            shares=self.shares,
            passes=self.passes,
            ranked=self.ranked,
        )
