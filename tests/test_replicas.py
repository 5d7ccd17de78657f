"""Replicas for real: clients and workers given several hq-server URLs on one store fail
over when a replica dies, with nothing lost and every task completed once by the
server's own accounting; a worker whose presence moves to another replica keeps its
leases (the dropped replica's grace timer is fenced off by the newer session)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import redis

from coffea_hq import Client, HQError
from coffea_hq.api import API
from coffea_hq.embedded import EmbeddedRedis, free_port
from coffea_hq.errors import ServerUnreachable
from coffea_hq.transport import parse_urls
from tests.conftest import Processes
from tests.tasks import nap
from tests.util import get_json, poll_until

embedded_only = pytest.mark.parametrize("store", ["embedded"], indirect=True)

TASKS = 200
STALL_BOUND = 10.0  # seconds without a completion after a kill that fail the test


def _counters(url: str) -> dict[str, int]:
    return get_json(url + "/api/v1/queue")["counters"]


def _holders(r: redis.Redis, prefix: str, job: str) -> dict[str, str]:
    raw = r.hgetall(f"{prefix}:job:{{{job}}}:holder")
    return {k.decode(): v.decode() for k, v in raw.items()}


def _sessions(r: redis.Redis, prefix: str) -> dict[str, str]:
    raw = r.hgetall(f"{prefix}:workers:session")
    return {k.decode(): v.decode() for k, v in raw.items()}


def test_bad_url_lists_are_clear_errors() -> None:
    assert parse_urls(" http://a:1/, https://b:2 ,") == ("http://a:1", "https://b:2")
    assert parse_urls(["http://a:1", "http://a:1/"]) == ("http://a:1",)
    for bad, says in [
        ("", "no coffea-hq server URL"),
        (",", "no coffea-hq server URL"),
        ([], "no coffea-hq server URL"),
        ("http://a:1,localhost:2", "must look like http://host:port"),
        ("ftp://a", "must look like"),
        ("http://a:port", "bad port"),
        ("http://", "must look like"),
    ]:
        with pytest.raises(HQError, match=says):
            parse_urls(bad)  # type: ignore[arg-type]
    with pytest.raises(HQError, match="must look like"):
        Client("http://127.0.0.1:1,nonsense")
    out = subprocess.run(
        [sys.executable, "-m", "coffea_hq.worker", "http://127.0.0.1:1,nonsense"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2 and "must look like http://host:port" in out.stderr, out.stderr


def _completions_resume(url: str, before: int, timeout: float) -> float:
    """Seconds until the server's tasks_ok count passes ``before`` (fails past ``timeout``)."""
    return poll_until(lambda: _counters(url)["tasks_ok"] > before, timeout, "completions resume")


@pytest.mark.slow
@embedded_only
@pytest.mark.parametrize("killed", ["client's replica", "workers' replica"])
def test_a_killed_replica_loses_nothing(
    processes: Processes, store: EmbeddedRedis, prefix: str, killed: str
) -> None:
    # A short lease timeout: a lease whose reply died with the replica (granted in the
    # store, never received) comes back within it; see docs/queue.md.
    a, doomed = processes.server(store.url, "--lease-timeout", "5", prefix=prefix)
    b, _ = processes.server(store.url, "--lease-timeout", "5", prefix=prefix)
    client_urls, worker_urls = (
        ([a, b], f"{b},{a}")
        if killed == "client's replica"
        else (
            [b, a],
            f"{a},{b}",
        )
    )
    for i in range(2):
        processes.worker(worker_urls, "--name", f"w{i}", "--slots", "2")
    with Client(client_urls) as client:
        job = client.map(nap, [0.02] * TASKS)
        poll_until(lambda: _counters(b)["tasks_ok"] >= TASKS // 4, 60, "a quarter done")
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(10)
        killed_at = time.monotonic()
        before = _counters(b)["tasks_ok"]
        stall = _completions_resume(b, before, STALL_BOUND)
        assert job.result(timeout=60) == [0.02] * TASKS
        took = time.monotonic() - killed_at
    counters = _counters(b)
    print(f"{killed} killed: completions resumed after {stall:.2f}s, rest took {took:.2f}s")
    assert counters["tasks_ok"] == TASKS and counters["tasks_failed"] == 0, counters
    assert stall < STALL_BOUND


class _Proxy:
    """A TCP proxy in front of one replica, on its own thread, that the test can cut:
    every connection through it drops, as when a network path to a replica breaks."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._cut: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Proxy:
        self._thread.start()
        assert self._ready.wait(10), "proxy did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def cut(self) -> None:
        if self._cut is not None:
            self._loop.call_soon_threadsafe(self._cut.set)

    def _run(self) -> None:
        self._loop.run_until_complete(self._serve())
        with contextlib.suppress(RuntimeError):
            self._loop.run_forever()

    async def _serve(self) -> None:
        self._cut = asyncio.Event()
        server = await asyncio.start_server(self._pipe, "127.0.0.1", self.port)
        self._server = server
        self._ready.set()

        async def close_on_cut() -> None:
            assert self._cut is not None
            await self._cut.wait()
            server.close()

        self._closer = asyncio.create_task(close_on_cut())

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._cut is not None
        up_reader, up_writer = await asyncio.open_connection(*self.target)

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()

        copies = [
            asyncio.create_task(copy(reader, up_writer)),
            asyncio.create_task(copy(up_reader, writer)),
        ]
        cut = asyncio.create_task(self._cut.wait())
        await asyncio.wait([*copies, cut], return_when=asyncio.FIRST_COMPLETED)
        for task in [*copies, cut]:
            task.cancel()
        for w in (writer, up_writer):
            with contextlib.suppress(OSError):
                w.transport.abort()  # a reset, not a clean close: the path broke


@pytest.fixture
def proxy_to() -> Iterator[Callable[[str], _Proxy]]:
    """Starts proxies in front of replicas; stops them all after the test."""
    proxies: list[_Proxy] = []

    def start(target: str) -> _Proxy:
        proxies.append(_Proxy(target).__enter__())
        return proxies[-1]

    yield start
    for p in proxies:
        p.__exit__()


@pytest.mark.slow
@embedded_only
def test_a_worker_that_moves_its_presence_keeps_its_leases(
    processes: Processes,
    store: EmbeddedRedis,
    prefix: str,
    redis_client: redis.Redis,
    proxy_to: Callable[[str], _Proxy],
) -> None:
    a, _ = processes.server(store.url, "--lease-timeout", "30", prefix=prefix)
    b, _ = processes.server(store.url, "--lease-timeout", "30", prefix=prefix)
    path = proxy_to(a)
    processes.worker(f"{path.url},{b}", "--name", "mover", "--slots", "2")
    with Client(b) as client:
        poll_until(lambda: "mover" in _sessions(redis_client, prefix), 20, "presence open")
        first = _sessions(redis_client, prefix)["mover"]
        job = client.map(nap, [3.0, 3.0])
        poll_until(
            lambda: (
                sorted(_holders(redis_client, prefix, job.id).values()) == ["1|mover", "1|mover"]
            ),
            20,
            "both leased by mover",
        )
        path.cut()  # A sees the presence drop and starts its grace timer; A stays up
        moved = poll_until(
            lambda: _sessions(redis_client, prefix).get("mover", first) != first,
            10,
            "presence reopened on B",
        )
        time.sleep(1.5 + 1.0)  # past A's grace (protocol.PRESENCE_GRACE): its timer has run
        assert _counters(a)["requeued"] == 0, "A's grace timer requeued a moved worker's leases"
        assert sorted(_holders(redis_client, prefix, job.id).values()) == ["1|mover", "1|mover"]
        assert job.result(timeout=30) == [3.0, 3.0]
    counters = _counters(b)
    print(f"presence moved to B within {moved:.2f}s")
    assert counters["tasks_ok"] == 2 and counters["requeued"] == 0, counters
    assert counters["refused"] == 0, counters


def test_every_replica_down_names_them_all() -> None:
    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]

    async def ask() -> None:
        api = API(dead, retry_for=0.5)
        try:
            await api.queue()
        finally:
            await api.close()

    with pytest.raises(ServerUnreachable) as e:
        asyncio.run(ask())
    assert f"any of {dead[0]}, {dead[1]}" in str(e.value), e.value


def test_a_dead_first_url_fails_over_at_once(server_url: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with Client(f"{dead},{server_url}") as client:
        started = time.monotonic()
        assert client.run(client.api.queue()).jobs == 0
        assert client.url == server_url and client.urls == (dead, server_url)
        assert time.monotonic() - started < 5
