"""Warm slot subprocesses: a fork server ("zygote") per worker.

A fresh interpreter per job (issue 12) costs its start plus the imports of whatever the job
uses: a second or two of CPU for coffea. The zygote is a long-lived process started by the
worker (``python -m coffea_hq.worker.zygote``) that imports ``child.py``'s dependencies and
a preload list once, runs no job code, and forks a fresh slot subprocess on request. A fork
of a process that has only imported modules holds nothing of any job: every job still gets
its own process, and what job A changes in a preloaded module (``numpy.x = 1``) dies with
A's process.

Worker and zygote talk over a Unix SOCK_SEQPACKET pair (one pickle per packet):

- worker to zygote: ``("fork", cwd)`` carrying the child's stdin (read end), stdout (write
  end) and marker fds by SCM_RIGHTS; end of the socket: exit.
- zygote to worker: ``("ready", loaded, skipped)`` once the preload is imported;
  ``("forked", pid)`` carrying a pidfd of the child (so the worker signals that process
  and no other, however late); ``("exit", pid, returncode)`` when the zygote, the child's
  parent, has reaped it (returncode as :mod:`subprocess` gives it: -N for signal N).

The zygote forks only while it has one thread (imports that start threads would leave
their locks held in every child): a module whose import starts one is named in the ready
message's ``threads`` and the worker starts a zygote without it. Children are tied to the
zygote (PDEATHSIG), the zygote to the worker: a SIGKILLed worker leaves nothing running.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import importlib
import importlib.util
import logging
import os
import pickle
import select
import signal
import socket
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from coffea_hq.lifeline import tie_to_parent

log = logging.getLogger("coffea_hq.worker")

PACKET_MAX = 1 << 16  # bytes of one control message (a cwd path, a list of module names)
READY_TIMEOUT = 120.0  # seconds a zygote may take to import its preload
# Imported by every zygote: what child.py and its task capture need, and nothing a job
# chose. Learned and --preload modules come on top.
BASE = ("coffea_hq.worker.child",)
LEARN_MAX = 256  # distinct module names a worker learns from its jobs (bounded)
LEARN_JOBS = 2  # jobs that must have imported a module before the zygote preloads it
ATTEMPTS = 3  # zygotes started in a row that fail before the worker gives up on them


def _native_threads() -> list[str]:
    """Names of this process's threads besides the main one, as the kernel has them."""
    try:
        tasks = sorted(os.listdir("/proc/self/task"), key=int)[1:]
        names = []
        for task in tasks:
            with open(f"/proc/self/task/{task}/comm") as f:
                names.append(f.read().strip())
        return names
    except OSError:
        return []


def _importable(name: str) -> bool:
    """Whether the worker's own path has a top-level module ``name`` (not one of a job's
    files, which only its subprocess's working directory holds), or the package of a
    submodule ``name``. Finds, not imports (a submodule's own spec would import its
    package here, in the worker)."""
    parts = name.split(".")
    if not all(part.isidentifier() for part in parts):
        return False
    try:
        return importlib.util.find_spec(parts[0]) is not None
    except (ImportError, ValueError):
        return False


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_prctl = _load_prctl()  # looked up before any fork
_PR_SET_CHILD_SUBREAPER = 36
END_ROUNDS = 20  # rounds of killing what a job left running (each may expose a generation)


def _become_subreaper() -> None:
    """Adopt this process's orphaned descendants (Linux): what a task started and left
    behind, daemonized or not, becomes this process's child rather than init's, for
    :func:`_end_descendants` to find."""
    if _prctl is not None:
        _prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _children() -> list[int]:
    found: list[int] = []
    try:
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children") as f:
                found += [int(p) for p in f.read().split()]
    except (OSError, ValueError):
        pass
    return found


def _end_descendants(keep: set[int] | frozenset[int] = frozenset()) -> None:
    """SIGKILL and reap this process's children but ``keep``: a slot process's, when its
    job is done (a daemon or a grandchild its tasks left); the zygote's, those it adopted
    from a slot process that was killed."""
    for _ in range(END_ROUNDS):
        left = [pid for pid in _children() if pid not in keep]
        if not left:
            return
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in left:  # their orphans, if any, are adopted: the next round's
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def _send(sock: socket.socket, message: Any, fds: Iterable[int] = ()) -> None:
    socket.send_fds(sock, [pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)], list(fds))


# ---------------------------------------------------------------------------- zygote side


def _preload(names: list[str]) -> tuple[list[str], list[str], str | None]:
    """Import ``names`` in order; (imported, skipped with why, first module that left a
    Python thread running).

    Only Python threads disqualify: one may hold a lock (logging's, an import's) that a
    fork would copy held. Native pools that libraries start at import survive a fork by
    their own pthread_atfork handlers, which stop them before it and let the child start
    its own (OpenBLAS, started by numpy; jemalloc's background thread, by pyarrow):
    tests/test_zygote.py checks a numpy matmul in a forked child."""
    loaded: list[str] = []
    skipped: list[str] = []
    for name in names:
        try:
            importlib.import_module(name)
        except BaseException as exc:  # noqa: BLE001 - any failure: skipped, named once
            skipped.append(f"{name} ({type(exc).__name__}: {exc})"[:300])
            continue
        if threading.active_count() > 1:
            return loaded, skipped, name
        loaded.append(name)
    return loaded, skipped, None


def _become_child(
    tie: Callable[[], None], fds: list[int], cwd: str | None, closing: list[int]
) -> None:
    """In the forked child: become ``python -m coffea_hq.worker.child MARKER`` as a spawned
    one would be, then exit as the interpreter would (atexit hooks run). Never returns."""
    code: Any = 0
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in closing:
            os.close(fd)
        tie()  # PDEATHSIG: the zygote's death (a killed worker's) ends this child too
        _become_subreaper()
        stdin, stdout, marker = fds
        os.dup2(stdin, 0)
        os.dup2(stdout, 1)
        os.close(stdin)
        os.close(stdout)
        if cwd is not None:
            os.chdir(cwd)
            sys.path[0] = cwd  # as `python -m` run there would have it: the job's files
            importlib.invalidate_caches()
        _reseed()
        from . import child

        sys.argv = [child.__file__, str(marker)]
        child.main()
    except SystemExit as exc:
        code = exc.code
    except BaseException:  # noqa: BLE001 - reported as an interpreter would
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        import atexit

        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BaseException):
                stream.flush()
        with contextlib.suppress(BaseException):
            _end_descendants()  # nothing a job's tasks started outlives its process
        if code is None:
            code = 0
        elif not isinstance(code, int):
            with contextlib.suppress(BaseException):
                print(code, file=sys.stderr)
            code = 1
        os._exit(code & 0xFF)


def _reseed() -> None:
    """A fresh interpreter seeds numpy's global generator from the OS; a fork would share
    the zygote's state with every sibling, so seed it again (``random`` does so itself)."""
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        with contextlib.suppress(Exception):
            numpy.random.seed()


def serve(sock: socket.socket, preload: list[str]) -> None:
    """The zygote's loop: fork on request, reap children and report their exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the worker's to handle
    # Stray prints of an import must not land on the worker's stdout.
    os.dup2(2, 1)
    loaded, skipped, threaded = _preload([*BASE, *preload])
    from .child import imported_modules

    # What a job would report, all already warm here (its top-level names, and the
    # submodules preloaded by name).
    present = sorted({*imported_modules(), *(n for n in loaded if "." in n)})
    _send(sock, ("ready", present, skipped, threaded, _native_threads()))
    if threaded is not None:
        return  # not fit to fork: the worker starts one without that module
    # What the preload made is out of the collector's reach in every child: a collection
    # there would touch (and so copy) each of those objects' pages.
    gc.collect()
    gc.freeze()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    os.set_blocking(wake_r, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    tie = tie_to_parent()  # made here: it ties a child to this process
    _become_subreaper()  # a killed slot process's orphans come here, to be ended
    children: set[int] = set()
    while True:
        readable, _, _ = select.select([sock.fileno(), wake_r], [], [], 1.0)
        if wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 4096)
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                children.clear()
                break
            if pid == 0:
                break
            if pid not in children:
                continue  # an adopted orphan, ended below
            children.discard(pid)
            with contextlib.suppress(OSError):
                _send(sock, ("exit", pid, os.waitstatus_to_exitcode(status)))
        _end_descendants(keep=children)
        if sock.fileno() not in readable:
            continue
        try:
            data, fds, _, _ = socket.recv_fds(sock, PACKET_MAX, 3)
        except OSError:
            data, fds = b"", []
        if not data:
            # The worker is gone or done: its slots have stopped their subprocesses; any
            # left are killed with this process (PDEATHSIG).
            return
        kind, cwd = pickle.loads(data)
        if kind != "fork" or len(fds) != 3:
            for fd in fds:
                os.close(fd)
            continue
        pid = os.fork()
        if pid == 0:
            _become_child(tie, fds, cwd, [sock.fileno(), wake_r, wake_w])
        for fd in fds:
            os.close(fd)
        children.add(pid)
        pidfd = os.pidfd_open(pid)
        try:
            _send(sock, ("forked", pid), [pidfd])
        finally:
            os.close(pidfd)


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    preload = [n for n in sys.argv[2].split(",") if n] if len(sys.argv) > 2 else []
    serve(sock, preload)


# ---------------------------------------------------------------------------- worker side


class ForkedProcess:
    """A slot subprocess forked by a zygote, with the parts of
    :class:`asyncio.subprocess.Process` a slot uses: ``pid``, ``returncode``, ``stdin``,
    ``stdout``, ``wait()`` and ``kill()``. Signals go through a pidfd; the exit status
    comes from the zygote, which reaps it."""

    def __init__(
        self,
        pid: int,
        pidfd: int,
        stdin: asyncio.StreamWriter,
        stdout: asyncio.StreamReader,
    ) -> None:
        self.pid = pid
        self._pidfd = pidfd
        self.stdin: asyncio.StreamWriter | None = stdin
        self.stdout: asyncio.StreamReader | None = stdout
        self.returncode: int | None = None
        self.generation = 0  # of the zygote that forked it (see Forker.generation)
        self.lost: str | None = None  # why it ended, when not its own doing (its zygote died)
        self._exited = asyncio.get_running_loop().create_future()

    def _exit(self, returncode: int) -> None:
        if self.returncode is not None:
            return
        self.returncode = returncode
        if not self._exited.done():
            self._exited.set_result(returncode)
        if self.stdin is not None:
            self.stdin.close()
        with contextlib.suppress(OSError):
            os.close(self._pidfd)
        self._pidfd = -1

    def send_signal(self, sig: int) -> None:
        if self.returncode is not None or self._pidfd < 0:
            raise ProcessLookupError(self.pid)
        signal.pidfd_send_signal(self._pidfd, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        return int(await asyncio.shield(self._exited))


async def _pipes(
    loop: asyncio.AbstractEventLoop,
) -> tuple[asyncio.StreamWriter, asyncio.StreamReader, int, int]:
    """The worker's ends of a child's stdin and stdout as streams, and the child's ends."""
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    try:
        reader = asyncio.StreamReader(limit=1 << 16, loop=loop)
        await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader, loop=loop), os.fdopen(out_r, "rb", 0)
        )
        transport, protocol = await loop.connect_write_pipe(
            lambda: asyncio.streams.FlowControlMixin(loop=loop), os.fdopen(in_w, "wb", 0)
        )
    except BaseException:
        for fd in (in_r, out_w):
            os.close(fd)
        raise
    writer = asyncio.StreamWriter(transport, protocol, None, loop)
    return writer, reader, in_r, out_w


class _Zygote:
    """One zygote process as the worker sees it."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        sock: socket.socket,
        on_gone: Callable[[_Zygote], None],
    ) -> None:
        self.proc = proc
        self.sock = sock
        self._on_gone = on_gone
        self.ready: asyncio.Future[tuple[list[str], list[str], str | None, list[str]]] = (
            asyncio.get_running_loop().create_future()
        )
        self.forks: deque[asyncio.Future[tuple[int, int]]] = deque()
        self.children: dict[int, ForkedProcess] = {}
        self.closed = asyncio.Event()
        self.loaded: set[str] = set()
        self.generation = 0
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            data, fds, _, _ = socket.recv_fds(self.sock, PACKET_MAX, 1)
        except BlockingIOError:
            return
        except OSError:
            data, fds = b"", []
        if not data:
            self._gone()
            return
        message = pickle.loads(data)
        kind = message[0]
        if kind == "ready" and not self.ready.done():
            self.ready.set_result(tuple(message[1:5]))
        elif kind == "forked" and self.forks and fds:
            future = self.forks.popleft()
            os.set_inheritable(fds[0], False)
            if not future.done():
                future.set_result((message[1], fds[0]))
            else:
                os.close(fds[0])
        elif kind == "exit":
            child = self.children.pop(message[1], None)
            if child is not None:
                child._exit(message[2])
        else:
            for fd in fds:
                os.close(fd)

    def _gone(self) -> None:
        """The zygote ended: its children were killed with it (PDEATHSIG)."""
        if self.closed.is_set():
            return
        self.closed.set()
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("the zygote exited before it was ready"))
        while self.forks:
            future = self.forks.popleft()
            if not future.done():
                future.set_exception(ConnectionError("the zygote exited"))
        for child in self.children.values():
            child.lost = "the task subprocess was killed with its zygote, which exited"
            child._exit(-signal.SIGKILL)
        self.children.clear()
        self._on_gone(self)

    async def fork(self, marker: int, cwd: str | None) -> ForkedProcess:
        loop = asyncio.get_running_loop()
        writer, reader, in_r, out_w = await _pipes(loop)
        future: asyncio.Future[tuple[int, int]] = loop.create_future()
        try:
            if self.closed.is_set():
                raise ConnectionError("the zygote exited")
            self.forks.append(future)
            _send(self.sock, ("fork", cwd), [in_r, out_w, marker])
        except BaseException:
            writer.close()
            if future in self.forks:
                self.forks.remove(future)
            raise
        finally:
            os.close(in_r)
            os.close(out_w)
        try:
            pid, pidfd = await future
        except BaseException:
            writer.close()
            raise
        child = ForkedProcess(pid, pidfd, writer, reader)
        child.generation = self.generation
        self.children[pid] = child
        return child

    async def close(self, timeout: float | None = 10.0) -> None:
        """End the zygote once its children have exited (their slots stop them), waiting
        ``timeout`` seconds (None: as long as they run) for them."""
        if self.children:
            await asyncio.wait(
                [asyncio.ensure_future(c.wait()) for c in list(self.children.values())],
                timeout=timeout,
            )
        if not self.closed.is_set():
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)
        try:
            await asyncio.wait_for(self.proc.wait(), 10.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.closed.wait(), 1.0)
        self._gone()


class Forker:
    """The worker's zygote: started in the background, refreshed (a new one, switched to
    once ready) when the worker learns of modules its jobs import, replaced when it dies.
    :meth:`fork` gives a fresh slot subprocess, or None when there is no zygote ready (the
    slot spawns one as before: never does a lease wait for a zygote)."""

    def __init__(self, preload: Iterable[str] = (), learn: bool = True) -> None:
        self.preload = [n for n in preload if n]
        self.learn_enabled = learn
        self.learned: list[str] = []  # in the order first seen
        self._jobs_of: dict[str, set[str]] = {}  # module name: jobs seen importing it
        self._rejected: set[str] = set()  # not importable from the worker's own path
        self._unjudged: list[tuple[str, list[str]]] = []  # reports before the first zygote
        self._current: _Zygote | None = None
        self._starting: asyncio.Task[None] | None = None
        # Replaced zygotes, ending once the slot processes they forked have exited.
        self._retired: dict[_Zygote, asyncio.Task[None]] = {}
        self._excluded: set[str] = set()  # modules that started threads in a zygote
        self._failures = 0
        self._gave_up = False
        self._closed = False
        self.forks = 0
        self.generation = 0  # zygotes that became ready

    @property
    def ready(self) -> bool:
        z = self._current
        return z is not None and not z.closed.is_set()

    def start(self) -> None:
        """Start the first zygote in the background."""
        self._refresh()

    def _judge(self) -> None:
        unjudged, self._unjudged = self._unjudged, []
        for job, names in unjudged:
            self.learn(names, job)

    def _wanted(self) -> list[str]:
        names = [*self.preload, *self.learned]
        return [n for i, n in enumerate(names) if n not in self._excluded and n not in names[:i]]

    def _refresh(self) -> None:
        if self._closed or self._gave_up:
            return
        if self._starting is not None and not self._starting.done():
            return  # the one starting will be followed by another if more was learned
        self._starting = asyncio.create_task(self._start(), name="zygote-start")

    async def _start(self) -> None:
        while not self._closed and not self._gave_up:
            wanted = self._wanted()
            try:
                zygote = await self._launch(wanted)
            except Exception as exc:  # noqa: BLE001 - anything: fall back to spawning
                self._failed(f"{type(exc).__name__}: {exc}")
                if self._gave_up:
                    return
                continue
            if self._closed:
                await zygote.close()
                return
            old, self._current = self._current, zygote
            self._failures = 0
            self.generation += 1
            zygote.generation = self.generation
            if old is not None:
                self._retire(old)
            self._judge()
            if set(self._wanted()) <= set(wanted):
                return  # else: learned more meanwhile, start the next one

    async def _launch(self, wanted: list[str]) -> _Zygote:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            ours.setblocking(False)
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "coffea_hq.worker.zygote",
                str(theirs.fileno()),
                ",".join(wanted),
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                preexec_fn=tie_to_parent(),  # a SIGKILLed worker leaves no zygote
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        zygote = _Zygote(proc, ours, self._lost)
        try:
            ready = await asyncio.wait_for(zygote.ready, READY_TIMEOUT)
            loaded, skipped, threaded, native = ready
        except BaseException:
            await zygote.close(0.0)
            raise
        for why in skipped:
            log.warning("zygote: preload of %s skipped", why)
        if threaded is not None:
            self._excluded.add(threaded)
            await zygote.close(1.0)
            raise RuntimeError(
                f"importing {threaded} started a thread, and a process with threads must not "
                "fork: it is no longer preloaded"
            )
        zygote.loaded = set(loaded) | {s.partition(" ")[0] for s in skipped}
        log.debug(
            "zygote %d ready: %s (native threads: %s)",
            proc.pid,
            ", ".join(n for n in wanted if n in loaded),
            ", ".join(native) or "none",
        )
        return zygote

    def _lost(self, zygote: _Zygote) -> None:
        if zygote is not self._current or self._closed:
            return  # a retired one, ending as asked
        self._current = None
        log.warning(
            "zygote %d exited (its slot processes with it: their tasks are retried); "
            "slots start new interpreters until another is ready",
            zygote.proc.pid,
        )
        self._refresh()

    def _failed(self, why: str) -> None:
        self._failures += 1
        if self._failures >= ATTEMPTS:
            self._gave_up = True
            log.warning(
                "zygote: could not start (%s); slots start their subprocesses afresh "
                "(slower per job, nothing else changes)",
                why,
            )
        else:
            log.info("zygote: %s; starting another", why)

    def _retire(self, zygote: _Zygote) -> None:
        task = asyncio.create_task(zygote.close(None), name="zygote-retire")
        self._retired[zygote] = task
        task.add_done_callback(lambda _: self._retired.pop(zygote, None))

    async def fork(self, marker: int, cwd: str | None) -> ForkedProcess | None:
        """A fresh slot subprocess from the zygote, or None (no zygote: spawn one)."""
        zygote = self._current
        if zygote is None or zygote.closed.is_set():
            return None
        try:
            child = await zygote.fork(marker, cwd)
        except (OSError, ConnectionError) as exc:
            log.warning("zygote: fork failed (%s); this slot subprocess is spawned", exc)
            return None
        self.forks += 1
        return child

    def stats(self) -> dict[str, Any]:
        """For the worker's heartbeat: forks so far and what the ready zygote preloaded."""
        z = self._current
        ready = z is not None and not z.closed.is_set()
        return {
            "zygote_forks": self.forks,
            "zygote_preloaded": sorted(z.loaded) if ready and z is not None else [],
        }

    def learn(self, names: Iterable[str], job: str | None = None) -> None:
        """Modules a job's subprocess imported (top-level names). Those that the worker
        itself could import (installed, not a job's own files) and that ``LEARN_JOBS``
        jobs imported are preloaded by the next zygote, started in the background: a
        worker that runs one job (a short-lived one) does not pay for a zygote that
        would import it all again."""
        if not self.learn_enabled or self._closed or self._gave_up:
            return
        names = [n for n in names if isinstance(n, str)][:LEARN_MAX]
        if self._current is None:
            # Judged once the first zygote says what it has (child.py's own imports).
            if len(self._unjudged) < LEARN_JOBS * 4:
                self._unjudged.append((job or "", names))
            return
        warm = self._current.loaded
        fresh = []
        for name in names:
            if name in warm or name in self._rejected or name in self.learned:
                continue
            jobs = self._jobs_of.get(name)
            if jobs is None:
                if len(self._jobs_of) >= LEARN_MAX:
                    continue
                jobs = self._jobs_of[name] = set()
            jobs.add(job or "")
            if len(jobs) < LEARN_JOBS:
                continue
            del self._jobs_of[name]
            if _importable(name):
                fresh.append(name)
            else:
                self._rejected.add(name)
        room = LEARN_MAX - len(self.learned)
        if fresh and room > 0:
            self.learned.extend(sorted(fresh)[:room])
            self._refresh()

    async def close(self) -> None:
        """End every zygote (after the slots have stopped their subprocesses)."""
        self._closed = True
        if self._starting is not None:
            self._starting.cancel()
            await asyncio.gather(self._starting, return_exceptions=True)
        if self._current is not None:
            await self._current.close()
            self._current = None
        retired = list(self._retired.items())
        for _, task in retired:
            task.cancel()
        await asyncio.gather(*(task for _, task in retired), return_exceptions=True)
        await asyncio.gather(*(z.close(1.0) for z, _ in retired), return_exceptions=True)


if __name__ == "__main__":
    main()
