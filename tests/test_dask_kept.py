"""GET JOB_KEPT under ``hq-server --auth``: only workers whose pool serves the job's user
fetch its kept results; a kept result over the user's result quota becomes the task's
error, saying so. Read from the server's own record (results, errors, counters)."""

from __future__ import annotations

import asyncio
import json

import redis
from coffea_hq.server import tokens
from coffea_hq.server.keys import Keys

from coffea_hq import messages as m
from coffea_hq import protocol
from coffea_hq.api import API
from coffea_hq.embedded import EmbeddedRedis
from coffea_hq.errors import ServerError
from coffea_hq.protocol import Role

from .conftest import Processes

QUOTA = 1000


def test_kept_results_reach_only_the_jobs_pool_and_respect_the_quota(
    embedded_store: EmbeddedRedis, processes: Processes, prefix: str
) -> None:
    keys = Keys(prefix)
    r = redis.Redis.from_url(embedded_store.url)
    bob, _ = tokens.create(r, keys, user="bob", role=Role.USER)
    bobs_pool, _ = tokens.create(r, keys, user="pool-b", role=Role.WORKER, users=["bob"])
    alices_pool, _ = tokens.create(r, keys, user="pool-a", role=Role.WORKER, users=["alice"])
    url, _ = processes.server(
        embedded_store.url, "--auth", "--quota-result-bytes", str(QUOTA), prefix=prefix
    )
    job = "kept-pool-job"

    async def scenario() -> tuple[bytes, int, int]:
        bob_api, pool_api = API(url, token=bob, retry_for=5), API(url, token=bobs_pool, retry_for=5)
        alice_api = API(url, token=alices_pool, retry_for=5)
        try:
            sha = await bob_api.upload(b"kept-function")
            await bob_api.create_job(
                job, m.CreateJob(function=sha, max_attempts=1, fail_fast=False)
            )
            tasks = m.SubmitTasks(tasks=["t0", "t1", "t2"], keep=["t0", "t1"])
            await bob_api.submit_tasks(job, tasks, [b"a", b"b", b"c"])
            reply, _ = await pool_api.lease(m.LeaseRequest(worker="wb", max=3, wait=5))
            assert sorted(t.task for t in reply.tasks) == ["t0", "t1", "t2"]
            items = [[job, t.task, t.attempt, "ok", None] for t in reply.tasks]
            values = {"t0": b"small", "t1": b"x" * (QUOTA + 1), "t2": b"y" * (QUOTA + 1)}
            await pool_api.complete(
                m.Complete(worker="wb", items=items), [values[t.task] for t in reply.tasks]
            )
            got = await pool_api.kept_result(job, "t0")
            statuses = []
            for api in (alice_api, pool_api):
                try:
                    await api.kept_result(job, "t1")
                    statuses.append(200)
                except ServerError as e:
                    statuses.append(e.status)
            return got, statuses[0], statuses[1]
        finally:
            for api in (bob_api, pool_api, alice_api):
                await api.close()

    try:
        got, alice_status, missing_status = asyncio.run(scenario())
        assert got == b"small"
        assert alice_status == 403  # alice's pool: refused before anything is read
        assert missing_status == 404  # t1 failed: its result was never kept
        jk = keys.job(job)
        error = json.loads(r.hget(jk.errors, "t1"))
        assert error["type"] == "coffea_hq.errors.KeptResultTooLarge"
        assert f"{QUOTA:,} bytes" in error["message"] and "--quota-result-bytes" in error["message"]
        assert r.hget(jk.results, "t2") == b"y" * (QUOTA + 1)  # not kept: the client's
        counters = {k.decode(): int(v) for k, v in r.hgetall(keys.counters).items()}
        assert counters[protocol.Counter.KEPT] == 1
        assert counters[protocol.Counter.KEPT_FETCHED] == 1
    finally:
        r.close()
