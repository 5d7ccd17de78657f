"""Worker presence: a dropped connection is a dead worker, known in seconds.

Each worker holds one ``POST PRESENCE`` request open for its life. When it ends with a
goodbye, the worker's session closes. When it ends without one (the worker was killed,
its host died, the network broke), this replica waits ``grace`` seconds, then runs one
fenced script that requeues the worker's leases unless the worker opened a newer
session meanwhile (a reconnect, to this replica or another). A hung or partitioned
worker whose connection stays open is still caught by the lease timeout.
"""

from __future__ import annotations

import asyncio
import logging

from .store import Store

log = logging.getLogger("coffea_hq.server")


class PresenceTracker:
    """This replica's open presence streams and the grace timers of dropped ones."""

    def __init__(self, store: Store, grace: float) -> None:
        self.store = store
        self.grace = grace
        self.closing = False
        self._streams: set[asyncio.Task[object]] = set()
        self._pending: set[asyncio.Task[None]] = set()

    def opened(self) -> None:
        """Called by the stream's handler: it is cancelled when this replica shuts down."""
        task = asyncio.current_task()
        if task is not None:
            self._streams.add(task)

    def ended(self, worker: str, session: str, *, clean: bool, users: tuple[str, ...] = ()) -> None:
        """The stream of ``worker``'s ``session`` ended, with a goodbye or without;
        ``users``: its token reaches only these users' jobs (empty: any job)."""
        task = asyncio.current_task()
        if task is not None:
            self._streams.discard(task)
        if self.closing:
            return  # this replica is going away, not the worker: it reconnects elsewhere
        timer = asyncio.create_task(self._end(worker, session, clean=clean, users=users))
        self._pending.add(timer)
        timer.add_done_callback(self._pending.discard)

    async def _end(self, worker: str, session: str, *, clean: bool, users: tuple[str, ...]) -> None:
        if not clean:
            await asyncio.sleep(self.grace)
        try:
            current, requeued, failed = await self.store.end_session(
                worker, session, lost=not clean, users=users
            )
        except Exception as e:  # the store is down: the lease timeout covers it
            log.warning("worker %s: ending its presence failed (%s)", worker, e)
            return
        if current and not clean:
            log.info(
                "worker %s lost (its connection dropped, no reconnect within %.1f s): "
                "%d task(s) requeued, %d failed for good",
                worker,
                self.grace,
                requeued,
                failed,
            )

    async def close(self) -> None:
        """Shutdown: end every stream now (workers reconnect to another replica) and drop
        the pending timers (the lease timeout covers a worker that really died)."""
        self.closing = True
        for task in [*self._streams, *self._pending]:
            task.cancel()
        tasks = [*self._streams, *self._pending]
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
