"""What a slot's per-file reuse (coffea_hq/filecache.py, coffea_hq/formcache.py) must not
change: every chunk an analysis gets through ``HQExecutor`` (one slot subprocess running
every chunk, so the kept files and forms are reused) is the chunk coffea's
``IterativeExecutor`` gives, which bypasses both caches: its own metadata on every chunk
of a file, its own tree, its schema's form, its bytes read; errors naming the file."""

from __future__ import annotations

import ast
import os
import shutil
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
import pytest

pytest.importorskip("coffea")
uproot = pytest.importorskip("uproot")

from coffea import processor  # noqa: E402
from coffea.nanoevents import BaseSchema, NanoAODSchema, PFNanoAODSchema  # noqa: E402

from coffea_hq import HQExecutor, LocalCluster, formcache  # noqa: E402
from coffea_hq.filecache import FileCache  # noqa: E402

ENTRIES = 1_200
CHUNKSIZE = 400  # three chunks per tree: chunks 2 and 3 reuse what chunk 1 built


class Probe(processor.ProcessorABC):
    """Notes, per chunk, what the analysis sees: its metadata, its form, its values and
    the file's state; then changes ``events.metadata`` (must not reach the next chunk)."""

    def __init__(self, reopen: bool = False) -> None:
        self.reopen = reopen  # also build events of the chunk's tree with coffea's factory

    def process(self, events: Any) -> dict[str, Any]:
        from coffea_hq import filecache

        meta = dict(events.metadata)
        factory = events.attrs["@events_factory"]
        file = factory.file_handle.file
        other_arrays = 0  # baskets the slot still holds for other files (coffea: none)
        kept = filecache.cache()
        for directory in kept._open.values() if kept is not None else ():
            if directory.file is not file and directory.file.array_cache is not None:
                other_arrays += len(directory.file.array_cache)
        x = np.asarray(events.x)
        fields = events.fields
        jets = (
            events.Jet.pt if "Jet" in fields else events.Jet_pt if "Jet_pt" in fields else events.z
        )
        matched = 0.0  # NanoAOD's cross-references: each chunk's own global indices
        if "Electron" in events.fields and "matched_jet" in dir(events.Electron):
            matched = float(ak.sum(ak.fill_none(events.Electron.matched_jet.pt, 0.0)))
        form = events.layout.form
        seen = {
            "meta": sorted((k, repr(v)) for k, v in meta.items()),
            # NanoAODSchema orders its fields differently in every process: compare by name
            "form": sorted(zip(form.fields, (str(c.type) for c in form.contents), strict=True)),
            "sum": int(x.sum()),
            "jets": float(ak.sum(jets)),
            "matched": matched,
            "other_arrays": other_arrays,
            "bytes": file.source.num_requested_bytes,
            "source": type(file.source).__name__,
            "pid": os.getpid(),
        }
        if self.reopen:
            seen["own_opens"] = own_opens(meta["filename"], meta["treename"], meta["entrystart"])
        events.metadata["dataset"] = "changed by chunk"
        events.metadata["leak"] = meta["entrystart"]
        key = f"{meta['dataset']}|{os.path.basename(meta['filename'])}|{meta['treename']}"
        return {"chunks": {f"{key}|{meta['entrystart']}": repr(seen)}}

    def postprocess(self, accumulator: Any) -> Any:
        return accumulator


def collection(counts: np.ndarray, pt: np.ndarray, **more: np.ndarray) -> ak.Array:
    """A NanoAOD collection: four-momenta (``pt`` given) and ``more``, ``counts`` per event."""
    flat = {"pt": pt, **{k: np.zeros(len(pt), np.float32) for k in ("eta", "phi", "mass")}}
    return ak.zip({k: ak.unflatten(v, counts) for k, v in {**flat, **more}.items()})


def own_opens(filename: str, treename: str, start: int) -> Any:
    """The metadata of events a processor builds itself (coffea's own factory, not the
    executor's), the second time without metadata."""
    from coffea.nanoevents import NanoEventsFactory

    for metadata in ({"mine": start}, None):
        events = NanoEventsFactory.from_root(
            {filename: treename}, schemaclass=BaseSchema, metadata=metadata, entry_stop=10
        ).events()
    return dict(events.metadata)


def write(path: Path, scale: int = 1, extra: bool = False) -> None:
    counts = np.arange(ENTRIES) % 3
    one = np.ones(ENTRIES, dtype=np.int64)
    ids = {  # NanoAODSchema requires them
        "run": np.ones(ENTRIES, dtype=np.uint32),
        "luminosityBlock": np.ones(ENTRIES, dtype=np.uint32),
        "event": np.arange(ENTRIES, dtype=np.uint64),
    }
    tree: dict[str, Any] = {
        **ids,
        "x": np.arange(ENTRIES, dtype=np.int64) * scale,
        "w": np.full(ENTRIES, 0.5),
        "Jet": collection(counts, np.arange(counts.sum(), dtype=np.float32) * scale),
        # one electron per event, matched to its event's first jet if it has one
        "Electron": collection(
            one,
            np.full(ENTRIES, 2.0 * scale, dtype=np.float32),
            charge=np.ones(ENTRIES, dtype=np.int32),
            jetIdx=np.where(counts > 0, 0, -1).astype(np.int32),
        ),
    }
    if extra:
        tree["y"] = np.ones(ENTRIES)
    with uproot.recreate(path) as f:
        types = {k: v.type.content if isinstance(v, ak.Array) else v.dtype for k, v in tree.items()}
        # NanoAOD's branch names: nJet, Jet_pt, ...
        f.mktree("Events", types, field_name=lambda outer, inner: f"{outer}_{inner}")
        f["Events"].extend(tree)
        f["Other"] = {"x": np.arange(ENTRIES, dtype=np.int64) + 7, "z": np.zeros(ENTRIES), **ids}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("reuse")
    out = {}
    for name, scale in (("a", 1), ("b", 2)):
        write(folder / f"{name}.root", scale)
        out[name] = str(folder / f"{name}.root")
    return out


def fileset(files: dict[str, str]) -> dict[str, Any]:
    """Two trees of one file, one file in two datasets, user metadata (one key the
    NanoAOD schema sets itself)."""
    return {
        "one": {
            "files": {files["a"]: "Events", files["b"]: "Events"},
            "metadata": {"xsec": 1.5, "version": "from the fileset"},
        },
        "two": {"files": {files["a"]: "Other"}, "metadata": {"xsec": 2.5}},
        "three": {"files": {files["a"]: "Events"}},
    }


def run(
    files: dict[str, str], executor: Any, schema: Any, fileset: Any = fileset, **options: Any
) -> Any:
    uproot_options = options.pop("uproot_options", {})
    probe = Probe(options.pop("reopen", False))
    runner = processor.Runner(
        executor=executor,
        schema=schema,
        chunksize=CHUNKSIZE,
        **{
            "metadata_cache": {},
            "pre_executor": processor.IterativeExecutor(status=False),  # one job per run
            **options,
        },
    )
    return runner(fileset(files), processor_instance=probe, uproot_options=uproot_options)


def hq(cluster: LocalCluster) -> HQExecutor:
    return HQExecutor(cluster.url, status=False, timeout=60)


@pytest.mark.parametrize("schema", [NanoAODSchema, BaseSchema], ids=["nanoaod", "base"])
def test_every_chunk_is_the_one_coffea_builds(
    chunk_cluster: LocalCluster, files: dict[str, str], schema: Any
) -> None:
    reference, reference_metrics = run(
        files, processor.IterativeExecutor(status=False), schema, savemetrics=True, reopen=True
    )
    out, metrics = run(files, hq(chunk_cluster), schema, savemetrics=True, reopen=True)
    assert len(reference["chunks"]) == 4 * ENTRIES // CHUNKSIZE
    assert sorted(metrics["columns"]) == sorted(reference_metrics["columns"])
    assert metrics["entries"] == reference_metrics["entries"]
    assert 0 < metrics["bytesread"] < reference_metrics["bytesread"]
    assert metrics["bytesread"] == sum(bytes_read(out["chunks"]).values())
    assert without_bytes(out["chunks"]) == without_bytes(reference["chunks"])
    if schema is NanoAODSchema:  # the cross-references were followed
        seen = without_bytes(out["chunks"])
        assert all(seen[key]["matched"] > 0 for key in seen if "|Events|" in key)
    # A kept file's header and TTree are not read again, nor a basket two chunks share.
    read, reference_read = bytes_read(out["chunks"]), bytes_read(reference["chunks"])
    assert all(0 <= read[key] <= reference_read[key] for key in reference_read)
    for name in ("a.root", "b.root"):  # the chunk that opened the file read what coffea's did
        assert any(read[k] == reference_read[k] for k in read if f"|{name}|" in k)
    assert sum(read.values()) < sum(reference_read.values())


def test_a_copy_changed_in_place_gets_its_own_form(
    chunk_cluster: LocalCluster, tmp_path: Path, files: dict[str, str]
) -> None:
    # A copy keeps the file's UUID; its tree, written again in place, keeps its path
    # ("/Events;1") but not its branches.
    copy = tmp_path / "copy.root"
    shutil.copy(files["a"], copy)
    with uproot.update(copy) as f:
        del f["Events"]
        f["Events"] = {
            "run": np.ones(ENTRIES, dtype=np.uint32),
            "luminosityBlock": np.ones(ENTRIES, dtype=np.uint32),
            "event": np.arange(ENTRIES, dtype=np.uint64),
            "x": np.arange(ENTRIES, dtype=np.int64) * 5,
            "z": np.ones(ENTRIES),
        }

    def both(files: dict[str, str]) -> dict[str, Any]:
        return {"one": {"files": {files["a"]: "Events", str(copy): "Events"}}}

    reference = run(files, processor.IterativeExecutor(status=False), NanoAODSchema, both)
    out = run(files, hq(chunk_cluster), NanoAODSchema, both)
    assert len(out["chunks"]) == 2 * ENTRIES // CHUNKSIZE
    assert without_bytes(out["chunks"]) == without_bytes(reference["chunks"])


class BreaksOnce(processor.ProcessorABC):
    """On its first chunk, leaves the slot's open file reading garbage, as a dropped
    connection or a failing disk leaves a file handle, and fails with an OSError."""

    def __init__(self, marker: str, garbage: str) -> None:
        self.marker = marker
        self.garbage = garbage

    def process(self, events: Any) -> dict[str, Any]:
        if not os.path.exists(self.marker):
            Path(self.marker).touch()
            source = events.attrs["@events_factory"].file_handle.file.source
            for resource in vars(source._executor).values():
                if hasattr(resource, "_file"):  # uproot's FileResource: its open file
                    resource._file = open(self.garbage, "rb")  # noqa: SIM115
            raise OSError("the file's connection was lost")
        x = np.asarray(events.x)
        return {"n": len(x), "sum": int(x.sum())}

    def postprocess(self, accumulator: Any) -> Any:
        return accumulator


def test_a_chunk_that_failed_reopens_its_file(
    chunk_cluster: LocalCluster, tmp_path: Path, files: dict[str, str]
) -> None:
    garbage = tmp_path / "garbage"
    garbage.write_bytes(bytes(range(256)) * 1000)
    runner = processor.Runner(
        executor=hq(chunk_cluster),  # coffea retries a failed chunk 3 times, in its slot
        pre_executor=processor.IterativeExecutor(status=False),
        schema=BaseSchema,
        chunksize=CHUNKSIZE,
        metadata_cache={},
    )
    out = runner(
        {"one": {"files": {files["a"]: "Events"}}},
        processor_instance=BreaksOnce(str(tmp_path / "broke"), str(garbage)),
        uproot_options={"array_cache": None},  # every chunk reads its baskets
    )
    assert (tmp_path / "broke").exists()
    assert out == {"n": ENTRIES, "sum": int(np.arange(ENTRIES).sum())}


@pytest.mark.slow
def test_preprocessing_on_the_workers_too(
    chunk_cluster: LocalCluster, files: dict[str, str]
) -> None:
    # The preprocessing job's slot keeps the files it opened too (then ends).
    reference = run(files, processor.IterativeExecutor(status=False), NanoAODSchema)
    out = run(files, hq(chunk_cluster), NanoAODSchema, pre_executor=hq(chunk_cluster))
    assert without_bytes(out["chunks"]) == without_bytes(reference["chunks"])


class ByDataset(NanoAODSchema):  # type: ignore[misc]
    """A schema whose form depends on the chunk's metadata: never kept."""

    def __init__(self, base_form: dict[str, Any], version: str = "latest") -> None:
        if base_form["parameters"]["metadata"]["dataset"] == "three":
            index = base_form["fields"].index("w")
            del base_form["fields"][index], base_form["contents"][index]
        super().__init__(base_form, version)


@pytest.mark.slow
@pytest.mark.parametrize("schema", [ByDataset, PFNanoAODSchema], ids=["by-dataset", "pfnano"])
def test_schemas_not_kept_run_per_chunk(
    chunk_cluster: LocalCluster, files: dict[str, str], schema: Any
) -> None:
    reference = run(files, processor.IterativeExecutor(status=False), schema)
    out = run(files, hq(chunk_cluster), schema)
    assert without_bytes(out["chunks"]) == without_bytes(reference["chunks"])


@pytest.mark.slow
def test_a_file_rewritten_between_runs_is_read_anew(
    chunk_cluster: LocalCluster, tmp_path: Path
) -> None:
    files = {"a": str(tmp_path / "a.root"), "b": str(tmp_path / "b.root")}
    write(Path(files["a"]))
    write(Path(files["b"]))
    first = run(files, hq(chunk_cluster), NanoAODSchema)
    write(Path(files["a"]), scale=3, extra=True)  # a new UUID, another branch
    reference = run(files, processor.IterativeExecutor(status=False), NanoAODSchema)
    out = run(files, hq(chunk_cluster), NanoAODSchema)
    assert without_bytes(out["chunks"]) == without_bytes(reference["chunks"])
    assert without_bytes(out["chunks"]) != without_bytes(first["chunks"])
    # Each job has its own slot subprocess: nothing the first one kept reaches the second.
    assert len(pids(first) | pids(out)) == 2


def pids(out: dict[str, Any]) -> set[int]:
    return {ast.literal_eval(seen)["pid"] for seen in out["chunks"].values()}


def test_plain_paths_read_in_the_calling_thread_unless_asked(files: dict[str, str]) -> None:
    cache = FileCache(uproot.open)
    with cache.open({files["a"]: None}) as plain:
        assert type(plain.file.source) is uproot.source.file.MultithreadedFileSource
        assert plain.file.source._use_threads is False
    with cache.open({files["a"]: None}, use_threads=True, num_workers=2) as threaded:
        assert threaded.file.source._use_threads is True
    with cache.open({files["b"]: None}, handler=uproot.source.file.MemmapSource) as chosen:
        assert type(chosen.file.source) is uproot.source.file.MemmapSource
    cache.close()


def test_kept_forms_are_bounded() -> None:
    kept = formcache._Lru()
    for i in range(formcache.FORMS_KEPT + 5):
        kept.keep(i, {"form": i})
        assert kept.hit(0) is not None  # the one used each time stays
    assert len(kept) == formcache.FORMS_KEPT
    assert kept.hit(1) is None  # the least recently used went first


def test_the_analysis_handler_is_kept(chunk_cluster: LocalCluster, files: dict[str, str]) -> None:
    options = {"uproot_options": {"handler": uproot.source.file.MemmapSource}}
    reference = run(files, processor.IterativeExecutor(status=False), BaseSchema, **options)
    out = run(files, hq(chunk_cluster), BaseSchema, **options)
    assert without_bytes(out["chunks"]) == without_bytes(reference["chunks"])
    assert {ast.literal_eval(seen)["source"] for seen in out["chunks"].values()} == {"MemmapSource"}


def test_paths_with_a_colon_and_file_urls(
    chunk_cluster: LocalCluster, tmp_path: Path, files: dict[str, str]
) -> None:
    folder = tmp_path / "run:1"
    folder.mkdir()
    write(folder / "c.root")

    def odd(files: dict[str, str]) -> dict[str, Any]:
        return {
            "colon": {"files": {str(folder / "c.root"): "Events"}},
            "url": {"files": {"file://" + files["b"]: "Events"}},
        }

    reference = run(files, processor.IterativeExecutor(status=False), BaseSchema, odd)
    out = run(files, hq(chunk_cluster), BaseSchema, odd)
    assert len(out["chunks"]) == 2 * ENTRIES // CHUNKSIZE
    assert without_bytes(out["chunks"]) == without_bytes(reference["chunks"])


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["removed", "garbage"])
def test_a_bad_file_is_named_and_skipped(
    chunk_cluster: LocalCluster, tmp_path: Path, damage: str
) -> None:
    files = {"a": str(tmp_path / "a.root"), "b": str(tmp_path / "b.root")}
    write(Path(files["a"]))
    write(Path(files["b"]))

    def two(files: dict[str, str]) -> dict[str, Any]:
        return {"one": {"files": {files["a"]: "Events", files["b"]: "Events"}}}

    known: dict[Any, Any] = {}  # filled by the first run: the next ones do not open b first
    run(files, processor.IterativeExecutor(status=False), BaseSchema, two, metadata_cache=known)
    os.remove(files["b"])
    if damage == "garbage":
        Path(files["b"]).write_bytes(b"not a ROOT file" * 100)
    with pytest.raises(Exception, match="b.root") as failed:
        run(files, hq(chunk_cluster), BaseSchema, two, metadata_cache=dict(known))
    with pytest.raises(Exception) as coffea_failed:
        run(
            files,
            processor.IterativeExecutor(status=False),
            BaseSchema,
            two,
            metadata_cache=dict(known),
        )
    assert type(failed.value) is type(coffea_failed.value)
    skip = (OSError, ValueError)  # coffea's True skips OSErrors only; garbage is a ValueError
    reference = run(
        files,
        processor.IterativeExecutor(status=False),
        BaseSchema,
        two,
        metadata_cache=dict(known),
        skipbadfiles=skip,
    )
    out = run(
        files, hq(chunk_cluster), BaseSchema, two, metadata_cache=dict(known), skipbadfiles=skip
    )
    assert without_bytes(out["chunks"]) == without_bytes(reference["chunks"])
    assert len(out["chunks"]) == ENTRIES // CHUNKSIZE  # a's chunks


def without_bytes(chunks: dict[str, str]) -> dict[str, Any]:
    # The slot reads plain paths through uproot's plain file source, coffea through fsspec.
    return {
        key: {**ast.literal_eval(seen), "bytes": None, "source": None, "pid": None}
        for key, seen in chunks.items()
    }


def bytes_read(chunks: dict[str, str]) -> dict[str, int]:
    return {key: ast.literal_eval(seen)["bytes"] for key, seen in chunks.items()}
