"""Worker pools per user: a worker limited to some users' jobs (``hq-worker --users``, or a
worker token that names users) runs only their tasks; the server's own record of which
worker ran each task (the job's holder hash) is what the test reads."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis
from coffea_hq.server import tokens
from coffea_hq.server.keys import Keys

from coffea_hq import Client, protocol
from coffea_hq.embedded import EmbeddedRedis
from coffea_hq.protocol import Role

from .conftest import Processes
from .tasks import square
from .util import poll_until


def _ran_on(client: redis.Redis, keys: Keys, job: str) -> set[str]:
    """The workers the server recorded as having run the job's tasks."""
    holders = client.hgetall(keys.job(job).holder)
    assert holders and all(v.endswith(b"|D") for v in holders.values())
    return {v.decode().split("|")[1] for v in holders.values()}


def _state(client: redis.Redis, keys: Keys, job: str) -> str:
    return (client.hget(keys.job(job).meta, "state") or b"").decode()


def test_each_users_tasks_run_only_on_their_pool(
    store: EmbeddedRedis,
    processes: Processes,
    prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    keys = Keys(prefix)
    r = redis.Redis.from_url(store.url)
    try:
        alice, _ = tokens.create(r, keys, user="alice", role=Role.USER)
        bob, _ = tokens.create(r, keys, user="bob", role=Role.USER)
        any_worker, _ = tokens.create(r, keys, user="pool-a", role=Role.WORKER)
        bobs_worker, _ = tokens.create(r, keys, user="pool-b", role=Role.WORKER, users=["bob"])
        url, _ = processes.server(store.url, "--auth", "--lease-timeout", "5", prefix=prefix)
        # Pool A: any worker token, limited by its flag; read from a token file.
        token_file = tmp_path / "worker-token"
        token_file.write_text(any_worker + "\n")
        monkeypatch.setenv(protocol.ENV_TOKEN_FILE, str(token_file))
        processes.worker(url, "--name", "pool-a", "--users", "alice", "--lease-wait", "1")
        monkeypatch.delenv(protocol.ENV_TOKEN_FILE)
        # Pool B: a token that serves bob's jobs only, no flag; read from $HQ_TOKEN.
        monkeypatch.setenv(protocol.ENV_TOKEN, bobs_worker)
        processes.worker(url, "--name", "pool-b", "--lease-wait", "1")
        monkeypatch.setenv(protocol.ENV_TOKEN, bob)
        bobs_client = Client(url)
        monkeypatch.delenv(protocol.ENV_TOKEN)
        with Client(url, token=alice) as alices_client, bobs_client:
            jobs = {
                "alice": alices_client.map(square, range(12)),
                "bob": bobs_client.map(square, range(12)),
            }
            for job in jobs.values():
                poll_until(lambda j=job: _state(r, keys, j.id) == "done", 60, f"{job.id} done")
            assert _ran_on(r, keys, jobs["alice"].id) == {"pool-a"}
            assert _ran_on(r, keys, jobs["bob"].id) == {"pool-b"}
            for job in jobs.values():
                assert job.result() == [i * i for i in range(12)]
        # A worker token for bob's jobs cannot be stretched to alice's by the flag.
        body = json.dumps({"worker": "sneaky", "users": ["alice"]}).encode()
        request = urllib.request.Request(
            url + protocol.LEASE,
            data=body,
            method="POST",
            headers={"Authorization": f"Bearer {bobs_worker}", "Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 403
        assert "bob" in json.loads(refused.value.read())["message"]
    finally:
        r.close()
        os.environ.pop(protocol.ENV_TOKEN, None)
