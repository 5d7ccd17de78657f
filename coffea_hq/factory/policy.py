"""How many worker jobs a factory should have, and which to remove: pure decisions.

Given the queue's work (queued + running tasks, as ``GET /api/v1/queue`` reports it),
the worker jobs the factory has in its batch system, the slots per worker and the
``min``/``max`` bounds, :func:`decide` says how many jobs to submit or which to remove,
and why. Nothing here talks to a server or a batch system, so every branch is cheap to
test; :mod:`coffea_hq.factory.condor` does the talking.

Scale-down never kills a task: it removes, in this order, held jobs (they run nothing),
idle jobs (queued in the batch system, not started), running workers that hold no
tasks, and only then running workers that do. Removing a running worker sends it
SIGTERM (HTCondor's ``kill_sig``), which ``hq-worker`` treats as *drain*: stop leasing,
hand back unstarted tasks, finish the running ones, exit. The batch system waits
``job_max_vacate_time`` seconds for that before it kills.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum


class BatchState(StrEnum):
    """A worker job's state in the batch system, as far as scaling cares (not to be
    confused with :class:`coffea_hq.protocol.JobState`, the state of a job of tasks)."""

    IDLE = "idle"  # submitted, waiting for a slot: no tasks, cheapest to remove
    RUNNING = "running"  # hq-worker is (or is about to be) pulling tasks
    HELD = "held"  # stuck (bad input, policy): runs nothing, an operator must look


@dataclass(frozen=True)
class WorkerJob:
    """One worker job. ``busy`` is whether its hq-worker holds tasks (None: unknown)."""

    id: str
    state: BatchState
    busy: bool | None = None


@dataclass(frozen=True)
class Bounds:
    minimum: int
    maximum: int
    slots: int

    def __post_init__(self) -> None:
        if self.minimum < 0:
            raise ValueError(f"--min must be 0 or more, got {self.minimum}")
        if self.maximum < max(self.minimum, 1):
            raise ValueError(
                f"--max must be at least 1 and at least --min ({self.minimum}), got {self.maximum}"
            )
        if self.slots < 1:
            raise ValueError(f"--slots must be at least 1, got {self.slots}")


@dataclass(frozen=True)
class Decision:
    """What to do this cycle: submit ``submit`` jobs, remove the jobs in ``remove``."""

    target: int
    submit: int
    remove: tuple[str, ...]
    reason: str

    @property
    def idle(self) -> bool:
        return self.submit == 0 and not self.remove


def wanted(work: int, bounds: Bounds) -> int:
    """Workers for ``work`` tasks: one slot per task, within the bounds."""
    need = math.ceil(max(work, 0) / bounds.slots)
    return min(max(need, bounds.minimum), bounds.maximum)


# Removal order: what costs nothing first, workers holding tasks (which drain) last.
def _removal_rank(job: WorkerJob) -> int:
    if job.state is BatchState.HELD:
        return 0
    if job.state is BatchState.IDLE:
        return 1
    if job.busy is False:
        return 2
    if job.busy is None:
        return 3
    return 4


def decide(
    work: int,
    jobs: list[WorkerJob],
    bounds: Bounds,
    *,
    scale_down: bool = True,
) -> Decision:
    """Jobs to submit or remove so the factory has ``wanted(work)`` worker jobs.

    ``scale_down=False`` (a cooldown in progress) keeps surplus jobs this cycle.
    """
    target = wanted(work, bounds)
    held = sum(j.state is BatchState.HELD for j in jobs)
    idle = sum(j.state is BatchState.IDLE for j in jobs)
    running = sum(j.state is BatchState.RUNNING for j in jobs)
    have = len(jobs)
    need = math.ceil(max(work, 0) / bounds.slots)
    why = f"work {work} at {bounds.slots} slot(s) per worker needs {need} worker(s)"
    if need != target:
        side = "min" if target == bounds.minimum and need < target else "max"
        why += f", {side} {target}"
    state = f"have {running} running + {idle} idle" + (f" + {held} held" if held else "")
    if target > have:
        count = target - have
        return Decision(target, count, (), f"{why}; {state}: submit {count}")
    if target == have:
        note = f" ({held} held: see condor_q -hold)" if held else ""
        return Decision(target, 0, (), f"{why}; {state}: nothing to do{note}")
    surplus = have - target
    if not scale_down:
        return Decision(target, 0, (), f"{why}; {state}: {surplus} surplus, waiting for cooldown")
    # Within a rank the newest job (the last listed) goes first: older idle jobs are
    # nearer the front of the batch system's queue.
    chosen = sorted(reversed(jobs), key=_removal_rank)[:surplus]
    busy = sum(j.state is BatchState.RUNNING and j.busy is not False for j in chosen)
    drain = f", {busy} of them drain their tasks first" if busy else ""
    return Decision(
        target,
        0,
        tuple(j.id for j in chosen),
        f"{why}; {state}: remove {surplus}{drain}",
    )


class Cooldown:
    """Scale down only after the wanted count stayed below the current one for
    ``seconds`` (so a short lull between two jobs does not drop the workers)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._low_since: float | None = None

    def allows_scale_down(self, target: int, have: int, now: float) -> bool:
        if target >= have:
            self._low_since = None
            return False
        if self._low_since is None:
            self._low_since = now
        return now - self._low_since >= self.seconds
