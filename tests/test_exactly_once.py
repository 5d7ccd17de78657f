"""Exactly-once on the server's side: each defect of issue 9, reproduced against real parts.

Store-level tests run the Lua scripts on a real Redis-protocol server; the others talk
HTTP to a real hq-server. Assertions read the server's own accounting (the job summary,
the store, ``GET /api/v1/queue`` counters), never what a client deduplicated.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import redis as sync_redis
from coffea_hq.server import scripts
from coffea_hq.server.keys import STORE_KEY_NAMES, Event, JobKeys, Keys, Meta
from coffea_hq.server.store import Report, Store

from coffea_hq import protocol
from coffea_hq.embedded import EmbeddedRedis, free_port, server_binary
from coffea_hq.protocol import CompleteStatus, Counter, Outcome

from .conftest import Processes
from .test_bad_input import http, js, make_job
from .test_transitions import FN, merge_name, new_job, ok
from .util import poll_until

REDUCER = protocol.blob_name(b"reducer")


async def reducing_job(s: Store, job: str, n: int, fanin: int) -> None:
    await s.put_blob(REDUCER, b"reducer")
    await s.create_job(
        job,
        function=FN,
        max_attempts=3,
        fail_fast=True,
        label="",
        user="",
        reducer=REDUCER,
        fanin=fanin,
    )
    await s.submit(job, [str(i) for i in range(n)], [b"p"] * n)
    await s.seal(job, n)


async def snapshot(s: Store) -> dict[bytes, bytes]:
    """Every key under the store's prefix, dumped: a point a store can roll back to."""
    keys = [k async for k in s.redis.scan_iter(f"{s.keys.prefix}:*")]
    return {k: await s.redis.dump(k) for k in keys}


async def roll_back(s: Store, snap: dict[bytes, bytes]) -> None:
    """Put the store back to ``snap``, as a crash under ``appendfsync everysec`` does."""
    keys = [k async for k in s.redis.scan_iter(f"{s.keys.prefix}:*")]
    if keys:
        await s.redis.delete(*keys)
    for key, value in snap.items():
        await s.redis.restore(key, 0, value, replace=True)


# ---------------------------------------------------------------------- merges and rollbacks


async def test_after_a_store_rollback_a_stale_merge_report_is_refused(queue_store: Store) -> None:
    """A merge named from a counter was re-created over other inputs after a rollback and
    accepted the old merge's report: two chunks counted twice, two lost."""
    await reducing_job(queue_store, "r", 4, fanin=2)
    assert len(await queue_store.lease("w", 4)) == 4
    before = await snapshot(queue_store)
    await queue_store.complete("w", [ok("r", "0", data=b"A"), ok("r", "1", data=b"B")])
    (old_merge,) = await queue_store.lease("w", 4)
    await roll_back(queue_store, before)  # the last second of writes is gone
    await queue_store.complete("w", [ok("r", "2", data=b"C"), ok("r", "3", data=b"D")])
    (new_merge,) = await queue_store.lease("w", 4)
    assert new_merge.attempt == old_merge.attempt == 1
    assert new_merge.task == merge_name("2", "3") != old_merge.task
    # The worker's late report of the merge it leased before the rollback:
    (status,) = await queue_store.complete("w", [ok("r", old_merge.task, data=b"AB")])
    assert status is CompleteStatus.UNKNOWN
    # Chunks 0 and 1 are still leased (their reports were lost): re-reported, they form
    # the same merge again, under the same name, and everything adds up once.
    await queue_store.complete("w", [ok("r", "0", data=b"A"), ok("r", "1", data=b"B")])
    (again,) = await queue_store.lease("w", 4)
    assert again.task == old_merge.task
    await queue_store.complete(
        "w", [ok("r", new_merge.task, data=b"CD"), ok("r", again.task, data=b"AB")]
    )
    (final,) = await queue_store.lease("w", 4)
    parts = [bytes(p) for p in protocol.split_merge_payload(final.payload)]
    assert sorted(parts) == [b"AB", b"CD"]
    await queue_store.complete("w", [ok("r", final.task, data=b"ABCD")])
    summary = await queue_store.summary("r")
    assert (summary["state"], summary["done"]) == ("done", 4)


async def test_fanin_at_the_limit_merges_in_one_task(queue_store: Store) -> None:
    n = protocol.MAX_FANIN
    await reducing_job(queue_store, "big", n, fanin=n)
    leased = await queue_store.lease("w", protocol.LEASE_MAX_TASKS)
    assert len(leased) == n
    await queue_store.complete("w", [ok("big", t.task, data=t.task.encode()) for t in leased])
    (merge,) = await queue_store.lease("w", 10)
    parts = protocol.split_merge_payload(merge.payload)
    assert sorted(int(bytes(p)) for p in parts) == list(range(n))
    await queue_store.complete("w", [ok("big", merge.task, data=b"all")])
    assert (await queue_store.summary("big"))["state"] == "done"


def test_fanin_over_the_limit_is_refused(server_url: str) -> None:
    blob = b"f"
    sha = protocol.blob_name(blob)
    http("PUT", server_url + protocol.BLOB.format(sha=sha), blob, "application/octet-stream")
    body = {"function": sha, "reducer": sha, "fanin": protocol.MAX_FANIN + 1}
    status, doc = http("PUT", server_url + protocol.JOB.format(job="wide"), js(body))
    assert (
        status == 400 and "$.fanin" in doc["message"] and str(protocol.MAX_FANIN) in doc["message"]
    )
    assert http("GET", server_url + protocol.JOB.format(job="wide"))[0] == 404


# ---------------------------------------------------------------------- reports item by item


def test_one_malformed_item_is_refused_and_the_rest_of_the_report_stands(
    server_url: str,
) -> None:
    make_job(server_url, "mixed", 3)
    status, (header, _) = http(
        "POST", server_url + protocol.LEASE, js({"worker": "w", "max": 3, "wait": 0})
    )
    assert len(header["tasks"]) == 3
    huge = {"type": "builtins.ValueError", "message": "x" * (protocol.ERROR_TEXT_MAX + 1)}
    items = [
        [job, task, attempt, *(("error", huge | {"traceback": ""}) if i == 1 else ("ok", None))]
        for i, (job, task, attempt, _) in enumerate(header["tasks"])
    ]
    body = protocol.pack({"worker": "w", "items": items}, [b"r"] * 3)
    status, doc = http("POST", server_url + protocol.COMPLETE, body, protocol.FRAMES_CONTENT_TYPE)
    assert status == 409
    assert doc["items"] == ["accepted", "invalid", "accepted"]
    assert "$[4].message" in doc["rejected"][0]["reason"] and doc["rejected"][0]["index"] == 1
    summary = http("GET", server_url + protocol.JOB.format(job="mixed"))[1]
    assert (summary["done"], summary["failed"], summary["state"]) == (2, 0, "running")


def test_an_oversized_task_info_is_refused_by_name_and_the_others_notes_stand(
    server_url: str,
) -> None:
    make_job(server_url, "noted", 2)
    status, (header, _) = http(
        "POST", server_url + protocol.LEASE, js({"worker": "w", "max": 2, "wait": 0})
    )
    (j0, t0, a0, _), (j1, t1, a1, _) = header["tasks"]
    good = {
        "wall": 1.5,
        "cpu": 1.0,
        "max_rss": 1 << 20,
        "warnings": [["builtins.UserWarning", "hm"]],
    }
    bad = {"output": "x" * (protocol.TASK_OUTPUT_MAX + 1)}
    items = [[j0, t0, a0, "ok", None, good], [j1, t1, a1, "ok", None, bad]]
    body = protocol.pack({"worker": "w", "items": items}, [b"r"] * 2)
    status, doc = http("POST", server_url + protocol.COMPLETE, body, protocol.FRAMES_CONTENT_TYPE)
    assert status == 409 and doc["items"] == ["accepted", "invalid"]
    assert "$[5].output" in doc["rejected"][0]["reason"]
    status, (results, _) = http("GET", server_url + protocol.JOB_RESULTS.format(job="noted"))
    assert results["notes"] == {
        t0: {"worker": "w", **good, "warnings": [["builtins.UserWarning", "hm", "", 0, "", 1]]}
    }


def test_a_report_refused_keeps_no_note_and_a_deleted_job_gets_no_keys_back(
    server_url: str, redis_client: Any, prefix: str
) -> None:
    """Notes and output are the complete script's to keep, for the reports it accepts: a
    stale attempt's note does not replace the accepted one's, and a report for a job
    deleted meanwhile recreates none of its keys."""
    make_job(server_url, "gone", 2)
    status, (header, _) = http(
        "POST", server_url + protocol.LEASE, js({"worker": "w", "max": 2, "wait": 0})
    )
    (j0, t0, a0, _), (j1, t1, a1, _) = header["tasks"]

    def report(items: list[Any]) -> Any:
        body = protocol.pack({"worker": "w", "items": items}, [b"r"] * len(items))
        return http("POST", server_url + protocol.COMPLETE, body, protocol.FRAMES_CONTENT_TYPE)

    # (A warning each: a note is kept for a task that raised one, or a job keeping resources.)
    warned = [["builtins.UserWarning", "careful", "t.py", 1, "", 1]]
    first = {"wall": 1.0, "output": "first\n", "warnings": warned}
    assert report([[j0, t0, a0, "ok", None, first]])[1]["items"] == ["accepted"]
    stale = {"wall": 9.0, "output": "stale\n", "warnings": warned}
    assert report([[j0, t0, a0 + 1, "ok", None, stale]])[1]["items"] == ["not_leased"]
    notes = redis_client.hgetall(f"{prefix}:job:{{gone}}:notes")
    assert list(notes) == [t0.encode()] and json.loads(notes[t0.encode()])["wall"] == 1.0
    logs = redis_client.lrange(f"{prefix}:job:{{gone}}:logs", 0, -1)
    assert [json.loads(line)["text"] for line in logs] == ["first\n"]

    assert http("DELETE", server_url + protocol.JOB.format(job="gone"))[0] == 200
    assert report([[j1, t1, a1, "ok", None, first]])[1]["items"] == ["unknown"]
    assert list(redis_client.scan_iter(match=f"{prefix}:job:{{gone}}*")) == []


# ---------------------------------------------------------------------- abandoned jobs


def test_an_unsealed_job_without_client_activity_is_cancelled_and_expires(
    store: EmbeddedRedis, processes: Processes, prefix: str
) -> None:
    url, _ = processes.server(
        store.url, "--unsealed-timeout", "1", "--result-ttl", "300", prefix=prefix
    )
    blob = b"f"
    sha = protocol.blob_name(blob)
    http("PUT", url + protocol.BLOB.format(sha=sha), blob, "application/octet-stream")
    for job in ("abandoned", "sealed"):
        assert http("PUT", url + protocol.JOB.format(job=job), js({"function": sha}))[0] == 200
        frames = protocol.pack({"tasks": ["0", "1"]}, [b"x", b"y"])
        http("POST", url + protocol.JOB_TASKS.format(job=job), frames, protocol.FRAMES_CONTENT_TYPE)
    http("POST", url + protocol.JOB_SEAL.format(job="sealed"), js({"total": 2}))
    poll_until(
        lambda: http("GET", url + protocol.JOB.format(job="abandoned"))[1]["state"] != "running",
        10,
        "the abandoned job is cancelled",
        every=0.2,
    )
    summary = http("GET", url + protocol.JOB.format(job="abandoned"))[1]
    assert summary["state"] == "cancelled" and "never sealed" in summary["reason"]
    assert http("GET", url + protocol.JOB.format(job="sealed"))[1]["state"] == "running"
    r = sync_redis.Redis.from_url(store.url)
    try:
        keys = [f"{prefix}:job:{{abandoned}}", f"{prefix}:job:{{abandoned}}:events"]
        assert all(0 < int(r.ttl(k)) <= 300 for k in keys)  # type: ignore[arg-type]
        assert http("GET", url + protocol.QUEUE)[1]["jobs"] == 1  # only the sealed one
    finally:
        r.close()


# ---------------------------------------------------------------------- lease requests


def test_a_parked_lease_of_a_worker_that_stopped_heartbeating_is_not_filled(
    store: EmbeddedRedis, processes: Processes, prefix: str
) -> None:
    """A SIGSTOPped worker's long poll stays parked on the server; filling it would cost
    every task it gets an attempt."""
    url, _ = processes.server(store.url, "--lease-timeout", "3", prefix=prefix)
    assert http("POST", url + protocol.HEARTBEAT, js({"worker": "sleepy"}))[0] == 200
    got: dict[str, Any] = {}

    def park() -> None:
        status, (header, _) = http(
            "POST", url + protocol.LEASE, js({"worker": "sleepy", "max": 5, "wait": 8})
        )
        got.update(header, at=time.monotonic())

    thread = threading.Thread(target=park)
    thread.start()
    time.sleep(2.4)  # over 2/3 of the lease timeout without a heartbeat
    submitted = time.monotonic()
    make_job(url, "j", 1)
    thread.join(timeout=10)
    assert got["tasks"] == [] and got["at"] - submitted < 3
    status, (header, _) = http(
        "POST", url + protocol.LEASE, js({"worker": "awake", "max": 5, "wait": 0})
    )
    assert [t[1:3] for t in header["tasks"]] == [["0", 1]]  # first attempt, not second


def test_a_lease_request_whose_connection_closed_gets_no_tasks(
    store: EmbeddedRedis, processes: Processes, prefix: str
) -> None:
    url, _ = processes.server(store.url, prefix=prefix)
    port = int(url.rsplit(":", 1)[1])
    body = js({"worker": "ghost", "max": 5, "wait": 10})
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (protocol.LEASE.encode(), len(body), body)
        )
        time.sleep(0.3)  # parked on the server now
    time.sleep(0.3)
    make_job(url, "j", 1)
    time.sleep(0.5)
    status, (header, _) = http(
        "POST", url + protocol.LEASE, js({"worker": "live", "max": 5, "wait": 2})
    )
    assert [t[1:3] for t in header["tasks"]] == [["0", 1]]


# ---------------------------------------------------------------------- the store itself


def test_a_redis_cluster_store_is_refused_at_start(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "store.log"
    # The cluster bus port defaults to port + 10000, which may be over 65535: choose one.
    store = subprocess.Popen(
        [server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)]
        + ["--cluster-enabled", "yes", "--cluster-port", str(free_port())]
        + ["--save", "", "--appendonly", "no", "--logfile", str(log)],
        stdout=subprocess.DEVNULL,
    )

    def answers() -> bool:
        assert store.poll() is None, log.read_text() if log.exists() else "no log"
        try:
            return bool(sync_redis.Redis(host="127.0.0.1", port=port).ping())
        except sync_redis.ConnectionError:
            return False

    try:
        poll_until(answers, 60, "the cluster-mode store answers")
        server = subprocess.run(
            [sys.executable, "-m", "coffea_hq.server", "--redis", f"redis://127.0.0.1:{port}/0"]
            + ["--port", str(free_port())],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert server.returncode == 2
        assert "Redis Cluster" in server.stderr and "one primary" in server.stderr
    finally:
        store.kill()
        store.wait()


async def test_workers_not_heard_from_are_pruned(queue_store: Store) -> None:
    await queue_store.heartbeat("gone", {"slots": 1}, [])
    await queue_store.heartbeat("here", {"slots": 1}, [])
    await queue_store.redis.zadd(
        queue_store.keys.workers_seen, {"gone": time.time() - 3600}
    )  # an hour ago
    assert set(await queue_store.workers()) == {"gone", "here"}
    assert await queue_store.prune_workers() == 1
    assert set(await queue_store.workers()) == {"here"}
    assert (await queue_store.queue_stats())["workers"] == 1


async def test_counters_account_for_every_transition(queue_store: Store) -> None:
    job = await new_job(queue_store, 4, max_attempts=2, fail_fast=False)
    await queue_store.lease("w", 4)
    crash = Report(job, "1", 1, Outcome.CRASHED, {"type": "x", "message": "m"}, b"")
    error = Report(job, "2", 1, Outcome.ERROR, {"type": "x", "message": "m"}, b"")
    await queue_store.complete("w", [ok(job, "0"), ok(job, "0"), crash, error])
    await queue_store.complete("intruder", [ok(job, "3")])
    await queue_store.release("w", [(job, "3", 1)])
    counts = await queue_store.counters()
    assert counts == {
        **{c.value: 0 for c in Counter},
        "tasks_ok": 1,
        "tasks_failed": 1,
        "requeued": 1,
        "released": 1,
        "duplicates": 1,
        "refused": 1,
    }


# ---------------------------------------------------------------------- the Python/Lua contract


LUA = resources.files("coffea_hq.server").joinpath("lua")


def lua_sources() -> dict[str, str]:
    return {name: LUA.joinpath(f"{name}.lua").read_text() for name in scripts.SPECS}


def test_the_lua_prelude_declares_the_python_key_layout_and_argv() -> None:
    job_keys = Keys("p").job("j")
    assert len(job_keys.script_keys) == len(JobKeys.names())
    assert job_keys.owned == job_keys.script_keys[: JobKeys.OWNED]
    for name, spec in scripts.SPECS.items():
        prelude = scripts.prelude(name)
        declared = re.search(r"^local ([A-Z_, ]+) = KEYS\[1\]", prelude, re.M)
        assert declared is not None
        if name in scripts.STORE_SCRIPTS:  # store-wide: its own KEYS, job keys via use_job
            assert declared.group(1).split(", ") == [k.upper() for k in STORE_KEY_NAMES]
            assert (
                Keys("p").store_keys[: len(job_keys.script_keys) - JobKeys.OWNED]
                == (job_keys.script_keys[JobKeys.OWNED :])
            )
        else:
            assert declared.group(1).split(", ") == [k.upper() for k in JobKeys.names()]
        table = re.search(r"^local A = \{(.*)\}$", prelude, re.M)
        assert table is not None
        named = re.findall(r"(\w+) = ARGV\[(\d+)\]", table.group(1))
        assert [a for a, _ in named] == list(spec.args)
        first = len(scripts.COMMON_ARGS) + 1
        assert [int(i) for _, i in named] == list(range(first, first + len(spec.args)))


def test_every_name_the_scripts_use_is_defined_in_python() -> None:
    """A typo in a field, status or argument name is a nil at run time in Lua: catch it here."""
    tables: dict[str, set[str]] = {
        "F": {m.name for m in Meta},
        "EV": {m.name for m in Event},
        "STATE": {m.name for m in protocol.JobState},
        "STATUS": {m.name for m in CompleteStatus},
        "COUNT": {m.name for m in Counter},
        "CREATEREPLY": {m.name for m in scripts.CreateReply},
        "SUBMITREPLY": {m.name for m in scripts.SubmitReply},
        "SEALREPLY": {m.name for m in scripts.SealReply},
    }
    common = LUA.joinpath("common.lua").read_text()
    for name, text in lua_sources().items():
        for table, members in tables.items():
            used = set(re.findall(rf"\b{table}\.([A-Za-z_]+)", common + text))
            assert used <= members, f"{name}.lua uses undefined {table}.{used - members}"
        args = set(re.findall(r"\bA\.(\w+)", text))
        assert args <= set(scripts.SPECS[name].args), f"{name}.lua: {args}"
        assert not re.search(r"ARGV\[\d", text), f"{name}.lua indexes ARGV by number"
        # Statuses and states come from the generated tables, not string literals.
        for literal in ("'running'", "'accepted'", "'not_leased'", "'m'"):
            assert literal not in text + common, f"{name}.lua spells {literal}"


def test_error_json_the_lua_builds_is_what_the_client_reads() -> None:
    """The WorkerLost error is built in Lua; its type is the client's class."""
    from coffea_hq.errors import WorkerLost

    assert f"{WorkerLost.__module__}.{WorkerLost.__qualname__}" == protocol.WORKER_LOST_TYPE
    assert f"WORKER_LOST = '{protocol.WORKER_LOST_TYPE}'" in scripts.prelude("reap")


@pytest.mark.parametrize("name", sorted(scripts.SPECS))
def test_each_script_loads_on_the_store(store: EmbeddedRedis, name: str) -> None:
    r = sync_redis.Redis.from_url(store.url)
    try:
        sha = r.script_load(scripts.source(name))
        assert r.script_exists(sha) == [True]
    finally:
        r.close()
