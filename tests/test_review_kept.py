"""Adversarial review of kept results (GET JOB_KEPT, complete.lua's kept set, finish())
against a real hq-server: the 404 sentence for each reason a kept result is not there, a
job cancelled while a dependent computes (its late report refused, nothing kept after),
and no key of the job left in the store once it is deleted (a SCAN of the store)."""

from __future__ import annotations

import asyncio
from typing import Any

import redis

from coffea_hq import messages as m
from coffea_hq.api import API
from coffea_hq.embedded import EmbeddedRedis
from coffea_hq.errors import ServerError

from .conftest import Processes


async def refusal(api: API, job: str, task: str) -> tuple[int, str]:
    try:
        await api.kept_result(job, task)
    except ServerError as e:
        return e.status, e.message
    return 200, ""


def test_kept_results_through_a_cancel_mid_compute_leave_nothing(
    store: EmbeddedRedis, processes: Processes, prefix: str
) -> None:
    url, _ = processes.server(store.url, prefix=prefix)
    job = "kept-review"

    r = redis.Redis.from_url(store.url)

    async def scenario() -> dict[str, tuple[Any, ...]]:
        api = API(url, retry_for=10)
        seen: dict[str, tuple[Any, ...]] = {}
        try:
            sha = await api.upload(b"kept-review-function")
            await api.create_job(job, m.CreateJob(function=sha, max_attempts=1, fail_fast=False))
            kept = m.SubmitTasks(tasks=["a", "b", "c"], keep=["a", "b", "c"])
            await api.submit_tasks(job, kept, [b"pa", b"pb", b"pc"])
            reply, _ = await api.lease(m.LeaseRequest(worker="w1", max=3, wait=5))
            held = {t.task: t.attempt for t in reply.tasks}
            assert sorted(held) == ["a", "b", "c"]
            error = {"type": "ValueError", "message": "no", "traceback": ""}
            await api.complete(
                m.Complete(
                    worker="w1",
                    items=[
                        [job, "a", held["a"], "ok", None],
                        [job, "b", held["b"], "error", error],
                    ],
                ),
                [b"A" * 100, b""],
            )
            # The dependent of a: submitted, leased, its input fetched; c still computing.
            await api.submit_tasks(job, m.SubmitTasks(tasks=["d"]), [b"pd"])
            reply, _ = await api.lease(m.LeaseRequest(worker="w2", max=1, wait=5))
            assert [t.task for t in reply.tasks] == ["d"]
            assert await api.kept_result(job, "a") == b"A" * 100
            seen["failed"] = await refusal(api, job, "b")
            seen["computing"] = await refusal(api, job, "c")
            seen["not kept"] = await refusal(api, job, "d")
            seen["unknown"] = await refusal(api, job, "zz")
            await api.cancel(job)
            seen["after cancel"] = await refusal(api, job, "a")
            # c's worker reports after the cancel: refused, nothing stored for it.
            late = await api.complete(
                m.Complete(worker="w1", items=[[job, "c", held["c"], "ok", None]]), [b"C" * 100]
            )
            jk = f"{prefix}:job:{{{job}}}"
            # (b's exception stays for the client; the kept values are gone.)
            stored = [t for t in (b"a", b"c", b"d") if r.hexists(f"{jk}:results", t)]
            stored += [b"kept set"] if r.exists(f"{jk}:kept") else []
            seen["late report"] = (
                len(late.rejected or []),
                "".join(late.items),
                "nothing stored" if not stored else f"stored: {stored}",
            )
            await api.delete_job(job)
            seen["deleted"] = await refusal(api, job, "a")
        finally:
            await api.close()
        return seen

    try:
        seen = asyncio.run(scenario())
        left = [
            bytes(k).decode() for k in r.scan_iter(match=f"{prefix}:job:{{{job}}}*", count=1000)
        ]
        counters = {bytes(k).decode(): int(v) for k, v in r.hgetall(f"{prefix}:counters").items()}
    finally:
        r.close()
    assert seen["failed"][0] == 404 and "failed: it has no result" in seen["failed"][1]
    # Each reason alone: the store knows which it is.
    assert seen["computing"][0] == 404 and "has not finished" in seen["computing"][1]
    assert "never submitted" not in seen["computing"][1]
    assert "has not finished" not in seen["not kept"][1]
    assert seen["not kept"][0] == 404 and "never submitted with 'keep'" in seen["not kept"][1]
    assert seen["unknown"][0] == 404
    assert seen["after cancel"][0] == 404 and "ended (cancelled)" in seen["after cancel"][1]
    assert seen["late report"] == (0, "job_finished", "nothing stored")
    assert seen["deleted"][0] == 404 and "is gone" in seen["deleted"][1]
    assert left == [], f"keys of the deleted job left in the store: {left}"
    assert counters.get("kept") == 1 and counters.get("kept_fetched") == 1
