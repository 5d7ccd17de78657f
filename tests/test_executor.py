"""HQExecutor against coffea's own executors, on ROOT files the tests write, through a real
LocalCluster (embedded Valkey, hq-server, hq-worker processes running real coffea).

Histograms are compared bin for bin with exact equality. That is fair because every
weight is a multiple of 1/4 and every count an integer: their sums are exact in floating
point whatever order the merges add them in.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("coffea")

import awkward as ak  # noqa: E402
import hist  # noqa: E402
import numpy as np  # noqa: E402
import redis  # noqa: E402
import uproot  # noqa: E402
from coffea import processor  # noqa: E402
from coffea.nanoevents import BaseSchema, NanoAODSchema  # noqa: E402
from coffea.processor.executor import ExecutorBase, Ok  # noqa: E402
from uproot.deserialization import DeserializationError  # noqa: E402

from coffea_hq import Client, HQError, HQExecutor, Job, LocalCluster, protocol  # noqa: E402
from coffea_hq.embedded import free_port  # noqa: E402
from coffea_hq.errors import ServerUnreachable  # noqa: E402

from .util import get_json, poll_until  # noqa: E402

CHUNKSIZE = 250
CATEGORY_AXES = (hist.axis.StrCategory, hist.axis.IntCategory)
# coffea evens out chunks: dy_1.root (800 entries) runs as three chunks of 267, tt_0.root
# (900) as four of 225. The failure tests pick on the second of each.
BAD_DY = (267, 534)
BAD_TT = (225, 450)
pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.filterwarnings("ignore:Missing cross-reference index:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:Performed attempt:UserWarning"),
]


# ---------------------------------------------------------------------- input files


def write_nanoaod(path: Path, n: int, seed: int) -> None:
    """A small NanoAOD-like file: event counters and a Muon collection with nMuon."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(1.6, n)
    total = int(counts.sum())
    muon = ak.zip(
        {
            "pt": rng.exponential(20.0, total).astype(np.float32) + 3,
            "eta": rng.uniform(-2.4, 2.4, total).astype(np.float32),
            "phi": rng.uniform(-np.pi, np.pi, total).astype(np.float32),
            "mass": np.full(total, 0.1057, np.float32),
            "charge": rng.choice(np.array([-1, 1], np.int32), total),
        }
    )
    with uproot.recreate(path) as f:
        f.mktree(
            "Events",
            {
                "run": np.full(n, 1, np.uint32),
                "luminosityBlock": (np.arange(n) // 100).astype(np.uint32),
                "event": np.arange(seed * 100_000, seed * 100_000 + n, dtype=np.uint64),
                "genWeight": rng.choice(np.array([0.25, 0.5, 1.0, -0.5], np.float32), n),
                "Muon": ak.unflatten(muon, counts),
            },
            field_name=lambda outer, inner: f"{outer}_{inner}",
            counter_name=lambda counted: "n" + counted,
        )


def write_flat(path: Path, n: int, seed: int = 7) -> None:
    rng = np.random.default_rng(seed)
    with uproot.recreate(path) as f:
        f.mktree("tree", {"x": np.float64, "w": np.float64, "k": np.int32})
        for start in range(0, n, 400):  # several baskets, so align_clusters has clusters
            size = min(400, n - start)
            f["tree"].extend(
                {
                    "x": rng.normal(0.0, 1.0, size),
                    "w": rng.integers(1, 8, size) / 4.0,
                    "k": rng.integers(0, 5, size).astype(np.int32),
                }
            )


def corrupt_baskets(source: Path, target: Path) -> None:
    """A file whose header and TTree metadata are fine but whose Muon_pt data is garbage:
    pre-processing succeeds, processing fails (uproot's DeserializationError)."""
    data = bytearray(source.read_bytes())
    with uproot.open(source) as f:
        branch = f["Events"]["Muon_pt"]
        seek = int(branch.member("fBasketSeek")[0])
        size = int(branch.member("fBasketBytes")[0])
    data[seek + 80 : seek + size] = b"\x5a" * (size - 80)
    target.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("root")
    paths = {
        "dy0": d / "dy_0.root",
        "dy1": d / "dy_1.root",
        "tt0": d / "tt_0.root",
        "flat": d / "flat.root",
        "truncated": d / "truncated.root",
        "baskets": d / "bad_baskets.root",
    }
    write_nanoaod(paths["dy0"], 1200, 1)
    write_nanoaod(paths["dy1"], 800, 2)
    write_nanoaod(paths["tt0"], 900, 3)
    write_flat(paths["flat"], 2000)
    paths["truncated"].write_bytes(paths["dy0"].read_bytes()[:3000])  # a cut-off copy
    corrupt_baskets(paths["dy1"], paths["baskets"])
    return paths


def nano_fileset(data: dict[str, Path], dy: tuple[str, ...] = ("dy0", "dy1")) -> dict[str, Any]:
    """Both ways of naming trees: the ``{path: treename}`` form and a ``treename`` key."""
    return {
        "DYJets": {"files": {str(data[name]): "Events" for name in dy}},
        "TTbar": {"treename": "Events", "files": [str(data["tt0"])]},
    }


# ---------------------------------------------------------------------- processors
# Module-level classes: FuturesExecutor's processes import them from this module, and
# HQExecutor ships this module's code to the workers by value (it is not installed).


class MuonHistograms(processor.ProcessorABC):
    """dict of hist.Hist (Weight and Double storage, a growing category) and a count."""

    def process(self, events: Any) -> dict[str, Any]:
        dataset = events.metadata["dataset"]
        muons = events.Muon[events.Muon.pt > 5]
        pt = (
            hist.Hist.new.StrCat([], growth=True, name="dataset")
            .Reg(40, 0, 200, name="pt")
            .Weight()
        )
        weights = ak.broadcast_arrays(events.genWeight, muons.pt)[0]
        pt.fill(dataset=dataset, pt=ak.flatten(muons.pt), weight=ak.flatten(weights))
        etaphi = (
            hist.Hist.new.Reg(24, -2.4, 2.4, name="eta").Reg(16, -3.2, 3.2, name="phi").Double()
        )
        etaphi.fill(eta=ak.flatten(muons.eta), phi=ak.flatten(muons.phi))
        pairs = ak.combinations(muons, 2)
        mass = hist.Hist.new.Reg(30, 0, 150, name="mass").Int64()
        mass.fill(mass=ak.flatten((pairs["0"] + pairs["1"]).mass))
        return {"hists": {"pt": pt, "etaphi": etaphi, "mass": mass}, "events": len(events)}

    def postprocess(self, accumulator: Any) -> Any:
        accumulator["postprocessed"] = True
        return accumulator


class Bookkeeping(processor.ProcessorABC):
    """defaultdict, value_accumulator, sets, a numpy array, a plain int."""

    def process(self, events: Any) -> dict[str, Any]:
        dataset = events.metadata["dataset"]
        cutflow: defaultdict[str, int] = defaultdict(int)
        cutflow[f"{dataset}/all"] += len(events)
        cutflow[f"{dataset}/2mu"] += int(ak.sum(ak.num(events.Muon) >= 2))
        sumw = processor.value_accumulator(float)
        sumw += float(ak.sum(events.genWeight))
        lumis = {(dataset, int(lb)) for lb in np.unique(ak.to_numpy(events.luminosityBlock))}
        meta = events.metadata
        chunk = (os.path.basename(meta["filename"]), meta["entrystart"], meta["entrystop"])
        charges = np.bincount(ak.to_numpy(ak.flatten(events.Muon.charge)) + 1, minlength=3)
        return {
            "cutflow": cutflow,
            "sumw": sumw,
            "lumis": lumis,
            "chunks": processor.set_accumulator({chunk}),
            "charges": charges,
            "muons": int(ak.sum(ak.num(events.Muon))),
        }

    def postprocess(self, accumulator: Any) -> None:
        return None


class FlatTree(processor.ProcessorABC):
    """BaseSchema on a flat tree."""

    def process(self, events: Any) -> dict[str, Any]:
        h = hist.Hist.new.IntCat([0, 1, 2, 3, 4], name="k").Reg(20, -4, 4, name="x").Weight()
        h.fill(k=events.k, x=events.x, weight=events.w)
        return {"x": h, "sumw": float(ak.sum(events.w)), "n": len(events)}

    def postprocess(self, accumulator: Any) -> None:
        return None


class FailOnChunk(MuonHistograms):
    """Raises on one chunk: entries 267-534 of the second DY file."""

    def process(self, events: Any) -> dict[str, Any]:
        meta = events.metadata
        if meta["filename"].endswith("dy_1.root") and meta["entrystart"] == BAD_DY[0]:
            raise ValueError("bad calibration for this run range")
        return super().process(events)


class WithTables(Bookkeeping):
    """A processor holding 5 MB of 'correction tables'."""

    def __init__(self) -> None:
        self.table = np.random.default_rng(0).integers(0, 255, 5_000_000, dtype=np.uint8)

    def process(self, events: Any) -> dict[str, Any]:
        out = super().process(events)
        out["table_sum"] = int(self.table[:1000].sum())
        return out


# ---------------------------------------------------------------------- comparing


def assert_same(a: Any, b: Any, where: str = "output") -> None:
    """Equal key for key and bin for bin (exactly; see the module docstring)."""
    if isinstance(a, hist.Hist):
        assert isinstance(b, hist.Hist), where
        assert_same_hist(a, b, where)
    elif isinstance(a, dict):
        assert type(a) is type(b), f"{where}: {type(a)} vs {type(b)}"
        assert set(a) == set(b), f"{where}: keys {set(a) ^ set(b)} differ"
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, processor.value_accumulator):
        assert isinstance(b, processor.value_accumulator) and a.value == b.value, where
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=where)
    else:
        assert type(a) is type(b) and a == b, f"{where}: {a!r} != {b!r}"


def assert_same_hist(a: Any, b: Any, where: str) -> None:
    """Bin for bin. Categories on a growing axis appear in the order results were merged,
    which differs between runs of any parallel executor: compare category by category."""
    categorical = [ax for ax in a.axes if isinstance(ax, CATEGORY_AXES)]
    if categorical:
        ax = categorical[0]
        assert type(b.axes[ax.name]) is type(ax), f"{where}: axis {ax.name} differs"
        assert set(ax) == set(b.axes[ax.name]), f"{where}: categories of {ax.name} differ"
        for value in ax:
            pick: Any = {ax.name: hist.loc(value)}  # type: ignore[arg-type]
            assert_same_hist(a[pick], b[pick], f"{where}[{ax.name}={value!r}]")
        return
    assert a.axes == b.axes, f"{where}: axes differ"
    np.testing.assert_array_equal(a.values(flow=True), b.values(flow=True), err_msg=where)
    if a.variances() is not None:
        np.testing.assert_array_equal(a.variances(flow=True), b.variances(flow=True), err_msg=where)


def run_with(executor: ExecutorBase, fileset: Any, proc: Any, **options: Any) -> Any:
    options.setdefault("schema", NanoAODSchema)
    options.setdefault("chunksize", CHUNKSIZE)
    # A fresh metadata cache: every run does its own pre-processing on its pre_executor.
    runner = processor.Runner(executor=executor, metadata_cache={}, **options)
    return runner(fileset, processor_instance=proc)


def iterative() -> processor.IterativeExecutor:
    return processor.IterativeExecutor(status=False)


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(workers=2, slots=1, lease_timeout=3) as c:
        yield c


@pytest.fixture
def hq(cluster: LocalCluster) -> HQExecutor:
    return HQExecutor(cluster.url, status=False)


def worker_stats(url: str) -> list[dict[str, Any]]:
    return [w["stats"] for w in get_json(url + protocol.WORKERS).values()]


# ---------------------------------------------------------------------- same results


# slow: coffea-level coverage beyond the default run's budget (CI runs it)
@pytest.mark.slow
def test_nanoaod_histograms_equal_iterative_and_futures(
    hq: HQExecutor, data: dict[str, Path]
) -> None:
    fileset = nano_fileset(data)
    ours = run_with(hq, fileset, MuonHistograms())
    assert_same(ours, run_with(iterative(), fileset, MuonHistograms()))
    futures = processor.FuturesExecutor(workers=2, status=False)
    assert_same(ours, run_with(futures, fileset, MuonHistograms()))
    assert ours["events"] == 1200 + 800 + 900 and ours["postprocessed"] is True
    assert ours["hists"]["pt"].sum().value > 0  # the comparison compared something


@pytest.mark.parametrize(
    "treereduction",
    [pytest.param(2, marks=pytest.mark.slow), pytest.param(20, marks=pytest.mark.slow), None],
)
def test_accumulator_types_equal_iterative(
    cluster: LocalCluster, data: dict[str, Path], treereduction: int | None
) -> None:
    hq = HQExecutor(cluster.url, status=False, treereduction=treereduction)
    fileset = nano_fileset(data)
    ours = run_with(hq, fileset, Bookkeeping())
    assert_same(ours, run_with(iterative(), fileset, Bookkeeping()))
    assert ours["cutflow"]["DYJets/all"] == 2000 and len(ours["chunks"]) == 12
    assert isinstance(ours["cutflow"], defaultdict)


def test_progress_bars_count_chunks_and_merges(
    cluster: LocalCluster,
    data: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    polled: list[str] = []
    monkeypatch.setattr(Job, "status", lambda job: polled.append(job.id))
    hq = HQExecutor(cluster.url, status=True, treereduction=3)
    out = run_with(hq, nano_fileset(data), Bookkeeping(), chunksize=100)
    assert_same(out, run_with(iterative(), nano_fileset(data), Bookkeeping(), chunksize=100))
    shown = capsys.readouterr().out
    assert "Processing" in shown and "Merging (on workers)" in shown
    assert "29/29" in shown  # every chunk counted (1200/100 + 800/100 + 900/100)
    # Every merge counted: at least ceil(28 / (3 - 1)), more if some took fewer inputs.
    merged = re.findall(r"Merging \(on workers\)[^\n]*?(\d+)/(\d+)", shown)
    assert merged and merged[-1][0] == merged[-1][1] and int(merged[-1][1]) >= 14
    assert polled == []  # the merge bar follows the results stream, not status polls


# slow: coffea-level coverage beyond the default run's budget (CI runs it)
@pytest.mark.slow
def test_base_schema_flat_tree_in_both_fileset_forms(hq: HQExecutor, data: dict[str, Path]) -> None:
    flat = str(data["flat"])
    for fileset in (
        {"flat": {"treename": "tree", "files": [flat]}},
        {"flat": {"files": {flat: "tree"}}},
    ):
        ours = run_with(hq, fileset, FlatTree(), schema=BaseSchema, chunksize=300)
        assert_same(
            ours, run_with(iterative(), fileset, FlatTree(), schema=BaseSchema, chunksize=300)
        )
        assert ours["n"] == 2000


# slow: coffea-level coverage beyond the default run's budget (CI runs it)
@pytest.mark.slow
def test_hq_as_pre_executor_only_and_as_executor_only(
    hq: HQExecutor, data: dict[str, Path]
) -> None:
    fileset = nano_fileset(data)
    expected = run_with(iterative(), fileset, Bookkeeping(), align_clusters=True)
    # Metadata (with cluster boundaries) fetched on the workers, chunks run here...
    assert_same(
        run_with(iterative(), fileset, Bookkeeping(), pre_executor=hq, align_clusters=True),
        expected,
    )
    # ...and the other way round.
    assert_same(
        run_with(hq, fileset, Bookkeeping(), pre_executor=iterative(), align_clusters=True),
        expected,
    )


# slow: coffea-level coverage beyond the default run's budget (CI runs it)
@pytest.mark.slow
def test_maxchunks_and_savemetrics(hq: HQExecutor, data: dict[str, Path]) -> None:
    fileset = nano_fileset(data)
    out, metrics = run_with(hq, fileset, Bookkeeping(), maxchunks=2, savemetrics=True)
    ref, ref_metrics = run_with(iterative(), fileset, Bookkeeping(), maxchunks=2, savemetrics=True)
    assert_same(out, ref)
    assert len(out["chunks"]) == 4  # two per dataset
    assert sorted(metrics["columns"]) == sorted(ref_metrics["columns"])
    assert metrics["entries"] == 2 * 240 + 2 * 225 and metrics["chunks"] == 4


# slow: coffea-level coverage beyond the default run's budget (CI runs it)
@pytest.mark.slow
def test_preprocessed_chunks_and_use_result_type(hq: HQExecutor, data: dict[str, Path]) -> None:
    runner = processor.Runner(
        executor=hq,
        schema=NanoAODSchema,
        chunksize=CHUNKSIZE,
        metadata_cache={},
        skipbadfiles=True,
        use_result_type=True,
    )
    chunks = list(runner.preprocess(nano_fileset(data)))
    result = runner(chunks, processor_instance=Bookkeeping())
    assert isinstance(result, Ok)
    reference = run_with(iterative(), nano_fileset(data), Bookkeeping())
    assert_same(result.unwrap(), reference)


# ---------------------------------------------------------------------- bad input


# slow: coffea-level coverage beyond the default run's budget (CI runs it)
@pytest.mark.slow
def test_skipbadfiles_skips_an_unreadable_file_in_preprocessing(
    hq: HQExecutor, data: dict[str, Path]
) -> None:
    fileset = nano_fileset(data, dy=("dy0", "dy1", "truncated"))
    with pytest.warns(UserWarning, match="Skipping bad file"):
        ref = run_with(iterative(), fileset, Bookkeeping(), skipbadfiles=True)
    with pytest.warns(UserWarning, match=r"(?s)Skipping bad file.*\[on worker "):  # as theirs
        ours = run_with(hq, fileset, Bookkeeping(), skipbadfiles=True)
    assert_same(ours, ref)
    assert ours["cutflow"]["DYJets/all"] == 2000
    with pytest.raises(OSError, match="truncated.root"):
        run_with(hq, fileset, Bookkeeping())


# slow: coffea-level coverage beyond the default run's budget (CI runs it)
@pytest.mark.slow
def test_skipbadfiles_tuple_skips_chunks_that_fail_in_processing(
    hq: HQExecutor, data: dict[str, Path]
) -> None:
    fileset = nano_fileset(data, dy=("dy0", "baskets"))
    skip = (DeserializationError,)
    with pytest.warns(UserWarning, match="Skipping bad file"):
        ref = run_with(iterative(), fileset, MuonHistograms(), skipbadfiles=skip)
    with pytest.warns(UserWarning, match=r"(?s)Skipping bad file.*\[on worker "):
        ours = run_with(hq, fileset, MuonHistograms(), skipbadfiles=skip)
    assert_same(ours, ref)
    assert ours["events"] == 1200 + 900  # the bad file's four chunks were skipped


# ---------------------------------------------------------------------- errors


def test_processor_exception_surfaces_like_futures_executor(
    cluster: LocalCluster, data: dict[str, Path]
) -> None:
    fileset = nano_fileset(data)
    futures = processor.FuturesExecutor(workers=2, status=False, retries=0)
    with pytest.raises(Exception) as theirs:
        run_with(futures, fileset, FailOnChunk())
    with pytest.raises(Exception) as ours:
        run_with(HQExecutor(cluster.url, status=False, retries=0), fileset, FailOnChunk())
    assert type(ours.value) is type(theirs.value)
    message = str(ours.value)
    assert message.startswith(str(theirs.value))  # coffea's own sentence comes first
    assert "dy_1.root" in message and "entries {}-{}".format(*BAD_DY) in message
    assert "Remote traceback" in message and "bad calibration for this run range" in message
    assert "in process" in message  # a frame of the processor, from the worker


# slow: coffea-level coverage beyond the default run's budget (CI runs it)
@pytest.mark.slow
def test_recoverable_returns_the_partial_output_and_the_exception(
    cluster: LocalCluster, data: dict[str, Path]
) -> None:
    fileset = nano_fileset(data)
    runner = processor.Runner(
        executor=iterative(), schema=NanoAODSchema, chunksize=CHUNKSIZE, metadata_cache={}
    )
    chunks = list(runner.preprocess(fileset))
    good = [
        c for c in chunks if not (c.filename.endswith("dy_1.root") and c.entrystart == BAD_DY[0])
    ]
    assert len(good) == len(chunks) - 1
    expected = runner(good, processor_instance=MuonHistograms())

    hq = HQExecutor(cluster.url, status=False, retries=0, recoverable=True)
    # Through Runner: the exception is raised with the partial output attached, as with
    # any recoverable coffea executor...
    with pytest.raises(Exception, match="bad calibration") as info:
        run_with(hq, fileset, FailOnChunk())
    assert_same(getattr(info.value, "partial_output", None), expected)


def crash_on_second_chunk(item: Any) -> dict[str, int]:
    if item.entrystart == BAD_TT[0]:
        os._exit(7)  # a segfault or an out-of-memory kill looks like this to the worker
    return {"entries": len(item)}


def raise_on_second_chunk(item: Any) -> dict[str, int]:
    if item.entrystart == BAD_TT[0]:
        raise KeyError("Muon_pt")
    return {"entries": len(item)}


def test_executor_called_directly_recoverable_and_crash(
    cluster: LocalCluster, data: dict[str, Path]
) -> None:
    runner = processor.Runner(
        executor=iterative(), schema=NanoAODSchema, chunksize=CHUNKSIZE, metadata_cache={}
    )
    chunks = [c for c in runner.preprocess(nano_fileset(data)) if c.dataset == "TTbar"]
    hq = HQExecutor(cluster.url, status=False, recoverable=True)
    out, exception = hq(chunks, raise_on_second_chunk, {"entries": 0})
    assert isinstance(exception, KeyError) and out == {"entries": 900 - 225}
    assert any("tt_0.root" in note for note in getattr(exception, "__notes__", []))

    crashing = HQExecutor(cluster.url, status=False, max_attempts=1)
    with pytest.raises(RuntimeError, match="crashed its worker on every attempt") as info:
        crashing(chunks, crash_on_second_chunk, None)
    assert "tt_0.root" in str(info.value) and "entries {}-{}".format(*BAD_TT) in str(info.value)


# ---------------------------------------------------------------------- the executor object


def test_url_from_argument_or_hq_url_else_local_cluster_help(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HQ_URL", raising=False)
    with pytest.raises(HQError, match="LocalCluster") as info:
        HQExecutor()
    assert "HQ_URL" in str(info.value)
    monkeypatch.setenv("HQ_URL", cluster.url)
    assert HQExecutor().server_url() == cluster.url
    assert HQExecutor("http://elsewhere:8786").server_url() == "http://elsewhere:8786"
    with pytest.raises(ValueError, match="treereduction"):
        HQExecutor(cluster.url, treereduction=1)


@pytest.mark.parametrize("where", ["free port", "unknown host"])
def test_no_server_at_the_url_fails_within_seconds_in_one_sentence(
    data: dict[str, Path], where: str
) -> None:
    """A wrong URL or a stopped server: the run fails at its first request, naming the URL
    and what to do, instead of retrying for the client's whole budget (120 s)."""
    url = (
        f"http://127.0.0.1:{free_port()}"
        if where == "free port"
        else "http://no-such-host.invalid:8786"
    )
    started = time.monotonic()
    with pytest.raises(ServerUnreachable) as info:
        run_with(HQExecutor(url, status=False), nano_fileset(data), MuonHistograms())
    assert time.monotonic() - started < 10
    assert isinstance(info.value, HQError)
    text = str(info.value)
    assert text.startswith(f"no coffea-hq server answers at {url} (")
    assert "`coffea-hq local`" in text and "HQ_URL" in text and "\n" not in text
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_copy_keeps_the_url_the_options_and_an_open_client(cluster: LocalCluster) -> None:
    executor = HQExecutor(cluster.url, treereduction=5, retries=1, timeout=60)
    copied = executor.copy(desc="Preprocessing", unit="file", compression=None)
    assert isinstance(copied, ExecutorBase)
    assert (copied.url, copied.treereduction, copied.retries, copied.timeout) == (
        cluster.url,
        5,
        1,
        60,
    )
    assert (copied.desc, copied.unit, executor.desc) == ("Preprocessing", "file", "Processing")
    with Client(cluster.url) as client:
        shared = HQExecutor(client=client, status=False).copy(function_name="get_metadata")
        assert shared.client is client and shared.server_url() == cluster.url
        assert shared([1, 2, 3], lambda x: {"x": x}, {"x": 10}) == ({"x": 16}, 0)
        assert shared([], abs, {"x": 1}) == ({"x": 1}, 0)


# slow: coffea-level coverage beyond the default run's budget (CI runs it)
@pytest.mark.slow
def test_processor_closure_is_fetched_once_per_worker(
    cluster: LocalCluster, data: dict[str, Path]
) -> None:
    def fetched() -> int:
        return sum(s["functions_fetched"] for s in worker_stats(cluster.url))

    time.sleep(1.2)  # let the last heartbeats report
    before = fetched()
    hq = HQExecutor(cluster.url, status=False)
    out = run_with(hq, nano_fileset(data), WithTables(), chunksize=50)
    assert len(out["chunks"]) == 58 and out["table_sum"] == 58 * int(
        WithTables().table[:1000].sum()
    )
    time.sleep(1.2)
    # Two jobs (pre-processing, processing), each a function and a reducer, two workers:
    # at most 8 fetches for 58 chunks that each carried the 5 MB processor.
    assert fetched() - before <= 8


def test_processor_from_a_local_module_travels_by_value(
    cluster: LocalCluster, data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"my_analysis_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "import awkward as ak\n"
        "from coffea import processor\n\n"
        "SCALE = 2\n\n"
        "class Counts(processor.ProcessorABC):\n"
        "    def process(self, events):\n"
        "        return {'muons': SCALE * int(ak.sum(ak.num(events.Muon)))}\n\n"
        "    def postprocess(self, accumulator):\n"
        "        return accumulator\n"
    )
    # Only this process can import it: the workers run elsewhere (another cwd, no path).
    monkeypatch.syspath_prepend(str(tmp_path))
    module = __import__(name)
    fileset = {"TTbar": {"treename": "Events", "files": [str(data["tt0"])]}}
    expected = run_with(iterative(), fileset, module.Counts())
    ours = run_with(HQExecutor(cluster.url, status=False), fileset, module.Counts())
    assert ours == expected and ours["muons"] > 0
    import cloudpickle

    assert name not in cloudpickle.list_registry_pickle_by_value()  # registered only while sent
    stay = HQExecutor(cluster.url, status=False, ship_local_modules=False, retries=0)
    with pytest.raises(ModuleNotFoundError, match="pickle_by_value"):
        run_with(stay, fileset, module.Counts())


def nap(seconds: float) -> dict[str, float]:
    time.sleep(seconds)
    return {"slept": seconds}


def test_timeout_cancels_the_run_and_frees_the_workers(cluster: LocalCluster) -> None:
    hq = HQExecutor(cluster.url, status=False, timeout=1.0)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        hq([30.0, 30.0, 30.0], nap, None)
    assert time.monotonic() - started < 10
    with Client(cluster.url) as client:
        poll_until(lambda: client.queue()["work"] == 0, 15, "nothing left queued or running")


# ---------------------------------------------------------------------- workers killed (slow)


class SlowMerge:
    """An accumulator whose addition takes a while, so merges are still running when a
    worker is killed."""

    def __init__(self, value: float) -> None:
        self.value = value

    def __add__(self, other: SlowMerge) -> SlowMerge:
        time.sleep(0.15)
        return SlowMerge(self.value + other.value)

    def __iadd__(self, other: SlowMerge) -> SlowMerge:
        time.sleep(0.15)
        self.value += other.value
        return self

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SlowMerge) and self.value == other.value


class Sleepy(MuonHistograms):
    def __init__(self, nap: float, slow_merge: bool) -> None:
        self.nap = nap
        self.slow_merge = slow_merge

    def process(self, events: Any) -> dict[str, Any]:
        time.sleep(self.nap)
        out = super().process(events)
        if self.slow_merge:
            out["slow"] = SlowMerge(float(len(events)))
        return out


def kill_worker_when(
    cluster: LocalCluster, condition: str, fired: threading.Event
) -> threading.Thread:
    """SIGKILL worker 0 once the running job has tasks running ("processing") or merge
    tasks queued ("merging"), read straight from the store."""
    store = redis.Redis.from_url(cluster.redis_url or "")

    def watch() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not fired.is_set():
            for key in store.scan_iter("hq:job:{*}"):
                raw: dict[bytes, bytes] = store.hgetall(key)  # type: ignore[assignment]
                meta = {k.decode(): v.decode() for k, v in raw.items()}
                if meta.get("state") != "running" or not meta.get("reducer_blob"):
                    continue
                ready = (
                    int(meta.get("done", 0)) >= 5
                    if condition == "processing"
                    else int(meta.get("merges_open", 0)) > 0
                    and int(meta.get("done", 0)) >= int(meta.get("total", 10**9))
                )
                if ready:
                    os.kill(cluster.workers[0].pid, signal.SIGKILL)
                    fired.set()
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("when", ["processing", "merging"])
def test_worker_killed_mid_run_changes_no_histogram(data: dict[str, Path], when: str) -> None:
    fileset = nano_fileset(data)
    slow_merge = when == "merging"
    expected = run_with(iterative(), fileset, Sleepy(0.0, slow_merge), chunksize=50)
    with LocalCluster(workers=3, slots=1, lease_timeout=2) as cluster:
        fired = threading.Event()
        hq = HQExecutor(cluster.url, status=False, treereduction=4)
        # Pre-process first, so the watcher sees only the processing job.
        runner = processor.Runner(
            executor=hq, schema=NanoAODSchema, chunksize=50, metadata_cache={}
        )
        chunks = list(runner.preprocess(fileset))
        watcher = kill_worker_when(cluster, when, fired)
        ours = runner(chunks, processor_instance=Sleepy(0.0 if slow_merge else 0.1, slow_merge))
        watcher.join(timeout=1)
        assert fired.is_set(), f"no worker was killed during {when}"
        assert cluster.workers[0].poll() is not None
    assert_same(ours, expected)


def test_traceback_of_a_by_value_processor_names_its_file_and_line(
    cluster: LocalCluster, data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"my_failing_analysis_{uuid.uuid4().hex[:8]}"
    path = tmp_path / f"{name}.py"
    path.write_text(
        "from coffea import processor\n\n"
        "class Broken(processor.ProcessorABC):\n"
        "    def process(self, events):\n"
        "        raise LookupError('no such correction: ' + events.metadata['dataset'])\n\n"
        "    def postprocess(self, accumulator):\n"
        "        return accumulator\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    module = __import__(name)
    fileset = {"TTbar": {"treename": "Events", "files": [str(data["tt0"])]}}
    with pytest.raises(Exception, match="no such correction: TTbar") as info:
        run_with(HQExecutor(cluster.url, status=False, retries=0), fileset, module.Broken())
    message = str(info.value)
    assert f'File "{path}", line 5, in process' in message, message
    assert "raise LookupError('no such correction: '" in message
    # Shipping the processor left the class as it was: its code still names its file.
    assert module.Broken.process.__code__.co_filename == str(path)


NOTEBOOK_CELL = """\
from coffea import processor

class CellProcessor(processor.ProcessorABC):
    def process(self, events):
        raise LookupError("no such correction in the cell")

    def postprocess(self, accumulator):
        return accumulator
"""


def test_traceback_of_a_notebook_defined_processor_names_its_cell(
    cluster: LocalCluster, data: dict[str, Path], tmp_path: Path
) -> None:
    # As in Jupyter: the class lives in no importable module (coffea's Runner pickles it
    # by value) and its cell file is known to this process's linecache only.
    import linecache

    cell = str(tmp_path / "ipykernel" / f"{uuid.uuid4().hex}.py")
    linecache.cache[cell] = (len(NOTEBOOK_CELL), None, NOTEBOOK_CELL.splitlines(True), cell)
    namespace: dict[str, Any] = {"__name__": "notebook_cell"}
    exec(compile(NOTEBOOK_CELL, cell, "exec"), namespace)
    cls = namespace["CellProcessor"]
    fileset = {"TTbar": {"treename": "Events", "files": [str(data["tt0"])]}}
    with pytest.raises(Exception, match="no such correction in the cell") as info:
        run_with(HQExecutor(cluster.url, status=False, retries=0), fileset, cls())
    message = str(info.value)
    assert f'File "{cell}", line 5, in process' in message, message
    assert 'raise LookupError("no such correction in the cell")' in message
    assert cls.process.__code__.co_filename == cell  # the user's class is unchanged
