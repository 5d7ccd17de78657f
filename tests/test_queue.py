"""End to end through a real LocalCluster: embedded Valkey, hq-server, hq-worker processes."""

from __future__ import annotations

import json
import linecache
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import pytest
import redis

from coffea_hq import Client, LocalCluster, TaskFailed, protocol
from coffea_hq.embedded import free_port
from coffea_hq.errors import HQError, JobCancelled, ServerError, ServerUnreachable

from .conftest import Processes
from .tasks import add_all, fail_on, killed_on, nap, segfault_on, square
from .util import get_json, poll_until

# Tasks defined here must travel by value: the workers cannot import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(workers=2, slots=2, lease_timeout=3) as c:
        yield c


@pytest.fixture
def client(cluster: LocalCluster) -> Iterator[Client]:
    with Client(cluster.url) as c:
        yield c


def exit_once(x: int, marker: str) -> int:
    """Kills its own subprocess the first time it runs for x == 0."""
    if x == 0 and not os.path.exists(marker):
        Path(marker).touch()
        os._exit(3)
    return x + 100


def test_map_returns_results_ordered_like_the_inputs(client: Client) -> None:
    job = client.map(pow, range(3000), [2] * 3000)
    assert job.result(timeout=60) == [i * i for i in range(3000)]


def test_as_completed_yields_every_index_exactly_once(client: Client) -> None:
    seen = [
        index
        for index, value in client.map(square, range(500)).as_completed(timeout=60)
        if value == index * index
    ]
    assert sorted(seen) == list(range(500))


def test_empty_map_finishes_at_once(client: Client) -> None:
    assert client.map(square, []).result(timeout=10) == []


def test_task_exception_carries_type_message_item_and_remote_traceback(client: Client) -> None:
    job = client.map(fail_on, range(20), [7] * 20)
    with pytest.raises(TaskFailed) as info:
        job.result(timeout=60)
    failure = info.value
    assert failure.index == 7 and failure.item == (7, 7)
    assert failure.exc_type == "builtins.ValueError" and failure.message == "cannot take 7"
    assert "in fail_on" in failure.traceback and "raise ValueError" in failure.traceback
    assert isinstance(failure.exception, ValueError)
    assert "Remote traceback" in str(failure) and failure.worker != "?"


def test_without_fail_fast_the_other_tasks_still_run(client: Client) -> None:
    job = client.map(fail_on, range(30), [3] * 30, fail_fast=False)
    got = {}
    with pytest.raises(TaskFailed, match="cannot take 3"):
        for index, value in job.as_completed(timeout=60):
            got[index] = value
    assert got == {i: i for i in range(30) if i != 3}


def test_segfault_kills_only_its_subprocess_and_fails_after_max_attempts(client: Client) -> None:
    job = client.map(segfault_on, range(40), [5] * 40, fail_fast=False, max_attempts=2)
    got = {}
    with pytest.raises(TaskFailed) as info:
        for index, value in job.as_completed(timeout=60):
            got[index] = value
    assert got == {i: i for i in range(40) if i != 5}
    assert info.value.index == 5 and "SIGSEGV" in info.value.message
    assert "2 attempts" in info.value.message and info.value.worker != "?"
    # The slots came back: the next job runs normally.
    assert client.map(square, range(10)).result(timeout=30) == [i * i for i in range(10)]


def test_oom_style_kill_is_reported_with_its_signal(client: Client) -> None:
    job = client.map(killed_on, range(10), [2] * 10, max_attempts=1)
    with pytest.raises(TaskFailed) as info:
        job.result(timeout=60)
    assert info.value.index == 2 and "SIGKILL (out of memory?)" in info.value.message


def test_job_keys_are_deleted_once_the_client_has_the_results(
    cluster: LocalCluster, client: Client
) -> None:
    job = client.map(square, range(50))
    assert job.result(timeout=30) == [i * i for i in range(50)]
    store = redis.Redis.from_url(cluster.redis_url or "")
    try:
        assert store.keys(f"hq:job:{{{job.id}}}*") == []
    finally:
        store.close()


def test_os_exit_is_a_crash_and_the_retry_succeeds(client: Client, tmp_path: Path) -> None:
    marker = str(tmp_path / "crashed-once")
    job = client.map(exit_once, range(10), [marker] * 10)
    assert job.result(timeout=60) == [i + 100 for i in range(10)]
    assert os.path.exists(marker)


def test_cancel_ends_the_job_and_drops_its_queue(client: Client) -> None:
    job = client.map(nap, [0.2] * 200)
    time.sleep(0.5)
    job.cancel()
    with pytest.raises(JobCancelled, match="cancelled"):
        job.result(timeout=30)
    poll_until(lambda: client.queue()["work"] == 0, 10, "the cancelled job's queue is dropped")


def worker_stats(url: str) -> list[dict[str, float]]:
    return [w["stats"] for w in get_json(url + protocol.WORKERS).values()]


def test_result_timeout_raises_and_cancel_stops_the_running_task(
    cluster: LocalCluster, client: Client
) -> None:
    restarts = sum(s["restarts"] for s in worker_stats(cluster.url))
    job = client.map(nap, [0.5] * 2 + [60])
    # The short tasks' time depends on the machine (a cold cluster's first job imports in
    # its slots): wait for the server to count them done, then time out on the long one.
    poll_until(lambda: job.status()["done"] >= 2, 60, "the two short tasks are done")
    with pytest.raises(TimeoutError, match="2/3 tasks done"):
        job.result(timeout=2)
    job.cancel()
    # The next heartbeat tells the worker its lease is gone; it kills the subprocess.
    poll_until(
        lambda: sum(s["restarts"] for s in worker_stats(cluster.url)) > restarts,
        10,
        "the cancelled task's subprocess is killed (a slot restarts)",
        every=0.2,
    )


def test_health_and_queue_endpoints_answer_json(cluster: LocalCluster) -> None:
    with urllib.request.urlopen(cluster.url + protocol.HEALTH) as r:
        assert r.status == 200 and json.load(r)["status"] == "ok"
    # Load balancers probe with HEAD: it answers like GET, without a body.
    head = urllib.request.Request(cluster.url + protocol.HEALTH, method="HEAD")
    with urllib.request.urlopen(head) as r:
        assert r.status == 200 and r.read() == b""
    doc = get_json(cluster.url + protocol.QUEUE)
    assert set(doc) >= {"queued", "running", "work", "workers"}
    # Workers register with their first request, shortly after the cluster is up.
    poll_until(lambda: get_json(cluster.url + protocol.QUEUE)["workers"] == 2, 20, "2 workers")


def test_client_reads_hq_url(cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HQ_URL", cluster.url)
    with Client() as c:
        assert c.url == cluster.url and c.map(square, [3]).result(timeout=30) == [9]
    monkeypatch.delenv("HQ_URL")
    with pytest.raises(HQError, match="LocalCluster"):
        Client()


def big_closure(size: int) -> object:
    table = bytes(range(256)) * (size // 256)

    def lookup(i: int) -> int:
        return table[i % len(table)]

    return lookup


def test_function_blob_is_fetched_once_per_worker(cluster: LocalCluster, client: Client) -> None:
    fn = big_closure(5_000_000)  # a processor holding 5 MB of correction tables
    assert client.map(fn, range(400)).result(timeout=60) == [i % 256 for i in range(400)]
    time.sleep(1.5)  # one heartbeat interval (lease timeout / 3)
    fetched = [s["functions_fetched"] for s in worker_stats(cluster.url)]
    # Each worker fetched each function it ran at most once, not once per task.
    assert sum(fetched) <= 2 * 20 and max(fetched) < 400


def test_two_servers_on_one_store_serve_the_same_job(
    store,
    processes: Processes,  # type: ignore[no-untyped-def]
    prefix: str,
) -> None:
    url_a, _ = processes.server(store.url, prefix=prefix)
    url_b, _ = processes.server(store.url, prefix=prefix)
    processes.worker(url_a)
    processes.worker(url_b)
    with Client(url_a) as submitter, Client(url_b) as reader:
        job = submitter.map(square, range(2000))
        # Collect through the other replica: any replica answers any request.
        job.client = reader
        assert job.result(timeout=60) == [i * i for i in range(2000)]


def test_local_cluster_stops_everything_it_started() -> None:
    with LocalCluster(workers=1) as c:
        procs = [c.server, *c.workers]
        redis_proc = c.redis.process if c.redis else None
        assert Client(c.url).map(square, [2]).result(timeout=30) == [4]
    assert all(p is not None and p.poll() is not None for p in procs)
    assert redis_proc is not None and redis_proc.poll() is not None
    assert c.redis is not None and not c.redis.directory.exists()


def slow_identity(x: int) -> int:
    time.sleep(0.02)
    return x


def failing_reducer(values: list[int]) -> int:
    raise RuntimeError("cannot merge")


def test_reduce_merges_on_workers_and_returns_one_value(client: Client) -> None:
    job = client.map(square, range(1000), reduce=add_all, fanin=7)
    seen = sorted(index for index, value in job.as_completed(timeout=60) if value is None)
    assert seen == list(range(1000))
    assert job.result() == sum(i * i for i in range(1000))
    assert client.map(square, [], reduce=add_all).result(timeout=10) is None
    assert client.map(square, [5], reduce=add_all).result(timeout=10) == 25


def test_merging_starts_while_chunks_are_still_running(client: Client) -> None:
    job = client.map(slow_identity, range(400), reduce=add_all, fanin=4)
    overlapped = False
    for _ in job.as_completed(timeout=60):
        status = job.status() if not overlapped else None
        if status and status["merges"] > 0 and status["done"] < 300:
            overlapped = True
    assert overlapped and job.result() == sum(range(400))


def test_job_follows_its_merges_from_the_results_stream(client: Client) -> None:
    job = client.map(slow_identity, range(200), reduce=add_all, fanin=4)
    seen = []
    for _ in job.as_completed(timeout=60):
        seen.append((job.merges, job.merges_open))
        assert 0 <= job.merges_open <= job.merges
    assert [m for m, _ in seen] == sorted(m for m, _ in seen)  # never goes back
    assert any(m > 0 for m, _ in seen[:150])  # known while chunks still arrive
    assert job.result() == sum(range(200))
    assert job.merges >= -(-199 // 3) and job.merges_open == 0


def test_reduce_without_fail_fast_gives_the_merge_of_the_successes(client: Client) -> None:
    job = client.map(fail_on, range(50), [13] * 50, reduce=add_all, fanin=5, fail_fast=False)
    with pytest.raises(TaskFailed, match="cannot take 13") as info:
        job.result(timeout=60)
    assert info.value.index == 13
    assert job.partial() == sum(range(50)) - 13


def test_a_failing_reducer_ends_the_job_with_its_traceback(client: Client) -> None:
    job = client.map(square, range(10), reduce=failing_reducer, fanin=3)
    with pytest.raises(TaskFailed, match="cannot merge") as info:
        job.result(timeout=60)
    assert info.value.index == -1 and "failing_reducer" in info.value.traceback


def test_as_completed_resumes_where_the_caller_stopped(client: Client) -> None:
    job = client.map(square, range(500))
    first = []
    for index, _ in job.as_completed(timeout=60):
        first.append(index)
        if len(first) == 10:
            break
    rest = [index for index, _ in job.as_completed(timeout=60)]
    assert sorted(first + rest) == list(range(500))
    assert job.result(timeout=10) == [i * i for i in range(500)]


def test_a_function_workers_cannot_unpickle_fails_its_tasks(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "only_here.py").write_text("def twice(x):\n    return 2 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import only_here  # type: ignore[import-not-found]

    job = client.map(only_here.twice, range(3))
    with pytest.raises(TaskFailed, match="only_here") as info:
        job.result(timeout=60)
    assert info.value.exc_type == "builtins.ModuleNotFoundError"


def test_as_completed_without_keeping_values(client: Client) -> None:
    job = client.map(square, range(100))
    assert sorted(v for _, v in job.as_completed(timeout=60, keep=False)) == [
        i * i for i in range(100)
    ]
    assert job.result() == [None] * 100  # nothing held


def test_a_fail_fast_failure_frees_the_job_and_raises_again(
    cluster: LocalCluster, client: Client
) -> None:
    job = client.map(fail_on, range(20), [0] * 20)
    with pytest.raises(TaskFailed):
        job.result(timeout=60)
    with pytest.raises(TaskFailed):
        job.result(timeout=60)
    store = redis.Redis.from_url(cluster.redis_url or "")
    try:
        assert store.keys(f"hq:job:{{{job.id}}}*") == []
    finally:
        store.close()


# Code whose file exists only in this process, as a Jupyter cell's does: registered in
# linecache here (as IPython registers cells), absent on the workers' disks.
CLIENT_ONLY_SOURCE = """\
def scale(x):
    factor = 3
    if x == 4:
        raise ArithmeticError(f"no factor for {x}")
    return factor * x
"""


def client_only_function(tmp_path: Path) -> tuple[object, str]:
    filename = str(tmp_path / "no-such-dir" / f"cell_{os.getpid()}_{time.time_ns()}.py")
    linecache.cache[filename] = (
        len(CLIENT_ONLY_SOURCE),
        None,
        CLIENT_ONLY_SOURCE.splitlines(True),
        filename,
    )
    namespace: dict[str, object] = {"__name__": "notebook_cell_module"}  # not importable
    exec(compile(CLIENT_ONLY_SOURCE, filename, "exec"), namespace)
    return namespace["scale"], filename


def test_remote_traceback_names_a_client_only_file_line_and_source(
    client: Client, tmp_path: Path
) -> None:
    scale, filename = client_only_function(tmp_path)
    job = client.map(scale, range(8))
    with pytest.raises(TaskFailed) as info:
        job.result(timeout=60)
    failure = info.value
    assert failure.index == 4 and failure.exc_type == "builtins.ArithmeticError"
    frame = f'File "{filename}", line 4, in scale'
    assert frame in failure.traceback, failure.traceback
    # The worker had no such file; the client filled in the line from its own linecache.
    after = failure.traceback.split(frame, 1)[1].splitlines()[1]
    assert after.strip() == 'raise ArithmeticError(f"no factor for {x}")'
    assert frame in str(failure)


def test_by_value_code_unpickles_with_only_the_standard_library_and_cloudpickle(
    tmp_path: Path,
) -> None:
    from coffea_hq import protocol

    scale, filename = client_only_function(tmp_path)
    data = protocol.decompress(protocol.dumps(scale))
    loader = (
        "import sys, pickle\n"
        "for name in [m for m in sys.modules if m.startswith('coffea_hq')]: del sys.modules[name]\n"
        "sys.modules['coffea_hq'] = None  # any reference to coffea_hq fails to import\n"
        "f = pickle.loads(sys.stdin.buffer.read())\n"
        "print(f.__code__.co_filename, f(2))\n"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", loader], input=data, capture_output=True, check=True
    )
    assert out.stdout.decode().split() == [filename, "6"]


def queue_doc(url: str) -> dict[str, int]:
    doc: dict[str, int] = get_json(url + protocol.QUEUE)
    return doc


def test_a_map_whose_submission_fails_leaves_no_job_behind(
    store,  # type: ignore[no-untyped-def]
    processes: Processes,
    prefix: str,
    redis_client: redis.Redis,
) -> None:
    limit = 1_000_000
    url, _ = processes.server(store.url, "--max-request-size", str(limit), prefix=prefix)
    # The first batch (SUBMIT_BATCH small tasks) is accepted; the second holds one task
    # larger than the server takes.
    items: list[object] = [b""] * 4096 + [os.urandom(2 * limit)]
    with Client(url) as client, pytest.raises(HQError, match=f"{limit} bytes") as info:
        client.map(len, items)
    assert "deleted" in str(info.value)
    assert redis_client.keys(f"{prefix}:job:*") == []
    assert queue_doc(url)["jobs"] == 0 and queue_doc(url)["work"] == 0
    # A worker that joins afterwards finds nothing of it to run.
    processes.worker(url)
    poll_until(lambda: queue_doc(url)["workers"], 15, "the new worker registers", every=0.1)
    time.sleep(2.0)  # a lease poll and a heartbeat with its stats
    stats = worker_stats(url)
    assert stats and all(s.get("done", 0) + s.get("failed", 0) == 0 for s in stats), stats


def test_ctrl_c_during_submission_deletes_the_job(
    store,  # type: ignore[no-untyped-def]
    processes: Processes,
    prefix: str,
    redis_client: redis.Redis,
) -> None:
    url, _ = processes.server(store.url, prefix=prefix)
    created = threading.Event()

    def interrupt_once_the_job_exists() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not redis_client.keys(f"{prefix}:job:*"):
            time.sleep(0.005)
        created.set()
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    with Client(url) as client:
        interrupter = threading.Thread(target=interrupt_once_the_job_exists, daemon=True)
        interrupter.start()
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            client.map(square, range(1_000_000))
            time.sleep(5)  # the submission finished first: the interrupt lands here
        interrupter.join()
        assert created.is_set() and time.monotonic() - started < 60
        interrupted = time.monotonic()
        assert queue_doc(url)["jobs"] == 0
        assert redis_client.keys(f"{prefix}:job:*") == []
        assert time.monotonic() - interrupted < 5
        # The client still works after the interrupt.
        processes.worker(url)
        assert client.map(square, range(5)).result(timeout=30) == [0, 1, 4, 9, 16]


def test_tasks_larger_in_sum_than_the_request_limit_go_in_several_batches(
    store,  # type: ignore[no-untyped-def]
    processes: Processes,
    prefix: str,
) -> None:
    limit = 1_000_000
    url, _ = processes.server(store.url, "--max-request-size", str(limit), prefix=prefix)
    processes.worker(url)
    items = [os.urandom(100_000) for _ in range(40)]  # 4 MB in all, 100 kB each
    with Client(url) as client:
        assert client.map(len, items).result(timeout=60) == [100_000] * 40


def test_batch_spans_respect_both_bounds() -> None:
    from coffea_hq.client import batch_spans

    assert batch_spans([1] * 10, 4, 100) == [(0, 4), (4, 8), (8, 10)]
    assert batch_spans([40, 40, 40, 200, 1], 10, 100) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    assert batch_spans([], 4, 100) == []


# ---------------------------------------------------------------------- what the user sees


def test_no_server_at_the_url_fails_the_first_call_within_seconds() -> None:
    """Nothing listens there: the first call says so in one sentence, within seconds."""
    url = f"http://127.0.0.1:{free_port()}"
    with Client(url) as client:
        started = time.monotonic()
        with pytest.raises(HQError) as info:
            client.map(square, [1, 2])
        assert time.monotonic() - started < 10
    assert isinstance(info.value, ServerUnreachable) and isinstance(info.value, ConnectionError)
    assert str(info.value) == (
        f"no coffea-hq server answers at {url} (connection refused): start one with "
        "`coffea-hq local` or check the URL (HQ_URL)"
    )
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_hq_error_catches_the_server_refusing_and_the_server_gone(
    store,  # type: ignore[no-untyped-def]
    processes: Processes,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url, server = processes.server(store.url, prefix=prefix)
    with Client(url, retry_for=2) as client:
        try:
            client.run(client.api.get_job("nosuchjob"))
        except HQError as e:
            assert isinstance(e, ServerError) and e.status == 404 and "no job nosuchjob" in str(e)
        else:
            pytest.fail("an unknown job's status did not raise")
        server.kill()
        server.wait()
        caplog.set_level(logging.WARNING, logger="coffea_hq.transport")
        with pytest.raises(HQError) as info:
            client.queue()
        assert isinstance(info.value, ServerUnreachable) and isinstance(info.value, ConnectionError)
    # A request that starts retrying says so, once, before its budget runs out.
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"coffea-hq server at {url} unreachable (connection refused), retrying for 2 s ..."
    ]


UNCLOSED_SCRIPT = """
from coffea_hq import Client, LocalCluster

with LocalCluster(workers=1) as cluster:
    client = Client(cluster.url)                  # as in the README: never closed
    assert client.map(pow, range(4), [2] * 4).result() == [0, 1, 4, 9]
    for index, value in client.map(abs, [-1, -2, -3]).as_completed():
        pass
    Client(cluster.url).health()                  # dropped at once, never closed
print("done")
"""


def test_a_client_nobody_closed_closes_quietly_at_exit(tmp_path: Path) -> None:
    script = tmp_path / "unclosed.py"
    script.write_text(UNCLOSED_SCRIPT)
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert out.returncode == 0 and out.stdout.strip() == "done", out.stderr
    assert "Unclosed" not in out.stderr and "Task was destroyed" not in out.stderr, out.stderr
