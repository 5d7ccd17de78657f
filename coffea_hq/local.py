"""``LocalCluster``: an embedded Redis, one hq-server and N hq-workers on this machine.

>>> with LocalCluster(workers=2) as cluster:
...     Client(cluster.url).map(abs, [-1, -2]).result()
[1, 2]
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from . import lifeline, protocol
from .autoscale import LocalScaler
from .embedded import EmbeddedRedis, free_port
from .errors import HQError

log = logging.getLogger(__name__)


def _interactive() -> bool:
    """Whether a person is watching this session (a Python prompt, IPython, Jupyter)."""
    return hasattr(sys, "ps1") or bool(sys.flags.interactive) or "IPython" in sys.modules


START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
INTERRUPTED_STOP_TIMEOUT = 3.0  # after Ctrl-C: the job was cancelled, nothing to wait for
WATCH_EVERY = 0.5  # seconds between looks for workers that died
RESTART_WINDOW = 60.0  # a crash loop: at most RESTART_BURST restarts per window
RESTART_BURST = 5


def describe_exit(code: int | None) -> str:
    """How a process ended, in words: its exit code or the signal that killed it."""
    if code is None:
        return "still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit code {code}"


def wait_healthy(
    url: str,
    proc: subprocess.Popen[bytes],
    timeout: float,
    context: ssl.SSLContext | None = None,
) -> None:
    """Wait until the hq-server ``proc`` answers ``/health`` at ``url`` (an ``https://``
    one verified with ``context``)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise HQError(f"hq-server exited at start with code {proc.returncode}")
        with (
            contextlib.suppress(OSError, ValueError),
            urllib.request.urlopen(url + protocol.HEALTH, timeout=2, context=context) as r,
        ):
            if json.load(r).get("status") == "ok":
                return
        if time.monotonic() > deadline:
            raise HQError(f"hq-server did not answer at {url} within {timeout}s")
        time.sleep(0.05)


def terminate(procs: Sequence[subprocess.Popen[bytes]], timeout: float) -> None:
    """Stop processes: SIGCONT (a stopped process cannot act on SIGTERM) and SIGTERM to
    all, then wait for them together up to ``timeout`` seconds, then SIGKILL the rest."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdin is not None:  # a lifeline pipe
            with contextlib.suppress(OSError):
                proc.stdin.close()


class LocalCluster:
    """Start everything coffea-hq needs on this machine; stop all of it on exit.

    ``workers`` hq-worker processes with ``slots`` task subprocesses each. ``redis_url``
    uses an existing store instead of the embedded one. ``port`` 0 picks a free one.
    ``logs`` is a directory for the processes' logs (default: a temporary one,
    removed at exit; ``None``-like ``"-"`` streams them to this terminal).
    """

    def __init__(
        self,
        workers: int = 2,
        slots: int = 1,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        redis_url: str | None = None,
        lease_timeout: float = protocol.DEFAULT_LEASE_TIMEOUT,
        server_args: tuple[str, ...] = (),
        worker_args: tuple[str, ...] = (),
        logs: str | None = None,
        adaptive: tuple[int, int] | None = None,
        scale_interval: float = 1.0,
        scale_cooldown: float = 10.0,
    ) -> None:
        if workers < 0 or slots < 1:
            raise ValueError("LocalCluster needs workers >= 0 and slots >= 1")
        if adaptive is not None:
            low, high = adaptive
            if not 0 <= low <= high or high < 1:
                raise ValueError("adaptive=(min, max) needs 0 <= min <= max and max >= 1")
            workers = low
        if not protocol.is_loopback(host) and not {"--auth", "--insecure"} & set(server_args):
            # The server would refuse too; say it here, before anything starts.
            raise ValueError(
                f"LocalCluster runs an open server (no tokens): it listens on loopback only, "
                f"not {host!r}. Pass server_args=('--insecure',) if the network is trusted"
            )
        self.adaptive = adaptive
        self.scaler: LocalScaler | None = None
        self._scale_settings = (scale_interval, scale_cooldown)
        self.n_workers = workers
        self.slots = slots
        self.host = host
        self.port = port or free_port(host)
        self.lease_timeout = lease_timeout
        self.server_args = tuple(server_args)
        self.worker_args = tuple(worker_args)
        self._stream_logs = logs == "-"
        self._own_logs = logs is None
        self.log_dir = Path(
            tempfile.mkdtemp(prefix="coffea-hq-logs-") if logs in (None, "-") else logs
        )
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.redis: EmbeddedRedis | None = None if redis_url else EmbeddedRedis()
        self.redis_url = redis_url
        self.server: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self._log_files: list[IO[bytes]] = []
        self._started = False
        self._lock = threading.Lock()  # the workers list: the watcher restarts workers
        self._closing = threading.Event()
        self._watcher: threading.Thread | None = None
        self._restarts: list[float] = []  # when workers were restarted (crash-loop bound)
        self._reported: set[int] = set()  # pids of dead workers already logged
        self._gave_up_until = 0.0

    @property
    def url(self) -> str:
        """The server URL to give a :class:`~coffea_hq.Client` (or ``HQ_URL``)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def __repr__(self) -> str:
        return (
            f"<LocalCluster {self.url}: {len(self.workers)} workers x {self.slots} slots, "
            f"dashboard {self.dashboard_link}>"
        )

    @property
    def dashboard_link(self) -> str:
        """The server's dashboard page (open it in a browser)."""
        return self.url.rstrip("/") + protocol.DASHBOARD

    def _repr_html_(self) -> str:
        from .html import cluster_html

        return cluster_html(self)

    # ------------------------------------------------------------------ start

    def start(self) -> LocalCluster:
        if self._started:
            return self
        self._started = True
        atexit.register(self.close)
        try:
            if self.redis is not None:
                self.redis.start()
                self.redis_url = self.redis.url
            self.start_server()
            for _ in range(self.n_workers):
                self.add_worker()
            if self.adaptive is not None:
                interval, cooldown = self._scale_settings
                self.scaler = LocalScaler(
                    self, *self.adaptive, interval=interval, cooldown=cooldown
                )
                self.scaler.start()
            self._watcher = threading.Thread(
                target=self._watch, name="coffea-hq-local-watch", daemon=True
            )
            self._watcher.start()
        except BaseException:
            self.close()
            raise
        log.info("coffea-hq LocalCluster at %s: dashboard %s", self.url, self.dashboard_link)
        if _interactive():  # a notebook or a prompt: say where to look, as Dask does
            print(f"coffea-hq dashboard: {self.dashboard_link}", file=sys.stderr, flush=True)
        return self

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        out: IO[bytes] | None = None
        if not self._stream_logs:
            out = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 (closed in close())
            self._log_files.append(out)
        # Own session (the terminal's Ctrl-C is ours to handle), dies with this process.
        return lifeline.spawn(
            [sys.executable, "-m", *argv],
            lifeline=True,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
        )

    def start_server(self) -> None:
        """(Re)start the hq-server process on this cluster's port."""
        assert self.redis_url
        self.server = self._spawn(
            "server",
            [
                "coffea_hq.server",
                "--redis",
                self.redis_url,
                "--host",
                self.host,
                "--port",
                str(self.port),
                "--lease-timeout",
                str(self.lease_timeout),
                *self.server_args,
            ],
        )
        self._wait_healthy(self.server)

    def add_worker(self, *extra: str) -> subprocess.Popen[bytes]:
        """Start one more hq-worker process."""
        with self._lock:
            n = len(self.workers)
            proc = self._spawn(
                f"worker-{n}",
                [
                    "coffea_hq.worker",
                    self.url,
                    "--slots",
                    str(self.slots),
                    "--name",
                    f"local-{self.port}-{n}",
                    *self.worker_args,
                    *extra,
                ],
            )
            self.workers.append(proc)
            return proc

    def _watch(self) -> None:
        """Restart workers that die while the cluster runs (an autoscaled cluster's own
        scaler replaces them instead), at most RESTART_BURST per RESTART_WINDOW."""
        while not self._closing.wait(WATCH_EVERY):
            with self._lock:
                dead = [
                    w for w in self.workers if w.poll() is not None and w.pid not in self._reported
                ]
            for proc in dead:
                if self._closing.is_set():
                    return
                self._reported.add(proc.pid)
                if self.scaler is not None and proc in self.scaler.draining:
                    continue  # scaled down: it was asked to stop
                self._replace(proc)

    def _replace(self, proc: subprocess.Popen[bytes]) -> None:
        name, how = self.worker_name(proc), describe_exit(proc.returncode)
        if self.scaler is not None:
            log.warning("worker %s died (%s); the autoscaler replaces it if needed", name, how)
            return
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW]
        if len(self._restarts) >= RESTART_BURST:
            if now >= self._gave_up_until:
                self._gave_up_until = now + RESTART_WINDOW
                log.error(
                    "worker %s died (%s); %d workers were restarted in the last %.0f s, so it "
                    "is not restarted (see its log in %s)",
                    name,
                    how,
                    len(self._restarts),
                    RESTART_WINDOW,
                    self.log_dir,
                )
            return
        self._restarts.append(now)
        new = self.add_worker()
        log.warning(
            "worker %s died (%s); started %s in its place", name, how, self.worker_name(new)
        )

    def worker_name(self, proc: subprocess.Popen[bytes]) -> str:
        """The name a worker process of this cluster reports to the server."""
        return f"local-{self.port}-{self.workers.index(proc)}"

    def _wait_healthy(self, proc: subprocess.Popen[bytes]) -> None:
        try:
            wait_healthy(self.url, proc, START_TIMEOUT)
        except HQError as e:
            raise HQError(f"{e}:\n{self.log_tail('server')}") from None

    def log_tail(self, name: str, size: int = 3000) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-size:] if path.exists() else "(no log)"

    # ------------------------------------------------------------------ stop

    def close(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop workers (draining, up to ``timeout`` seconds), the server and the embedded
        Redis; remove temp files."""
        if not self._started:
            return
        self._started = False
        atexit.unregister(self.close)
        self._closing.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        if self.scaler is not None:
            self.scaler.stop()
        with self._lock:
            workers = list(self.workers)
        terminate(workers, timeout)
        if self.server is not None:
            terminate([self.server], timeout)
        if self.redis is not None:
            self.redis.stop()
        for f in self._log_files:
            f.close()
        if self._own_logs:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, kind: object, *exc: object) -> None:
        # After Ctrl-C the job was cancelled: workers have nothing worth waiting for.
        interrupted = isinstance(kind, type) and issubclass(kind, KeyboardInterrupt)
        self.close(INTERRUPTED_STOP_TIMEOUT if interrupted else STOP_TIMEOUT)
