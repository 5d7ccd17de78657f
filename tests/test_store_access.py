"""hq-server on a locked-down store: as a minimal Redis ACL user (server/acl.py), and over
rediss:// with certificates made here (trustme), each against a real redis-server."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import trustme
from coffea_hq.server.acl import acl_rules
from coffea_hq.server.keys import Keys

from coffea_hq import Client
from coffea_hq.embedded import EmbeddedRedis, free_port

from .conftest import Processes
from .tasks import square

REDIS_SERVER = shutil.which("redis-server")
DOCS = Path(__file__).resolve().parent.parent / "docs" / "deploy.md"


@pytest.fixture
def acl_store() -> Iterator[EmbeddedRedis]:
    """A private store (ACL users are server-wide): redis-server where installed."""
    server = EmbeddedRedis(binary=REDIS_SERVER).start()
    yield server
    server.stop()


def counters(client: redis.Redis, prefix: str) -> dict[str, int]:
    raw = client.hgetall(Keys(prefix).counters)
    return {k.decode(): int(v) for k, v in raw.items()}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def denied(admin: redis.Redis, user: str) -> set[str]:
    """What the store refused ``user`` so far (its ACL LOG)."""
    found = set()
    for entry in admin.acl_log():
        if _text(entry["username"]) == user:
            found.add(_text(entry["object"]))
    return found


def test_the_server_runs_a_job_as_the_minimal_acl_user(
    acl_store: EmbeddedRedis, processes: Processes, prefix: str
) -> None:
    admin = redis.Redis.from_url(acl_store.url)
    try:
        admin.execute_command(
            "ACL", "SETUSER", "hq-server", "on", ">s3cret", *acl_rules(prefix).split()
        )
        url, _ = processes.server(
            acl_store.url,
            "--store-user",
            "hq-server",
            prefix=prefix,
            env={"HQ_STORE_PASSWORD": "s3cret"},
        )
        processes.worker(url)
        with Client(url) as client:
            assert client.map(square, range(30)).result(timeout=30) == [x * x for x in range(30)]
        assert counters(admin, prefix)["tasks_ok"] == 30
        # Nothing the server needed was refused: only what it does without (it warns that
        # it cannot check the eviction policy; redis-py names connections where it may).
        assert denied(admin, "hq-server") <= {"config|get", "client|setinfo"}
        # The ACL is in force: as that user, anything else is refused.
        user = redis.Redis.from_url(acl_store.url, username="hq-server", password="s3cret")
        try:
            for command in (("FLUSHALL",), ("KEYS", "*"), ("CONFIG", "SET", "save", "")):
                with pytest.raises(redis.exceptions.NoPermissionError):
                    user.execute_command(*command)
            with pytest.raises(redis.exceptions.NoPermissionError):
                user.get("other-prefix:secret")
            assert user.hget(Keys(prefix).counters, "tasks_ok") == b"30"
        finally:
            user.close()
    finally:
        admin.close()


def test_a_wrong_store_password_stops_the_server_at_start(
    acl_store: EmbeddedRedis, processes: Processes, prefix: str
) -> None:
    admin = redis.Redis.from_url(acl_store.url)
    try:
        admin.execute_command(
            "ACL", "SETUSER", "hq-server", "on", ">s3cret", *acl_rules(prefix).split()
        )
    finally:
        admin.close()
    proc = processes.spawn(
        "server",
        [
            "coffea_hq.server",
            "--redis",
            acl_store.url,
            "--port",
            str(free_port()),
            "--store-user",
            "hq-server",
        ],
        env={"HQ_STORE_PASSWORD": "wrong"},
    )
    assert proc.wait(timeout=20) == 2
    assert "invalid username-password" in processes.logs()


def test_the_acl_in_the_docs_is_the_one_the_server_needs() -> None:
    assert acl_rules("hq") in DOCS.read_text()


class RedisTLS:
    """A redis-server that speaks only TLS, and requires client certificates."""

    def __init__(self, directory: Path) -> None:
        self.ca = trustme.CA()
        self.ca_file = directory / "store-ca.pem"
        self.ca.cert_pem.write_to_path(self.ca_file)
        server = self.ca.issue_cert("127.0.0.1", "localhost")
        self.server_pem = directory / "store-server.pem"
        server.private_key_and_cert_chain_pem.write_to_path(self.server_pem)
        client = self.ca.issue_cert("hq-server@example.org")
        self.client_cert = directory / "store-client.pem"
        self.client_key = directory / "store-client-key.pem"
        client.cert_chain_pems[0].write_to_path(self.client_cert)
        client.private_key_pem.write_to_path(self.client_key)
        self.port = free_port()
        assert REDIS_SERVER
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                "0",
                "--tls-port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--tls-cert-file",
                str(self.server_pem),
                "--tls-key-file",
                str(self.server_pem),
                "--tls-ca-cert-file",
                str(self.ca_file),
                "--tls-auth-clients",
                "yes",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        self.url = f"rediss://127.0.0.1:{self.port}/0"
        self._wait_ready()

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(
            self.url,
            ssl_ca_certs=str(self.ca_file),
            ssl_certfile=str(self.client_cert),
            ssl_keyfile=str(self.client_key),
        )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 15
        while True:
            try:
                c = self.client()
                c.ping()
                c.close()
                return
            except redis.exceptions.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def tls_store(tmp_path: Path) -> Iterator[RedisTLS]:
    if not REDIS_SERVER:
        pytest.skip("no redis-server here (Debian's is built with TLS)")
    server = RedisTLS(tmp_path)
    yield server
    server.stop()


def test_the_server_uses_a_rediss_store_with_client_certificates(
    tls_store: RedisTLS, processes: Processes, prefix: str
) -> None:
    url, _ = processes.server(
        tls_store.url,
        "--store-ca",
        str(tls_store.ca_file),
        "--store-cert",
        str(tls_store.client_cert),
        "--store-key",
        str(tls_store.client_key),
        prefix=prefix,
    )
    processes.worker(url)
    with Client(url) as client:
        assert client.map(square, range(20)).result(timeout=30) == [x * x for x in range(20)]
    store = tls_store.client()
    try:
        assert counters(store, prefix)["tasks_ok"] == 20
    finally:
        store.close()


def test_a_rediss_store_signed_by_an_unknown_ca_stops_the_server_at_start(
    tls_store: RedisTLS, processes: Processes, prefix: str
) -> None:
    proc = processes.spawn(
        "server",
        [
            "coffea_hq.server",
            "--redis",
            tls_store.url,
            "--port",
            str(free_port()),
            "--prefix",
            prefix,
            "--store-cert",
            str(tls_store.client_cert),
            "--store-key",
            str(tls_store.client_key),
        ],
    )
    assert proc.wait(timeout=30) == 2
    assert "certificate verify failed" in processes.logs()
