"""What the workers know reaches the session: warnings, log records, task output, per-task
resources, a job's end stopping its fetched work, forwarded environment variables, and the
progress display. Through a real LocalCluster (embedded Valkey, hq-server, hq-worker
processes); the coffea test runs real coffea on a truncated ROOT file the test writes."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import psutil
import pytest
import redis
from coffea_hq.server.keys import Keys
from rich.console import Console

from coffea_hq import Client, LocalCluster, TaskFailed, protocol
from coffea_hq.progress import RunProgress, status_text

from .util import get_json, poll_until

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.filterwarnings("ignore:Missing cross-reference index:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Performed attempt:UserWarning"),
]


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(workers=2, slots=1, lease_timeout=3) as c:
        yield c


@pytest.fixture
def client(cluster: LocalCluster) -> Iterator[Client]:
    with Client(cluster.url) as c:
        yield c


class NowhereWarning(Warning):
    """A warning category the session cannot import by its (made-up) module name."""


NowhereWarning.__module__ = "no_such_module_here"


def chatty(x: int) -> int:
    import logging
    import os
    import warnings

    warnings.warn("calibration file is old", RuntimeWarning, stacklevel=1)
    for _ in range(3):  # raised three times in the task, reported once
        warnings.warn("no such category here", NowhereWarning, stacklevel=1)
    logging.getLogger("analysis.corrections").warning("fallback correction for run %d", x)
    print(f"python print {x}")
    os.write(2, f"C-level write {x}\n".encode())  # what ROOT or XRootD would print
    return x


def test_warnings_and_log_records_are_raised_again_in_the_session(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="analysis.corrections")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert client.map(chatty, range(6)).result(timeout=30) == list(range(6))
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    # Identical warnings from six tasks: shown once, as Python's default filter would.
    assert len(runtime) == 1, [str(w.message) for w in caught]
    assert re.search(r"calibration file is old \[on worker local-\d+-\d\]", str(runtime[0].message))
    assert runtime[0].filename.endswith("test_session_feedback.py")
    fallback = [w for w in caught if w.category.__name__ == "RemoteWarning"]
    assert len(fallback) == 1
    assert "no_such_module_here.NowhereWarning: no such category here" in str(fallback[0].message)
    records = [r for r in caplog.records if r.name == "analysis.corrections"]
    assert len(records) == 6 and all(r.levelno == logging.WARNING for r in records)
    assert {r.getMessage().split(" [on worker")[0] for r in records} == {
        f"fallback correction for run {x}" for x in range(6)
    }
    assert all(re.match(r"local-\d+-\d", r.worker) for r in records)  # type: ignore[attr-defined]


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")
def test_job_and_worker_logs_hold_task_output_and_the_workers_own_lines(
    cluster: LocalCluster, client: Client
) -> None:
    job = client.map(chatty, range(4))
    job.result(timeout=30)
    lines = job.logs()  # kept from before the job's deletion
    assert sorted(line.task for line in lines) == ["0", "1", "2", "3"]
    for line in lines:
        assert f"python print {line.task}" in line.text
        assert f"C-level write {line.task}" in line.text
        assert line.job == job.id and line.worker.startswith("local-")
    # The job's buffers went with the job.
    r = redis.Redis.from_url(cluster.redis_url)
    keys = Keys("hq").job(job.id)
    assert r.exists(keys.logs, keys.notes) == 0
    r.close()
    logs: dict[str, Any] = {}

    def worker_lines_arrived() -> bool:
        logs.update(client.worker_logs())
        return all(any("slot(s), server" in x.text for x in v) for v in logs.values())

    poll_until(worker_lines_arrived, 10, "each worker's own start line in its log buffer")
    assert len(logs) == 2
    printed = [x for v in logs.values() for x in v if x.job == job.id]
    assert sorted(x.task for x in printed) == ["0", "1", "2", "3"]


def shout(size: int) -> int:
    print("x" * size)
    return size


def test_task_output_is_cut_to_its_tail(client: Client) -> None:
    job = client.map(shout, [protocol.TASK_OUTPUT_MAX * 3])
    job.result(timeout=30)
    (line,) = job.logs()
    assert len(line.text) <= protocol.TASK_OUTPUT_MAX
    assert line.text.startswith("[... ") and line.text.rstrip().endswith("xxxx")


def hog(megabytes: int, seconds: float) -> int:
    import time

    block = bytearray(megabytes * 1024 * 1024)
    for i in range(0, len(block), 4096):  # touch every page: resident, not just reserved
        block[i] = 1
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
    return len(block)


def test_each_task_reports_its_wall_cpu_and_peak_memory(
    cluster: LocalCluster, client: Client
) -> None:
    # Two tasks on one worker (2 workers x 1 slot: run them in one job, then a small one
    # after): the small task's peak is its own, not the big one's before it.
    big = client.map(hog, [200], [0.3], resources=True)
    big.result(timeout=30)
    used = big.resources(0)
    assert used is not None and used["max_rss"] > 200 * 1024 * 1024
    assert 0.25 < used["cpu"] <= used["wall"] + 0.05
    small = client.map(hog, [1] * 4, [0.0] * 4, resources=True)
    small.result(timeout=30)
    peaks = [small.resources(i)["max_rss"] for i in range(4)]  # type: ignore[index]
    assert max(peaks) < 150 * 1024 * 1024, peaks
    workers = get_json(cluster.url + protocol.WORKERS)
    stats = workers[used["worker"]]["stats"]
    assert len(stats["slot_rss_bytes"]) == 1 and stats["slot_rss_bytes"][0] > 0
    assert "agent_max_rss_kb" in stats and "max_rss_kb" not in stats


def test_a_job_without_resources_gets_no_per_task_note_but_its_totals(client: Client) -> None:
    # The cheap default: the store keeps no note per task, only the job's totals.
    job = client.map(hog, [50, 1], [0.3, 0.0])
    deadline = time.monotonic() + 60  # read before the results are collected (then deleted)
    while (summary := job.status())["done"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    job.result(timeout=30)
    assert job.resources(0) is None and job.resources(1) is None
    assert summary["max_rss"] > 50 * 1024 * 1024
    assert 0.25 < summary["cpu_seconds"] <= summary["wall_seconds"] + 0.05


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def nap_noting_pid(seconds: float, where: str) -> float:
    import os
    import time

    with open(os.path.join(where, str(os.getpid())), "w"):
        pass
    time.sleep(seconds)
    return seconds


def test_cancel_kills_running_tasks_and_drops_fetched_ones_promptly(tmp_path: Path) -> None:
    # The default lease timeout (30 s): heartbeats every 10 s, so only the server telling
    # the workers at once stops the tasks within the 2.5 s asked here.
    with LocalCluster(workers=2, slots=1) as cluster, Client(cluster.url) as client:
        try:
            cancel_promptly(client, tmp_path)
        except AssertionError:
            print(cluster.log_tail("worker-0"), cluster.log_tail("worker-1"))
            raise


def cancel_promptly(client: Client, tmp_path: Path) -> None:
    job = client.map(nap_noting_pid, [30.0] * 3, [str(tmp_path)] * 3)
    poll_until(lambda: any(tmp_path.iterdir()), 10, "a slot runs a long task")
    # The other worker too, if it leased one: under load its task starts a second or more
    # later, and one started after the snapshot below would look like a fetched task run.
    with contextlib.suppress(AssertionError):
        poll_until(lambda: len(list(tmp_path.iterdir())) >= 2, 5, "both workers run a task")
    running = {int(p.name) for p in tmp_path.iterdir()}
    job.cancel()
    took = poll_until(
        lambda: not any(psutil.pid_exists(pid) for pid in running),
        2.5,
        "the cancelled tasks' subprocesses are gone",
        every=0.05,
    )
    assert took < 2.5
    poll_until(lambda: client.queue()["work"] == 0, 5, "nothing of the job is left queued")
    time.sleep(0.5)
    assert {int(p.name) for p in tmp_path.iterdir()} == running  # nothing fetched ran


def fail_fifth(x: int) -> int:
    import time

    time.sleep(0.005)
    if x == 5:
        raise KeyError("bad entry 5")
    return x


def test_a_failed_job_stops_fetched_work_with_one_info_line(
    cluster: LocalCluster, client: Client
) -> None:
    job = client.map(fail_fifth, range(600))
    with pytest.raises(TaskFailed, match="bad entry 5"):
        job.result(timeout=30)
    time.sleep(2.5)  # the workers' next heartbeats carry their log lines
    lines = [x.text for v in client.worker_logs().values() for x in v]
    dropped = [x for x in lines if "results were dropped" in x]
    assert not dropped, dropped
    over = [x for x in lines if f"job {job.id} is over" in x]
    assert 1 <= len(over) <= 2 and all(x.startswith("INFO") for x in over), lines
    queue = client.queue()
    assert queue["work"] == 0


def read_env(name: str) -> str | None:
    import os

    return os.environ.get(name)


def test_env_reaches_the_job_s_tasks_only(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HQ_SESSION_ONLY", "from the session")
    with_env = client.map(read_env, ["HQ_SESSION_ONLY"] * 4, env=["HQ_SESSION_ONLY"])
    assert with_env.result(timeout=30) == ["from the session"] * 4
    as_dict = client.map(read_env, ["HQ_GIVEN"] * 2, env={"HQ_GIVEN": "given"})
    assert as_dict.result(timeout=30) == ["given"] * 2
    # The same slots, another job: nothing leaked.
    assert (
        client.map(read_env, ["HQ_SESSION_ONLY", "HQ_GIVEN"] * 2).result(timeout=30) == [None] * 4
    )


def test_env_naming_a_variable_the_session_lacks_fails_before_submitting(
    client: Client,
) -> None:
    jobs = client.queue()["counters"]
    with pytest.raises(ValueError, match="HQ_NOT_SET_ANYWHERE"):
        client.map(read_env, ["x"], env=["HQ_NOT_SET_ANYWHERE"])
    with pytest.raises(ValueError, match="must be a string"):
        client.map(read_env, ["x"], env={"A": 1})  # type: ignore[dict-item]
    assert client.queue()["counters"] == jobs


# ---------------------------------------------------------------------- progress display


def render(progress: RunProgress) -> str:
    console = Console(width=80, record=True, force_terminal=False)
    console.print(*progress.get_renderables())
    return console.export_text()


def test_progress_keeps_its_time_column_whole_at_80_columns_and_says_what_goes_wrong() -> None:
    progress = RunProgress(console=Console(width=80, file=open(os.devnull, "w")))  # noqa: SIM115
    chunks = progress.add_task("Processing", total=123456, unit="chunk")
    merges = progress.add_task("Merging (on workers)", total=6500, unit="merges")
    progress.update(chunks, completed=60000)
    progress.update(merges, completed=3000)
    time.sleep(1.1)
    progress.update(chunks, completed=61000)
    progress.update(merges, completed=3300)
    shown = render(progress)
    rows = shown.splitlines()
    assert len(rows) == 2
    for row in rows:
        assert len(row) <= 80
        assert re.search(r"\[ \d:\d\d:\d\d < \d:\d\d:\d\d \| [\d.]+ \w+/s +\]$", row), row
    progress.status = status_text(retried=3, crashed=1, waiting=True)
    status = render(progress).splitlines()[-1]
    assert "waiting for a worker" in status and "1 crashed" in status and "3 retried" in status


def test_no_empty_merge_bar_for_a_single_item(cluster: LocalCluster) -> None:
    pytest.importorskip("coffea")
    from coffea_hq.executor import _MergeBar

    progress = RunProgress(console=Console(width=80, file=open(os.devnull, "w")))  # noqa: SIM115
    progress.add_task("Preprocessing", total=1, unit="file")
    bar = _MergeBar(progress, 1, 20)
    bar.finish()
    assert "Merging" not in render(progress)
    bar.update(1, 1)  # a merge after all: now it shows
    assert "Merging (on workers)" in render(progress)


def test_a_remote_exception_is_caught_by_its_own_type_and_as_task_failed(client: Client) -> None:
    job = client.map(fail_fifth, [5])
    with pytest.raises(KeyError) as caught:
        job.result(timeout=30)
    assert isinstance(caught.value, TaskFailed)
    assert "bad entry 5" in str(caught.value)


def test_savemetrics_adds_chunk_resources_to_coffea_metrics(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    pytest.importorskip("coffea")
    from coffea import processor
    from coffea.nanoevents import NanoAODSchema

    from coffea_hq import HQExecutor

    from .test_executor import Bookkeeping, write_nanoaod

    files = [tmp_path / "dy_0.root", tmp_path / "dy_1.root"]
    write_nanoaod(files[0], 600, 1)
    write_nanoaod(files[1], 400, 2)

    runner = processor.Runner(
        executor=HQExecutor(cluster.url, status=False, savemetrics=True),
        schema=NanoAODSchema,
        chunksize=250,
        metadata_cache={},
        savemetrics=True,
    )
    fileset = {"DY": {"files": {str(f): "Events" for f in files}}}
    _, metrics = runner(fileset, processor_instance=Bookkeeping())
    assert metrics["processtime"] > 0 and metrics["entries"] == 1000  # coffea's own
    assert metrics["chunk_walltime"] >= metrics["chunk_walltime_max"] > 0
    assert metrics["chunk_cputime"] >= metrics["chunk_cputime_max"] > 0
    assert metrics["chunk_max_rss_bytes"] > 50 * 1024 * 1024  # an interpreter with coffea
    assert metrics["merge_walltime"] > 0


def test_skipbadfiles_warning_reaches_the_session_naming_the_worker(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    pytest.importorskip("coffea")
    from coffea import processor
    from coffea.nanoevents import NanoAODSchema

    from coffea_hq import HQExecutor

    from .test_executor import Bookkeeping, write_nanoaod

    good, truncated = tmp_path / "good.root", tmp_path / "truncated.root"
    write_nanoaod(good, 500, 4)
    truncated.write_bytes(good.read_bytes()[:3000])  # cut off: unreadable
    fileset = {"DY": {"files": {str(good): "Events", str(truncated): "Events"}}}
    runner = processor.Runner(
        executor=HQExecutor(cluster.url, status=False),
        schema=NanoAODSchema,
        chunksize=250,
        metadata_cache={},
        skipbadfiles=True,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = runner(fileset, processor_instance=Bookkeeping())
    assert out["cutflow"]["DY/all"] == 500
    skipped = [w for w in caught if "Skipping bad file" in str(w.message)]
    assert len(skipped) == 1, [str(w.message) for w in caught]
    assert issubclass(skipped[0].category, UserWarning)
    assert re.search(r"truncated\.root.*\[on worker local-\d+-\d\]", str(skipped[0].message))
    with pytest.warns(UserWarning, match=r"(?s)Skipping bad file.*\[on worker local-"):
        runner(fileset, processor_instance=Bookkeeping())
