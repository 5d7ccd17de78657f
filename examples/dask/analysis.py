"""A small dask-awkward analysis for coffea-hq's dask scheduler (tests and benchmark).

Writes NanoAOD-like ROOT files (muons and jets), runs a processor over them with
``coffea.dataset_tools.apply_to_fileset`` (NanoAODSchema, hist outputs) and returns
what ``dask.compute`` gives::

    paths = write_files(Path("data"), files=2, events=2_000)
    fileset = make_fileset(paths, step=500)
    (out,) = dask.compute(build(fileset), scheduler=coffea_hq.get)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import awkward as ak
import hist.dask as hda
import numpy as np
import uproot
from coffea import processor
from coffea.dataset_tools import apply_to_fileset
from coffea.nanoevents import NanoAODSchema


def write_file(path: Path, n: int, seed: int) -> None:
    """One NanoAOD-like file of ``n`` events: Muon_* and Jet_* collections, genWeight."""
    rng = np.random.default_rng(seed)

    def collection(mean: float, scale: float, mass: float) -> tuple[ak.Array, np.ndarray]:
        counts = rng.poisson(mean, n)
        total = int(counts.sum())
        fields = {
            "pt": (rng.exponential(scale, total) + 5).astype(np.float32),
            "eta": rng.uniform(-2.4, 2.4, total).astype(np.float32),
            "phi": rng.uniform(-np.pi, np.pi, total).astype(np.float32),
            "mass": np.full(total, mass, np.float32),
        }
        return ak.unflatten(ak.zip(fields), counts), counts

    muons, _ = collection(1.5, 20.0, 0.1057)
    muons = ak.with_field(
        muons,
        ak.unflatten(
            rng.choice(np.array([-1, 1], np.int32), int(ak.sum(ak.num(muons)))), ak.num(muons)
        ),
        "charge",
    )
    jets, _ = collection(3.0, 30.0, 5.0)
    with uproot.recreate(path) as f:
        f.mktree(
            "Events",
            {
                "run": np.full(n, 1, np.uint32),
                "luminosityBlock": (np.arange(n) // 100).astype(np.uint32),
                "event": np.arange(seed * 1_000_000, seed * 1_000_000 + n, dtype=np.uint64),
                "genWeight": rng.choice(np.array([0.5, 1.0, -0.5, 2.0], np.float32), n),
                "Muon": muons,
                "Jet": jets,
            },
            field_name=lambda outer, inner: f"{outer}_{inner}",
            counter_name=lambda counted: "n" + counted,
        )


def write_files(directory: Path, files: int = 2, events: int = 2_000) -> list[Path]:
    """``files`` files of ``events`` events each in ``directory`` (made if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(files):
        path = directory / f"sample_{i}.root"
        if not path.exists():
            write_file(path, events, seed=i + 1)
        paths.append(path)
    return paths


def make_fileset(paths: list[Path], step: int = 500, datasets: int = 2) -> dict[str, Any]:
    """A preprocessed coffea file set: the files dealt over ``datasets`` datasets, each
    file cut in steps of ``step`` events (what ``dataset_tools.preprocess`` would give)."""
    fileset: dict[str, Any] = {}
    for i, path in enumerate(paths):
        with uproot.open(path) as f:
            entries = f["Events"].num_entries
        steps = [[a, min(a + step, entries)] for a in range(0, entries, step)]
        files = fileset.setdefault(f"dataset{i % datasets}", {"files": {}})["files"]
        files[str(path)] = {"object_path": "Events", "steps": steps}
    return fileset


class MuonJets(processor.ProcessorABC):
    """Dimuon mass, leading-jet pt (with a systematic axis) and weighted counts."""

    def process(self, events: Any) -> dict[str, Any]:
        dataset = events.metadata.get("dataset", "?")
        muons = events.Muon[(events.Muon.pt > 10) & (abs(events.Muon.eta) < 2.1)]
        pairs = ak.combinations(muons, 2, fields=["a", "b"])
        opposite = pairs[pairs.a.charge != pairs.b.charge]
        mass = (opposite.a + opposite.b).mass
        jets = events.Jet[events.Jet.pt > 25]
        leading = ak.firsts(jets.pt)
        has_jet = ~ak.is_none(leading)
        weight = events.genWeight

        mll = hda.Hist.new.Reg(60, 0, 240, name="mass").Weight()
        mll.fill(mass=ak.flatten(mass))
        jet = (
            hda.Hist.new.StrCat(["nominal", "up"], name="syst").Reg(40, 25, 425, name="pt").Weight()
        )
        jet.fill(syst="nominal", pt=leading[has_jet], weight=weight[has_jet])
        jet.fill(syst="up", pt=leading[has_jet] * 1.05, weight=weight[has_jet])
        return {
            dataset: {
                "mll": mll,
                "jet_pt": jet,
                "events": ak.num(events, axis=0),
                "sumw": ak.sum(weight),
            }
        }

    def postprocess(self, accumulator: Any) -> Any:
        return accumulator


def build(fileset: dict[str, Any]) -> Any:
    """The analysis as dask collections, one output dict per dataset."""
    return apply_to_fileset(MuonJets(), fileset, schemaclass=NanoAODSchema)
