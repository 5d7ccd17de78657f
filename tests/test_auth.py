"""Tokens with roles against a real hq-server --auth: every route refuses a missing,
revoked, wrong-role or other user's token with the right status, and changes nothing."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from coffea_hq.server import tokens
from coffea_hq.server.app import make_app
from coffea_hq.server.auth import _MISSING, ROUTE_ROLES, roles_for
from coffea_hq.server.config import ServerConfig
from coffea_hq.server.keys import Keys
from coffea_hq.server.tokens import TokenRecord

from coffea_hq import Client, protocol
from coffea_hq.cli import main as hq_main
from coffea_hq.embedded import EmbeddedRedis
from coffea_hq.errors import HQError, ServerError
from coffea_hq.protocol import Role

from .conftest import Processes

FUNCTION = b"alice's function"
SHA = protocol.blob_name(FUNCTION)
NEW_BLOB = b"a blob nobody uploaded yet"
JOB = "alice-job"


def http(
    method: str,
    url: str,
    body: bytes | None = None,
    token: str | None = None,
    content_type: str = "application/json",
) -> tuple[int, Any]:
    headers = {"Content-Type": content_type}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


@dataclass
class AuthServer:
    url: str
    redis: redis.Redis
    keys: Keys
    secret: dict[str, str] = field(default_factory=dict)

    def token(self, name: str, user: str, role: Role, **kw: Any) -> str:
        self.secret[name], _ = tokens.create(self.redis, self.keys, user=user, role=role, **kw)
        return self.secret[name]

    def snapshot(self) -> dict[bytes, Any]:
        """Every key of this server's prefix with its value (compared as values: DUMP of
        an equal hash may differ in its internal order)."""
        return snapshot(self.redis, self.keys.prefix)


def snapshot(client: redis.Redis, prefix: str) -> dict[bytes, Any]:
    read = {
        b"string": client.get,
        b"hash": client.hgetall,
        b"list": lambda k: client.lrange(k, 0, -1),
        b"set": client.smembers,
        b"zset": lambda k: client.zrange(k, 0, -1, withscores=True),
        b"stream": lambda k: client.xrange(k),
    }
    return {
        key: read[client.type(key)](key)
        for key in client.scan_iter(match=f"{prefix}:*", count=1000)
    }


@pytest.fixture(scope="module")
def auth_server(
    store: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AuthServer]:
    prefix = "a" + uuid.uuid4().hex[:10]
    procs = Processes(Path(tmp_path_factory.mktemp("auth")))
    client = redis.Redis.from_url(store.url)
    try:
        worker_file = Path(tmp_path_factory.mktemp("secret")) / "worker-token"
        worker_file.write_text("a-worker-token-from-a-k8s-secret\n")
        url, _ = procs.server(
            store.url,
            "--auth",
            "--token-cache-ttl",
            "0.5",
            "--worker-token-file",
            str(worker_file),
            prefix=prefix,
        )
        server = AuthServer(url, client, Keys(prefix))
        server.secret["file"] = "a-worker-token-from-a-k8s-secret"
        server.token("alice", "alice", Role.USER)
        server.token("bob", "bob", Role.USER)
        server.token("worker", "pool", Role.WORKER)
        server.token("admin", "ops", Role.ADMIN)
        revoked = server.token("revoked", "alice", Role.USER)
        tokens.revoke(client, server.keys, tokens.digest(revoked)[: tokens.ID_LENGTH])
        # Alice's job, with queued tasks, through the protocol.
        alice = server.secret["alice"]
        blob_url = url + protocol.BLOB.format(sha=SHA)
        assert http("PUT", blob_url, FUNCTION, alice, protocol.BLOB_CONTENT_TYPE)[0] == 201
        body = json.dumps({"function": SHA}).encode()
        assert http("PUT", url + protocol.JOB.format(job=JOB), body, alice)[0] == 200
        frames = protocol.pack({"tasks": ["t0", "t1"]}, [b"x", b"y"])
        tasks_url = url + protocol.JOB_TASKS.format(job=JOB)
        assert http("POST", tasks_url, frames, alice, protocol.FRAMES_CONTENT_TYPE)[0] == 200
        yield server
    finally:
        procs.stop_all()
        client.close()


def _requests() -> dict[tuple[str, str], tuple[str, bytes | None, str]]:
    """One well-formed request per route: (url path, body, content type)."""
    j = json.dumps
    frames = protocol.FRAMES_CONTENT_TYPE
    report = [[JOB, "t0", 1, "ok", None]]
    return {
        ("GET", protocol.QUEUE): (protocol.QUEUE, None, "application/json"),
        ("GET", protocol.WORKERS): (protocol.WORKERS, None, "application/json"),
        ("GET", protocol.TELEMETRY): (protocol.TELEMETRY, None, "application/json"),
        ("GET", protocol.EVENTS): (protocol.EVENTS + "?count=1", None, "application/json"),
        ("GET", protocol.METRICS): (protocol.METRICS, None, "application/json"),
        ("GET", protocol.SHARES): (protocol.SHARES, None, "application/json"),
        ("POST", protocol.SHARES): (
            protocol.SHARES,
            j({"weights": {"alice": 2}}).encode(),
            "application/json",
        ),
        ("GET", protocol.JOBS): (protocol.JOBS, None, "application/json"),
        ("GET", protocol.WORKER_LOGS): (
            protocol.WORKER_LOGS.format(worker="w1"),
            None,
            "application/json",
        ),
        ("GET", protocol.JOB_LOGS): (protocol.JOB_LOGS.format(job=JOB), None, "application/json"),
        ("PUT", protocol.BLOB): (
            protocol.BLOB.format(sha=protocol.blob_name(NEW_BLOB)),
            NEW_BLOB,
            protocol.BLOB_CONTENT_TYPE,
        ),
        ("HEAD", protocol.BLOB): (protocol.BLOB.format(sha=SHA), None, "application/json"),
        ("GET", protocol.BLOB): (protocol.BLOB.format(sha=SHA), None, "application/json"),
        ("PUT", protocol.JOB): (
            protocol.JOB.format(job=JOB),
            j({"function": SHA}).encode(),
            "application/json",
        ),
        ("GET", protocol.JOB): (protocol.JOB.format(job=JOB), None, "application/json"),
        ("DELETE", protocol.JOB): (protocol.JOB.format(job=JOB), None, "application/json"),
        ("POST", protocol.JOB_TASKS): (
            protocol.JOB_TASKS.format(job=JOB),
            protocol.pack({"tasks": ["t9"]}, [b"z"]),
            frames,
        ),
        ("POST", protocol.JOB_SEAL): (
            protocol.JOB_SEAL.format(job=JOB),
            j({"total": 2}).encode(),
            "application/json",
        ),
        ("POST", protocol.JOB_CANCEL): (
            protocol.JOB_CANCEL.format(job=JOB),
            None,
            "application/json",
        ),
        ("GET", protocol.JOB_RESULTS): (
            protocol.JOB_RESULTS.format(job=JOB) + "?ack=99999999999999-0",
            None,
            "application/json",
        ),
        ("GET", protocol.JOB_KEPT): (
            protocol.JOB_KEPT.format(job=JOB, task="t0"),
            None,
            "application/json",
        ),
        ("POST", protocol.LEASE): (
            protocol.LEASE,
            j({"worker": "w1", "max": 2}).encode(),
            "application/json",
        ),
        ("POST", protocol.COMPLETE): (
            protocol.COMPLETE,
            protocol.pack({"worker": "w1", "items": report}, [b"r"]),
            frames,
        ),
        ("POST", protocol.RELEASE): (
            protocol.RELEASE,
            j({"worker": "w1", "items": [[JOB, "t0", 1]]}).encode(),
            "application/json",
        ),
        ("POST", protocol.HEARTBEAT): (
            protocol.HEARTBEAT,
            j({"worker": "w1", "leases": [[JOB, "t0", 1]]}).encode(),
            "application/json",
        ),
        ("POST", protocol.PRESENCE): (
            protocol.PRESENCE,
            j({"worker": "w1", "session": "s1", "bye": True}).encode() + b"\n",
            protocol.PRESENCE_CONTENT_TYPE,
        ),
    }


REQUESTS = _requests()


def _wrong_role(roles: frozenset[Role]) -> str | None:
    """A token whose role the route does not admit (None if every non-admin role may)."""
    if Role.USER not in roles:
        return "alice"
    if Role.WORKER not in roles:
        return "worker"
    return None


def _cases() -> list[Any]:
    cases = []
    for route, roles in ROUTE_ROLES.items():
        if roles is None:
            continue
        name = f"{route[0]} {route[1]}"
        cases.append(pytest.param(route, None, 401, id=f"{name} / no token"))
        cases.append(pytest.param(route, "revoked", 401, id=f"{name} / revoked"))
        wrong = _wrong_role(roles)
        if wrong:
            cases.append(pytest.param(route, wrong, 403, id=f"{name} / wrong role"))
        if "{job}" in route[1] and Role.USER in roles:  # (a worker route: 403 above)
            cases.append(pytest.param(route, "bob", 404, id=f"{name} / other user"))
    return cases


def test_every_route_has_a_role_and_a_request() -> None:
    app = make_app(ServerConfig(redis_url="redis://127.0.0.1:1/0", auth=True))
    for route in app.router.routes():
        resource = route.resource
        assert resource is not None
        assert roles_for(route.method, resource.canonical) is not _MISSING, (
            f"{route.method} {resource.canonical} has no entry in server/auth.py ROUTE_ROLES"
        )
    protected = {r for r, roles in ROUTE_ROLES.items() if roles is not None}
    assert protected == set(REQUESTS), "the matrix below must cover every protected route"


@pytest.mark.parametrize(("route", "who", "status"), _cases())
def test_refused_and_nothing_changed(
    auth_server: AuthServer, route: tuple[str, str], who: str | None, status: int
) -> None:
    path, body, ctype = REQUESTS[route]
    token = auth_server.secret[who] if who else None
    before = auth_server.snapshot()
    got, reply = http(route[0], auth_server.url + path, body, token, ctype)
    assert got == status, reply
    if route[0] != "HEAD":
        assert reply["message"], reply
    if (
        status == 404 and route[0] != "PUT"
    ):  # existence hidden: the same answer as for a job that never existed
        missing = path.replace(JOB, "no-such-job")
        assert http(route[0], auth_server.url + missing, body, token, ctype) == (
            got,
            {
                **reply,
                "message": reply["message"].replace(JOB, "no-such-job"),
            },
        )
    assert auth_server.snapshot() == before


def test_owner_and_admin_see_the_job_and_the_job_records_its_user(
    auth_server: AuthServer,
) -> None:
    job_url = auth_server.url + protocol.JOB.format(job=JOB)
    assert http("GET", job_url, token=auth_server.secret["alice"])[0] == 200
    assert http("GET", job_url, token=auth_server.secret["admin"])[0] == 200
    meta = auth_server.redis.hget(f"{auth_server.keys.prefix}:job:{{{JOB}}}", "user")
    assert meta == b"alice"
    queue = http("GET", auth_server.url + protocol.QUEUE, token=auth_server.secret["admin"])
    assert queue[0] == 200 and queue[1]["queued"] >= 2
    assert http("GET", auth_server.url + protocol.HEALTH)[0] == 200  # no token needed


def test_revocation_takes_effect_within_the_cache_ttl(auth_server: AuthServer) -> None:
    carol = auth_server.token("carol", "carol", Role.USER)
    url = auth_server.url + protocol.JOB.format(job="carols-job")
    assert http("GET", url, token=carol)[0] == 404  # authenticated: the job does not exist
    tokens.revoke(auth_server.redis, auth_server.keys, tokens.digest(carol)[:8])
    # Still cached (the server was started with --token-cache-ttl 0.5) ...
    assert http("GET", url, token=carol)[0] == 404
    time.sleep(0.6)
    # ... and refused once the cache entry ran out.
    assert http("GET", url, token=carol)[0] == 401


def test_client_without_a_token_is_told_how_to_get_one(
    auth_server: AuthServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(protocol.ENV_TOKEN, raising=False)
    monkeypatch.delenv(protocol.ENV_TOKEN_FILE, raising=False)
    before = auth_server.snapshot()
    with Client(auth_server.url) as client, pytest.raises(HQError) as refused:
        client.map(abs, [-1, -2])
    assert isinstance(refused.value.__cause__, ServerError)
    assert refused.value.__cause__.status == 401
    assert protocol.ENV_TOKEN_FILE in str(refused.value)
    assert auth_server.snapshot() == before
    monkeypatch.setenv(protocol.ENV_TOKEN_FILE, "/nonexistent/token")
    with pytest.raises(HQError, match="cannot read the access token file"):
        Client(auth_server.url)


def test_worker_token_file_is_a_worker_token(auth_server: AuthServer) -> None:
    token = auth_server.secret["file"]
    lease = json.dumps({"worker": "from-file", "users": ["nobody"]}).encode()
    assert http("POST", auth_server.url + protocol.LEASE, lease, token)[0] == 200
    assert http("GET", auth_server.url + protocol.QUEUE, token=token)[0] == 403


def test_expired_token_is_refused(auth_server: AuthServer) -> None:
    secret = tokens.new_secret()
    sha, record = tokens.make_record(secret, user="dave", role=Role.USER)
    old = TokenRecord(record.id, "dave", Role.USER, time.time() - 10, time.time() - 1)
    auth_server.redis.hset(auth_server.keys.tokens, sha, old.to_json())
    status, reply = http("GET", auth_server.url + protocol.JOB.format(job="x"), token=secret)
    assert status == 401 and "expired" in reply["message"]


def test_token_command_creates_lists_and_revokes(
    store: EmbeddedRedis, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = "c" + uuid.uuid4().hex[:8]
    base = ["token", "--redis", store.url, "--prefix", prefix]
    assert hq_main([*base, "create", "--user", "alice", "--role", "user"]) == 0
    secret = capsys.readouterr().out.strip()
    assert secret.startswith(protocol.TOKEN_PREFIX)
    client = redis.Redis.from_url(store.url)
    try:
        stored = client.hgetall(Keys(prefix).tokens)
        # Only the digest is stored, never the secret.
        assert list(stored) == [tokens.digest(secret).encode()]
        assert secret.encode() not in b"".join(stored.values())
        assert hq_main([*base, "list"]) == 0
        listed = capsys.readouterr().out
        token_id = tokens.digest(secret)[: tokens.ID_LENGTH]
        assert token_id in listed and "alice" in listed
        # Bad input: a clear sentence, nothing stored.
        assert hq_main([*base, "create", "--user", "no spaces", "--role", "user"]) == 2
        assert "user name" in capsys.readouterr().err
        assert hq_main([*base, "create", "--user", "a", "--role", "user", "--users", "b"]) == 2
        assert hq_main([*base, "revoke", "ffffffffffff"]) == 2
        assert "no token" in capsys.readouterr().err
        assert len(client.hgetall(Keys(prefix).tokens)) == 1
        assert hq_main([*base, "revoke", token_id]) == 0
        assert client.hgetall(Keys(prefix).tokens) == {}
    finally:
        client.delete(Keys(prefix).tokens)
        client.close()


def test_open_server_refuses_a_non_loopback_address(capsys: pytest.CaptureFixture[str]) -> None:
    from coffea_hq.server.cli import main as server_main

    with pytest.raises(SystemExit) as exit_:
        server_main(["--redis", "redis://127.0.0.1:1/0", "--host", "0.0.0.0"])
    assert exit_.value.code == 2
    assert "without --auth" in capsys.readouterr().err
    from coffea_hq import LocalCluster

    with pytest.raises(ValueError, match="loopback"):
        LocalCluster(host="0.0.0.0")
