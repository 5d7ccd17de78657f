"""Bad input gets a clear 4xx (or CLI error) and changes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any

import cloudpickle
import pytest
import redis

from coffea_hq import Client, TaskFailed, protocol
from coffea_hq.embedded import EmbeddedRedis, free_port

from .conftest import Processes

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def http(
    method: str, url: str, body: bytes | None = None, content_type: str = "application/json"
) -> tuple[int, Any]:
    request = urllib.request.Request(
        url, data=body, method=method, headers={"Content-Type": content_type}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            status, raw, ctype = r.status, r.read(), r.headers.get_content_type()
    except urllib.error.HTTPError as e:
        status, raw, ctype = e.code, e.read(), e.headers.get_content_type()
    if ctype == "application/json":
        return status, json.loads(raw)
    if ctype == protocol.FRAMES_CONTENT_TYPE:
        return status, protocol.unpack(raw)
    return status, raw


def js(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def make_job(url: str, job: str, n: int) -> None:
    """A job with n tasks, through the raw protocol."""
    blob = b"not really a function"
    sha = protocol.blob_name(blob)
    blob_url = url + protocol.BLOB.format(sha=sha)
    assert http("PUT", blob_url, blob, "application/octet-stream")[0] == 201
    assert http("PUT", url + protocol.JOB.format(job=job), js({"function": sha}))[0] == 200
    body = protocol.pack({"tasks": [str(i) for i in range(n)]}, [b"x"] * n)
    tasks_url = url + protocol.JOB_TASKS.format(job=job)
    assert http("POST", tasks_url, body, protocol.FRAMES_CONTENT_TYPE)[0] == 200
    assert http("POST", url + protocol.JOB_SEAL.format(job=job), js({"total": n}))[0] == 200


def lease(url: str, worker: str, n: int) -> list[list[Any]]:
    status, (header, _) = http(
        "POST", url + protocol.LEASE, js({"worker": worker, "max": n, "wait": 0})
    )
    assert status == 200
    return header["tasks"]  # type: ignore[no-any-return]


def complete(url: str, worker: str, items: list[list[Any]]) -> tuple[int, Any]:
    body = protocol.pack({"worker": worker, "items": items}, [b"result"] * len(items))
    return http("POST", url + protocol.COMPLETE, body, protocol.FRAMES_CONTENT_TYPE)


@pytest.mark.parametrize(
    ("method", "path", "body", "ctype", "status", "says"),
    [
        ("POST", "/api/v1/lease", b"{not json", "application/json", 400, "must be JSON"),
        ("POST", "/api/v1/lease", b"[1, 2]", "application/json", 400, "Expected `object`"),
        ("POST", "/api/v1/lease", js({"worker": "w", "max": 0}), "application/json", 400, "$.max"),
        ("POST", "/api/v1/lease", js({"worker": "a b"}), "application/json", 400, "$.worker"),
        ("POST", "/api/v1/lease", js({"worker": "w", "mx": 3}), "application/json", 400, "`mx`"),
        ("POST", "/api/v1/lease", b"[" * 5000 + b"]" * 5000, "application/json", 400, "object"),
        (
            "POST",
            "/api/v1/heartbeat",
            b'{"worker": "w", "stats": {"a": ' + b"[" * 5000 + b"]" * 5000 + b"}}",
            "application/json",
            400,
            "nested too deeply",
        ),
        (
            "POST",
            "/api/v1/lease",
            js({"worker": "w", "wait": "x"}),
            "application/json",
            400,
            "$.wait",
        ),
        (
            "POST",
            "/api/v1/complete",
            b"\x00\x00\x00\x05abc",
            protocol.FRAMES_CONTENT_TYPE,
            400,
            "frame header",
        ),
        ("POST", "/api/v1/complete", js({}), "application/json", 400, protocol.FRAMES_CONTENT_TYPE),
        (
            "POST",
            "/api/v1/complete",
            protocol.pack({"worker": "w", "items": [["j", "0", 1, "ok"]]}, [b""]),
            protocol.FRAMES_CONTENT_TYPE,
            409,  # judged item by item: this one is refused, a batch's others would stand
            "'items'[0]: Expected `array` of at least length 5",
        ),
        (
            "POST",
            "/api/v1/heartbeat",
            js({"worker": "w", "leases": [["j", "0"]]}),
            "application/json",
            400,
            "$.leases[0]",
        ),
        ("GET", "/api/v1/jobs/nope", None, "application/json", 404, "no job nope"),
        ("GET", "/api/v1/jobs/nope/results", None, "application/json", 404, "no job nope"),
        ("GET", "/api/v1/jobs/nope/results?after=zz", None, "application/json", 400, "cursor"),
        ("GET", "/api/v1/jobs/n/results?after=99999999999999999999999-0", None, "", 400, "cursor"),
        ("GET", "/api/v1/jobs/n/results?after=1-99999999999999999999999", None, "", 400, "cursor"),
        ("GET", "/api/v1/jobs/n/results?ack=%C2%B2", None, "application/json", 400, "cursor"),
        ("GET", "/api/v1/jobs/n/results?after=%D9%A3", None, "application/json", 400, "cursor"),
        (
            "POST",
            "/api/v1/heartbeat",
            js({"worker": "evil\n"}),
            "application/json",
            400,
            "$.worker",
        ),
        ("POST", "/api/v1/jobs/nope/seal", js({"total": 1}), "application/json", 404, "no job"),
        ("POST", "/api/v1/jobs/nope/cancel", None, "application/json", 404, "no job"),
        ("GET", "/api/v1/jobs/nope/logs", None, "application/json", 404, "no job nope"),
        ("GET", "/api/v1/workers/bad%20id/logs", None, "application/json", 400, "worker id"),
        (
            "POST",
            "/api/v1/heartbeat",
            js({"worker": "w", "logs": ["x" * 5000]}),
            "application/json",
            400,
            "$.logs[0]",
        ),
        (
            "PUT",
            "/api/v1/jobs/bad%20id",
            js({"function": "0" * 64}),
            "application/json",
            400,
            "job id",
        ),
        (
            "PUT",
            "/api/v1/jobs/j",
            js({"function": "0" * 64}),
            "application/json",
            404,
            "upload it first",
        ),
        ("PUT", "/api/v1/jobs/j", js({"function": "f"}), "application/json", 400, "$.function"),
        (
            "POST",
            "/api/v1/complete",
            b"\x00\x00\x13\x88" + b"[" * 2500 + b"]" * 2500,
            protocol.FRAMES_CONTENT_TYPE,
            400,
            "frame header",
        ),
        ("GET", "/api/v1/blobs/xyz", None, "application/json", 400, "sha256"),
        ("GET", "/api/v1/nothing-here", None, "application/json", 404, "Not Found"),
    ],
)
def test_malformed_requests_get_a_clear_4xx(
    module_server_url: str,
    method: str,
    path: str,
    body: bytes | None,
    ctype: str,
    status: int,
    says: str,
) -> None:
    got, doc = http(method, module_server_url + path, body, ctype)
    assert got == status
    assert isinstance(doc, dict) and says in doc["message"], doc


def test_blob_with_wrong_hash_is_rejected_and_not_stored(server_url: str) -> None:
    sha = protocol.blob_name(b"the real bytes")
    status, doc = http(
        "PUT",
        server_url + protocol.BLOB.format(sha=sha),
        b"other bytes",
        "application/octet-stream",
    )
    assert status == 400 and "do not match" in doc["message"]
    assert http("HEAD", server_url + protocol.BLOB.format(sha=sha))[0] == 404


def test_completing_a_task_not_leased_to_the_worker_is_409_and_changes_nothing(
    server_url: str,
) -> None:
    make_job(server_url, "j1", 2)
    (job, task, attempt, _), _ = lease(server_url, "rightful", 2)
    status, doc = complete(server_url, "intruder", [[job, task, attempt, "ok", None]])
    assert status == 409 and "not leased to worker intruder" in doc["message"]
    assert doc["rejected"] == [{"index": 0, "job": job, "task": task, "status": "not_leased"}]
    assert http("GET", server_url + protocol.JOB.format(job="j1"))[1]["done"] == 0
    status, doc = complete(server_url, "rightful", [[job, task, attempt, "ok", None]])
    assert status == 200 and doc["items"] == ["accepted"]
    status, doc = complete(server_url, "rightful", [[job, task, attempt, "ok", None]])
    assert status == 200 and doc["items"] == ["duplicate"]  # a retried request
    assert http("GET", server_url + protocol.JOB.format(job="j1"))[1]["done"] == 1
    status, doc = complete(server_url, "rightful", [["nojob", "0", 1, "ok", None]])
    assert status == 409 and doc["items"] == ["unknown"]


def test_submit_batch_with_mismatched_parts_changes_nothing(server_url: str) -> None:
    make_job(server_url, "j2", 1)
    body = protocol.pack({"tasks": ["5", "6"]}, [b"x"])
    status, doc = http(
        "POST", server_url + protocol.JOB_TASKS.format(job="j2"), body, protocol.FRAMES_CONTENT_TYPE
    )
    assert status == 400 and "one payload part per task" in doc["message"]
    assert http("GET", server_url + protocol.JOB.format(job="j2"))[1]["submitted"] == 1


def test_oversized_request_is_413_and_stores_nothing(
    store: EmbeddedRedis, processes: Processes, prefix: str
) -> None:
    url, _ = processes.server(store.url, "--max-request-size", "4096", prefix=prefix)
    blob = b"x" * 10_000
    sha = protocol.blob_name(blob)
    status, doc = http("PUT", url + protocol.BLOB.format(sha=sha), blob, "application/octet-stream")
    assert status == 413 and "--max-request-size" in doc["message"] and "4096" in doc["message"]
    assert http("HEAD", url + protocol.BLOB.format(sha=sha))[0] == 404


def test_server_refuses_a_store_that_may_evict_keys(
    embedded_store: EmbeddedRedis, processes: Processes
) -> None:
    redis.Redis.from_url(embedded_store.url).config_set("maxmemory-policy", "allkeys-lru")
    proc = processes.spawn(
        "server", ["coffea_hq.server", "--redis", embedded_store.url, "--port", str(free_port())]
    )
    assert proc.wait(timeout=20) == 2
    log = processes.logs()
    assert "allkeys-lru" in log and "--allow-eviction" in log and "noeviction" in log
    url, server = processes.server(embedded_store.url, "--allow-eviction")
    assert http("GET", url + protocol.HEALTH)[0] == 200 and server.poll() is None


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["coffea_hq.server", "--redis", "redis://x", "--port", "abc"], "positive number"),
        (["coffea_hq.server"], "--redis URL is required"),
        (["coffea_hq.server", "--redis", "http://x"], "redis://"),
        (["coffea_hq.server", "--redis", "redis://x", "--prefix", "a b"], "--prefix"),
        (["coffea_hq.server", "--redis", "redis://x", "--lease-timeout", "-1"], "positive"),
        (["coffea_hq.worker"], "HQ_URL"),
        (["coffea_hq.worker", "ftp://x"], "http://"),
        (["coffea_hq.worker", "http://x", "--slots", "0"], "--slots"),
        (["coffea_hq.worker", "http://x", "--name", "a b"], "--name"),
        (["coffea_hq.cli"], "required"),
        (["coffea_hq.cli", "local", "--workers", "-1"], "--workers"),
        (["coffea_hq.cli", "local", "--port", "99999"], "--port"),
        (["coffea_hq.cli", "local", "--min", "2"], "--min and --max go together"),
        (["coffea_hq.cli", "local", "--min", "3", "--max", "2"], "min <= max"),
    ],
)
def test_nonsense_command_line_gets_an_error_message(argv: list[str], says: str) -> None:
    env = {"PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-m", *argv], capture_output=True, text=True, timeout=30, env=env
    )
    assert result.returncode == 2
    assert says in result.stderr, result.stderr


def test_server_that_cannot_reach_its_store_says_so(processes: Processes) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    proc = processes.spawn(
        "server", ["coffea_hq.server", "--redis", dead, "--port", str(free_port())]
    )
    assert proc.wait(timeout=30) == 2
    assert "cannot start" in processes.logs()


def big_result(n: int) -> bytes:
    return os.urandom(n)


def test_a_result_over_the_request_limit_fails_its_task_clearly(
    store: EmbeddedRedis, processes: Processes, prefix: str
) -> None:
    url, _ = processes.server(store.url, "--max-request-size", "200000", prefix=prefix)
    processes.worker(url)
    with Client(url) as client:
        job = client.map(big_result, [10, 500_000])
        with pytest.raises(TaskFailed) as info:
            job.result(timeout=60)
    assert info.value.index == 1 and "over the server's request limit" in info.value.message
    assert "--max-request-size" in info.value.message
