"""Leasing ahead: a slot's next task is leased while its current one finishes.

A worker holds about ``SECONDS_OF_WORK_PER_SLOT`` of work per slot, so with tasks longer
than that (an AGC chunk: 100-200 ms) it holds just the running ones. A lease then ends
only once its result is reported, and only then is the next task leased: every task
waited for two round trips to the server (22 ms a chunk on a loaded 2-core machine, 10%
of the slots' time). :class:`LeaseAhead` lets the lease loop ask for one more task per
busy slot whose task is expected to end within a margin (two lease round trips, within
bounds), judged from the mean task runtime. A task is held unstarted for about that
margin, so the end of a job is not left waiting on a worker that hoards work.
"""

from __future__ import annotations

import time

__all__ = ["LeaseAhead"]

MARGIN_MIN = 0.02  # seconds before a task's expected end to lease its successor
MARGIN_MAX = 0.1
RTT_WEIGHT = 0.2  # of the latest lease round trip in the running mean


class LeaseAhead:
    """When to lease beyond the worker's room: :meth:`started`/:meth:`stopped` follow
    each slot's batch, :meth:`observe` the lease round trips, :meth:`due` decides."""

    def __init__(self) -> None:
        self.rtt: float | None = None  # mean round trip of leases that returned tasks
        self._since: dict[int, float] = {}  # slot index: when its batch began

    def started(self, slot: int, now: float | None = None) -> None:
        self._since[slot] = time.monotonic() if now is None else now

    def stopped(self, slot: int) -> None:
        self._since.pop(slot, None)

    def observe(self, seconds: float) -> None:
        """A lease that returned tasks took ``seconds``."""
        rtt = self.rtt
        self.rtt = seconds if rtt is None else (1 - RTT_WEIGHT) * rtt + RTT_WEIGHT * seconds

    def margin(self, mean_runtime: float) -> float:
        rtt = self.rtt if self.rtt is not None else MARGIN_MIN
        return min(mean_runtime / 2, max(MARGIN_MIN, min(MARGIN_MAX, 2 * rtt)))

    def due(
        self, mean_runtime: float | None, pending: int, now: float | None = None
    ) -> tuple[int, float | None]:
        """``(n, wait)``: lease ``n`` tasks now for slots about to finish (beyond what is
        pending already); if none, ``wait`` is the seconds until one is due (None: not
        before a lease ends)."""
        if mean_runtime is None or not self._since:
            return 0, None
        now = time.monotonic() if now is None else now
        ahead = mean_runtime - self.margin(mean_runtime)  # elapsed from which a slot is due
        elapsed = [now - t for t in self._since.values()]
        soon = sum(1 for e in elapsed if e >= ahead)
        if soon > pending:
            return soon - pending, None
        later = [ahead - e for e in elapsed if e < ahead]
        # A slot due later matters only once the ones due now are covered by pending tasks.
        return 0, (min(later) if later else None)
