"""coffea_hq.get / coffea_hq.Scheduler: dask graphs run on real hq-server and hq-worker
processes give what dask's sync scheduler gives; failures name the dask key; a worker
killed mid-graph loses nothing (slow)."""

from __future__ import annotations

import importlib.util
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec
import pytest

dask = pytest.importorskip("dask")
pytest.importorskip("dask_awkward")

import dask.array as da  # noqa: E402
import dask.bag as db  # noqa: E402
import numpy as np  # noqa: E402

import coffea_hq  # noqa: E402
from coffea_hq import LocalCluster, protocol  # noqa: E402
from coffea_hq.dask import Scheduler, partition  # noqa: E402
from coffea_hq.embedded import EmbeddedRedis  # noqa: E402

from . import dask_tasks  # noqa: E402
from .conftest import Processes  # noqa: E402
from .util import get_json, poll_until  # noqa: E402

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "dask" / "analysis.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dask_example_analysis", EXAMPLE)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def counters(url: str) -> dict[str, int]:
    """The server's own task accounting."""
    return get_json(url + protocol.QUEUE, timeout=10)["counters"]


def jobs_left(url: str) -> int:
    return int(get_json(url + protocol.QUEUE, timeout=10)["jobs"])


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(workers=2, slots=1, lease_timeout=3) as c:
        yield c


def test_partition_keeps_each_partition_on_one_worker() -> None:
    x = da.arange(100, chunks=10)
    total = (x * 2 + 1).sum(split_every=4)
    graph = dict(total.__dask_graph__())
    from dask._task_spec import convert_legacy_graph

    groups, data = partition(convert_legacy_graph(graph), [(total.name,)])
    # Ten chunk groups (arange, *2, +1, partial sum each), no inputs from other groups...
    sources = [g for g in groups if not g.needs]
    assert len(sources) == 10
    assert all(len(g.nodes) >= 3 and len(g.outputs) == 1 for g in sources)
    # ...and the reduction tree's steps: each its own group, fan-ins kept.
    steps = [g for g in groups if g.needs]
    assert 2 <= len(steps) <= 4
    assert sum(len(g.nodes) for g in groups) + len(data) == len(graph)
    assert any(g.outputs == ((total.name,),) for g in groups)


def test_bad_input_is_refused_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HQ_URL", raising=False)
    with pytest.raises(Exception, match="HQ_URL"):
        dask.compute(da.ones(4, chunks=2).sum(), scheduler=Scheduler())
    with pytest.raises(KeyError, match="not in the graph"):
        Scheduler("http://127.0.0.1:9")({"a": 1}, ["b"])


def test_failed_task_raises_with_its_key(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HQ_URL", cluster.url)
    before = counters(cluster.url)
    bag = db.from_sequence(range(10), npartitions=5).map(dask_tasks.inverse_shifted).sum()
    with pytest.raises(ZeroDivisionError) as info:
        dask.compute(bag, scheduler=coffea_hq.get)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "dask key" in notes and "2)" in notes, notes  # partition 2 holds x == 5
    assert "dask task" in str(info.value)
    assert counters(cluster.url)["tasks_failed"] > before["tasks_failed"]
    poll_until(lambda: jobs_left(cluster.url) == 0, 30, "the graph's job deleted")


def test_intermediate_results_stay_off_the_session(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = da.arange(40_000, chunks=2_000).reshape(200, 200).rechunk((20, 200))
    total = (x * 3 + 1).sum(axis=0, split_every=2)  # a tree of 200-float partial sums
    before = counters(cluster.url)
    scheduler = Scheduler(cluster.url)
    (got,) = dask.compute(total, scheduler=scheduler)
    (want,) = dask.compute(total, scheduler="sync")
    np.testing.assert_array_equal(got, want)
    stats, after = scheduler.stats, counters(cluster.url)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    # From the server's own accounting: every group but the last kept its outputs in the
    # store, the workers fetched them from there, and each group was accepted once.
    assert stats["groups"] >= 10
    assert delta["kept"] == stats["kept"] == stats["groups"] - 1
    assert delta["kept_fetched"] >= delta["kept"]
    assert delta["tasks_ok"] == stats["groups"]
    # The session received only the final group's result, far less than what was kept.
    assert delta["kept_bytes"] > 20 * 200 * 8
    assert 0 < stats["bytes_received"] < delta["kept_bytes"] / 4
    poll_until(lambda: jobs_left(cluster.url) == 0, 30, "the graph's job deleted")


def test_a_dependent_whose_input_is_gone_fails_naming_it(cluster: LocalCluster) -> None:
    from coffea_hq import messages
    from coffea_hq.client import Client, Job
    from coffea_hq.dask import GroupCall, RunGroups
    from coffea_hq.errors import TaskFailed

    before = counters(cluster.url)
    with Client(cluster.url) as client:
        api = client.api
        job = Job(client, "kept-input-gone", [("the dependent",)])
        sha = client.run(api.upload(protocol.cloud_dumps(RunGroups([]))))
        client.run(api.create_job(job.id, messages.CreateJob(function=sha, max_attempts=1)))
        refs = messages.KeptInputs(tasks=["7"], labels=["dask key ('sum-partial', 3)"])
        payload = protocol.kept_inputs_payload(
            msgspec.json.encode(refs), protocol.dumps((GroupCall(0, "k", {}),))
        )
        client.run(api.submit_tasks(job.id, messages.SubmitTasks(tasks=["0"]), [payload]))
        client.run(api.seal(job.id, messages.Seal(total=1)))
        with pytest.raises(TaskFailed) as info:
            job.result(timeout=60)
    assert info.value.exc_type == "coffea_hq.errors.KeptInputMissing"
    assert "dask key ('sum-partial', 3)" in info.value.message
    assert "task 7" in info.value.message and "never submitted with 'keep'" in info.value.message
    assert counters(cluster.url)["tasks_failed"] == before["tasks_failed"] + 1


def hist_equal(a: Any, b: Any) -> None:
    """Bin for bin, flow bins and variances included."""
    assert a.axes == b.axes
    np.testing.assert_array_equal(a.values(flow=True), b.values(flow=True))
    np.testing.assert_array_equal(a.variances(flow=True), b.variances(flow=True))


def plain_graphs() -> tuple[Any, ...]:
    """dask.array and dask.bag collections: reductions, a matrix product, a shuffle-free
    groupby (frequencies), a distinct count."""
    x = da.random.default_rng(3).normal(size=(300, 40), chunks=(50, 20))
    bag = db.from_sequence(range(200), npartitions=9).filter(dask_tasks.odd).map(dask_tasks.cube)
    return (
        ((x - x.mean(axis=0)) ** 2).sum(axis=1),
        (x @ x.T).trace(),
        bag.sum(),
        bag.frequencies(),
        bag.map(str).distinct().count(),
    )


@pytest.mark.slow  # ~40 s on a loaded 2-core machine: cold worker processes import coffea
def test_coffea_analysis_and_plain_graphs_equal_sync(
    cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory
) -> None:
    analysis = load_example()
    paths = analysis.write_files(tmp_path_factory.mktemp("dask-root"), files=2, events=1500)
    outputs = analysis.build(analysis.make_fileset(paths, step=500))
    plain = plain_graphs()
    before = counters(cluster.url)
    scheduler = Scheduler(cluster.url)
    # One compute for both (each compute is one job, whose worker processes start cold).
    with dask.config.set(scheduler=scheduler):
        got, *got_plain = dask.compute(outputs, *plain)
    want, *want_plain = dask.compute(outputs, *plain, scheduler="sync")
    assert set(got) == set(want) == {"dataset0", "dataset1"}
    for name in want:
        g, w = got[name][name], want[name][name]
        assert g["events"] == w["events"] == 1500
        assert g["sumw"] == w["sumw"]
        hist_equal(g["mll"], w["mll"])
        hist_equal(g["jet_pt"], w["jet_pt"])
        assert w["mll"].sum().value > 0
    np.testing.assert_array_equal(got_plain[0], want_plain[0])
    assert got_plain[1:] == want_plain[1:]
    # One task per group, each accepted once (partitions' tasks fused), nothing left over.
    assert scheduler.stats["groups"] < scheduler.stats["tasks"] / 2
    assert counters(cluster.url)["tasks_ok"] - before["tasks_ok"] == scheduler.stats["groups"]
    poll_until(lambda: jobs_left(cluster.url) == 0, 30, "the graph's job deleted")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_worker_killed_mid_graph_loses_nothing(
    store: EmbeddedRedis, processes: Processes, prefix: str
) -> None:
    url, _ = processes.server(store.url, "--lease-timeout", "2", prefix=prefix)
    victim = processes.worker(url, "--slots", "1")
    processes.worker(url, "--slots", "1")
    bag = db.from_sequence(range(120), npartitions=40).map(dask_tasks.slow_cube)
    collections = (bag.sum(), bag.map(dask_tasks.inverse_shifted, at=-1).sum())
    before = counters(url)
    result: dict[str, Any] = {}
    scheduler = Scheduler(url)

    def compute() -> None:
        try:
            result["got"] = dask.compute(*collections, scheduler=scheduler)
        except BaseException as e:
            result["error"] = e

    thread = threading.Thread(target=compute)
    thread.start()
    poll_until(lambda: counters(url)["tasks_ok"] - before["tasks_ok"] >= 5, 120, "5 groups done")
    victim.send_signal(signal.SIGKILL)
    thread.join(timeout=180)
    assert not thread.is_alive()
    assert "error" not in result, result
    assert result["got"] == dask.compute(*collections, scheduler="sync")
    assert victim.wait(timeout=5) == -signal.SIGKILL
    after = counters(url)
    assert after["requeued"] > before["requeued"]
    # Each group's result accepted exactly once, the killed worker's included.
    assert after["tasks_ok"] - before["tasks_ok"] == scheduler.stats["groups"]


@pytest.mark.slow  # fresh server and worker processes, and a group that outlasts the timeout
@pytest.mark.timeout(180)
def test_a_long_group_does_not_get_the_unsealed_job_cancelled(
    store: EmbeddedRedis, processes: Processes, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The job stays unsealed while a group waits for others: without the session's empty
    # submits the server would cancel it as abandoned after --unsealed-timeout.
    monkeypatch.setattr(coffea_hq.dask, "TOUCH_EVERY", 0.5)
    url, _ = processes.server(store.url, "--unsealed-timeout", "2", prefix=prefix)
    processes.worker(url, "--slots", "1")
    bag = db.from_sequence([1, 2], npartitions=2).map(dask_tasks.sleepy, seconds=5)
    scheduler = Scheduler(url)
    (got,) = dask.compute(bag.sum(), scheduler=scheduler)
    assert got == 3
    assert counters(url)["tasks_ok"] == scheduler.stats["groups"]
