"""The worker agent: lease, run in slots, report, heartbeat, drain.

Four kinds of loops share one event loop and never block it:

- the lease loop long-polls the server for as many tasks as the worker has room for;
- one loop per slot feeds batches of leased tasks to that slot's subprocess;
- the report loop sends finished tasks back, batching whatever piled up meanwhile;
- the heartbeat loop extends the leases of every held task and carries telemetry.

Room is sized from observed task runtimes: short tasks are leased in large
batches (the control plane's cost per task shrinks), long ones one per slot
(no worker hoards work that another could start now).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import socket
import time
import uuid
from collections import deque
from dataclasses import dataclass

from coffea_hq import protocol
from coffea_hq.protocol import FRAMES_CONTENT_TYPE, Outcome
from coffea_hq.transport import ServerError, ServerUnreachable, Transport

from .slots import Result, Slot, WorkItem

log = logging.getLogger("coffea_hq.worker")

SECONDS_OF_WORK_PER_SLOT = 0.25  # how much work to hold per slot once runtimes are known
SHORT_TASK = 0.005  # tasks shorter than this go to a subprocess in batches
REPORT_MAX_ITEMS = 4096
REPORT_MAX_BYTES = 64 * 1024 * 1024
FRAME_OVERHEAD = 64 * 1024  # room for a report's header beside one result


@dataclass(frozen=True)
class WorkerConfig:
    url: str
    slots: int = 1
    name: str | None = None
    lease_wait: float = 10.0
    retry_for: float = 300.0
    drain_timeout: float | None = None
    token: str | None = None


def default_name() -> str:
    host = "".join(c if c.isalnum() or c in "-_." else "-" for c in socket.gethostname())[:30]
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Worker:
    """One hq-worker process. ``await Worker(config).run()`` until SIGTERM or :meth:`stop`."""

    def __init__(self, config: WorkerConfig) -> None:
        if config.name is not None and not protocol.valid_id(config.name):
            raise ValueError("worker name: 1-64 letters, digits, '-', '_' or '.'")
        self.config = config
        self.id = config.name or default_name()
        self.transport = Transport(config.url, retry_for=config.retry_for, token=config.token)
        self.slots = [Slot(i, self._function_bytes) for i in range(config.slots)]
        self.pending: deque[WorkItem] = deque()  # leased, not started
        self.held: dict[tuple[str, str], WorkItem] = {}  # leased, not yet reported
        self.outbox: list[Result] = []
        self._functions: dict[str, bytes] = {}
        self._function_fetches: dict[str, asyncio.Task[bytes]] = {}
        self._mean_runtime: float | None = None
        self._heartbeat_every = protocol.DEFAULT_LEASE_TIMEOUT / 3
        self._max_request = protocol.DEFAULT_MAX_REQUEST_SIZE  # the server says its own
        self._started = time.monotonic()
        self.stats = {
            "done": 0,
            "failed": 0,
            "crashed": 0,
            "busy_seconds": 0.0,
            "functions_fetched": 0,
        }
        self._stopping = asyncio.Event()
        self._abort = asyncio.Event()
        self._work = asyncio.Event()
        self._room = asyncio.Event()
        self._outbox_ready = asyncio.Event()
        self._busy = 0
        self._lost: set[tuple[str, str]] = set()  # leases the server says we no longer hold

    # ------------------------------------------------------------------ control

    def stop(self) -> None:
        """Drain: stop leasing, hand back unstarted tasks, finish running ones, exit.
        A second call aborts at once (held tasks return to the queue when leases expire)."""
        if self._stopping.is_set():
            log.warning("second stop request: aborting without draining")
            self._abort.set()
        self._stopping.set()
        self._work.set()
        self._room.set()

    @property
    def capacity(self) -> int:
        """How many tasks to hold (running + waiting) given what tasks have cost so far."""
        n = len(self.slots)
        if self._mean_runtime is None:
            return n
        per_slot = SECONDS_OF_WORK_PER_SLOT / max(self._mean_runtime, 1e-6)
        return max(n, min(protocol.LEASE_MAX_TASKS, int(n * per_slot)))

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        await asyncio.gather(*(slot.start() for slot in self.slots))
        log.info("worker %s: %d slot(s), server %s", self.id, len(self.slots), self.config.url)
        background = [
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self._report_loop(), name="report"),
        ]
        leasing = asyncio.create_task(self._lease_loop(), name="lease")
        running = [
            asyncio.create_task(self._slot_loop(s), name=f"slot{s.index}") for s in self.slots
        ]
        watched = [leasing, *background]
        try:
            done, _ = await asyncio.wait(
                [*watched, asyncio.create_task(self._stopping.wait())],
                return_when=asyncio.FIRST_COMPLETED,
            )
            for task in done:
                if task in watched and task.exception():
                    log.error("worker %s giving up: %s", self.id, task.exception())
                    self._abort.set()
                    self.stop()
            if not self._abort.is_set():
                # A second SIGTERM (abort) cuts the drain short.
                drain = asyncio.create_task(self._drain(leasing, running))
                abort = asyncio.create_task(self._abort.wait())
                await asyncio.wait([drain, abort], return_when=asyncio.FIRST_COMPLETED)
                for task in (drain, abort):
                    task.cancel()
                await asyncio.gather(drain, abort, return_exceptions=True)
        finally:
            for task in [leasing, *running, *background]:
                task.cancel()
            await asyncio.gather(leasing, *running, *background, return_exceptions=True)
            grace = 0.0 if self._abort.is_set() else 5.0
            await asyncio.gather(*(slot.stop(grace) for slot in self.slots))
            await self.transport.close()
        log.info("worker %s stopped: %s", self.id, self.stats)

    async def _drain(self, leasing: asyncio.Task[None], running: list[asyncio.Task[None]]) -> None:
        log.info("worker %s draining: %d held", self.id, len(self.held))
        with contextlib.suppress(ServerError, ServerUnreachable):
            await self._heartbeat(draining=True)  # wakes our parked long poll
        with contextlib.suppress(Exception):
            await leasing
        unstarted = list(self.pending)
        self.pending.clear()
        if unstarted:
            with contextlib.suppress(ServerError, ServerUnreachable):
                await self.transport.call(
                    "POST",
                    protocol.RELEASE,
                    json_body={
                        "worker": self.id,
                        "items": [[i.job, i.task, i.attempt] for i in unstarted],
                    },
                )
                for item in unstarted:
                    self.held.pop(item.key, None)
                log.info("worker %s handed back %d unstarted task(s)", self.id, len(unstarted))
        finishing = asyncio.gather(*running)
        flushed = asyncio.create_task(self._wait_reported())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(finishing, flushed), self.config.drain_timeout)
        with contextlib.suppress(ServerError, ServerUnreachable):
            await self._heartbeat(exiting=True)

    async def _wait_reported(self) -> None:
        while self.held and not self._abort.is_set():
            self._room.clear()
            await self._room.wait()

    # ------------------------------------------------------------------ leasing

    async def _lease_loop(self) -> None:
        while not self._stopping.is_set():
            room = self.capacity - len(self.held)
            if room < max(1, self.capacity // 2):
                self._room.clear()
                await self._room.wait()
                continue
            response = await self.transport.call(
                "POST",
                protocol.LEASE,
                json_body={
                    "worker": self.id,
                    "max": min(room, protocol.LEASE_MAX_TASKS),
                    "wait": self.config.lease_wait,
                },
            )
            header, parts = response.frames()
            for (job, task, attempt, function), payload in zip(header["tasks"], parts, strict=True):
                item = WorkItem(job, task, attempt, function, bytes(payload))
                self.held[item.key] = item
                self.pending.append(item)
            if header["tasks"]:
                self._work.set()

    async def _function_bytes(self, sha: str) -> bytes:
        """A job's function, fetched once per worker and shared by its slots."""
        if sha in self._functions:
            return self._functions[sha]
        fetch = self._function_fetches.get(sha)
        if fetch is None:
            fetch = asyncio.create_task(self._fetch_function(sha))
            self._function_fetches[sha] = fetch
        try:
            return await fetch
        finally:
            self._function_fetches.pop(sha, None)

    async def _fetch_function(self, sha: str) -> bytes:
        data = (await self.transport.call("GET", protocol.BLOB.format(sha=sha))).body
        if protocol.blob_name(data) != sha:
            raise ServerError(502, "bad_blob", f"blob {sha} arrived corrupted")
        self._functions[sha] = data
        self.stats["functions_fetched"] += 1
        return data

    # ------------------------------------------------------------------ running

    def _take_batch(self) -> list[WorkItem]:
        while self.pending and self.pending[0].key in self._lost:
            self._forget(self.pending.popleft())
        n = 1
        if self._mean_runtime is not None and self._mean_runtime < SHORT_TASK:
            n = max(1, min(256, len(self.pending) // len(self.slots)))
        return [self.pending.popleft() for _ in range(min(n, len(self.pending)))]

    async def _slot_loop(self, slot: Slot) -> None:
        while True:
            while not self.pending and not self._stopping.is_set():
                self._work.clear()
                await self._work.wait()
            if self._stopping.is_set():
                return
            batch = self._take_batch()
            self._busy += 1
            try:
                leftover = await slot.run(batch, self._on_results)
            finally:
                self._busy -= 1
            if leftover:
                self.pending.extendleft(reversed(leftover))
                self._work.set()
            if slot.restarts:
                log.debug("slot %d restarted %d time(s)", slot.index, slot.restarts)

    def _forget(self, item: WorkItem) -> None:
        self.held.pop(item.key, None)
        self._lost.discard(item.key)
        self._room.set()

    def _fits(self, r: Result) -> Result:
        """A result too large for the server's request limit becomes the task's error,
        rather than a report refused again on every retry."""
        limit = self._max_request - FRAME_OVERHEAD
        if len(r.data) <= limit:
            return r
        error = {
            "type": "coffea_hq.errors.ResultTooLarge",
            "message": f"the task's result is {len(r.data)} bytes pickled and compressed, over "
            f"the server's request limit of {self._max_request} bytes "
            "(raise hq-server --max-request-size, or return less)",
            "traceback": "",
        }
        return Result(r.item, Outcome.ERROR, error, b"", r.seconds)

    def _on_results(self, results: list[Result]) -> None:
        wanted = []
        for r in results:
            if r.item.key in self._lost:
                self._forget(r.item)  # nobody wants this result any more
            else:
                wanted.append(r)
        results = [self._fits(r) for r in wanted]
        for r in results:
            self.stats["busy_seconds"] += r.seconds
            if r.outcome is Outcome.OK:
                self.stats["done"] += 1
            elif r.outcome is Outcome.ERROR:
                self.stats["failed"] += 1
            else:
                self.stats["crashed"] += 1
                log.warning(
                    "task %s/%s crashed: %s",
                    r.item.job,
                    r.item.task,
                    (r.error or {}).get("message"),
                )
            if r.outcome is not Outcome.CRASHED:
                m = self._mean_runtime
                self._mean_runtime = r.seconds if m is None else 0.9 * m + 0.1 * r.seconds
        self.outbox.extend(results)
        self._outbox_ready.set()

    # ------------------------------------------------------------------ reporting

    @property
    def _report_max_bytes(self) -> int:
        return min(REPORT_MAX_BYTES, self._max_request // 2)

    def _next_report(self) -> list[Result]:
        size, n = 0, 0
        for r in self.outbox:
            if n >= REPORT_MAX_ITEMS or (n and size + len(r.data) > self._report_max_bytes):
                break
            size += len(r.data)
            n += 1
        batch = self.outbox[:n]
        del self.outbox[:n]
        return batch

    async def _report_loop(self) -> None:
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            while self.outbox:
                batch = self._next_report()
                header = {
                    "worker": self.id,
                    "items": [
                        [r.item.job, r.item.task, r.item.attempt, r.outcome.value, r.error]
                        for r in batch
                    ],
                }
                body = protocol.pack(header, [r.data for r in batch])
                try:
                    response = await self.transport.call(
                        "POST",
                        protocol.COMPLETE,
                        body=body,
                        content_type=FRAMES_CONTENT_TYPE,
                        accept=(200, 409),
                    )
                    if response.status == 409:
                        log.warning("worker %s: %s", self.id, response.json().get("message"))
                except ServerError as e:
                    log.error("worker %s: report refused, results dropped: %s", self.id, e)
                for r in batch:
                    self.held.pop(r.item.key, None)
                self._room.set()

    # ------------------------------------------------------------------ heartbeats

    async def _heartbeat(self, *, draining: bool = False, exiting: bool = False) -> None:
        uptime = time.monotonic() - self._started
        stats = {
            **self.stats,
            "uptime": uptime,
            "busy_slots": self._busy,
            "held": len(self.held),
            "mean_runtime": self._mean_runtime,
            "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "restarts": sum(s.restarts for s in self.slots),
        }
        response = await self.transport.call(
            "POST",
            protocol.HEARTBEAT,
            json_body={
                "worker": self.id,
                "slots": len(self.slots),
                "host": socket.gethostname(),
                "leases": [[i.job, i.task, i.attempt] for i in self.held.values()],
                "stats": stats,
                "draining": draining or self._stopping.is_set(),
                "exiting": exiting,
            },
        )
        doc = response.json()
        self._heartbeat_every = float(doc.get("interval", self._heartbeat_every))
        self._max_request = int(doc.get("max_request_size", self._max_request))
        lost = {(job, task) for job, task, _ in doc.get("lost", [])}
        if lost:
            # Cancelled jobs or expired leases: do not start what is no longer ours, and
            # stop what is running (its result would be refused anyway).
            self._lost |= lost & self.held.keys()
            for item in [i for i in self.pending if i.key in lost]:
                self.pending.remove(item)
                self._forget(item)
            for slot in self.slots:
                if slot.running & lost:
                    log.info(
                        "worker %s: stopping slot %d, its task's lease is gone", self.id, slot.index
                    )
                    slot.kill()

    async def _heartbeat_loop(self) -> None:
        while True:
            await self._heartbeat()
            await asyncio.sleep(self._heartbeat_every)
