"""``HQExecutor``: coffea's executor interface on the coffea-hq queue.

Change one line of an analysis that runs with ``FuturesExecutor`` or ``DaskExecutor``:

>>> run = processor.Runner(executor=HQExecutor("http://hq.facility:8786"), schema=NanoAODSchema)
>>> out = run(fileset, processor_instance=MyAnalysis())

Chunks run on hq-workers; their outputs are added on the workers, ``treereduction`` at a
time, merges of merges until one is left, so the analysis session downloads one
accumulator however many chunks there are. This is the only module of coffea_hq that
imports coffea.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import cloudpickle
from coffea.processor import accumulate
from coffea.processor.executor import ExecutorBase
from coffea.util import coffea_console

from . import protocol
from .chunks import LimitedTask, entries, halves, is_memory_exceeded, restore_processed
from .client import Client, Job, resolve_url
from .errors import HQError, MemoryExceeded, TaskFailed
from .filecache import FILES_KEPT, KeepFilesOpen
from .progress import RunProgress, status_text
from .remote import TaskNotes
from .shipping import forwarded_env, ship_code
from .sizes import format_size, parse_memory

__all__ = ["HQExecutor", "merge_outputs"]

NO_URL_HELP = (
    "HQExecutor needs a coffea-hq server: pass its URL, HQExecutor('http://host:8786'), "
    "or set HQ_URL. To run everything on this machine, start a local cluster first:\n\n"
    "    from coffea_hq import LocalCluster\n"
    "    cluster = LocalCluster(workers=4)   # embedded Redis, an hq-server, 4 hq-workers\n"
    "    executor = HQExecutor(cluster.url)\n\n"
    "(or run `coffea-hq local --workers 4` in a terminal and export the HQ_URL it prints)"
)

PROGRESS_EVERY = 0.1  # seconds between progress-bar redraws
WATCH_EVERY = 2.0  # seconds between looks at the queue for the status line


def add_metrics(output: Any, notes: TaskNotes) -> None:
    """Add the chunks' resources to coffea's metrics (``Runner(savemetrics=True)``), beside
    its own ``bytesread``, ``columns`` and ``processtime``: totals and maxima over the
    chunks of wall time and CPU time (seconds) and the largest peak RSS (bytes) of a
    chunk's subprocess, and the same for the merges on workers."""
    metrics = output.get("metrics") if isinstance(output, dict) else None
    if not isinstance(metrics, dict):
        return
    for prefix, r in (("chunk", notes.chunks), ("merge", notes.merges)):
        if not r.count:
            continue
        metrics[f"{prefix}_walltime"] = r.wall
        metrics[f"{prefix}_cputime"] = r.cpu
        metrics[f"{prefix}_walltime_max"] = r.wall_max
        metrics[f"{prefix}_cputime_max"] = r.cpu_max
        metrics[f"{prefix}_max_rss_bytes"] = r.max_rss


def merge_outputs(outputs: list[Any]) -> Any:
    """Add chunk outputs with coffea's ``accumulate`` (the merge task the workers run).

    Chunks skipped by ``skipbadfiles`` arrive as ``None`` and add nothing; a merge of
    nothing but skipped chunks is ``None``.
    """
    return accumulate(outputs)


@dataclass(init=False)
class HQExecutor(ExecutorBase):
    """Run coffea chunks on a coffea-hq queue.

    >>> executor = HQExecutor("http://localhost:8786")   # or HQExecutor() with $HQ_URL set
    >>> out = processor.Runner(executor=executor, schema=NanoAODSchema)(fileset, MyAnalysis())

    Parameters
    ----------
        url : str or list of str, optional
            The hq-server, e.g. ``http://hq.facility:8786``. ``None`` reads ``$HQ_URL``.
            Several URLs (a list, or comma-separated) name replicas of one server: the
            run fails over to the next when one stops answering.
        status, unit, desc : optional
            Progress bars, as in coffea's executors.
        compression : int, optional
            Accepted for compatibility with coffea's executors. coffea-hq always compresses
            results in flight (lz4), so this changes nothing.
        retries : int, optional
            How many times coffea's ``Runner`` retries a chunk whose processing raises
            (default 3), on the worker that ran it; see also ``skipbadfiles``.
        recoverable : bool, optional
            On a failure, finish the other chunks and return ``(partial_output, exception)``
            instead of raising.
        treereduction : int or None, optional
            Chunk outputs merged per merge task on the workers (default 20). ``None`` sends
            every chunk's output to this process and adds them here, as ``FuturesExecutor``
            does by default.
        max_attempts : int, optional
            Attempts per chunk when its worker dies or hangs (segfault, out of memory,
            node lost), before the chunk fails (default 3).
        timeout : float, optional
            Seconds each executor call (coffea calls it once to preprocess, once to
            process) may take before it is cancelled with ``TimeoutError``.
        ship_local_modules : bool, optional
            Send the code of your own modules (the ones no installed package provides,
            e.g. ``my_processor.py`` beside your notebook) with the processor, so the
            workers need not have them (default True).
        pickle_by_value : sequence of str, optional
            More module names whose code travels with the processor.
        token : str, optional
            Access token, sent with every request (``Authorization: Bearer``); hq-server
            does not check it yet.
        tls_ca : str, optional
            PEM file of the CA that signed an ``https://`` server's certificate, if not a
            public one (default ``$HQ_TLS_CA``). The certificate is always verified.
        tls_cert, tls_key : str, optional
            This session's client certificate and key, for a server that requires one
            (mutual TLS; default ``$HQ_TLS_CERT``, ``$HQ_TLS_KEY``).
        environment : coffea_hq.Environment, optional
            The software environment the chunks run in on the workers, instead of the
            workers' own: ``Environment.pixi("pixi.toml")``, ``.pixi_pack(...)``,
            ``.pip([...])`` or ``.interpreter("/cvmfs/.../bin/python")`` (see
            docs/environments.md).
        files : list of str, optional
            Data files the processor reads (correctionlib JSON, calibrations): each
            appears under its basename in the chunk's working directory on the worker.
        env : dict or list of str, optional
            Environment variables to set for the chunks on the workers (this run only): a
            dict, or names whose values are taken from this session's ``os.environ``.
        savemetrics : bool, optional
            With coffea's ``Runner(savemetrics=True)``, add each run's chunk resources to
            its metrics: ``chunk_walltime``, ``chunk_cputime`` (totals, seconds), their
            ``_max`` over chunks, ``chunk_max_rss_bytes`` (the largest peak memory of a
            chunk's subprocess), and the same for ``merge_`` tasks.
        keep_files_open : int, optional
            How many ROOT files each worker slot keeps open between the chunks it runs
            (default 8), so that a file's header, tree metadata and NanoEvents form are
            read and built once per slot, not once per chunk; plain local paths are read
            with uproot's plain file source unless ``uproot_options`` name a ``handler``.
            0 runs coffea's own path: the file opened and closed for every chunk.
        memory : int or str, optional
            Memory (private resident set) one chunk may use on a worker, e.g. ``"2GiB"``. A chunk
            over it is stopped and run again as two halves by entry range, as often as
            needed down to ``split_min_entries`` entries; the output is the same as
            unsplit. Default: no limit (but see ``hq-worker --task-memory``).
        split_min_entries : int, optional
            The smallest chunk a chunk over its ``memory`` is split into (default 100);
            a chunk this small that still goes over fails with ``MemoryExceeded``, naming
            its file and entry range.
        walltime : float, optional
            Seconds one chunk may run on a worker. A chunk over it is stopped and fails
            with ``walltime_exceeded`` (it is neither retried nor split). Default: none.
        client : coffea_hq.Client, optional
            Reuse an open client instead of connecting for each run.
        priority : int, optional
            Among your own jobs, higher runs first (default 0); workers are shared fairly
            between users whatever the priorities.
        share : str, optional
            The fair-share group in open mode (default ``$HQ_USER`` or the login name);
            under ``hq-server --auth`` your token's user is used.
    """

    url: str | Sequence[str] | None
    retries: int
    recoverable: bool
    treereduction: int | None
    max_attempts: int
    timeout: float | None
    ship_local_modules: bool
    pickle_by_value: tuple[str, ...]
    token: str | None
    tls_ca: str | None
    tls_cert: str | None
    tls_key: str | None
    environment: Any
    files: tuple[str, ...]
    env: dict[str, str] | tuple[str, ...] | None
    savemetrics: bool
    keep_files_open: int
    memory: int | str | None
    split_min_entries: int
    walltime: float | None
    client: Client | None
    priority: int
    share: str | None

    def __init__(
        self,
        url: str | Sequence[str] | None = None,
        *,
        status: bool = True,
        unit: str = "items",
        desc: str = "Processing",
        compression: int | None = 1,
        function_name: str | None = None,
        retries: int = 3,
        recoverable: bool = False,
        treereduction: int | None = 20,
        max_attempts: int = protocol.DEFAULT_MAX_ATTEMPTS,
        timeout: float | None = None,
        ship_local_modules: bool = True,
        pickle_by_value: Sequence[str] = (),
        token: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        environment: Any = None,
        files: Sequence[str | os.PathLike[str]] = (),
        env: dict[str, str] | Sequence[str] | None = None,
        savemetrics: bool = False,
        keep_files_open: int = FILES_KEPT,
        memory: int | str | None = None,
        split_min_entries: int = 100,
        walltime: float | None = None,
        client: Client | None = None,
        priority: int = 0,
        share: str | None = None,
    ) -> None:
        # Every attribute is an argument: coffea's copy() rebuilds us as
        # type(self)(**self.__dict__).
        self.status = status
        self.unit = unit
        self.desc = desc
        self.compression = compression
        self.function_name = function_name
        self.url = url
        self.retries = retries
        self.recoverable = recoverable
        self.treereduction = treereduction
        self.max_attempts = max_attempts
        self.timeout = timeout
        self.ship_local_modules = ship_local_modules
        self.pickle_by_value = tuple(pickle_by_value)
        self.token = token
        self.tls_ca = tls_ca
        self.tls_cert = tls_cert
        self.tls_key = tls_key
        self.environment = environment
        self.files = tuple(os.fspath(f) for f in ([files] if isinstance(files, str) else files))
        self.env = env if env is None or isinstance(env, dict) else tuple(env)
        self.savemetrics = savemetrics
        self.keep_files_open = keep_files_open
        self.memory = memory
        self.split_min_entries = split_min_entries
        self.walltime = walltime
        self.client = client
        parse_memory(memory)  # a size that cannot be read fails now
        if walltime is not None and walltime <= 0:
            raise ValueError(f"walltime must be positive seconds, got {walltime!r}")
        if keep_files_open < 0:
            raise ValueError(f"keep_files_open must be 0 or more, got {keep_files_open}")
        if split_min_entries < 1:
            raise ValueError(f"split_min_entries must be at least 1, got {split_min_entries}")
        self.priority = priority
        self.share = share
        if env is not None:
            forwarded_env(env)  # a name this session lacks fails now, not mid-analysis
        if treereduction is not None and treereduction < 2:
            raise ValueError(f"treereduction must be at least 2 or None, got {treereduction}")
        if retries < 0 or max_attempts < 1:
            raise ValueError("HQExecutor needs retries >= 0 and max_attempts >= 1")
        if client is None:
            self.server_url()  # fail now, with the help text, rather than mid-analysis

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__, client=None)  # an open connection does not travel

    def server_url(self) -> str:
        """The server this executor submits to: ``url``, else ``$HQ_URL`` (several
        replicas' URLs comma-separated)."""
        if self.client is not None:
            return self.client.url
        return resolve_url(self.url, NO_URL_HELP)

    def __call__(
        self, items: Iterable[Any], function: Callable[..., Any], accumulator: Any
    ) -> tuple[Any, int | BaseException]:
        items = list(items)
        if not items:
            return accumulator, 0
        client = self.client or Client(
            self.server_url(),
            token=self.token,
            tls_ca=self.tls_ca,
            tls_cert=self.tls_cert,
            tls_key=self.tls_key,
        )
        try:
            return self._run(client, items, function, accumulator)
        finally:
            if self.client is None:
                client.close()

    # ------------------------------------------------------------------ running

    def _run(
        self, client: Client, items: list[Any], function: Callable[..., Any], accumulator: Any
    ) -> tuple[Any, int | BaseException]:
        reducing = self.treereduction is not None
        unwrapped = function
        memory = parse_memory(self.memory) or 0
        function, registered = ship_code(function, self.pickle_by_value, self.ship_local_modules)
        if self.keep_files_open:
            function = KeepFilesOpen(function, self.keep_files_open)
        if memory or self.walltime:
            function = LimitedTask(function, memory, self.walltime or 0.0)
        try:
            job = client.map(
                function,
                items,
                max_attempts=self.max_attempts,
                # With a memory limit, a chunk over it must not end the job: it is split.
                fail_fast=not self.recoverable and not memory,
                label=f"coffea {self.desc}: {self.function_name or ''}".strip(),
                reduce=merge_outputs if reducing else None,
                fanin=self.treereduction or protocol.DEFAULT_FANIN,
                # The processor inside is lz4 already (coffea's work function expects it so).
                blob_codec=protocol.Codec.NONE,
                env=self.env,
                environment=self.environment,
                files=self.files,
                resources=self.savemetrics,
                priority=self.priority,
                share=self.share,
                # A chunk's file: its worker likely has it open, or cached, already.
                locality=[_file_of(item) for item in items],
            )
        finally:
            for name in registered:
                cloudpickle.unregister_pickle_by_value(sys.modules[name])
        partial: list[Any] = [None]  # what arrived here before a failure (no reduction)
        try:
            output = self._collect(job, len(items), partial)
        except TaskFailed as failure:
            failures = job.failures
            if memory and failures and all(is_memory_exceeded(f) for f in failures):
                recovered = job.partial() if reducing else partial[0]
                return self._split(client, failures, unwrapped, [recovered, accumulator])
            exception = surface(failure)
            if not self.recoverable:
                _cancel_quietly(job)
                raise exception from None
            recovered = job.partial() if reducing else partial[0]
            return accumulate([recovered, accumulator]), exception
        except KeyboardInterrupt:
            job.interrupted()  # briefly: Ctrl-C must return within seconds
            raise
        except BaseException:  # a timeout: stop the workers on this job
            _cancel_quietly(job)
            raise
        if self.savemetrics:
            add_metrics(output, job.notes)
        return accumulate([output, accumulator]), 0

    def _split(
        self,
        client: Client,
        failures: list[TaskFailed],
        function: Callable[..., Any],
        done: list[Any],
    ) -> tuple[Any, int | BaseException]:
        """Run the chunks that went over the memory limit again as halves, in a follow-up
        job (the first job's tasks were sealed when it was submitted); add their outputs
        to ``done``, the outputs of everything else."""
        split: dict[Any, list[Any]] = {}
        for failure in failures:
            item = failure.item[0] if isinstance(failure.item, tuple) else failure.item
            size = entries(item)
            if size is None or size < 2 * self.split_min_entries:
                too_large = MemoryExceeded(
                    f"coffea-hq: work item {describe(item)} went over the memory limit of "
                    f"{format_size(parse_memory(self.memory) or 0)} on worker "
                    f"{failure.worker}, and is not split below {self.split_min_entries} "
                    "entries per chunk (HQExecutor(split_min_entries=...)): raise "
                    f"HQExecutor(memory=...) or find what in the processor grows so large. "
                    f"The worker said: {failure.message}"
                )
                if not self.recoverable:
                    raise too_large
                return accumulate(done), too_large
            split[item] = halves(item)
        more = [half for parts in split.values() for half in parts]
        output, exception = self._run(client, more, function, None)
        return accumulate([restore_processed(output, split), *done]), exception

    def _collect(self, job: Job, total: int, partial: list[Any]) -> Any:
        """Follow the job with coffea's progress bars; return the merged output."""
        with RunProgress(console=coffea_console, disable=not self.status) as progress:
            bar = progress.add_task(self.desc, total=total, unit=self.unit)
            merging = None
            if job.reducing:
                merging = _MergeBar(progress, total, self.treereduction or 2)
            watch = _Watch(job, progress) if self.status else None
            done, last_draw = 0, 0.0
            try:
                for _, value in job.as_completed(timeout=self.timeout):
                    done += 1
                    if not job.reducing:
                        partial[0] = accumulate([value], partial[0])
                    now = time.monotonic()
                    if now - last_draw > PROGRESS_EVERY or done == total:
                        if watch is not None:
                            watch.show()
                        progress.update(bar, completed=done, refresh=True)
                        last_draw = now
                    if merging is not None:
                        merging.update(job.merges, job.merges_open)
            finally:
                if watch is not None:
                    watch.stop()
            progress.update(bar, completed=done, refresh=True)
            if merging is not None:
                merging.finish()
        return job.result() if job.reducing else partial[0]


class _Watch:
    """Keeps the status line current while results are slow to come: every
    ``WATCH_EVERY`` seconds it asks the queue whether any worker is there, and shows the
    job's retried and crashed attempts."""

    def __init__(self, job: Job, progress: RunProgress) -> None:
        self.job = job
        self.progress = progress
        self.waiting = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="coffea-hq-progress", daemon=True)
        self._thread.start()

    def show(self) -> None:
        job = self.job
        status = status_text(retried=job.requeued, crashed=job.crashed, waiting=self.waiting)
        if status != self.progress.status:
            self.progress.status = status
            self.progress.refresh()

    def _run(self) -> None:
        while not self._stop.wait(WATCH_EVERY):
            try:
                queue = self.job.client.queue()
            except (HQError, RuntimeError):  # closed meanwhile, or the server is away
                continue
            self.waiting = queue.get("workers", 0) == 0 and queue.get("work", 0) > 0
            self.show()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=WATCH_EVERY + 1)


class _MergeBar:
    """The merge bar, drawn from the job summary each batch of results carries.

    It counts merge tasks finished; its total is the number a tree of fan-in ``fanin``
    needs for ``total`` chunks (or the number queued, if more).
    """

    def __init__(self, progress: Any, total: int, fanin: int) -> None:
        self.progress = progress
        self.total = -(-(total - 1) // (fanin - 1)) if total > 1 else 0
        self.bar: Any = None  # drawn once there is a merge to count: never an empty 0/0
        self.shown = (0, 0)
        if self.total:
            self.bar = progress.add_task("Merging (on workers)", total=self.total, unit="merges")

    def update(self, merges: int, merges_open: int) -> None:
        """Redraw if the job's ``merges`` (queued so far) or ``merges_open`` changed."""
        if (merges, merges_open) == self.shown:
            return
        self.shown = (merges, merges_open)
        self.total = max(self.total, merges)
        if self.bar is None:
            self.bar = self.progress.add_task("Merging (on workers)", total=0, unit="merges")
        self.progress.update(
            self.bar, completed=merges - merges_open, total=self.total, refresh=True
        )

    def finish(self) -> None:
        # The last batch carried the summary from before the final merge was counted.
        if self.bar is not None:
            self.progress.update(self.bar, completed=self.total, refresh=True)


def _cancel_quietly(job: Job) -> None:
    # Already finished, or the server is gone: nothing left to stop.
    with contextlib.suppress(Exception):
        job.cancel()


# ---------------------------------------------------------------------- errors


def _file_of(item: Any) -> str | None:
    """The file a work item reads (its locality key), if it names one."""
    filename = getattr(item, "filename", None)
    return filename if isinstance(filename, str) else None


def describe(item: Any) -> str:
    """A work item the way a physicist looks for it: dataset, file, tree, entry range."""
    if isinstance(item, tuple) and len(item) == 1:
        item = item[0]
    filename = getattr(item, "filename", None)
    if filename is None:
        return repr(item)
    parts = [f"dataset {getattr(item, 'dataset', '?')!r}", f"file {filename!r}"]
    if getattr(item, "treename", None):
        parts.append(f"tree {item.treename!r}")
    if getattr(item, "entrystart", None) is not None:
        parts.append(f"entries {item.entrystart}-{item.entrystop}")
    return ", ".join(parts)


def surface(failure: TaskFailed) -> BaseException:
    """The exception a coffea user expects from a failed task.

    The processor's own exception, as ``FuturesExecutor`` raises it, with the work item,
    the worker and the remote traceback added to its message. A chunk that crashed its
    worker on every attempt becomes a ``RuntimeError``, as with ``DaskExecutor``'s
    ``KilledWorker``; an exception whose class does not exist here stays a ``TaskFailed``.
    """
    where = (
        "a merge of chunk outputs" if failure.index < 0 else f"work item {describe(failure.item)}"
    )
    context = f"coffea-hq: {where} failed on worker {failure.worker}"
    exception = failure.exception
    if exception is None:
        if failure.exc_type.endswith("WorkerLost"):
            return RuntimeError(
                f"{context}: it crashed its worker on every attempt (likely a segfault or "
                f"out-of-memory issue): {failure.message}"
            )
        return failure
    text = context
    if failure.exc_type.endswith(("ModuleNotFoundError", "ImportError")):
        text += (
            "\n(the workers cannot import a module your processor needs: install it where the "
            "workers run, or name it in HQExecutor(pickle_by_value=[...]) to send its code)"
        )
    if failure.traceback:
        text += "\n\nRemote traceback:\n" + failure.traceback.rstrip()
    args = exception.args
    if (
        type(exception).__str__ is BaseException.__str__
        and len(args) == 1
        and isinstance(args[0], str)
    ):
        exception.args = (f"{args[0]}\n\n{text}",)
    else:  # its message comes from its own __str__: tracebacks still print notes
        exception.add_note(text)
    return exception
