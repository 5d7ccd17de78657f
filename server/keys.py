"""Every Redis key the server uses, in one place.

A job's keys share the ``{job-id}`` hash tag, so one script touches one slot and
per-job state can be sharded later. Global keys (the ready and unfinished job
indices, blobs, the worker registry) carry only the prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

JOB_KEY_NAMES = ("meta", "payload", "queue", "leases", "owner", "results", "errors", "events")


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix (``--prefix``, default ``hq``)."""

    prefix: str = "hq"

    @property
    def ready(self) -> str:
        return f"{self.prefix}:ready"

    @property
    def jobs(self) -> str:
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

    def job(self, job: str) -> list[str]:
        """The KEYS every job script takes, in the order ``lua/common.lua`` names them."""
        base = f"{self.prefix}:job:{{{job}}}"
        return [base if name == "meta" else f"{base}:{name}" for name in JOB_KEY_NAMES] + [
            self.ready,
            self.jobs,
        ]

    def meta(self, job: str) -> str:
        return f"{self.prefix}:job:{{{job}}}"

    def events(self, job: str) -> str:
        return f"{self.prefix}:job:{{{job}}}:events"
