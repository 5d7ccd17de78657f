"""Fixtures that start real parts: a Redis-protocol server, hq-server and hq-worker processes.

Every fixture that starts a process stops it in its teardown, whatever the test did.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from coffea_hq.server.keys import Keys
from coffea_hq.server.store import Store

from coffea_hq import protocol
from coffea_hq.embedded import EmbeddedRedis, free_port
from coffea_hq.errors import HQError
from coffea_hq.local import terminate, wait_healthy

FUNCTION_BLOB = b"function"  # what store-level tests name as a job's function
PORT_ATTEMPTS = 3  # hq-servers started on a port another process took first


def _stores() -> list[str]:
    """The stores the shared ``store`` fixture runs on: ``$HQ_TEST_STORES`` (comma-separated,
    ``embedded`` and/or ``redis-server``), by default the embedded Valkey alone; CI runs the
    store-script tests a second time against the system redis-server (see .ci/run)."""
    names = [
        n.strip() for n in os.environ.get("HQ_TEST_STORES", "embedded").split(",") if n.strip()
    ]
    unknown = sorted(set(names) - {"embedded", "redis-server"})
    if unknown or not names:
        raise pytest.UsageError(
            f"HQ_TEST_STORES={os.environ.get('HQ_TEST_STORES')!r}: use embedded and/or redis-server"
        )
    if "redis-server" in names and shutil.which("redis-server") is None:
        raise pytest.UsageError("HQ_TEST_STORES names redis-server, which is not on PATH")
    return names


STORES = _stores()


def pytest_report_header() -> str:
    return f"coffea-hq stores under test: {', '.join(STORES)}"


@pytest.fixture(scope="session", params=STORES)
def store(request: pytest.FixtureRequest) -> Iterator[EmbeddedRedis]:
    """A Redis-protocol server for the session: the embedded Valkey, or the system
    redis-server (``HQ_TEST_STORES``)."""
    binary = None if request.param == "embedded" else shutil.which("redis-server")
    server = EmbeddedRedis(binary=binary).start()
    yield server
    server.stop()


@pytest.fixture
def embedded_store() -> Iterator[EmbeddedRedis]:
    """A private embedded store for one test (for tests that restart or kill it)."""
    server = EmbeddedRedis().start()
    yield server
    server.stop()


@pytest.fixture
def prefix() -> str:
    """A fresh key prefix, so tests sharing a store never see each other's keys."""
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
async def queue_store(
    store: EmbeddedRedis, prefix: str, request: pytest.FixtureRequest
) -> AsyncIterator[Store]:
    """The server's domain layer on the shared store, for store-level (Lua script) tests,
    with the stand-in function blob ``FUNCTION_BLOB`` uploaded. A test marked
    ``@pytest.mark.lease_timeout(s)`` gets that lease timeout."""
    marker = request.node.get_closest_marker("lease_timeout")
    lease_timeout = float(marker.args[0]) if marker else 30.0
    client = aioredis.Redis.from_url(store.url)
    try:
        queue = Store(client, Keys(prefix), lease_timeout=lease_timeout, result_ttl=60)
        await queue.put_blob(protocol.blob_name(FUNCTION_BLOB), FUNCTION_BLOB)
        yield queue
    finally:
        await client.aclose()


@pytest.fixture
def redis_client(store: EmbeddedRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(store.url)
    yield client
    client.close()


@dataclass
class Processes:
    """Starts hq-server and hq-worker processes for one test and always stops them."""

    log_dir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    log_files: dict[int, Path] = field(default_factory=dict)  # pid: its output

    def spawn(
        self, name: str, argv: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """``python -m argv``, its output in the test's log directory; ``env`` is added to
        this process's environment."""
        path = self.log_dir / f"{name}-{len(self.procs)}.log"
        log = open(path, "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", *argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=None if env is None else {**os.environ, **env},
        )
        log.close()
        self.procs.append(proc)
        self.log_files[proc.pid] = path
        return proc

    def server(
        self,
        redis_url: str,
        *args: str,
        port: int | None = None,
        prefix: str = "hq",
        tls: ssl.SSLContext | None = None,
        env: dict[str, str] | None = None,
    ) -> tuple[str, subprocess.Popen[bytes]]:
        """An hq-server on ``redis_url``; ``tls``: it serves HTTPS (give it --tls-cert and
        --tls-key in ``args``) and is checked with this client context."""
        chosen = port
        for _ in range(PORT_ATTEMPTS):
            port = chosen or free_port()
            proc = self.spawn(
                "server",
                [
                    "coffea_hq.server",
                    "--redis",
                    redis_url,
                    "--port",
                    str(port),
                    "--prefix",
                    prefix,
                    *args,
                ],
                env=env,
            )
            url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
            try:
                wait_healthy(url, proc, timeout=20, context=tls)
            except HQError:
                # A free port taken by another process (an xdist sibling's server, a
                # client's outgoing connection) before this server bound it: another one.
                if (
                    chosen
                    or proc.poll() is None
                    or "address already in use" not in self.log_files[proc.pid].read_text()
                ):
                    raise
                continue
            return url, proc
        raise HQError(f"no free port for an hq-server in {PORT_ATTEMPTS} attempts")

    def worker(
        self, url: str, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        return self.spawn("worker", ["coffea_hq.worker", url, *args], env=env)

    def logs(self) -> str:
        return "\n".join(
            f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.log_dir.glob("*.log"))
        )

    def stop_all(self) -> None:
        """Workers first (they drain through their server), then servers."""
        workers = [p for p in self.procs if "coffea_hq.worker" in list(p.args)]  # type: ignore[arg-type]
        terminate(workers, 10)
        terminate([p for p in self.procs if p not in workers], 10)


@pytest.fixture
def processes(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    yield procs
    procs.stop_all()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(procs.logs())


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    outcome: Any = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture
def server_url(store: EmbeddedRedis, processes: Processes, prefix: str) -> str:
    """A real hq-server on the shared store (short lease timeout for fast fault tests)."""
    url, _ = processes.server(store.url, "--lease-timeout", "3", prefix=prefix)
    return url


@pytest.fixture(scope="module")
def module_server_url(
    store: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """One real hq-server (as ``server_url``'s) for a whole module, on a prefix of its own:
    for requests that change nothing another test of the module looks at (refused bad
    input), so a parametrized test starts one server rather than one per case."""
    procs = Processes(tmp_path_factory.mktemp("module-server"))
    try:
        url, _ = procs.server(store.url, "--lease-timeout", "3", prefix="m" + uuid.uuid4().hex[:10])
        yield url
    finally:
        procs.stop_all()


@pytest.fixture(scope="session")
def chunk_cluster() -> Iterator[Any]:
    """One LocalCluster (one worker, one slot) for the chunk tests (test_slot_cache,
    test_splitting), started once."""
    from coffea_hq import LocalCluster

    with LocalCluster(workers=1, slots=1) as cluster:
        yield cluster
