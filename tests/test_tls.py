"""TLS at the HTTP boundary, with certificates made here by trustme: a real hq-server
serving HTTPS (and mutual TLS), real workers and clients verifying it, and each way a TLS
connection can be wrong failing at once with one sentence."""

from __future__ import annotations

import asyncio
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from coffea_hq import Client, TLSError
from coffea_hq.embedded import EmbeddedRedis
from coffea_hq.tls import refusal

from .conftest import Processes
from .tasks import square

FAIL_FAST = 4.0  # seconds within which a TLS mistake must be reported (no retrying)


@pytest.fixture(scope="module")
def tls_store() -> Iterator[EmbeddedRedis]:
    """One store for the module: TLS is the HTTP side's business."""
    server = EmbeddedRedis().start()
    yield server
    server.stop()


class Certs:
    """A CA and the server's certificate from it, as PEM files under ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.ca = trustme.CA()
        self.dir = directory
        self.ca_file = self._write("ca.pem", self.ca.cert_pem.bytes())
        server = self.ca.issue_cert("127.0.0.1", "localhost")
        self.server_cert = self._write(
            "server.pem", b"".join(blob.bytes() for blob in server.cert_chain_pems)
        )
        self.server_key = self._write("server-key.pem", server.private_key_pem.bytes())

    def _write(self, name: str, data: bytes) -> str:
        path = self.dir / name
        path.write_bytes(data)
        return str(path)

    def client_pair(self, ca: trustme.CA, name: str) -> tuple[str, str]:
        """A client certificate (and key) for ``name`` signed by ``ca``."""
        cert = ca.issue_cert(f"{name}@example.org")
        return (
            self._write(f"{name}.pem", b"".join(b.bytes() for b in cert.cert_chain_pems)),
            self._write(f"{name}-key.pem", cert.private_key_pem.bytes()),
        )

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_file)

    def server_args(self) -> list[str]:
        return ["--tls-cert", self.server_cert, "--tls-key", self.server_key]


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return Certs(tmp_path)


def refused_fast(client: Client) -> TLSError:
    start = time.monotonic()
    with pytest.raises(TLSError) as info:
        client.queue()
    assert time.monotonic() - start < FAIL_FAST, "a TLS failure must not be retried"
    assert "\n" not in str(info.value)  # one sentence
    return info.value


def test_https_round_trip_with_a_private_ca(
    tls_store: EmbeddedRedis, processes: Processes, prefix: str, certs: Certs
) -> None:
    url, _ = processes.server(
        tls_store.url, *certs.server_args(), prefix=prefix, tls=certs.context()
    )
    assert url.startswith("https://")
    processes.worker(url, "--tls-ca", certs.ca_file)
    with Client(url, tls_ca=certs.ca_file) as client:
        assert client.map(square, range(40)).result(timeout=30) == [x * x for x in range(40)]
        assert client.queue()["counters"]["tasks_ok"] == 40


def test_a_worker_takes_its_ca_from_the_environment(
    tls_store: EmbeddedRedis, processes: Processes, prefix: str, certs: Certs
) -> None:
    url, _ = processes.server(
        tls_store.url, *certs.server_args(), prefix=prefix, tls=certs.context()
    )
    processes.worker(url, env={"HQ_TLS_CA": certs.ca_file})
    with Client(url, tls_ca=certs.ca_file) as client:
        assert client.map(square, range(5)).result(timeout=30) == [x * x for x in range(5)]


def test_a_certificate_from_another_ca_is_refused_at_once(
    tls_store: EmbeddedRedis, processes: Processes, prefix: str, certs: Certs, tmp_path: Path
) -> None:
    url, _ = processes.server(
        tls_store.url, *certs.server_args(), prefix=prefix, tls=certs.context()
    )
    other = tmp_path / "other-ca.pem"
    other.write_bytes(trustme.CA().cert_pem.bytes())
    with Client(url, tls_ca=str(other)) as client:
        error = refused_fast(client)
    assert "does not trust" in str(error) and "HQ_TLS_CA" in str(error)
    # Verification is on by default: without the private CA, the system's CAs refuse it too.
    with Client(url) as client:
        assert "does not trust" in str(refused_fast(client))
    # A worker that cannot verify the server gives up rather than retry for ever.
    worker = processes.worker(url, "--retry-for", "60")
    assert worker.wait(timeout=20) != 0


def test_plaintext_to_a_tls_port_says_to_use_https(
    tls_store: EmbeddedRedis, processes: Processes, prefix: str, certs: Certs
) -> None:
    url, _ = processes.server(
        tls_store.url, *certs.server_args(), prefix=prefix, tls=certs.context()
    )
    plain = url.replace("https://", "http://")
    with Client(plain) as client:
        error = refused_fast(client)
    assert "speaks TLS" in str(error) and url in str(error)


def test_https_to_a_plaintext_server_says_it_does_not_speak_tls(server_url: str) -> None:
    with Client(server_url.replace("http://", "https://")) as client:
        error = refused_fast(client)
    assert "does not speak TLS" in str(error)


def test_mutual_tls_refuses_a_client_without_a_certificate(
    tls_store: EmbeddedRedis, processes: Processes, prefix: str, certs: Certs
) -> None:
    users = trustme.CA()
    users_ca = certs._write("users-ca.pem", users.cert_pem.bytes())
    cert, key = certs.client_pair(users, "alice")
    context = certs.context()
    context.load_cert_chain(cert, key)
    url, _ = processes.server(
        tls_store.url, *certs.server_args(), "--tls-ca", users_ca, prefix=prefix, tls=context
    )
    processes.worker(url, env={"HQ_TLS_CA": certs.ca_file, "HQ_TLS_CERT": cert, "HQ_TLS_KEY": key})
    with Client(url, tls_ca=certs.ca_file) as anonymous:
        error = refused_fast(anonymous)
    assert "client certificate" in str(error)
    # A certificate from a CA the server does not take for clients is refused too.
    stranger, stranger_key = certs.client_pair(trustme.CA(), "mallory")
    with Client(url, tls_ca=certs.ca_file, tls_cert=stranger, tls_key=stranger_key) as client:
        refused_fast(client)
    with Client(url, tls_ca=certs.ca_file, tls_cert=cert, tls_key=key) as alice:
        assert alice.map(square, range(10)).result(timeout=30) == [x * x for x in range(10)]
        queue = alice.queue()
    # The refused clients reached nothing: only alice's job ever existed.
    assert queue["counters"]["tasks_ok"] == 10


def test_a_refusal_that_resets_the_connection_is_recognised(certs: Certs) -> None:
    """hq-server hangs up on a client without a certificate right after the handshake; when
    the client's request is already in its socket buffer the kernel resets the connection
    instead of closing it (a few % of refusals under load). The probe must read that as the
    refusal too, or the client retries until it calls the server unreachable (the flaky
    failure of the test above). A TLS listener that always hangs up that way: the reset is
    the kernel's behaviour, made certain here, not the server's."""
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(certs.server_cert, certs.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def hang_up_unread() -> None:
        conn, _ = listener.accept()
        with server_side.wrap_socket(conn, server_side=True) as tls:
            select.select([tls], [], [], 5)  # the client's request has arrived, unread
            tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    thread = threading.Thread(target=hang_up_unread, daemon=True)
    thread.start()
    try:
        answer = asyncio.run(refusal(f"https://127.0.0.1:{port}", certs.context()))
    finally:
        thread.join(10)
        listener.close()
    assert answer is not None and "requires a client certificate" in answer


def test_a_missing_ca_file_fails_when_the_client_is_made(tmp_path: Path) -> None:
    with pytest.raises(TLSError, match="cannot load the TLS CA"):
        Client("https://127.0.0.1:1", tls_ca=str(tmp_path / "nope.pem"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.pem"], "cannot load"),
        (["--tls-cert", "/nonexistent.pem"], "--tls-cert and --tls-key go together"),
        (["--tls-ca", "/nonexistent.pem"], "needs --tls-cert and --tls-key"),
        (["--store-ca", "/nonexistent.pem"], "need a rediss:// store URL"),
    ],
)
def test_bad_tls_options_stop_the_server_with_a_sentence(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from coffea_hq.server import cli

    with pytest.raises(SystemExit) as info:
        cli.main(["--redis", "redis://127.0.0.1:1/0", *argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_worker_with_an_unreadable_ca_exits_with_a_sentence(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from coffea_hq.worker import cli

    assert cli.main(["https://127.0.0.1:1", "--tls-ca", "/nonexistent.pem"]) == 2
    assert "cannot load the TLS CA from /nonexistent.pem" in capsys.readouterr().err
