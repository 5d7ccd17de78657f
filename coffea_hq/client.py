"""The Python client: submit a function over many inputs, stream or gather the results.

>>> client = Client("http://localhost:8786")          # or Client() with $HQ_URL set
>>> job = client.map(pow, range(10), [2] * 10)
>>> job.result()
[0, 1, 4, 9, 16, 25, 36, 49, 64, 81]

The client runs its HTTP traffic on a private event-loop thread, so it works the
same from a script, a notebook (which has its own running loop) or a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import msgspec

from . import messages, protocol, tls
from .api import API, Frames
from .environments import Environment, binding, coffea_hq_by_value
from .errors import (
    HQError,
    JobCancelled,
    ServerError,
    ServerUnreachable,
    SubmitFailed,
    TaskFailed,
    TLSError,
)
from .protocol import Codec
from .remote import TaskNotes
from .shares import locality_key, share_name
from .shipping import with_env
from .transport import parse_urls

T = TypeVar("T")

log = logging.getLogger("coffea_hq")

SUBMIT_BATCH = 4096
SUBMIT_IN_FLIGHT = 2
SUBMIT_SHARE = 4  # a submit batch stays under this share of the server's request limit
POLL_WAIT = 30.0
ABANDON_BUDGET = 3.0  # seconds a failed submission spends deleting its job
STOP_BUDGET = ABANDON_BUDGET + 2  # how long Ctrl-C waits for a stopped call to clean up
CONNECT_BUDGET = 5.0  # seconds the first use of a Client waits for the server to answer
CLOSE_BUDGET = 10.0  # seconds closing waits for the HTTP session to shut down
INTERRUPT_BUDGET = 3.0  # seconds Ctrl-C spends cancelling the job before giving up

NO_URL_HELP = (
    "no coffea-hq server URL: pass Client(url), set HQ_URL, or start one on this machine "
    "with `with coffea_hq.LocalCluster() as cluster: Client(cluster.url)`"
)


def resolve_url(url: str | Sequence[str] | None, help: str = NO_URL_HELP) -> str:
    """``url``, else $HQ_URL, else :class:`HQError` with ``help``: one server URL, or
    several replicas' (a list, or comma-separated), returned comma-separated."""
    url = url or os.environ.get(protocol.ENV_URL)
    if not url:
        raise HQError(help)
    return ",".join(parse_urls(url))


def no_server(url: str, reason: str) -> str:
    """The sentence for a server that does not answer when a client first calls it."""
    return (
        f"no coffea-hq server answers at {url} ({reason}): start one with `coffea-hq local` "
        "or check the URL (HQ_URL)"
    )


class Client:
    """A connection to a coffea-hq server.

    ``url`` defaults to ``$HQ_URL``. Several URLs (a list, or one comma-separated string)
    name replicas of one server: a request whose connection fails moves to the next.
    The first call checks, within a few seconds, that a
    server answers there, and raises :class:`~coffea_hq.errors.ServerUnreachable` saying
    so if none does (:class:`~coffea_hq.errors.TLSError` if TLS is what failed). Later,
    ``retry_for`` is how long requests ride out an unreachable server (restarts, network
    cuts) before raising.

    An ``https://`` server's certificate is verified: against the system's CAs and
    ``tls_ca`` (default ``$HQ_TLS_CA``), a private CA's PEM file. ``tls_cert`` and
    ``tls_key`` (default ``$HQ_TLS_CERT``, ``$HQ_TLS_KEY``) are this client's certificate
    for a server that requires one (mutual TLS).

    Close it (or use it as a context manager); one nobody closed closes itself when it
    is garbage-collected or the interpreter exits.

    ``api`` is the server's HTTP API as coroutines (:class:`coffea_hq.api.API`), bound to
    the client's event loop: :meth:`run` runs one there and waits for it.
    """

    def __init__(
        self,
        url: str | Sequence[str] | None = None,
        *,
        token: str | None = None,
        retry_for: float = 120.0,
        codec: Codec = Codec.LZ4,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> None:
        self.urls = parse_urls(resolve_url(url))
        self.codec = codec
        # Built (and its files read) now: a missing file fails here, not in the first call.
        context = (
            tls.client_context(tls_ca, tls_cert, tls_key)
            if any(u.startswith("https://") for u in self.urls)
            else None
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="coffea-hq-client", daemon=True
        )
        self._thread.start()
        self.api = API(self.urls, retry_for=retry_for, token=token, tls=context)
        self._closed = False
        self._request_limit: int | None = None  # the server's, read from /health once
        self._checking = threading.Lock()
        # Closes the session and stops the loop on close(), garbage collection or exit,
        # whichever comes first; it holds no reference to the client.
        self._finalizer = weakref.finalize(self, _stop, self._loop, self._thread, self.api)

    @property
    def url(self) -> str:
        """The server URL requests go to now (of several replicas: the one in use)."""
        return self.api.url

    def __repr__(self) -> str:
        return f"Client({','.join(self.urls)!r})"

    def _repr_html_(self) -> str:
        from .html import client_html

        return client_html(self)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` (a call of :attr:`api`, or built on them) on the client's event
        loop and wait for its result: the one place the caller's thread crosses over.

        Ctrl-C in the caller cancels the coroutine and waits (briefly) for it to clean
        up on its way out (a submission deletes its job) before re-raising.
        """
        if self._closed:
            coro.close()
            raise HQError("this Client is closed")
        if self._request_limit is None:
            try:
                self._check_server()
            except BaseException:
                coro.close()
                raise
        return self._call(coro)

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        begun, ended = threading.Event(), threading.Event()

        async def tracked() -> T:
            begun.set()
            try:
                return await coro
            finally:
                ended.set()

        future = asyncio.run_coroutine_threadsafe(tracked(), self._loop)
        try:
            return future.result()
        except KeyboardInterrupt:
            future.cancel()
            if begun.is_set():
                ended.wait(STOP_BUDGET)
            raise

    def _check_server(self) -> None:
        """Ask the server's ``/health`` once, briefly: a wrong URL or a stopped server
        fails the first call in seconds with one sentence, not after ``retry_for``."""
        with self._checking:
            if self._request_limit is not None:
                return
            try:
                doc = self._call(self._health_check())
            except TLSError as e:
                raise TLSError(str(e), url=self.url) from None  # one sentence, no loop frames
            except ServerUnreachable as e:
                # Raised here, in the caller's thread: the loop's frames add nothing.
                raise ServerUnreachable(
                    no_server(", ".join(self.urls), e.reason), url=self.url, reason=e.reason
                ) from None
            except (ServerError, ValueError) as e:  # ValueError: msgspec's, a reply not a Health
                raise HQError(
                    f"the server at {self.url} does not answer like a coffea-hq server "
                    f"(GET {protocol.HEALTH}: {e}): check the URL (HQ_URL)"
                ) from None
            self._request_limit = doc.max_request_size

    async def _health_check(self) -> messages.Health:
        try:
            async with asyncio.timeout(CONNECT_BUDGET):
                # A share of the budget each: a hung first replica leaves time for the next.
                doc = await self.api.health(
                    retry_for=CONNECT_BUDGET,
                    warn=False,
                    attempt_timeout=CONNECT_BUDGET / len(self.urls),
                )
        except TimeoutError:  # a connection attempt that hangs (packets dropped)
            reason = f"no answer within {CONNECT_BUDGET:.0f} s"
            raise ServerUnreachable(reason, url=self.url, reason=reason) from None
        return doc

    def close(self) -> None:
        """Close the connection (running jobs continue on the server)."""
        if self._closed:
            return
        self._closed = True
        self._finalizer()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ service

    def health(self) -> dict[str, Any]:
        """The server's ``/health`` document."""
        return msgspec.to_builtins(self.run(self.api.health()))

    def queue(self) -> dict[str, Any]:
        """Queued and running task counts, jobs, workers and the server's task counters
        (:class:`coffea_hq.messages.QueueStats`)."""
        return msgspec.to_builtins(self.run(self.api.queue()))

    def workers(self) -> dict[str, Any]:
        """Each live worker's last heartbeat: slots, host, telemetry (``stats``)."""
        return self.run(self.api.workers())

    def telemetry(self) -> dict[str, Any]:
        """The heartbeats' rolling windows (:class:`coffea_hq.messages.Telemetry`): each
        live worker's last samples and each unfinished job's share of them, oldest first."""
        return msgspec.to_builtins(self.run(self.api.telemetry()))

    def jobs(self) -> list[dict[str, Any]]:
        """The newest unfinished jobs' summaries, oldest first (every user's: an admin
        route under ``hq-server --auth``)."""
        return msgspec.to_builtins(self.run(self.api.list_jobs()).jobs)

    def metrics(self) -> str:
        """The server's Prometheus metrics, as text (``GET /metrics``)."""
        return self.run(self.api.metrics())

    def worker_logs(
        self, workers: Iterable[str] | None = None
    ) -> dict[str, list[messages.LogLine]]:
        """The log ring buffer of each worker (default: every live one), as Dask's
        ``get_worker_logs``: its tasks' output and its own log lines, oldest first."""
        names = list(self.workers()) if workers is None else list(workers)

        async def fetch() -> dict[str, list[messages.LogLine]]:
            replies = await asyncio.gather(*(self.api.worker_logs(w) for w in names))
            return {w: r.lines for w, r in zip(names, replies, strict=True)}

        return self.run(fetch())

    # ------------------------------------------------------------------ jobs

    def map(
        self,
        function: Callable[..., Any],
        *iterables: Iterable[Any],
        max_attempts: int = protocol.DEFAULT_MAX_ATTEMPTS,
        fail_fast: bool = True,
        label: str = "",
        reduce: Callable[[list[Any]], Any] | None = None,
        fanin: int = protocol.DEFAULT_FANIN,
        blob_codec: Codec | None = None,
        env: dict[str, str] | Iterable[str] | None = None,
        environment: Environment | None = None,
        files: Iterable[str | os.PathLike[str]] = (),
        resources: bool = False,
        priority: int = 0,
        share: str | None = None,
        locality: Sequence[str | None] | None = None,
    ) -> Job:
        """Run ``function(*args)`` for each ``args`` in ``zip(*iterables)`` on the workers.

        ``max_attempts`` bounds retries after a worker dies or hangs (a task that raises
        fails at once); with ``fail_fast`` the first failure ends the job.

        With ``reduce``, results are merged on the workers, ``fanin`` at a time, by
        ``reduce(list_of_values)``, merges of merges until one is left: ``result()``
        returns that one value, and ``as_completed()`` yields ``(index, None)`` as each
        task finishes.

        ``blob_codec`` compresses the pickled function and reducer (default: the client's
        codec); ``Codec.NONE`` for functions whose bulk is compressed already.

        ``env`` sets environment variables in each task's process, for this job only: a
        dict, or names whose values are taken from this process's ``os.environ``.

        ``environment`` (a :class:`coffea_hq.Environment`) runs the tasks and merges in
        that software environment instead of the worker's own; ``files`` are paths of data
        files that appear under their basename in each task's working directory.

        Workers are shared fairly between users (under ``hq-server --auth``: the token's
        user; otherwise ``share``, default ``$HQ_USER`` or the login name), in proportion
        to the weights an admin set (``coffea-hq shares``); among one user's jobs, higher
        ``priority`` runs first, then the older job.

        ``locality``: one key per task (e.g. the file it reads; None for none): a worker
        that ran tasks of a key is given that key's tasks first, and workers spread over
        the keys, so each opens fewer files.

        Warnings and log records (WARNING and above) the tasks raise are raised again here
        as the results arrive, naming the worker; :meth:`Job.logs` holds what they printed.

        With ``resources``, each task's wall and CPU time and peak memory come back with its
        result (:meth:`Job.resources`, :attr:`Job.notes`); without, the server only adds
        them up per job (:meth:`Job.status`), which costs less per task.
        """
        if reduce is not None and fanin < 2:
            raise ValueError("fanin must be at least 2")
        if env is not None:
            function = with_env(function, env)
        bound = binding(environment, files) if environment is not None or files else None
        items = list(zip(*iterables, strict=False))
        payloads = [protocol.dumps(args, self.codec) for args in items]
        with coffea_hq_by_value(environment is not None):
            blobs = [
                protocol.compress(
                    protocol.cloud_dumps(f), self.codec if blob_codec is None else blob_codec
                )
                for f in (function, reduce)
                if f is not None
            ]
        extra: list[bytes] = []
        if bound is not None:  # the job names bound functions; their blobs go first
            extra = bound.blobs + blobs
            blobs = [bound.bind(b) for b in blobs]
        job = Job(
            self, uuid.uuid4().hex[:20], items, reducing=reduce is not None, fail_fast=fail_fast
        )
        spec = {
            "max_attempts": max_attempts,
            "fail_fast": fail_fast,
            "label": label,
            "priority": priority,
            "share": share_name(share),
        }
        if reduce is not None:
            spec["fanin"] = fanin
        if resources:
            spec["resources"] = True
        keys = [] if locality is None else [locality_key(k) for k in locality]
        if keys and len(keys) != len(items):
            raise ValueError(f"locality needs one key per task: {len(keys)} for {len(items)}")
        self.run(self._submit(job.id, blobs, payloads, spec, extra, keys))
        return job

    async def _submit(
        self,
        job: str,
        blobs: list[bytes],
        payloads: list[bytes],
        spec: dict[str, Any],
        extra: Sequence[bytes] = (),
        localities: list[str] | None = None,
    ) -> None:
        """Create, fill and seal the job; whatever fails (Ctrl-C included), nothing of it
        is left to run."""
        created = False
        try:
            for blob in extra:  # what the job's blobs refer to (environment, files)
                await self.api.upload(blob)
            shas = [await self.api.upload(blob) for blob in blobs]
            created = True  # from here on the job may exist, even if the reply is lost
            reducer = shas[1] if len(shas) > 1 else None
            await self.api.create_job(
                job, messages.CreateJob(function=shas[0], reducer=reducer, **spec)
            )
            await self._submit_tasks(job, payloads, localities or [])
            await self.api.seal(job, messages.Seal(total=len(payloads)))
        except BaseException as exc:
            # An unsealed job would run its first batches and never end: delete it.
            # (A cancelled task may still await here: the cancellation was delivered.)
            if created:
                await self._abandon(job)
            if isinstance(exc, Exception):
                raise SubmitFailed(
                    f"submitting job {job} failed, so it was deleted and none of its tasks "
                    f"will run: {exc}"
                ) from exc
            raise

    async def _max_request_size(self) -> int:
        if self._request_limit is None:  # a coroutine of api run on the loop directly
            self._request_limit = (await self.api.health()).max_request_size
        return self._request_limit

    async def _submit_tasks(
        self, job: str, payloads: list[bytes], localities: list[str] | None = None
    ) -> None:
        """Send the tasks in batches, a few in flight; the first failure stops the rest."""
        limit = asyncio.Semaphore(SUBMIT_IN_FLIGHT)
        budget = await self._max_request_size() // SUBMIT_SHARE

        async def submit(start: int, stop: int) -> None:
            header = messages.SubmitTasks(
                tasks=[str(i) for i in range(start, stop)],
                localities=localities[start:stop] if localities else [],
            )
            async with limit:
                await self.api.submit_tasks(job, header, payloads[start:stop])

        spans = batch_spans([len(p) for p in payloads], SUBMIT_BATCH, budget)
        batches = [asyncio.ensure_future(submit(a, b)) for a, b in spans]
        try:
            await asyncio.gather(*batches)
        finally:
            # gather leaves the other batches running after a failure or a cancel: stop
            # them before the job is deleted.
            for batch in batches:
                batch.cancel()
            await asyncio.gather(*batches, return_exceptions=True)

    async def _abandon(self, job: str) -> None:
        """Best effort, briefly: cancel the job and drop its keys."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(ABANDON_BUDGET):
                await self.api.delete_job(job, retry_for=ABANDON_BUDGET)


def _stop(loop: asyncio.AbstractEventLoop, thread: threading.Thread, api: API) -> None:
    """Close ``api``'s session on ``loop`` and stop the loop's thread (a Client's finalizer)."""

    async def shutdown() -> None:
        current = asyncio.current_task()
        pending = [t for t in asyncio.all_tasks() if t is not current]
        for task in pending:  # long polls prefetched for jobs nobody reads any more
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await api.close()

    if loop.is_closed() or not thread.is_alive():
        return
    if threading.current_thread() is thread:  # collected on its own loop: cannot wait
        loop.create_task(shutdown()).add_done_callback(lambda _: loop.stop())
        return
    future = asyncio.run_coroutine_threadsafe(shutdown(), loop)
    with contextlib.suppress(Exception):
        future.result(CLOSE_BUDGET)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=5)
    if not thread.is_alive():
        loop.close()  # else "unclosed event loop" (a ResourceWarning) when it is collected


def _retrieved(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


def batch_spans(sizes: list[int], max_items: int, max_bytes: int) -> list[tuple[int, int]]:
    """Cut ``sizes`` into consecutive ``(start, stop)`` spans of at most ``max_items`` items
    and ``max_bytes`` bytes (an item larger than that goes alone: the server judges it)."""
    spans: list[tuple[int, int]] = []
    start, size = 0, 0
    for i, n in enumerate(sizes):
        if i > start and (i - start >= max_items or size + n > max_bytes):
            spans.append((start, i))
            start, size = i, 0
        size += n
    if start < len(sizes):
        spans.append((start, len(sizes)))
    return spans


class Job:
    """A handle on a submitted job: stream results, gather them, or cancel.

    ``merges`` and ``merges_open`` (merge tasks queued so far, and of those the ones not
    finished), ``requeued`` and ``crashed`` (attempts retried, attempts that crashed their
    subprocess) follow the job as its results arrive, for progress bars. ``notes`` holds
    the tasks' resources added up (:class:`coffea_hq.remote.TaskNotes`).
    """

    __slots__ = (
        "id",
        "client",
        "items",
        "reducing",
        "fail_fast",
        "merges",
        "merges_open",
        "requeued",
        "crashed",
        "_values",
        "_reduced",
        "_received",
        "_failures",
        "_buffer",
        "_prefetch",
        "_cursor",
        "_end_state",
        "_finished",
        "_cancel_sent",
        "notes",
        "_logs",
    )

    def __init__(
        self,
        client: Client,
        job_id: str,
        items: list[tuple[Any, ...]],
        *,
        reducing: bool = False,
        fail_fast: bool = True,
    ) -> None:
        self.id = job_id
        self.client = client
        self.items = items
        self.reducing = reducing
        self.fail_fast = fail_fast
        self.merges = 0
        self.merges_open = 0
        self.requeued = 0  # attempts retried after their worker crashed, died or hung
        self.crashed = 0  # attempts that crashed their subprocess
        self._reduced: Any = None
        self._values: list[Any] = [None] * len(items)
        # A result may arrive twice (after a store restart lost its last writes): it counts once.
        self._received = bytearray(len(items))
        self._failures: list[TaskFailed] = []
        # Received but not yet handed to the caller: survives a caller that stops iterating.
        self._buffer: deque[tuple[str, str, memoryview, dict[str, Any]]] = deque()
        # The long poll for the next batch, on the client's loop (touched only there).
        self._prefetch: asyncio.Task[Frames] | None = None
        self._cursor = "0"  # where the next poll starts (touched only on the loop)
        self._end_state: str | None = None
        self._finished = False
        self._cancel_sent = False
        # The tasks' warnings and logs (re-raised here) and their resources, added up.
        self.notes = TaskNotes()
        self._logs: list[messages.LogLine] | None = None  # kept from before the job's deletion

    def __repr__(self) -> str:
        return f"<Job {self.id}: {len(self.items)} tasks>"

    def _repr_html_(self) -> str:
        from .html import job_html

        return job_html(self)

    @property
    def received(self) -> int:
        """How many tasks' results (or errors) this client has received."""
        return sum(self._received)

    def __len__(self) -> int:
        return len(self.items)

    def status(self) -> dict[str, Any]:
        """The server's summary: state, done, failed, total, merges
        (:class:`coffea_hq.messages.JobSummary`)."""
        return msgspec.to_builtins(self.client.run(self.client.api.get_job(self.id)))

    def resources(self, index: int) -> dict[str, Any] | None:
        """What task ``index`` cost, once its result arrived: ``wall`` and ``cpu`` seconds,
        ``max_rss`` (peak resident bytes of its subprocess during the task) and ``worker``.
        None for a job submitted without ``map(..., resources=True)``, unless that task
        raised a warning or logged."""
        got = self.notes.tasks.get(str(index))
        if got is None:
            return None
        return dict(zip(("wall", "cpu", "max_rss", "worker"), got, strict=True))

    def logs(self) -> list[messages.LogLine]:
        """What the job's tasks printed (stdout and stderr), newest last: the server's ring
        buffer of the job's last ``JOB_LOG_LINES`` outputs, each with its worker and task.
        Kept here once the job has ended (the server deletes it)."""
        if self._logs is not None:
            return list(self._logs)
        return self.client.run(self.client.api.job_logs(self.id)).lines

    def cancel(self, *, budget: float | None = None) -> None:
        """Cancel the job: queued tasks are dropped, and the workers stop the running ones
        (killing their processes) and drop the ones they fetched, within moments.
        ``budget``: seconds to keep trying an unreachable server (default: the client's
        ``retry_for``)."""
        api = self.client.api
        if budget is None:
            self.client.run(api.cancel(self.id))
        else:

            async def bounded() -> None:
                async with asyncio.timeout(budget):
                    await api.cancel(self.id, retry_for=budget)

            self.client.run(bounded())
        self._cancel_sent = True

    def interrupted(self) -> None:
        """Ctrl-C while this job runs: cancel it within :data:`INTERRUPT_BUDGET` seconds,
        or say in one line that the server did not answer (its workers may go on)."""
        if self._cancel_sent or self._finished:
            return
        self._cancel_sent = True
        try:
            self.cancel(budget=INTERRUPT_BUDGET)
        except Exception as e:
            reason = getattr(e, "reason", None) or str(e) or type(e).__name__
            log.warning(
                "interrupted: job %s not cancelled, the server at %s did not answer within "
                "%.0f s (%s); tasks already on workers may still run",
                self.id,
                self.client.url,
                INTERRUPT_BUDGET,
                reason,
            )

    def as_completed(
        self, timeout: float | None = None, *, keep: bool = True
    ) -> Iterator[tuple[int, Any]]:
        """Yield ``(index, value)`` as results arrive, in completion order.

        Raises :class:`TaskFailed` for a failed task, :class:`JobCancelled` if the job is
        cancelled first, and :class:`TimeoutError` after ``timeout`` seconds. Calling it
        again continues where the last call stopped. With ``keep=False`` the job does not
        hold on to the values it yields (for callers that add them up as they come).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._finished:
            while self._buffer:
                task, outcome, part, error = self._buffer.popleft()
                got = self._take(task, outcome, part, error, keep)
                if got is not None:
                    yield got
            if self._end_state is not None:
                self._finish(self._end_state)
                break
            try:
                self._receive(deadline, timeout)
            except KeyboardInterrupt:
                self.interrupted()
                raise
        if self._failures:
            raise self._failures[0]

    def _take(
        self, task: str, outcome: str, part: memoryview, error: dict[str, Any], keep: bool
    ) -> tuple[int, Any] | None:
        """Record one received item; what to yield, if anything."""
        if self.reducing and outcome == "ok":
            self._reduced = protocol.loads(part)  # the merge of every success
            return None
        if task.startswith(protocol.MERGE_PREFIX):  # a merge failed: the job has ended
            raise self._fail_now(self._failure(-1, error, part))
        index = int(task)
        if self._received[index]:
            return None
        self._received[index] = 1
        if outcome == "merged":
            return index, None
        if outcome == "ok":
            value = protocol.loads(part)
            if keep:
                self._values[index] = value
            return index, value
        failure = self._failure(index, error, part)
        if self.fail_fast:
            raise self._fail_now(failure)
        self._failures.append(failure)
        return None

    def _fail_now(self, failure: TaskFailed) -> TaskFailed:
        """The job has failed for good: free its keys on the server; later calls re-raise."""
        self._failures.append(failure)
        self._finished = True
        self._keep_logs()
        self.client.run(self._stop_polling(delete=True))
        return failure

    def _receive(self, deadline: float | None, timeout: float | None) -> None:
        """Wait for the next batch of results (the long poll after it starts at once, so
        the caller's unpickling and accumulation overlap the network)."""
        header, parts = self.client.run(self._next_batch(deadline))
        self.merges = header.merges
        self.merges_open = header.merges_open
        self.requeued = header.requeued
        self.crashed = header.crashed
        errors = header.errors
        for task, note in (header.notes or {}).items():
            self.notes.take(task, msgspec.to_builtins(note), protocol.is_merge(task))
        for item, part in zip(header.items, parts, strict=True):
            error = errors.get(item.task)
            described = msgspec.to_builtins(error) if error else {}
            self._buffer.append((item.task, item.outcome, part, described))
        if header.end:
            self._end_state = header.state
        elif not self._buffer and deadline is not None and time.monotonic() > deadline:
            self.client.run(self._stop_polling(delete=False))
            raise TimeoutError(
                f"job {self.id}: no complete result within {timeout}s "
                f"({sum(self._received)}/{len(self)} tasks done)"
            )

    async def _next_batch(self, deadline: float | None) -> Frames:
        """The prefetched batch (or a fresh poll), and the poll after it started."""
        if self._prefetch is None:
            self._prefetch = self._poll(deadline)
        # Shielded: a caller interrupted here (Ctrl-C) finds the same poll when it resumes.
        header, parts = await asyncio.shield(self._prefetch)
        self._cursor = header.cursor
        self._prefetch = None if header.end else self._poll(deadline)
        return header, parts

    def _poll(self, deadline: float | None) -> asyncio.Task[Frames]:
        wait = POLL_WAIT
        if deadline is not None:
            wait = max(0.0, min(POLL_WAIT, deadline - time.monotonic()))
        poll = asyncio.ensure_future(self.client.api.results(self.id, self._cursor, wait))
        poll.add_done_callback(_retrieved)  # a poll nobody awaits any more logs nothing
        return poll

    async def _stop_polling(self, *, delete: bool) -> None:
        if self._prefetch is not None:
            self._prefetch.cancel()
            self._prefetch = None
        if delete:
            await self.client.api.delete_job(self.id)

    def result(self, timeout: float | None = None) -> Any:
        """All results, ordered like the inputs (for a reducing job: the one merged value,
        ``None`` if there were no tasks). Raises like :meth:`as_completed`."""
        for _ in self.as_completed(timeout):
            pass
        return self._reduced if self.reducing else list(self._values)

    def partial(self) -> Any:
        """For a finished reducing job that had failures: the merge of what succeeded."""
        return self._reduced

    @property
    def failures(self) -> list[TaskFailed]:
        """The tasks that failed so far (with ``fail_fast=False``, every one of them)."""
        return list(self._failures)

    def _failure(self, index: int, error: dict[str, Any], part: memoryview) -> TaskFailed:
        exception = None
        if len(part):
            try:
                exception = protocol.loads(part)
            except Exception:  # the exception's class may not exist here
                exception = None
        item = self.items[index] if index >= 0 else "(a merge of results on a worker)"
        kind = TaskFailed.like(type(exception) if exception is not None else None)
        try:
            return kind(self.id, index, item, error, exception)
        except Exception:  # the remote class's __init__ wants other arguments
            return TaskFailed(self.id, index, item, error, exception)

    def _keep_logs(self) -> None:
        """Fetch the job's log buffer before the job is deleted (best effort)."""
        if self._logs is None:
            with contextlib.suppress(HQError):
                self._logs = self.client.run(self.client.api.job_logs(self.id)).lines

    def _finish(self, state: str) -> None:
        self._finished = True
        self._keep_logs()
        self.client.run(self.client.api.delete_job(self.id))
        if state == protocol.JobState.CANCELLED and not all(self._received):
            raise JobCancelled(
                f"job {self.id} was cancelled ({sum(self._received)}/{len(self)} results arrived)"
            )
