"""Adversarial review of replica failover (coffea_hq.transport): a replica that answers
with HTTP errors (a proxy in front of a replica that is gone answers 502/503/504) must
be failed over like one that refuses connections, and within a bounded time."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from coffea_hq import Client
from coffea_hq.errors import ServerUnreachable


class _Gateway(http.server.BaseHTTPRequestHandler):
    """What a load balancer or ingress answers for a backend that is down."""

    status = 502

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = b"<html>502 Bad Gateway</html>"
        self.send_response(self.status)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def gateway() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Gateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_replica_answering_502_is_failed_over(gateway: str, server_url: str) -> None:
    with Client(f"{gateway},{server_url}", retry_for=30) as client:
        started = time.monotonic()
        assert client.run(client.api.queue()).jobs == 0
        assert time.monotonic() - started < 5, "retried the 502 instead of the other replica"
        assert client.url == server_url


@pytest.mark.slow
def test_every_replica_answering_errors_gives_up_in_time(gateway: str) -> None:
    with Client(f"{gateway},{gateway}/", retry_for=1.5) as client:
        started = time.monotonic()
        with pytest.raises(ServerUnreachable, match="HTTP 502"):
            client.run(client.api.queue())
        assert time.monotonic() - started < 10


@pytest.fixture
def hung() -> Iterator[str]:
    """A replica whose host takes connections and never answers (stopped, swapping)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def test_a_hung_first_replica_does_not_fail_the_client(hung: str, server_url: str) -> None:
    """The first use's health check gave up after 5 s on the hung first URL, naming both,
    without ever asking the second."""
    with Client(f"{hung},{server_url}", retry_for=30) as client:
        started = time.monotonic()
        assert client.run(client.api.queue()).jobs == 0  # (after the health check)
        assert client.url == server_url
        assert time.monotonic() - started < 10
