"""ROOT files kept open across the chunks a slot runs: each file is opened once per slot
subprocess, not once per chunk, and the output is the one coffea gives without it."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

pytest.importorskip("coffea")
uproot = pytest.importorskip("uproot")

from coffea import processor  # noqa: E402
from coffea.nanoevents import BaseSchema  # noqa: E402

from coffea_hq import HQExecutor, LocalCluster  # noqa: E402
from coffea_hq.filecache import FileCache  # noqa: E402

ENTRIES = 4_000
CHUNKSIZE = 500


class Opens(processor.ProcessorABC):
    """Sums a column and notes, per chunk, its slot's file-cache counters."""

    def process(self, events: Any) -> dict[str, Any]:
        from coffea_hq import filecache

        cache = filecache.cache()
        seen = (os.getpid(), cache.opened, cache.reused) if cache else (os.getpid(), -1, -1)
        x = np.asarray(events.x)
        return {"n": len(x), "sum": int(x.sum()), "bytes": int(x.nbytes), "seen": {seen}}

    def postprocess(self, accumulator: Any) -> Any:
        return accumulator


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    out = []
    for i in range(2):
        path = tmp_path_factory.mktemp("cache") / f"f{i}.root"
        with uproot.recreate(path) as f:
            f["Events"] = {"x": np.arange(ENTRIES, dtype=np.int64) * (i + 1)}
        out.append(str(path))
    return out


def run(files: list[str], executor: Any) -> Any:
    runner = processor.Runner(
        executor=executor,
        pre_executor=processor.IterativeExecutor(status=False),  # one job per run, not two
        schema=BaseSchema,
        chunksize=CHUNKSIZE,
        metadata_cache={},
    )
    return runner({"sample": {"files": {f: "Events" for f in files}}}, processor_instance=Opens())


def test_slot_opens_each_file_once_and_output_is_unchanged(
    chunk_cluster: LocalCluster, files: list[str]
) -> None:
    reference = run(files, processor.IterativeExecutor(status=False))
    out = run(files, HQExecutor(chunk_cluster.url, status=False, timeout=60))
    assert out["n"] == reference["n"] == 2 * ENTRIES
    assert out["sum"] == reference["sum"]
    chunks = 2 * ENTRIES // CHUNKSIZE
    seen = out["seen"]
    assert len(seen) == chunks
    pids = {pid for pid, _, _ in seen}
    assert len(pids) == 1  # one worker, one slot: one subprocess ran every chunk
    # Two files, each opened once by this job's slot; every other chunk reused its file.
    assert max(opened for _, opened, _ in seen) == 2
    assert max(opened + reused for _, opened, reused in seen) == chunks


@pytest.mark.slow
def test_keep_files_open_zero_opens_per_chunk(
    chunk_cluster: LocalCluster, files: list[str]
) -> None:
    out = run(files, HQExecutor(chunk_cluster.url, status=False, timeout=60, keep_files_open=0))
    assert out["n"] == 2 * ENTRIES
    assert {(o, r) for _, o, r in out["seen"]} == {(-1, -1)}


def test_cache_is_bounded_and_closes_what_it_drops(files: list[str]) -> None:
    cache = FileCache(uproot.open, size=1)
    with cache.open({files[0]: None}) as first:
        pass
    assert not first.file.closed  # kept open for the next chunk
    with cache.open({files[0]: None}) as again:
        assert again is first
    with cache.open({files[1]: None}):
        pass
    assert first.file.closed  # dropped (size 1): closed
    assert (cache.opened, cache.reused, len(cache)) == (2, 1, 1)
    with cache.open({files[1]: None}, object_cache=None) as other:
        assert other is not first  # other open options: another entry
    cache.close()
    assert len(cache) == 0 and other.file.closed
