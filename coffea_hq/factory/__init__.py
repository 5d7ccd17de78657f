"""Worker factories: keep a batch system's worker count in line with the queue's work.

``policy`` holds the decisions (pure), ``condor`` the HTCondor factory behind
``coffea-hq condor``.
"""

from __future__ import annotations

from .policy import BatchState, Bounds, Cooldown, Decision, WorkerJob, decide, wanted

__all__ = ["BatchState", "Bounds", "Cooldown", "Decision", "WorkerJob", "decide", "wanted"]
