"""Long-poll leasing: a worker's lease request waits server-side until work exists.

Each replica subscribes to the store's wake-up channel (published by every script
that makes tasks leasable). Waiting requests queue up here in arrival order and
are served one after another when a wake-up arrives, so a burst of new work does
not stampede every waiting worker at the store at once.

A parked request is filled only while it can still be used: its connection is open
and its worker heartbeats. A worker that is stopped (SIGSTOP, a frozen VM) keeps
its request parked; handing it tasks would only cost them an attempt each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .store import LeasedTask, Store

log = logging.getLogger(__name__)


# A worker whose last heartbeat is older than this share of the lease timeout is
# presumed stopped (it heartbeats every third of it).
ALIVE_WITHIN = 2 / 3


def _always() -> bool:
    return True


@dataclass(eq=False)
class _Waiter:
    worker: str
    maximum: int
    connected: Callable[[], bool] = _always
    users: tuple[str, ...] = ()  # a worker that takes only these users' jobs
    future: asyncio.Future[list[LeasedTask]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Beacon:
    """Rings when a job ends somewhere (any replica: the store's wake-up channel), so
    that parked heartbeats look at their leases again at once."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.closed = False

    def ring(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    def close(self) -> None:
        """The server is stopping: release every parked heartbeat now."""
        self.closed = True
        self.ring()

    async def wait(self, timeout: float) -> bool:
        """Whether it rang within ``timeout`` seconds."""
        if self.closed:
            return False
        event = self._event
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)
        return event.is_set() and not self.closed


class LeaseDispatcher:
    """Serves lease requests, parking them until a wake-up when the queue is empty."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._waiters: deque[_Waiter] = deque()
        self._generation = 0  # bumped by every wake-up, to catch ones that raced a lease
        self._drainer: asyncio.Task[None] | None = None

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def lease(
        self,
        worker: str,
        maximum: int,
        wait: float,
        connected: Callable[[], bool] = _always,
        users: tuple[str, ...] = (),
    ) -> list[LeasedTask]:
        """Lease now, or park until work arrives or ``wait`` passes. ``connected`` tells
        whether the requester can still receive a reply; ``users`` limits the worker to
        those users' jobs."""
        generation = self._generation
        tasks = await self.store.lease(worker, maximum, users)
        if tasks or wait <= 0:
            return tasks
        waiter = _Waiter(worker, maximum, connected, users)
        self._waiters.append(waiter)
        if generation != self._generation:
            self.notify()
        try:
            return await asyncio.wait_for(asyncio.shield(waiter.future), wait)
        except TimeoutError:
            # The drainer may have served this request in the very loop iteration in which
            # the wait ran out: those tasks are leased to this worker now, so hand them over
            # (dropping them here would strand them until their lease expires).
            if waiter.future.done() and not waiter.future.cancelled():
                return waiter.future.result()
            return []
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
            if not waiter.future.done():
                waiter.future.cancel()

    def notify(self) -> None:
        """Work may have arrived: serve the parked requests."""
        self._generation += 1
        if self._waiters and (self._drainer is None or self._drainer.done()):
            self._drainer = asyncio.create_task(self._drain())

    def wake_worker(self, worker: str) -> None:
        """End ``worker``'s parked requests with no tasks (it is draining)."""
        for waiter in self._waiters:
            if waiter.worker == worker and not waiter.future.done():
                waiter.future.set_result([])

    async def _drain(self) -> None:
        # Parked requests are served in arrival order. One that finds nothing ends the round
        # unless it is limited to some users' jobs: the requests behind it may take others'.
        while self._waiters:
            generation = self._generation
            for waiter in list(self._waiters):
                if waiter.future.done():
                    self._remove(waiter)
                    continue
                try:
                    usable = waiter.connected() and await self.store.worker_alive(
                        waiter.worker, self.store.lease_timeout * ALIVE_WITHIN
                    )
                    if not usable:
                        log.info(
                            "parked lease of worker %s dropped: gone or not heartbeating",
                            waiter.worker,
                        )
                        if not waiter.future.done():
                            waiter.future.set_result([])
                        self._remove(waiter)
                        continue
                    tasks = await self.store.lease(waiter.worker, waiter.maximum, waiter.users)
                except Exception:
                    log.exception("lease for a parked request failed; it will time out and retry")
                    return
                if not tasks:
                    if waiter.users:
                        continue
                    break
                if waiter.future.done():
                    # The request timed out while we leased: hand the tasks straight back.
                    refs = [(t.job, t.task, t.attempt) for t in tasks]
                    await self.store.release(waiter.worker, refs)
                    continue
                waiter.future.set_result(tasks)
                self._remove(waiter)
            if generation == self._generation:
                return  # nothing new arrived while we looked

    def _remove(self, waiter: _Waiter) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)

    async def close(self) -> None:
        for waiter in self._waiters:
            if not waiter.future.done():
                waiter.future.set_result([])
        if self._drainer is not None:
            self._drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drainer
