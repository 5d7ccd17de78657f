"""One slot = one task subprocess, serving one job: restarted when it dies, replaced by a
fresh one before it serves another job (nothing a task changes in its interpreter reaches
another job's tasks)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from coffea_hq import protocol
from coffea_hq.errors import EnvironmentFailed
from coffea_hq.lifeline import tie_to_parent
from coffea_hq.messages import LeaseRef, TaskInfo, TaskLog, TaskWarning
from coffea_hq.protocol import Outcome, is_merge

from . import pipe
from .environments import DEFAULT_LAUNCH, FunctionUnavailable, Launch, Plan
from .pipe import LIMITS, MARKER, MARKER_SIZE
from .zygote import ForkedProcess, Forker

FOREIGN_RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "foreign.py")

LeaseKey = tuple[str, str, int]  # (job, task, attempt): how the server names one lease
Proc = asyncio.subprocess.Process | ForkedProcess  # spawned, or forked by the zygote


FUNCTION_UNAVAILABLE = "coffea_hq.errors.FunctionUnavailable"
ENVIRONMENT_FAILED = "coffea_hq.errors.EnvironmentFailed"
# How often a slot looks at its running task's memory and wall time, when a limit is set.
LIMITS_WATCH_EVERY = 0.05
MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class SlotLimits:
    """The worker's own per-task limits (0: none): bytes of resident memory, seconds of
    wall time. A task's own (tighter) limits, from HQExecutor, apply too."""

    memory: int = 0
    walltime: float = 0.0


def rss_bytes(pid: int | None) -> int:
    """Current resident set of process ``pid`` (0 if unknown)."""
    if pid is None:
        return 0
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


_PRIVATE = (b"Private_Clean:", b"Private_Dirty:", b"Private_Hugetlb:")


def private_bytes(pid: int | None) -> int:
    """Resident memory of process ``pid`` that no other process shares (its unique set
    size, from /proc/PID/smaps_rollup): what the task holds itself. A slot subprocess
    forked from the zygote shares the preloaded modules' pages with it and its siblings;
    its RSS counts them in full and its PSS by a share that changes as siblings come and
    go, so neither says what this task costs. Falls back to the RSS where the kernel has
    no smaps_rollup (before 4.14)."""
    if pid is None:
        return 0
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return rss_bytes(pid) if os.path.exists(f"/proc/{pid}") else 0
    except OSError:
        return 0
    kb = 0
    for line in lines:
        if line.startswith(_PRIVATE):
            with contextlib.suppress(ValueError, IndexError):
                kb += int(line.split()[1])
    return kb * 1024


def _tighter(a: float, b: float) -> float:
    return min(x for x in (a, b) if x) if a or b else 0


@dataclass(slots=True)
class HeldTask:
    """A leased task inside the worker (not coffea's ``WorkItem``, a chunk of a file)."""

    job: str
    task: str
    attempt: int
    function_blob: str  # the sha of the job's pickled function, a blob on the server
    payload: bytes
    since: float = field(default_factory=time.monotonic)  # when the worker leased it
    # (job, task, attempt): looked up several times per task, so built once
    key: LeaseKey = field(init=False, repr=False, compare=False)
    # A merge task: its function is the job's reducer, its payload the inputs' results.
    merge: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.key = (self.job, self.task, self.attempt)
        self.merge = is_merge(self.task)

    @property
    def ref(self) -> LeaseRef:
        return LeaseRef(self.job, self.task, self.attempt)


@dataclass(slots=True)
class Result:
    item: HeldTask
    outcome: Outcome
    error: dict[str, Any] | None
    data: bytes
    seconds: float
    info: TaskInfo | None = None  # warnings, logs, output and resources of the task


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "the task subprocess vanished"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        return f"the task subprocess was killed by {name}{hint}"
    return f"the task subprocess exited with code {returncode} (os._exit or a fatal error)"


class Slot:
    """Runs batches of one job's tasks in its subprocess; reports a crash as the crashed
    task's result. ``job`` is the job the subprocess serves (None: a fresh one)."""

    def __init__(
        self,
        index: int,
        plan: Callable[[str], Awaitable[Plan]],
        workdir: str | None = None,
        limits: SlotLimits | None = None,
        forker: Forker | None = None,
    ) -> None:
        self.index = index
        # The worker's zygote, which forks warm subprocesses for its own environment.
        self._forker = forker
        self._plan = plan
        self.limits = limits or SlotLimits()
        # (sequence number, error type, message) of the task the limit watch killed
        self._exceeded: tuple[int, str, str] | None = None
        # Where the subprocess of a job that ships files runs (made afresh for each).
        self._workdir = workdir
        self.launch = DEFAULT_LAUNCH  # how the current subprocess was started
        self._notes: list[TaskWarning] = []  # for the first result of the subprocess
        self._proc: Proc | None = None
        self._loaded: set[str] = set()  # function blobs (shas) the subprocess holds
        self._seq = 0
        self._marker = -1  # fd of the file the subprocess writes its current task into
        self.restarts = 0
        self._unreported: dict[int, HeldTask] = {}  # by sequence number: the batch in hand
        self.job: str | None = None
        self._spare: asyncio.Task[tuple[Proc, int]] | None = None
        self._exiting: set[asyncio.Task[None]] = set()  # replaced subprocesses being reaped
        self.switches = 0  # subprocesses replaced because the next batch was another job's

    async def start(self, launch: Launch = DEFAULT_LAUNCH) -> None:
        self._close_marker()
        self._proc, self._marker = await self._spawn(launch)
        self.launch = launch
        self._loaded = set()
        self.job = None

    def _prepare_workdir(self, launch: Launch) -> str | None:
        """A fresh working directory holding the launch's files (links into the cache)."""
        if not launch.files or self._workdir is None:
            return None
        shutil.rmtree(self._workdir, ignore_errors=True)
        os.makedirs(self._workdir)
        for name, path in launch.files:
            os.symlink(path, os.path.join(self._workdir, name))
        return self._workdir

    async def _spawn(self, launch: Launch = DEFAULT_LAUNCH) -> tuple[Proc, int]:
        """A fresh task subprocess and the fd of its marker file: forked by the zygote
        for the worker's own environment when it has one ready, else started afresh."""
        # Unlinked at once, shared by file descriptor: nothing is left in the temp
        # directory, however this worker ends.
        fd, path = tempfile.mkstemp(prefix=f"hq-slot{self.index}-")
        os.unlink(path)
        os.write(fd, bytes(MARKER_SIZE))
        env = None
        if launch.interpreter is None and self._forker is not None and self._forker.ready:
            try:
                forked = await self._forker.fork(fd, self._prepare_workdir(launch))
            except BaseException:
                os.close(fd)
                raise
            if forked is not None:
                return forked, fd
        if launch.interpreter is None:
            argv = [sys.executable, "-m", "coffea_hq.worker.child", str(fd)]
        else:
            # -I: none of the worker's packages (nor PYTHONPATH) on the task's sys.path.
            argv = [launch.interpreter, "-I", FOREIGN_RUNNER, str(fd), launch.label]
            argv.append(str(protocol.TASK_LOG_LEVEL))
            env = dict(os.environ)
            env.pop("VIRTUAL_ENV", None)
            bindir = os.path.dirname(launch.interpreter)
            env["PATH"] = os.pathsep.join([bindir, env.get("PATH", "")])
        try:
            cwd = self._prepare_workdir(launch)
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                pass_fds=(fd,),
                cwd=cwd,
                env=env,
                preexec_fn=tie_to_parent(),  # a SIGKILLed worker leaves no task running
            )
        except BaseException:
            os.close(fd)
            raise
        return proc, fd

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _marker_seq(self) -> int:
        """The sequence number of the task the subprocess runs (or last ran, if it died)."""
        return int(MARKER.unpack(os.pread(self._marker, MARKER.size, 0))[0])

    def executing(self) -> LeaseKey | None:
        """The lease whose task the subprocess is running at this moment, if any. Not the
        whole batch: a lease lost further down the batch must not cost the one running."""
        item = self._unreported.get(self._marker_seq()) if self._unreported else None
        return item.key if item else None

    async def run(
        self, batch: list[HeldTask], report: Callable[[list[Result]], None]
    ) -> list[HeldTask]:
        """Run ``batch``, calling ``report`` as results arrive. Returns the items that never
        ran because the subprocess died under an earlier one (run them again elsewhere)."""
        if not batch:
            return []
        job = batch[0].job
        assert all(item.job == job for item in batch), "a batch holds one job's tasks"
        plans: dict[str, Plan] = {}
        for sha in {item.function_blob for item in batch}:
            error = None
            try:
                plans[sha] = await self._plan(sha)
            except FunctionUnavailable as e:
                error = {"type": FUNCTION_UNAVAILABLE, "message": str(e), "traceback": ""}
            except EnvironmentFailed as e:  # never a fallback to the worker's environment
                error = {"type": ENVIRONMENT_FAILED, "message": str(e), "traceback": ""}
            if error is not None:
                # Fail this function's tasks now: a slot that died here would leave them
                # held and heartbeated for ever.
                failed = [i for i in batch if i.function_blob == sha]
                report([Result(i, Outcome.ERROR, error, b"", 0.0) for i in failed])
                batch = [i for i in batch if i.function_blob != sha]
        if not batch:
            return []
        launch = plans[batch[0].function_blob].launch
        # One launch per subprocess (a job's function and reducer share theirs).
        later = [i for i in batch if plans[i.function_blob].launch != launch]
        batch = [i for i in batch if plans[i.function_blob].launch == launch]
        if (
            (self.job is not None and self.job != job)
            or launch != self.launch
            or (self.job is None and self._stale(self._proc))
        ):
            try:
                await self._replace(launch)
            except OSError as e:  # an interpreter gone since it was checked, a full disk
                why = EnvironmentFailed("start interpreter", str(e), launch.label)
                error = {"type": ENVIRONMENT_FAILED, "message": str(why), "traceback": ""}
                report([Result(i, Outcome.ERROR, error, b"", 0.0) for i in batch])
                return later
        if self.job != job:
            self._notes = [n for sha in {i.function_blob for i in batch} for n in plans[sha].notes]
        self.job = job
        assert self._proc is not None and self._proc.stdin and self._proc.stdout
        functions = {
            sha: plans[sha].data for sha in {i.function_blob for i in batch} - self._loaded
        }
        foreign = self.launch.foreign
        by_seq = self._unreported = {}
        order = []
        for item in batch:
            self._seq += 1
            by_seq[self._seq] = item
            payload: object = item.payload
            if foreign:  # the foreign runner has no lz4: it gets plain pickles
                payload = (
                    [protocol.decompress(p) for p in protocol.split_merge_payload(item.payload)]
                    if item.merge
                    else protocol.decompress(item.payload)
                )
            order.append((self._seq, item.function_blob, payload, item.merge))
        watch = asyncio.create_task(self._watch_limits(), name=f"slot{self.index}-limits")
        try:
            for sha, data in functions.items():
                self._proc.stdin.write(pipe.encode(("function", sha, data)))
                self._loaded.add(sha)
            if order:
                self._proc.stdin.write(pipe.encode(("run", order)))
            await self._proc.stdin.drain()
            while by_seq:
                head = await self._proc.stdout.readexactly(pipe.HEADER.size)
                (size,) = pipe.HEADER.unpack(head)
                kind, done = pipe.decode(await self._proc.stdout.readexactly(size))
                if kind == "modules":
                    if self._forker is not None:
                        self._forker.learn(done, job)
                    continue
                results = []
                for seq, outcome, error, data, seconds, info in done:
                    item = by_seq.pop(seq)
                    if foreign:
                        data, info = _from_foreign(outcome, data, info)
                    if self._notes:
                        info = _with_notes(info, self._notes)
                        self._notes = []
                    results.append(Result(item, Outcome(outcome), error, data, seconds, info))
                report(results)
        except (asyncio.IncompleteReadError, ConnectionError, BrokenPipeError):
            watch.cancel()
            return await self._after_crash(by_seq, report) + later
        finally:
            watch.cancel()
            self._unreported = {}
        return later

    async def _watch_limits(self) -> None:
        """Kill the subprocess when the task it runs goes over its memory (private resident
        memory, :func:`private_bytes`) or wall-time limit, noting which task and why for
        :meth:`_after_crash`. Memory is read from /proc, not enforced with RLIMIT_AS:
        numpy and uproot map far more address space than they touch."""
        seq, started = 0, time.monotonic()
        while True:
            await asyncio.sleep(LIMITS_WATCH_EVERY)
            proc = self._proc
            if proc is None or proc.returncode is not None or self._marker < 0:
                continue
            now, running = time.monotonic(), self._marker_seq()
            if running != seq:
                seq, started = running, now
            if not running or running not in self._unreported:
                continue
            task_memory, task_walltime = LIMITS.unpack(
                os.pread(self._marker, LIMITS.size, MARKER.size)
            )
            memory = int(_tighter(self.limits.memory, task_memory))
            walltime = _tighter(self.limits.walltime, task_walltime)
            exceeded = None
            if memory and (held := private_bytes(proc.pid)) > memory:
                exceeded = (
                    protocol.MEMORY_EXCEEDED_TYPE,
                    f"the task's subprocess held {held / MiB:,.0f} MiB, over its memory limit "
                    f"of {memory / MiB:,.0f} MiB (private resident memory), and was stopped",
                )
            elif walltime and now - started > walltime:
                exceeded = (
                    protocol.WALLTIME_EXCEEDED_TYPE,
                    f"the task ran for over {walltime:g} s, its wall-time limit, and was stopped",
                )
            if exceeded is not None:
                self._exceeded = (running, *exceeded)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                return

    async def _replace(self, launch: Launch = DEFAULT_LAUNCH) -> None:
        """A fresh subprocess for the next job. A slot that has switched once keeps a
        spare one (of the worker's own interpreter) started ahead, so later switches do
        not wait for an interpreter to start; the old one exits on its own (its stdin
        closed). A job with its own environment or files gets one started for it.
        Raises OSError, changing nothing, if the subprocess cannot be started."""
        old, marker = self._proc, self._marker
        fresh = None
        if launch == DEFAULT_LAUNCH:
            spare, self._spare = self._spare, None
            if spare is not None:
                with contextlib.suppress(Exception):
                    fresh = await spare
        if fresh is not None and self._stale(fresh[0]):
            cold, fd = fresh  # started before the zygote (or its latest) was ready
            if cold.stdin:
                cold.stdin.close()
            self._reap(cold, fd)
            fresh = None
        if fresh is None or fresh[0].returncode is not None:
            if fresh is not None:
                os.close(fresh[1])
            fresh = await self._spawn(launch)
        if old is not None and old.stdin:
            old.stdin.close()
        self._proc, self._marker = fresh
        self.launch = launch
        self._loaded = set()
        self.switches += 1
        if self._spare is None:
            self._spare = asyncio.create_task(self._spawn(), name=f"slot{self.index}-spare")
        if old is not None:  # reaped meanwhile, not waited for here
            self._reap(old, marker)
        elif marker >= 0:
            os.close(marker)

    def _reap(self, proc: Proc, marker: int) -> None:
        reap = asyncio.create_task(_end(proc, 5.0, marker))
        self._exiting.add(reap)
        reap.add_done_callback(self._exiting.discard)

    def _stale(self, proc: Proc | None) -> bool:
        """Whether an unused subprocess of the worker's environment is colder than the
        zygote would fork now: spawned before it was ready, or forked by an older one
        (which lacks modules learned since)."""
        forker = self._forker
        if proc is None or forker is None or not forker.ready or self.launch.foreign:
            return False
        return not isinstance(proc, ForkedProcess) or proc.generation != forker.generation

    def kill(self) -> None:
        """Kill the subprocess (its task's job was cancelled); :meth:`run` restarts it."""
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()

    async def _after_crash(
        self, unreported: dict[int, HeldTask], report: Callable[[list[Result]], None]
    ) -> list[HeldTask]:
        assert self._proc is not None
        returncode = await self._proc.wait()
        crashed = self._marker_seq()
        # Not "out of memory?": a forked process dies with its zygote.
        reason = getattr(self._proc, "lost", None) or describe_exit(returncode)
        leftover = [item for seq, item in sorted(unreported.items()) if seq != crashed]
        exceeded, self._exceeded = self._exceeded, None
        if exceeded is not None and exceeded[0] == crashed and crashed in unreported:
            # Not retried as it is: the same task would go over its limit again.
            error = {"type": exceeded[1], "message": exceeded[2], "traceback": ""}
            report([Result(unreported[crashed], Outcome.ERROR, error, b"", 0.0)])
        elif crashed in unreported:
            error = {"type": "coffea_hq.errors.WorkerLost", "message": reason, "traceback": ""}
            report([Result(unreported[crashed], Outcome.CRASHED, error, b"", 0.0)])
        self.restarts += 1
        await self.start(self.launch)  # the same environment: the rest of the batch is its
        return leftover

    def _close_marker(self) -> None:
        if self._marker >= 0:
            os.close(self._marker)
            self._marker = -1

    async def stop(self, timeout: float = 5.0) -> None:
        spare, self._spare = self._spare, None
        if spare is not None:
            with contextlib.suppress(Exception):
                spare_proc, fd = await spare
                if spare_proc.stdin:
                    spare_proc.stdin.close()
                await _end(spare_proc, timeout, fd)
        if self._exiting:
            await asyncio.gather(*self._exiting, return_exceptions=True)
        proc = self._proc
        if proc is None:
            return
        if proc.stdin:
            proc.stdin.close()
        await _end(proc, timeout)
        self._close_marker()
        self._proc = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)


async def _end(proc: Proc, timeout: float, marker: int = -1) -> None:
    """Wait for ``proc`` (its stdin closed) to exit, killing it after ``timeout`` seconds
    (a task's atexit hook or thread that will not end); then close its ``marker`` fd."""
    try:
        await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
    finally:
        if marker >= 0:
            os.close(marker)


def _from_foreign(outcome: str, data: bytes, info: Any) -> tuple[bytes, TaskInfo | None]:
    """A foreign runner's plain pickle and note tuple as child.py would have sent them."""
    if outcome != Outcome.OK and len(data) > protocol.ERROR_PICKLE_MAX:
        data = b""  # too heavy to ship in a report: the error's text says what happened
    packed = protocol.compress(data) if data else b""
    try:
        wall, cpu, max_rss, caught, records = info
        caught = list(caught)
        warnings = [
            TaskWarning(
                protocol.cut_text(str(c), protocol.TASK_NOTE_TEXT_MAX),
                protocol.cut_text(str(m), protocol.TASK_NOTE_TEXT_MAX),
                protocol.cut_text(str(f), protocol.TASK_NOTE_TEXT_MAX),
                max(int(line), 0),
                "",
                max(int(n), 1),
            )
            for c, m, f, line, n in caught[: protocol.TASK_WARNINGS_MAX]
        ]
        logs = [
            TaskLog(
                protocol.cut_text(str(name), protocol.TASK_NOTE_TEXT_MAX),
                min(max(int(level), 0), 100),
                protocol.cut_text(str(text), protocol.TASK_NOTE_TEXT_MAX),
                protocol.cut_text(str(path), protocol.TASK_NOTE_TEXT_MAX),
                max(int(line), 0),
                float(created),
            )
            for name, level, text, path, line, created in list(records)[: protocol.TASK_LOGS_MAX]
        ]
        return packed, TaskInfo(
            wall=max(float(wall), 0.0),
            cpu=max(float(cpu), 0.0),
            max_rss=max(int(max_rss), 0),
            warnings=warnings,
            logs=logs,
        )
    except (TypeError, ValueError):
        return packed, None


def _with_notes(info: TaskInfo | None, notes: list[TaskWarning]) -> TaskInfo:
    """``info`` with the launch's warnings (a version mismatch) added."""
    info = info or TaskInfo()
    room = protocol.TASK_WARNINGS_MAX - len(info.warnings)
    return TaskInfo(
        wall=info.wall,
        cpu=info.cpu,
        max_rss=info.max_rss,
        warnings=[*notes[: max(room, 0)], *info.warnings],
        logs=info.logs,
        output=info.output,
    )
