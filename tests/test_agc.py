"""The AGC ttbar example (examples/agc): the analysis on coffea-hq gives the histograms
IterativeExecutor gives, and those histograms look like what a physicist expects."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

pytest.importorskip("coffea")
pytest.importorskip("uproot")

from coffea import processor  # noqa: E402
from coffea.nanoevents import NanoAODSchema, NanoEventsFactory  # noqa: E402

AGC = Path(__file__).resolve().parent.parent / "examples" / "agc"
EVENTS_PER_FILE = 4_000
CHUNKSIZE = 1_000


def load(name: str) -> ModuleType:
    """An examples/agc module, under a name no other test uses."""
    spec = importlib.util.spec_from_file_location(f"agc_{name}", AGC / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


analysis = load("analysis")
generate = load("generate")


def run(fileset: dict[str, Any], executor: Any, chunksize: int = CHUNKSIZE) -> Any:
    runner = processor.Runner(
        executor=executor, schema=NanoAODSchema, chunksize=chunksize, metadata_cache={}
    )
    return runner(fileset, processor_instance=analysis.TtbarAnalysis())


# Generating the AGC files and the reference run take ~20 s: the CI's slow step runs these.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("agc-data")
    return generate.generate(1, EVENTS_PER_FILE, cache_dir=cache, verbose=False)


@pytest.fixture(scope="module")
def fileset(inputs: Path) -> dict[str, Any]:
    return analysis.construct_fileset(inputs)


@pytest.fixture(scope="module")
def iterative(fileset: dict[str, Any]) -> dict[str, Any]:
    return run(fileset, processor.IterativeExecutor(status=False))


@pytest.fixture(scope="module")
def hq_output(fileset: dict[str, Any]) -> dict[str, Any]:
    from coffea_hq import HQExecutor, LocalCluster

    with LocalCluster(workers=2) as cluster:
        return run(fileset, HQExecutor(cluster.url, status=False, timeout=90))


def nominal(out: dict[str, Any], region: str, process: str, variation: str = "nominal") -> Any:
    return out["hist"][:, region, process, variation].values()


# ---------------------------------------------------------------------- executors


def test_hq_histograms_identical_to_iterative_bit_for_bit(
    iterative: dict[str, Any], hq_output: dict[str, Any]
) -> None:
    assert analysis.compare(iterative["hist"], hq_output["hist"]) == 0.0
    a, b = iterative["hist"].view(flow=True), hq_output["hist"].view(flow=True)
    assert np.array_equal(a["value"], b["value"])
    assert np.array_equal(a["variance"], b["variance"])
    assert hq_output["nevents"] == iterative["nevents"]
    assert hq_output["selected"] == iterative["selected"]


def test_other_chunking_gives_the_same_histograms(
    fileset: dict[str, Any], iterative: dict[str, Any]
) -> None:
    # The jet smearing is seeded per event, so other chunk boundaries change only the
    # rounding of the chunk sums (a random stream per chunk would move bins by percents).
    other = run(fileset, processor.IterativeExecutor(status=False), chunksize=1_300)
    assert analysis.compare(iterative["hist"], other["hist"]) < 1e-7
    assert other["selected"] == iterative["selected"]


def test_futures_histograms_identical_to_iterative(
    fileset: dict[str, Any], iterative: dict[str, Any]
) -> None:
    # forked workers inherit this process's modules (the analysis is loaded from a path)
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:
        other = run(fileset, processor.FuturesExecutor(pool=pool, workers=2, status=False))
    assert analysis.compare(iterative["hist"], other["hist"]) == 0.0
    assert other["nevents"] == iterative["nevents"]


# ---------------------------------------------------------------------- physics


def test_event_counts_equal_generated(inputs: Path, iterative: dict[str, Any]) -> None:
    catalogue = json.loads(inputs.read_text())
    expected = {
        f"{process}__{variation}": entry["nevts_total"]
        for process, variations in catalogue.items()
        for variation, entry in variations.items()
    }
    assert iterative["nevents"] == expected
    assert set(expected.values()) == {EVENTS_PER_FILE}
    assert len(expected) == 9


def test_every_region_is_filled_by_every_process(iterative: dict[str, Any]) -> None:
    for region in analysis.REGIONS:
        for process in analysis.PROCESSES:
            if process == "single_top_s_chan" or (process, region) == ("wjets", "4j2b"):
                continue  # tiny cross section / few MC events at this sample size
            assert nominal(iterative, region, process).sum() > 0, (region, process)


def test_ttbar_dominates_4j2b_with_a_top_mass_peak(iterative: dict[str, Any]) -> None:
    ttbar = nominal(iterative, "4j2b", "ttbar")
    others = sum(nominal(iterative, "4j2b", p) for p in analysis.PROCESSES if p != "ttbar")
    assert ttbar.sum() > 3 * others.sum()
    edges = iterative["hist"].axes["observable"].edges
    peak = edges[np.argmax(ttbar)]
    assert 130 <= peak <= 210, peak


def test_selection_efficiencies_look_physical(iterative: dict[str, Any]) -> None:
    sel, n = iterative["selected"], EVENTS_PER_FILE
    assert 0.02 < sel["ttbar__nominal"]["4j2b"] / n < 0.12  # a few percent
    assert 0.02 < sel["ttbar__nominal"]["4j1b"] / n < 0.12
    wjets = sel["wjets__nominal"]
    assert wjets["4j1b"] + wjets["4j2b"] < 0.02 * n  # W+jets rarely has four jets
    assert wjets["4j2b"] <= wjets["4j1b"]  # and mostly fails the b-tag requirement


def test_variations_differ_from_nominal_where_they_must_and_only_there(
    iterative: dict[str, Any],
) -> None:
    h = iterative["hist"]

    def filled(process: str, variation: str) -> bool:
        return bool(h[:, :, process, variation].values().sum() > 0)

    for process in analysis.PROCESSES:
        for variation in analysis.SAMPLE_VARIATIONS:  # their own samples: ttbar only
            assert filled(process, variation) == (process == "ttbar"), (process, variation)
        for variation in analysis.WJETS_VARIATIONS:
            assert filled(process, variation) == (process == "wjets"), (process, variation)
        for variation in analysis.JET_VARIATIONS + analysis.BTAG_VARIATIONS:
            assert filled(process, variation), (process, variation)

    for region in analysis.REGIONS:
        nom = nominal(iterative, region, "ttbar")
        for variation in ("pt_scale_up", "pt_res_up", *analysis.SAMPLE_VARIATIONS):
            assert not np.array_equal(nominal(iterative, region, "ttbar", variation), nom)
        for i in range(4):  # weights 1 +- x: up and down mirror each other
            up = nominal(iterative, region, "ttbar", f"btag_var_{i}_up")
            down = nominal(iterative, region, "ttbar", f"btag_var_{i}_down")
            assert up.sum() > nom.sum() > down.sum()
            np.testing.assert_allclose(up + down, 2 * nom, rtol=1e-9)
        wjets = nominal(iterative, region, "wjets")
        np.testing.assert_allclose(
            nominal(iterative, region, "wjets", "scale_var_up"), 1.03 * wjets, rtol=1e-9
        )
        np.testing.assert_allclose(
            nominal(iterative, region, "wjets", "scale_var_down"), 0.97 * wjets, rtol=1e-9
        )
    # a harder jet energy scale moves H_T up
    centres = h.axes["observable"].centers
    scaled = nominal(iterative, "4j1b", "ttbar", "pt_scale_up")
    nom = nominal(iterative, "4j1b", "ttbar")
    assert (centres * scaled).sum() / scaled.sum() > (centres * nom).sum() / nom.sum()


def test_variation_samples_fill_only_their_own_variation(fileset: dict[str, Any]) -> None:
    one = {"ttbar__scaleup": fileset["ttbar__scaleup"]}
    out = run(one, processor.IterativeExecutor(status=False), chunksize=EVENTS_PER_FILE)
    h = out["hist"]
    for variation in analysis.VARIATIONS:
        total = h[:, :, :, variation].values().sum()
        assert (total > 0) == (variation == "scaleup"), variation


def test_normalisation_is_cross_section_times_luminosity_over_events(
    iterative: dict[str, Any],
) -> None:
    sel = iterative["selected"]["ttbar__nominal"]
    weight = analysis.XSEC["ttbar"] * analysis.LUMI / EVENTS_PER_FILE
    total = iterative["hist"][:, "4j1b", "ttbar", "nominal"].values(flow=True).sum()
    assert total == pytest.approx(sel["4j1b"] * weight, rel=1e-9)


def test_resolution_smearing_is_a_function_of_the_event_alone() -> None:
    n = 200_000
    run_, lumi = np.ones(n, np.uint32), np.full(n, 7, np.uint32)
    event = np.arange(n, dtype=np.uint64)
    index = np.zeros(n, np.int64)
    z = analysis.event_normal(run_, lumi, event, index)
    assert np.array_equal(z, analysis.event_normal(run_, lumi, event, index))
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert not np.array_equal(z, analysis.event_normal(run_, lumi, event, index + 1))
    # the same event in another chunk, at another position, gets the same number
    assert analysis.event_normal(run_[:1], lumi[:1], event[123:124], index[:1])[0] == z[123]


# ---------------------------------------------------------------------- files and outputs


def test_files_read_by_nanoaod_schema_without_warnings(inputs: Path) -> None:
    path = json.loads(inputs.read_text())["ttbar"]["nominal"]["files"][0]["path"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        events = NanoEventsFactory.from_root(
            {path: "Events"}, schemaclass=NanoAODSchema, mode="virtual"
        ).events()
        jets = events.Jet
        assert len(events) == EVENTS_PER_FILE
        assert jets.pt.type.content.content.primitive == "float32"
        assert jets.isTightLeptonVeto.ndim == 2
        assert events.Muon.tightId.type.content.content.primitive == "bool"
        assert int(np.asarray(events.Electron.cutBased.layout.content.data).max()) == 4
        assert events.event.type.content.primitive == "uint64"


def test_generator_is_seeded_and_cached(tmp_path: Path, inputs: Path) -> None:
    first = generate.generate(1, 500, seed=7, cache_dir=tmp_path, verbose=False)
    again = generate.generate(1, 500, seed=7, cache_dir=tmp_path, verbose=False)
    assert first == again
    other = generate.generate(1, 500, seed=7, cache_dir=tmp_path / "b", verbose=False)
    import uproot

    def jets(p: Path) -> Any:
        path = json.loads(p.read_text())["wjets"]["nominal"]["files"][0]["path"]
        with uproot.open(path) as f:
            return f["Events"]["Jet_pt"].array(library="np")

    assert all(np.array_equal(a, b) for a, b in zip(jets(first), jets(other), strict=True))


def test_construct_fileset_limits_files_and_counts_their_events() -> None:
    inputs = {
        "ttbar": {
            "nominal": {
                "nevts_total": 30,
                "files": [
                    {"path": "https://host//store/a.root", "nevts": 10},
                    {"path": "https://host//store/b.root", "nevts": 20},
                ],
            }
        },
        "data": {"nominal": {"nevts_total": 5, "files": [{"path": "d.root", "nevts": 5}]}},
    }
    fileset = analysis.construct_fileset(
        inputs, max_files_per_sample=1, rewrite_prefix=("https://host/", "root://door/")
    )
    assert list(fileset) == ["ttbar__nominal"]
    assert fileset["ttbar__nominal"]["files"] == {"root://door//store/a.root": "Events"}
    meta = fileset["ttbar__nominal"]["metadata"]
    assert meta["nevts"] == 10 and meta["xsec"] == analysis.XSEC["ttbar"]


def test_root_file_uses_agc_names(tmp_path: Path, iterative: dict[str, Any]) -> None:
    import uproot

    names = analysis.save_root(iterative["hist"], tmp_path / "h.root")
    for name in (
        "4j1b_ttbar",
        "4j2b_ttbar",
        "4j1b_wjets_scale_var_up",
        "4j2b_ttbar_btag_var_3_down",
        "4j1b_ttbar_pt_res_up",
        "4j2b_ttbar_ME_var",
        "4j1b_pseudodata",
    ):
        assert name in names
    assert not any(n.endswith("_nominal") for n in names)
    with uproot.open(tmp_path / "h.root") as f:
        np.testing.assert_array_equal(f["4j2b_ttbar"].values(), nominal(iterative, "4j2b", "ttbar"))
