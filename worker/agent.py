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
import shutil
import signal
import socket
import tempfile
import time
import uuid
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field

import msgspec

from coffea_hq import messages as m
from coffea_hq import protocol, tls
from coffea_hq.api import API
from coffea_hq.protocol import Outcome
from coffea_hq.transport import ServerError, ServerUnreachable

from .environments import EnvironmentCache, FunctionUnavailable, Planner
from .kept import take_kept_inputs
from .leaseahead import LeaseAhead
from .slots import HeldTask, LeaseKey, Result, Slot, SlotLimits
from .zygote import Forker

log = logging.getLogger("coffea_hq.worker")

SECONDS_OF_WORK_PER_SLOT = 0.25  # how much work to hold per slot once runtimes are known
SHORT_TASK = 0.005  # tasks shorter than this go to a subprocess in batches
REPORT_MAX_ITEMS = 4096
REPORT_MAX_BYTES = 64 * 1024 * 1024
FRAME_OVERHEAD = 64 * 1024  # room for a report's header beside one result
DEFAULT_DRAIN_TIMEOUT = 600.0  # a drain always ends: Kubernetes and batch systems kill later
STALL_CATCH_UP = 0.1  # seconds after a stall before heartbeating again
DRAIN_CALL_MIN = 2.0  # seconds each request of a drain past its deadline may still retry
REPORT_GRACE = 10.0  # after a drain timeout: how long results already finished may take to send
# A drain whose server stays unreachable this long ends at once: nobody could take the
# results, and an orphan must not linger for the whole drain timeout.
DRAIN_UNREACHABLE = 5.0
# A lease lost before its slot began the task is looked for this often, this many times.
LOST_RECHECK_EVERY = 0.1
LOST_RECHECKS = 100
# A slot keeps serving its job's tasks while the oldest pending task of another job has
# waited less than this; then it switches (a new subprocess) to that job.
JOB_SWITCH_WAIT = 1.0
HEARTBEAT_MIN_GAP = 0.05  # seconds between a parked heartbeat answered early and the next
ENDED_JOBS_KEPT = 256  # jobs known to have ended (cancelled, failed, deleted): recent ones
# Report verdicts that mean the task's job is over here: it finished (cancelled or failed)
# or is gone altogether.
JOB_OVER = (protocol.CompleteStatus.JOB_FINISHED, protocol.CompleteStatus.UNKNOWN)


class LogBuffer(logging.Handler):
    """The worker's own log lines since the last heartbeat, which carries them to the
    server's ring buffer for ``client.worker_logs()`` (bounded: the oldest go first)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: deque[str] = deque(maxlen=protocol.HEARTBEAT_LOG_LINES)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # a bad record must not break the worker
            return
        self.lines.append(protocol.cut_text(text, protocol.TASK_NOTE_TEXT_MAX))

    def take(self) -> list[str]:
        lines = list(self.lines)
        self.lines.clear()
        return lines


_PLAIN_INFO_BYTES = 96  # the JSON of a TaskInfo holding only wall, CPU and RSS, at most


def _info_size(r: Result) -> int:
    """Bytes ``r``'s info adds to a report's header (encoded only when it holds text)."""
    info = r.info
    if info is None:
        return 0
    if not (info.output or info.warnings or info.logs):
        return _PLAIN_INFO_BYTES
    return len(msgspec.json.encode(info))


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds process ``pid`` has used (0 if unknown)."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # after the command's name
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    except (OSError, ValueError, IndexError):
        return 0.0


@dataclass
class _Sampler:
    """What a heartbeat's :class:`~coffea_hq.messages.WorkerSample` measures: the span
    since the previous one."""

    at: float = field(default_factory=time.monotonic)
    cpu: dict[int, float] = field(default_factory=dict)  # pid (0: the agent) -> CPU s then
    finished: Counter[str] = field(default_factory=Counter)  # job -> tasks since then

    def take(self, slots: list[Slot], busy: int) -> m.WorkerSample:
        now = time.monotonic()
        span = max(now - self.at, 1e-3)
        pids = [s.pid for s in slots]
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu = {0: usage.ru_utime + usage.ru_stime} | {p: _cpu_seconds(p) for p in pids if p}
        # A subprocess new since the last sample counts from its start.
        used = sum(c - self.cpu.get(p, 0.0) for p, c in cpu.items())
        jobs = dict(self.finished.most_common(1024))
        sample = m.WorkerSample(
            slots=len(slots),
            busy_slots=busy,
            tasks_per_second=sum(self.finished.values()) / span,
            cpu_percent=max(used, 0.0) / span * 100,
            slot_rss_bytes=[_rss_bytes(p) for p in pids],
            jobs=jobs,
        )
        self.at, self.cpu, self.finished = now, cpu, Counter()
        return sample


def _rss_bytes(pid: int | None) -> int:
    """Current resident set of process ``pid`` (0 if unknown)."""
    if pid is None:
        return 0
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return 0


@dataclass(frozen=True)
class WorkerConfig:
    url: str  # one server URL, or several replicas' comma-separated
    slots: int = 1
    name: str | None = None
    lease_wait: float = 10.0
    retry_for: float = 300.0
    drain_timeout: float | None = DEFAULT_DRAIN_TIMEOUT  # None: wait for running tasks
    token: str | None = None  # None: $HQ_TOKEN or $HQ_TOKEN_FILE
    users: tuple[str, ...] = ()  # take only these users' jobs (empty: anyone's)
    tls_ca: str | None = None  # PEM files; None: $HQ_TLS_CA, $HQ_TLS_CERT, $HQ_TLS_KEY
    tls_cert: str | None = None
    tls_key: str | None = None
    env_cache: str | None = None  # None: default_env_cache()
    env_cache_size: int | None = None  # bytes; None: unbounded
    task_memory: int = 0  # bytes of resident memory a task's subprocess may use (0: any)
    task_walltime: float = 0.0  # seconds a task may run (0: any)
    preload: tuple[str, ...] = ()  # modules the zygote imports besides the learned ones
    zygote: bool = True  # False: every slot subprocess a new interpreter


def default_env_cache() -> str:
    """Where environments are built by default: the batch system's scratch directory
    (HTCondor's $_CONDOR_SCRATCH_DIR) or the temporary directory, one per user, shared
    by the workers of a node."""
    scratch = os.environ.get("_CONDOR_SCRATCH_DIR") or tempfile.gettempdir()
    return os.path.join(scratch, f"coffea-hq-envs-{os.getuid()}")


def default_name() -> str:
    host = "".join(c if c.isalnum() or c in "-_." else "-" for c in socket.gethostname())[:30]
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Leases:
    """Every lease the worker holds, keyed as the server names a lease: (job, task, attempt).

    The only code that adds or removes one. A lease is *pending* from the lease reply
    until a slot takes it, then *running* until its result is queued for the report,
    and ends when the report is sent, when the server says it is lost, or when it is
    handed back. Two attempts of one task may both be held (a hung worker resumed):
    they are different leases and never stand in for each other.
    """

    def __init__(self) -> None:
        self._held: dict[LeaseKey, HeldTask] = {}
        self._pending: deque[HeldTask] = deque()
        self._running: set[LeaseKey] = set()
        self._lost: set[LeaseKey] = set()  # held, but the server says no longer ours
        self.work = asyncio.Event()  # set when there is something pending
        self.ended = asyncio.Event()  # set when a lease ends: room to lease more
        self.started = asyncio.Event()  # set when a slot takes leases to run

    def __len__(self) -> int:
        return len(self._held)

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return len(self._running)

    def refs(self, fresh_for: float = 0.0) -> list[m.LeaseRef]:
        """The leases to extend: held and not lost (the server said so once already).
        With ``fresh_for``, pending ones leased less than that many seconds ago are left
        out: their deadline is still far off (a heartbeat of a worker holding 4,096 short
        tasks otherwise lists all of them each time a job starts, the costliest request
        per task of a no-op workload). Running ones are always listed: a lost one must
        stop its slot."""
        if fresh_for > 0:
            recent = time.monotonic() - fresh_for
            return [
                i.ref
                for k, i in self._held.items()
                if k not in self._lost and (i.since <= recent or k in self._running)
            ]
        if not self._lost:
            return [i.ref for i in self._held.values()]
        return [i.ref for k, i in self._held.items() if k not in self._lost]

    def wake(self) -> None:
        """Wake whoever waits for work or room (the worker is stopping)."""
        self.work.set()
        self.ended.set()

    def add(self, items: list[HeldTask]) -> None:
        for item in items:
            self._held[item.key] = item
            self._pending.append(item)
        if items:
            self.work.set()

    def take(self, n: int, job: str | None = None) -> list[HeldTask]:
        """Up to ``n`` pending leases of one job, oldest first, now running.

        ``job`` (the one the calling slot's subprocess serves) is preferred while it has
        pending tasks and the oldest pending task has waited less than ``JOB_SWITCH_WAIT``:
        a slot switching jobs costs a new subprocess, but no job waits long behind another.
        """
        if not self._pending:
            return []
        head = self._pending[0]
        if job is None or head.job == job or time.monotonic() - head.since > JOB_SWITCH_WAIT:
            job = head.job
        batch: list[HeldTask] = []
        if head.job == job:  # the fast path: a run of one job's tasks at the front
            while self._pending and len(batch) < n and self._pending[0].job == job:
                batch.append(self._pending.popleft())
        else:
            rest: deque[HeldTask] = deque()
            for item in self._pending:
                if item.job == job and len(batch) < n:
                    batch.append(item)
                else:
                    rest.append(item)
            if not batch:  # the preferred job has nothing pending: take the oldest's
                return self.take(n, head.job)
            self._pending = rest
        self._running.update(item.key for item in batch)
        if batch:
            self.started.set()
        return batch

    def put_back(self, items: list[HeldTask]) -> None:
        """A batch's rest that never ran (its subprocess died): first in line again."""
        keep = []
        for item in items:
            self._running.discard(item.key)
            if item.key in self._held and item.key not in self._lost:
                keep.append(item)
            else:
                self.end(item)  # lost, or handed back meanwhile
        self._pending.extendleft(reversed(keep))
        if keep:
            self.work.set()

    def finished(self, item: HeldTask) -> bool:
        """The slot has a result for ``item``; whether it is still worth reporting."""
        self._running.discard(item.key)
        if item.key in self._held and item.key not in self._lost:
            return True
        self.end(item)  # lost or handed back: nobody wants this result any more
        return False

    def end(self, item: HeldTask) -> None:
        """Reported, dropped or handed back: the lease is no longer ours to extend."""
        self._held.pop(item.key, None)
        self._running.discard(item.key)
        self._lost.discard(item.key)
        self.ended.set()

    def lost(self, keys: set[LeaseKey]) -> set[LeaseKey]:
        """The server says these leases are gone: drop the pending ones and return the
        running ones (their slots should stop; their results would be refused)."""
        keys = keys & self._held.keys()
        if not keys:
            return set()
        gone = [i for i in self._pending if i.key in keys]
        if gone:  # one pass: a cancelled job may have thousands pending here
            self._pending = deque(i for i in self._pending if i.key not in keys)
            for item in gone:
                self.end(item)
        new = keys - self._lost  # the running ones lost before are being stopped already
        self._lost |= keys & self._held.keys()  # the pending ones have ended
        return new & self._running

    def end_job(self, job: str) -> set[LeaseKey]:
        """The job is over (cancelled, failed, deleted): drop its pending leases, mark the
        rest lost, and return its running ones (their slots should stop)."""
        return self.lost({key for key in self._held if key[0] == job})

    def hand_back_pending(self) -> list[HeldTask]:
        """End every pending lease; the caller gives them back to the server."""
        items = list(self._pending)
        self._pending.clear()
        for item in items:
            self.end(item)
        return items

    def hand_back_running(self) -> list[HeldTask]:
        """End every running lease (a drain out of time); the caller gives them back."""
        items = [self._held[k] for k in self._running if k in self._held]
        for item in items:
            self.end(item)
        return items

    def still_running(self, keys: set[LeaseKey]) -> set[LeaseKey]:
        """Those of ``keys`` a slot holds (taken, no result yet)."""
        return keys & self._running

    async def wait_empty(self) -> None:
        while self._held:
            self.ended.clear()
            await self.ended.wait()


class Worker:
    """One hq-worker process. ``await Worker(config).run()`` until SIGTERM or :meth:`stop`."""

    def __init__(self, config: WorkerConfig) -> None:
        if config.name is not None and not protocol.valid_id(config.name):
            raise ValueError("worker name: 1-64 letters, digits, '-', '_' or '.'")
        self.config = config
        self.id = config.name or default_name()
        context = (
            tls.client_context(config.tls_ca, config.tls_cert, config.tls_key)
            if "https://" in config.url
            else None
        )
        self.api = API(config.url, retry_for=config.retry_for, token=config.token, tls=context)
        self.env_cache = EnvironmentCache(
            config.env_cache or default_env_cache(), config.env_cache_size
        )
        self._planner = Planner(self.env_cache, self._function_bytes, self._blob_bytes, self.id)
        self._workdirs = os.path.join(self.env_cache.root, "work", self.id)
        limits = SlotLimits(config.task_memory, config.task_walltime)
        self.forker = Forker(config.preload) if config.zygote else None
        self.slots = [
            Slot(
                i, self._planner.plan, os.path.join(self._workdirs, f"slot{i}"), limits, self.forker
            )
            for i in range(config.slots)
        ]
        self.leases = Leases()
        # Finished tasks waiting to be reported: slots put, the report loop alone takes.
        self.outbox: asyncio.Queue[Result] = asyncio.Queue()
        self._functions: dict[str, bytes] = {}
        self._function_fetches: dict[str, asyncio.Task[bytes]] = {}
        self._mean_runtime: float | None = None
        self._ahead = LeaseAhead()  # leases a busy slot's next task before it finishes
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
        self._slot_grace = 5.0  # how long a stopping slot may finish its task
        self._busy = 0
        self._goodbye = asyncio.Event()  # set once everything held was handed back
        self._lost_watch: asyncio.Task[None] | None = None
        self.error: BaseException | None = None  # what made the worker give up, if anything
        self._ended: OrderedDict[str, None] = OrderedDict()  # jobs known to be over
        self._log_buffer = LogBuffer()
        # Peak RSS (bytes) of the last task each slot's subprocess ran.
        self._slot_task_rss = [0] * len(self.slots)
        self._sampler = _Sampler()

    # ------------------------------------------------------------------ control

    def stop(self) -> None:
        """Drain: stop leasing, hand back unstarted tasks, finish running ones, exit.
        A second call aborts at once (held tasks return to the queue when leases expire)."""
        if self._stopping.is_set():
            log.warning("second stop request: aborting without draining")
            self._abort.set()
        self._stopping.set()
        self.leases.wake()

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
        logging.getLogger("coffea_hq").addHandler(self._log_buffer)
        if self.forker is not None:
            self.forker.start()  # in the background: the first subprocesses are spawned
        await asyncio.gather(*(slot.start() for slot in self.slots))
        log.info("worker %s: %d slot(s), server %s", self.id, len(self.slots), self.config.url)
        background = [
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self._report_loop(), name="report"),
        ]
        presence = asyncio.create_task(self._presence_loop(), name="presence")
        leasing = asyncio.create_task(self._lease_loop(), name="lease")
        running = [
            asyncio.create_task(self._slot_loop(s), name=f"slot{s.index}") for s in self.slots
        ]
        watched = [leasing, *running, *background]
        try:
            done, _ = await asyncio.wait(
                [*watched, asyncio.create_task(self._stopping.wait())],
                return_when=asyncio.FIRST_COMPLETED,
            )
            for task in done:
                if task in watched and task.exception():
                    self.error = task.exception()
                    log.error("worker %s giving up: %s", self.id, self.error)
                    self._abort.set()
                    self.stop()
            if not self._abort.is_set():
                # A second SIGTERM (abort) cuts the drain short.
                drain = asyncio.create_task(self._drain(leasing, running))
                abort = asyncio.create_task(self._abort.wait())
                watch = asyncio.create_task(self._watch_server_while_draining())
                await asyncio.wait([drain, abort], return_when=asyncio.FIRST_COMPLETED)
                for task in (drain, abort, watch):
                    task.cancel()
                await asyncio.gather(drain, abort, watch, return_exceptions=True)
        finally:
            for task in watched:
                task.cancel()
            await asyncio.gather(*watched, return_exceptions=True)
            grace = 0.0 if self._abort.is_set() else self._slot_grace
            await asyncio.gather(*(slot.stop(grace) for slot in self.slots))
            if self.forker is not None:
                await self.forker.close()
            if self._lost_watch is not None:
                self._lost_watch.cancel()
            await self._end_presence(presence)
            await self.api.close()
            self.env_cache.close()
            shutil.rmtree(self._workdirs, ignore_errors=True)
            logging.getLogger("coffea_hq").removeHandler(self._log_buffer)
        log.info("worker %s stopped: %s", self.id, self.stats)

    async def _presence_loop(self) -> None:
        """Hold a presence connection to the server for the worker's life, a fresh
        session per connection: if this process dies, the server sees the connection
        drop and requeues what it held within seconds, not at the lease timeout."""
        delay = 0.1
        while not self._goodbye.is_set():
            hello = m.Presence(worker=self.id, session=uuid.uuid4().hex)
            started = time.monotonic()
            try:
                await self.api.presence(hello, self._goodbye)
            except asyncio.CancelledError:
                raise
            except ServerError as e:
                if e.status in (404, 405):  # an older server: the lease timeout alone
                    log.info("worker %s: the server has no presence route", self.id)
                    return
                log.debug("worker %s: presence refused: %s", self.id, e)
            except Exception as e:  # the server restarts or is cut off: reconnect
                log.debug("worker %s: presence connection ended: %r", self.id, e)
            if time.monotonic() - started > 10:
                delay = 0.1
            await asyncio.sleep(delay)
            delay = min(2 * delay, 1.0)  # well inside the server's grace while it answers

    async def _end_presence(self, presence: asyncio.Task[None]) -> None:
        """Say goodbye, unless aborting: an aborted worker still holds leases, which its
        silence lets the server requeue at once."""
        if self._abort.is_set():
            presence.cancel()
        else:
            self._goodbye.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(presence, return_exceptions=True), 2.0)

    async def _watch_server_while_draining(self) -> None:
        """Abort the drain once the server has not answered for ``DRAIN_UNREACHABLE``
        seconds (it is gone: the leases expire there, or a new server requeues them)."""
        while True:
            try:
                async with asyncio.timeout(2 * DRAIN_UNREACHABLE):  # a hung server too
                    await self.api.health(retry_for=DRAIN_UNREACHABLE, warn=False)
            except (ServerUnreachable, TimeoutError) as e:
                log.warning(
                    "worker %s: server unreachable for %.0f s while draining (%s): exiting "
                    "now; the tasks it held return to the queue when their leases expire",
                    self.id,
                    DRAIN_UNREACHABLE,
                    getattr(e, "reason", "") or "no answer",
                )
                self._abort.set()
                return
            except ServerError:
                pass  # it answers: the drain goes on
            await asyncio.sleep(1.0)

    async def _drain(self, leasing: asyncio.Task[None], running: list[asyncio.Task[None]]) -> None:
        """Hand back everything not started, let running tasks finish and report, within
        the drain timeout; then hand back whatever still runs. Always ends, and in about
        the drain timeout even when the server is unreachable: every request made here
        retries only as long as the drain has left (at least ``DRAIN_CALL_MIN``)."""
        loop = asyncio.get_running_loop()
        timeout = self.config.drain_timeout
        deadline = None if timeout is None else loop.time() + timeout

        def budget() -> float | None:
            if deadline is None:
                return None  # no limit: the API's own retry budget
            return max(DRAIN_CALL_MIN, deadline - loop.time())

        log.info("worker %s draining: %d held", self.id, len(self.leases))
        with contextlib.suppress(ServerError, ServerUnreachable):
            await self._heartbeat(draining=True, retry_for=budget())  # ends our parked poll
        # A lease request still in flight: let it land, but not past the budget (cancelled,
        # its connection closes and the server hands back what it could not deliver).
        with contextlib.suppress(Exception):
            await asyncio.wait_for(leasing, budget())
        await self._hand_back(self.leases.hand_back_pending(), "unstarted", budget())
        # Slot loops return after their batch, handing back the rest of a crashed one.
        settled = asyncio.gather(*running, self.leases.wait_empty(), return_exceptions=True)
        try:
            left = None if deadline is None else max(0.0, deadline - loop.time())
            done, _ = await asyncio.wait([settled], timeout=left)
            if not done:
                log.warning(
                    "worker %s: drain timeout (%ss) reached, handing back running tasks",
                    self.id,
                    timeout,
                )
                self._slot_grace = 0.0
                await self._hand_back(self.leases.hand_back_running(), "running", DRAIN_CALL_MIN)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.leases.wait_empty(), REPORT_GRACE)
        finally:
            settled.cancel()
        with contextlib.suppress(ServerError, ServerUnreachable):
            await self._heartbeat(exiting=True, retry_for=budget())

    async def _hand_back(
        self, items: list[HeldTask], what: str, retry_for: float | None = None
    ) -> None:
        """Return leases to the queue without counting an attempt (they end here either
        way: if the server cannot be told, they expire)."""
        if not items:
            return
        try:
            await self.api.release(
                m.Release(worker=self.id, items=[i.ref for i in items]), retry_for=retry_for
            )
        except (ServerError, ServerUnreachable) as e:
            log.warning("worker %s: could not hand back %d task(s): %s", self.id, len(items), e)
        else:
            log.info("worker %s handed back %d %s task(s)", self.id, len(items), what)

    # ------------------------------------------------------------------ leasing

    async def _lease_loop(self) -> None:
        while not self._stopping.is_set():
            room = self.capacity - len(self.leases)
            if room < max(1, self.capacity // 2):
                room, due_in = self._ahead.due(self._mean_runtime, self.leases.pending)
                if room <= 0:
                    self.leases.ended.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(due_in):
                            await self.leases.ended.wait()
                    continue
            asked = time.monotonic()
            reply, parts = await self.api.lease(
                m.LeaseRequest(
                    worker=self.id,
                    max=min(room, protocol.LEASE_MAX_TASKS),
                    wait=self.config.lease_wait,
                    users=list(self.config.users),
                )
            )
            if reply.tasks:
                self._ahead.observe(time.monotonic() - asked)
            self.leases.add(
                [
                    HeldTask(t.job, t.task, t.attempt, t.function, bytes(payload))
                    for t, payload in zip(reply.tasks, parts, strict=True)
                ]
            )

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
        try:
            data = await self.api.get_blob(sha)
        except ServerError as e:
            raise FunctionUnavailable(self._unavailable(sha, e.message)) from e
        if protocol.blob_name(data) != sha:
            raise FunctionUnavailable(
                self._unavailable(sha, "its bytes arrived corrupted (they do not match its hash)")
            )
        self._functions[sha] = data
        self.stats["functions_fetched"] += 1
        return data

    async def _blob_bytes(self, sha: str) -> bytes:
        """A blob an environment or a job's files need, fetched each time it is asked for
        (the environment cache keeps what it makes of it)."""
        try:
            data = await self.api.get_blob(sha)
        except ServerError as e:
            raise FunctionUnavailable(f"blob {sha} could not be fetched: {e.message}") from e
        if protocol.blob_name(data) != sha:
            raise FunctionUnavailable(f"blob {sha} arrived corrupted (its hash differs)")
        return data

    @staticmethod
    def _unavailable(sha: str, why: str) -> str:
        return (
            f"the job's function (blob {sha}) could not be fetched from the server: {why} "
            "(expired? re-submit the job)"
        )

    # ------------------------------------------------------------------ running

    def _batch_size(self) -> int:
        if self._mean_runtime is not None and self._mean_runtime < SHORT_TASK:
            return max(1, min(256, self.leases.pending // len(self.slots)))
        return 1

    async def _slot_loop(self, slot: Slot) -> None:
        while True:
            while not self.leases.pending and not self._stopping.is_set():
                self.leases.work.clear()
                await self.leases.work.wait()
            if self._stopping.is_set():
                return
            batch = self.leases.take(self._batch_size(), slot.job)
            batch, missing = await take_kept_inputs(self.api, batch)
            if missing:
                self._on_results(missing)
            if not batch:
                continue
            self._busy += 1
            self._ahead.started(slot.index)
            self.leases.ended.set()  # the lease loop times this slot's next lease
            try:
                leftover = await slot.run(
                    batch, lambda results: self._on_results(results, slot.index)
                )
            finally:
                self._busy -= 1
                self._ahead.stopped(slot.index)
            self.leases.put_back(leftover)
            if self._stopping.is_set():
                # The drain already handed back what was pending; a crash since then
                # brought back more.
                await self._hand_back(self.leases.hand_back_pending(), "unstarted")
            if slot.restarts:
                log.debug("slot %d restarted %d time(s)", slot.index, slot.restarts)

    def _fits(self, r: Result) -> Result:
        """A result too large for the server's request limit becomes the task's error,
        rather than a report refused again on every retry."""
        limit = self._max_request - FRAME_OVERHEAD
        if len(r.data) <= limit:
            return r
        error = {
            "type": "coffea_hq.errors.ResultTooLarge",
            "message": f"the task's result is {len(r.data)} bytes pickled and compressed, over "
            f"the server's request limit for one result: {max(limit, 0)} bytes (hq-server "
            f"--max-request-size {self._max_request} less {FRAME_OVERHEAD} for the report "
            "around it); raise --max-request-size, or return less",
            "traceback": "",
        }
        return Result(r.item, Outcome.ERROR, error, b"", r.seconds, r.info)

    def _on_results(self, results: list[Result], slot: int | None = None) -> None:
        for r in results:
            if slot is not None and r.info is not None:
                self._slot_task_rss[slot] = r.info.max_rss
            if not self.leases.finished(r.item):
                continue
            if r.error is not None:
                r.error = protocol.cut_error(r.error)  # one huge error must not sink a report
            r = self._fits(r)
            self.stats["busy_seconds"] += r.seconds
            self._sampler.finished[r.item.job] += 1
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
            self.outbox.put_nowait(r)

    # ------------------------------------------------------------------ reporting

    @property
    def _report_max_bytes(self) -> int:
        return min(REPORT_MAX_BYTES, self._max_request // 2)

    async def _report_loop(self) -> None:
        carried: Result | None = None  # taken from the outbox but over the last report's size
        while True:
            first = carried or await self.outbox.get()
            carried = None
            batch, size = [first], len(first.data) + _info_size(first)
            while len(batch) < REPORT_MAX_ITEMS and not self.outbox.empty():
                r = self.outbox.get_nowait()
                more = len(r.data) + _info_size(r)
                if size + more > self._report_max_bytes:
                    carried = r
                    break
                batch.append(r)
                size += more
            await self._report(batch)

    async def _report(self, batch: list[Result]) -> None:
        late = [r for r in batch if r.item.job in self._ended]
        if late:  # finished before we heard their job ended: nobody wants them
            for r in late:
                self.leases.end(r.item)
            batch = [r for r in batch if r.item.job not in self._ended]
            if not batch:
                return
        header = m.Complete(
            worker=self.id,
            items=[
                [r.item.job, r.item.task, r.item.attempt, r.outcome.value, r.error, r.info]
                for r in batch
            ],
        )
        try:
            reply = await self.api.complete(header, [r.data for r in batch])
        except ServerError as e:
            log.error("worker %s: report refused, results dropped: %s", self.id, e)
        else:
            over = self._jobs_over(batch, reply.items)
            unexplained = [
                s
                for r, s in zip(batch, reply.items, strict=False)
                if s.refused and r.item.job not in over
            ]
            if reply.error is not None and (unexplained or reply.error != "not_leased"):
                # Some items refused (HTTP 409) for another reason than their job's end.
                log.warning("worker %s: %s", self.id, reply.message)
        for r in batch:
            self.leases.end(r.item)

    def _jobs_over(self, batch: list[Result], statuses: list[protocol.CompleteStatus]) -> set[str]:
        """Jobs the server says are over (cancelled, failed, deleted): stop their work here."""
        over = {r.item.job for r, s in zip(batch, statuses, strict=False) if s in JOB_OVER}
        for job in over:
            self._end_job(job)
        return over

    def _end_job(self, job: str) -> None:
        """Drop the job's queued tasks and kill the slots running its tasks, logging it once."""
        self._ended[job] = None
        while len(self._ended) > ENDED_JOBS_KEPT:
            self._ended.popitem(last=False)
        before = self.leases.pending
        running = self.leases.end_job(job)
        dropped = before - self.leases.pending
        stopped = sum(slot.executing() in running for slot in self.slots)
        # As for lost leases: a task a slot has taken but not begun (its subprocess still
        # loading the function) is looked for again shortly, else it would run to the end.
        self._stop_lost(running, say=False)
        if dropped or stopped:
            log.info(
                "worker %s: job %s is over (cancelled, failed or deleted): dropped %d queued "
                "task(s) and the results of finished ones, stopped %d running",
                self.id,
                job,
                dropped,
                stopped,
            )

    # ------------------------------------------------------------------ heartbeats

    async def _heartbeat(
        self,
        *,
        draining: bool = False,
        exiting: bool = False,
        retry_for: float | None = None,
        wait: float = 0.0,
        fresh_for: float = 0.0,
    ) -> int:
        """One heartbeat (held by the server up to ``wait`` seconds, see the loop); returns
        how many of our leases the server says are lost. ``fresh_for``: see
        :meth:`Leases.refs` (the loop's regular beats; a catch-up or a goodbye lists all)."""
        uptime = time.monotonic() - self._started
        stats = {
            **self.stats,
            "uptime": uptime,
            "busy_slots": self._busy,
            "held": len(self.leases),
            "mean_runtime": self._mean_runtime,
            # The agent's own peak; the tasks' memory is the slots' (their subprocesses).
            "agent_max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "slot_rss_bytes": [_rss_bytes(s.pid) for s in self.slots],
            "slot_task_max_rss_bytes": list(self._slot_task_rss),
            "restarts": sum(s.restarts for s in self.slots),
            "job_switches": sum(s.switches for s in self.slots),
            **(self.forker.stats() if self.forker is not None else {}),
        }
        reply = await self.api.heartbeat(
            m.Heartbeat(
                worker=self.id,
                slots=len(self.slots),
                host=socket.gethostname()[:256],
                leases=self.leases.refs(fresh_for),
                stats=stats,
                draining=draining or self._stopping.is_set(),
                exiting=exiting,
                logs=self._log_buffer.take(),
                wait=wait,
                sample=self._sampler.take(self.slots, self._busy),
            ),
            retry_for=retry_for,
        )
        self._heartbeat_every = reply.interval
        self._max_request = reply.max_request_size
        for job in reply.ended:  # its queued and running tasks here go, logged once
            self._end_job(job)
        lost = {(r.job, r.task, r.attempt) for r in reply.lost if r.job not in reply.ended}
        # Cancelled jobs or expired leases: do not start what is no longer ours, and stop
        # what is running (its result would be refused anyway). Only that very attempt:
        # the same task may be running here again under a newer one.
        running = self.leases.lost(lost)
        if running:
            self._stop_lost(running)
        return len(reply.lost)

    def _stop_lost(self, running: set[LeaseKey], say: bool = True) -> set[LeaseKey]:
        """Kill the slots running these lost leases (logging each if ``say``); the ones no
        slot has begun yet (its subprocess still loading the function) are looked for
        again shortly."""
        for slot in self.slots:
            key = slot.executing()
            if key in running:
                if say:
                    log.info(
                        "worker %s: stopping slot %d, its task's lease is gone",
                        self.id,
                        slot.index,
                    )
                slot.kill()
                running = running - {key}
        left = self.leases.still_running(running)
        if left and self._lost_watch is None:
            self._lost_watch = asyncio.create_task(self._stop_lost_later(left))
        return left

    async def _stop_lost_later(self, running: set[LeaseKey]) -> None:
        try:
            for _ in range(LOST_RECHECKS):
                await asyncio.sleep(LOST_RECHECK_EVERY)
                running = self._stop_lost(running)
                if not running:
                    return
        finally:
            self._lost_watch = None

    async def _heartbeat_loop(self) -> None:
        while True:
            asked = self._heartbeat_every
            started = time.monotonic()
            if self.leases.running and not self._stopping.is_set():
                # Held by the server until the interval passes, or answered at once when
                # a job ends and takes one of our leases with it: its tasks stop now, not
                # an interval later.
                # A lease younger than half an interval has over 2.5 intervals to its
                # deadline: the next beat (an interval away) lists it.
                if await self._heartbeat(wait=asked, fresh_for=asked / 2):
                    await asyncio.sleep(HEARTBEAT_MIN_GAP)
                    continue
                await asyncio.sleep(max(0.0, asked - (time.monotonic() - started)))
            else:
                await self._heartbeat(fresh_for=asked / 2)
                asked = self._heartbeat_every  # the server's reply sets it
                # Until the interval passes, or a task starts: then beat held at once.
                self.leases.started.clear()
                if not self.leases.running:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.leases.started.wait(), asked)
            if time.monotonic() - started > 2 * asked:
                # The process was stopped or starved. A lease reply that waited meanwhile
                # may hold leases close to their deadline: once it is taken in (a moment
                # after this heartbeat), extend them too rather than a full interval later.
                await self._heartbeat()
                await asyncio.sleep(STALL_CATCH_UP)
