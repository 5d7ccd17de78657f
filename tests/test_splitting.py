"""Per-chunk memory and wall-time limits: a chunk over its memory limit is stopped on the
worker, fails as memory_exceeded, and HQExecutor runs it again as halves by entry range
until the pieces fit; the output equals the unsplit one. A chunk over its wall-time limit
fails as walltime_exceeded and is not retried."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("coffea")
uproot = pytest.importorskip("uproot")

from coffea import processor  # noqa: E402
from coffea.nanoevents import BaseSchema  # noqa: E402

from coffea_hq import Client, HQExecutor, LocalCluster, protocol  # noqa: E402
from coffea_hq.chunks import halves, restore_processed  # noqa: E402
from coffea_hq.errors import MemoryExceeded, TaskFailed  # noqa: E402
from coffea_hq.sizes import parse_memory  # noqa: E402

ENTRIES = 40_000
LIMIT = "800MiB"
# Bytes the processor holds per event: a whole chunk needs 960 MB (over the limit, even
# with none of the interpreter's memory counted, as in a process forked from the zygote),
# a half 480 MB (under, even beside a new interpreter's ~200 MB of its own).
PER_EVENT = 24_000


class Grows(processor.ProcessorABC):
    """Sums an integer column; holds ``per_event`` bytes per event of the chunk meanwhile
    (touched, so resident), and sleeps ``sleep`` seconds."""

    def __init__(self, per_event: int = 0, sleep: float = 0.0) -> None:
        self.per_event = per_event
        self.sleep = sleep

    def process(self, events: Any) -> dict[str, Any]:
        x = np.asarray(events.x)
        held = []
        for _ in range(len(x) * self.per_event // (8 << 20)):  # 8 MiB at a time, as it grows
            held.append(np.ones(1 << 20))
        if self.sleep:
            time.sleep(self.sleep)
        del held
        return {"n": len(x), "sum": int(x.sum()), "sumsq": int((x * x).sum())}

    def postprocess(self, accumulator: Any) -> Any:
        return accumulator


@pytest.fixture(scope="module")
def fileset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("split") / "events.root"
    with uproot.recreate(path) as f:
        f["Events"] = {"x": np.arange(ENTRIES, dtype=np.int64) % 1000}
    return {"sample": {"files": {str(path): "Events"}}}


def counters(url: str) -> dict[str, int]:
    with Client(url) as client:
        return dict(client.queue()["counters"])


def run(fileset: dict[str, Any], executor: Any, proc: Grows, chunksize: int = ENTRIES) -> Any:
    runner = processor.Runner(
        executor=executor,
        pre_executor=processor.IterativeExecutor(status=False),  # one job per run, not two
        schema=BaseSchema,
        chunksize=chunksize,
        metadata_cache={},
    )
    return runner(fileset, processor_instance=proc)


def test_chunk_over_memory_limit_is_split_until_it_fits(
    chunk_cluster: LocalCluster, fileset: dict[str, Any]
) -> None:
    reference = run(fileset, processor.IterativeExecutor(status=False), Grows())
    before = counters(chunk_cluster.url)
    out = run(
        fileset,
        HQExecutor(chunk_cluster.url, status=False, memory=LIMIT, timeout=120),
        Grows(PER_EVENT),
    )
    after = counters(chunk_cluster.url)
    assert out == reference
    assert out["n"] == ENTRIES
    failed = after.get("tasks_failed", 0) - before.get("tasks_failed", 0)
    ok = after.get("tasks_ok", 0) - before.get("tasks_ok", 0)
    # The server's accounting: each chunk over the limit failed once and was not retried
    # as it was; its halves ran as new tasks; every leaf of the split ran exactly once.
    assert failed == 1
    assert ok == 2
    assert after.get("requeued", 0) == before.get("requeued", 0)


@pytest.mark.slow
def test_chunk_at_smallest_size_fails_naming_file_and_range(
    chunk_cluster: LocalCluster, fileset: dict[str, Any]
) -> None:
    executor = HQExecutor(
        chunk_cluster.url, status=False, memory=LIMIT, split_min_entries=ENTRIES, timeout=120
    )
    with pytest.raises(MemoryExceeded, match=r"events\.root.*entries 0-40000.*memory limit"):
        run(fileset, executor, Grows(PER_EVENT))


@pytest.mark.slow
def test_chunk_over_walltime_fails_with_its_reason_and_is_not_retried(
    chunk_cluster: LocalCluster, fileset: dict[str, Any]
) -> None:
    before = counters(chunk_cluster.url)
    started = time.monotonic()
    executor = HQExecutor(chunk_cluster.url, status=False, walltime=1.0, timeout=120)
    with pytest.raises(TaskFailed, match="wall-time limit") as caught:
        run(fileset, executor, Grows(sleep=60))
    assert time.monotonic() - started < 30
    assert caught.value.exc_type == protocol.WALLTIME_EXCEEDED_TYPE
    after = counters(chunk_cluster.url)
    assert after.get("tasks_failed", 0) - before.get("tasks_failed", 0) == 1
    assert after.get("requeued", 0) == before.get("requeued", 0)


def test_halves_cover_the_range_and_processed_is_restored() -> None:
    from coffea.processor.executor import WorkItem

    item = WorkItem("d", "f.root", "Events", 10, 31, "uuid")
    a, b = halves(item)
    assert (a.entrystart, a.entrystop, b.entrystart, b.entrystop) == (10, 20, 20, 31)
    out = restore_processed({"processed": {a, b}}, {item: [a, b]})
    assert out["processed"] == {item}


@pytest.mark.parametrize(
    ("text", "size"), [("2GiB", 2 << 30), ("500MB", 500_000_000), ("1.5G", 1_500_000_000)]
)
def test_memory_sizes(text: str, size: int) -> None:
    assert parse_memory(text) == size


@pytest.mark.parametrize("bad", ["2 parsecs", "-1GB", "", "0"])
def test_bad_memory_size_is_refused_at_once(bad: str) -> None:
    with pytest.raises(ValueError, match="memory size"):
        HQExecutor("http://127.0.0.1:1", memory=bad)


def test_bad_walltime_is_refused_at_once() -> None:
    with pytest.raises(ValueError, match="walltime"):
        HQExecutor("http://127.0.0.1:1", walltime=0)


def test_worker_refuses_bad_task_memory(tmp_path: Path) -> None:
    from coffea_hq.worker.cli import parser

    with pytest.raises(SystemExit):
        parser().parse_args(["http://x:1", "--task-memory", "lots"])


@pytest.mark.slow
def test_worker_memory_limit_applies_to_tasks_without_one(fileset: dict[str, Any]) -> None:
    """hq-worker --task-memory: a chunk over it fails as memory_exceeded (not split
    without HQExecutor(memory=...)); with a looser HQExecutor limit the worker's tighter
    one still applies, and the chunk is split."""
    reference = run(fileset, processor.IterativeExecutor(status=False), Grows())
    with LocalCluster(workers=1, slots=1, worker_args=("--task-memory", LIMIT)) as cluster:
        with pytest.raises(TaskFailed) as caught:
            run(fileset, HQExecutor(cluster.url, status=False, timeout=120), Grows(PER_EVENT))
        assert caught.value.exc_type == protocol.MEMORY_EXCEEDED_TYPE
        assert "memory limit" in caught.value.message
        executor = HQExecutor(cluster.url, status=False, memory="64GiB", timeout=120)
        assert run(fileset, executor, Grows(PER_EVENT)) == reference
