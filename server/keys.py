"""Every Redis key the server uses, in one place.

A job's keys share the ``{job-id}`` hash tag, so one script touches one slot and
per-job state can be sharded later. Global keys (the ready and unfinished job
indices, blobs, the worker registry) carry only the prefix.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class JobKeys:
    """One job's keys, in the order ``lua/common.lua`` receives them as KEYS."""

    meta: str
    payload: str
    queue: str
    leases: str
    owner: str
    results: str
    errors: str
    events: str
    mergeable: str
    ready: str  # global
    jobs: str  # global

    @property
    def owned(self) -> list[str]:
        """The keys that belong to this job alone (deleted or expired with it)."""
        return [
            self.meta,
            self.payload,
            self.queue,
            self.leases,
            self.owner,
            self.results,
            self.errors,
            self.events,
            self.mergeable,
        ]

    @property
    def script_keys(self) -> list[str]:
        return [*self.owned, self.ready, self.jobs]


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
    def wake(self) -> str:
        """Pub/sub channel: published when tasks become leasable."""
        return f"{self.prefix}:wake"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    @property
    def workers_seen(self) -> str:
        return f"{self.prefix}:workers:seen"

    def blob(self, sha: str) -> str:
        return f"{self.prefix}:blob:{sha}"

    def job(self, job: str) -> JobKeys:
        base = f"{self.prefix}:job:{{{job}}}"
        return JobKeys(
            meta=base,
            payload=f"{base}:payload",
            queue=f"{base}:queue",
            leases=f"{base}:leases",
            owner=f"{base}:owner",
            results=f"{base}:results",
            errors=f"{base}:errors",
            events=f"{base}:events",
            mergeable=f"{base}:mergeable",
            ready=self.ready,
            jobs=self.jobs,
        )
