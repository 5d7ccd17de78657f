"""The AGC CMS Open Data ttbar analysis as a coffea processor (coffea 2025+, awkward 2, hist).

>>> fileset = construct_fileset("nanoaod_inputs.json", max_files_per_sample=1)
>>> out = processor.Runner(executor=..., schema=NanoAODSchema)(fileset, TtbarAnalysis())

Follows the Analysis Grand Challenge's definition (iris-hep/analysis-grand-challenge,
analyses/cms-open-data-ttbar): single-lepton events with at least four jets; the region
4j1b (exactly one b-tagged jet) histograms H_T, the region 4j2b (two or more) the mass
of the highest-pT trijet that contains a b-tagged jet. Its systematic variations: jet
pT scale (x1.03) and resolution (5% Gaussian smearing), four b-tag weight variations,
the W+jets scale variation, and the ttbar variation samples. Everything here is
deterministic: the smearing is drawn from a hash of each event's identity, not a random
stream, so every executor, chunking and retry gives the same histograms.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import awkward as ak
import hist
import numpy as np
from coffea import processor

LUMI = 3378.0  # /pb, the 2015 CMS Open Data
B_TAG_THRESHOLD = 0.5

# cross sections in pb, as the AGC uses them
XSEC = {
    "ttbar": 396.87 + 332.97,  # non-all-hadronic + all-hadronic
    "single_top_s_chan": 2.0268 + 1.2676,
    "single_top_t_chan": (36.993 + 22.175) / 0.252,  # lepton filter -> inclusive
    "single_top_tW": 37.936 + 37.906,
    "wjets": 61457 * 0.252,  # W -> e/mu nu
}
PROCESSES = tuple(XSEC)
REGIONS = ("4j1b", "4j2b")
JET_VARIATIONS = ("pt_scale_up", "pt_res_up")
BTAG_VARIATIONS = tuple(f"btag_var_{i}_{d}" for i in range(4) for d in ("up", "down"))
WJETS_VARIATIONS = ("scale_var_up", "scale_var_down")
SAMPLE_VARIATIONS = ("scaledown", "scaleup", "ME_var", "PS_var")
VARIATIONS = ("nominal", *SAMPLE_VARIATIONS, *JET_VARIATIONS, *BTAG_VARIATIONS, *WJETS_VARIATIONS)


# ---------------------------------------------------------------------- inputs


def construct_fileset(
    inputs: str | Path | Mapping[str, Any],
    max_files_per_sample: int = -1,
    processes: Iterable[str] = PROCESSES,
    treename: str = "Events",
    rewrite_prefix: tuple[str, str] | None = None,
) -> dict[str, dict[str, Any]]:
    """A coffea file set from the AGC's ``nanoaod_inputs.json`` format.

    ``inputs`` is the JSON's path or its content,
    ``{process: {variation: {"nevts_total": n, "files": [{"path": p, "nevts": n}, ...]}}}``.
    Datasets are named ``{process}__{variation}``; each carries the metadata the processor
    needs, with ``nevts`` counted over the files actually used (``max_files_per_sample``
    of each sample; -1 for all). ``rewrite_prefix=(old, new)`` moves the paths, e.g. from
    the AGC's https origin to an xrootd door or a local copy.
    """
    catalogue: Mapping[str, Any] = (
        inputs if isinstance(inputs, Mapping) else json.loads(Path(inputs).read_text())
    )
    wanted = set(processes)
    fileset: dict[str, dict[str, Any]] = {}
    for process, variations in catalogue.items():
        if process not in wanted:
            continue  # e.g. "data": this analysis runs on simulation only
        for variation, entry in variations.items():
            files = entry["files"]
            if max_files_per_sample >= 0:
                files = files[:max_files_per_sample]
            paths = [f["path"] for f in files]
            if rewrite_prefix is not None:
                old, new = rewrite_prefix
                paths = [new + p[len(old) :] if p.startswith(old) else p for p in paths]
            fileset[f"{process}__{variation}"] = {
                "files": {path: treename for path in paths},
                "metadata": {
                    "process": process,
                    "variation": variation,
                    "nevts": sum(int(f["nevts"]) for f in files),
                    "xsec": XSEC[process],
                },
            }
    return fileset


# ---------------------------------------------------------------------- systematics

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective scramble of 64-bit integers."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _uniform(key: np.ndarray) -> np.ndarray:
    """A uniform number in (0, 1) from 53 bits of ``key``."""
    return ((key >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def event_normal(
    run: np.ndarray, lumi: np.ndarray, event: np.ndarray, index: np.ndarray
) -> np.ndarray:
    """One standard-normal number per (event, object index), a pure function of both.

    A counter-based generator: the event's identity (run, luminosity block, event
    number) and the object's index in it are hashed into two uniforms, then Box-Muller.
    Whatever the chunking, the executor or the retries, an object gets the same number.
    """
    with np.errstate(over="ignore"):
        key = _mix(np.asarray(run, np.uint64) + _GOLDEN)
        key = _mix(key ^ np.asarray(lumi, np.uint64))
        key = _mix(key ^ np.asarray(event, np.uint64))
        key = key + np.asarray(index, np.uint64) * np.uint64(2) * _GOLDEN
        u1 = _uniform(_mix(key))
        u2 = _uniform(_mix(key + _GOLDEN))
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def jet_pt_resolution(
    run: np.ndarray, lumi: np.ndarray, event: np.ndarray, counts: np.ndarray
) -> np.ndarray:
    """Per-jet factors ~ N(1, 0.05), seeded by each event's identity and the jet's index.

    Arguments are per event; the result is flat, one factor per jet.
    """
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    index = np.arange(int(counts.sum())) - starts
    run, lumi, event = (np.repeat(x, counts) for x in (run, lumi, event))
    return 1.0 + 0.05 * event_normal(run, lumi, event, index)


def btag_weight(jet_pt: np.ndarray, direction: str) -> np.ndarray:
    """The AGC's b-tag weight variation: 1 +- 7.5% per 50 GeV of the jet's pT."""
    sign = 1.0 if direction == "up" else -1.0
    return 1.0 + sign * 0.075 * jet_pt / 50.0


WJETS_SCALE = {"up": 1.03, "down": 0.97}  # the AGC's flat W+jets normalisation variation


# ---------------------------------------------------------------------- processor


def snap_to_grid(histogram: hist.Hist, xsec_weight: float, nevts: int) -> None:
    """Round a chunk's bin sums to a grid fine enough to change nothing, so that adding
    chunk outputs is exact and its result independent of the order.

    float64 addition is not associative: executors that add the same chunk outputs in
    different orders (a tree on workers, as they arrive, in sequence) would differ in
    the last bits. Every sum of multiples of a power of two q is exact while it stays
    below 2**53 q, and a dataset's bins cannot exceed xsec_weight * nevts * 64 (weights
    times a variation factor, bounded by 64), their variances xsec_weight**2 * nevts
    * 64**2. So q is the smallest power of two that keeps those below 2**52 q: a chunk's
    bin moves by at most q/2, about nevts * 1e-14 of one event's weight.
    """
    view: Any = histogram.view(flow=True)
    for field, bound in (
        ("value", xsec_weight * nevts * 64.0),
        ("variance", xsec_weight**2 * nevts * 64.0**2),
    ):
        q = 2.0 ** (np.ceil(np.log2(max(bound, 1e-300))) - 52)
        view[field] = np.round(view[field] / q) * q


def new_histogram() -> hist.Hist:
    """25 bins from 50 to 550 GeV, by region, process and variation, weighted."""
    return (
        hist.Hist.new.Reg(25, 50, 550, name="observable", label="observable [GeV]")
        .StrCat(list(REGIONS), name="region", label="Region")
        .StrCat(list(PROCESSES), name="process", label="Process")
        .StrCat(list(VARIATIONS), name="variation", label="Systematic variation")
        .Weight()
    )


def count_leptons(events: Any) -> np.ndarray:
    """Tight, isolated electrons and muons per event."""
    e, m = events.Electron, events.Muon
    electron_ok = (e.pt > 30) & (np.abs(e.eta) < 2.1) & (e.cutBased == 4) & (e.sip3d < 4)
    muon_ok = (
        (m.pt > 30) & (np.abs(m.eta) < 2.1) & m.tightId & (m.sip3d < 4) & (m.pfRelIso04_all < 0.15)
    )
    return ak.to_numpy(ak.sum(electron_ok, axis=1) + ak.sum(muon_ok, axis=1))


def trijet_mass(
    counts: np.ndarray,
    pt: np.ndarray,
    eta: np.ndarray,
    phi: np.ndarray,
    mass: np.ndarray,
    btag: np.ndarray,
) -> np.ndarray:
    """Per event, the mass of the highest-pT three-jet combination holding a b-tagged jet.

    ``counts`` jets per event (at least 3), the others flat per-jet arrays.
    """
    px, py, pz = pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)
    energy = np.sqrt(px**2 + py**2 + pz**2 + mass**2)
    combos = ak.argcombinations(ak.unflatten(pt, counts), 3)
    per_event = ak.to_numpy(ak.num(combos))
    start = np.repeat(np.cumsum(counts) - counts, per_event)
    i, j, k = (ak.to_numpy(ak.flatten(combos[str(n)])) + start for n in range(3))
    sx, sy = px[i] + px[j] + px[k], py[i] + py[j] + py[k]
    sz, se = pz[i] + pz[j] + pz[k], energy[i] + energy[j] + energy[k]
    has_b = np.maximum(btag[i], np.maximum(btag[j], btag[k])) > B_TAG_THRESHOLD
    trijet_pt = np.where(has_b, np.hypot(sx, sy), -np.inf)
    # the first combination of highest pT in each event (as ak.argmax picks it)
    owner = np.repeat(np.arange(len(counts)), per_event)
    order = np.lexsort((-trijet_pt, owner))
    best = order[np.cumsum(per_event) - per_event]
    return np.sqrt(np.maximum(se[best] ** 2 - sx[best] ** 2 - sy[best] ** 2 - sz[best] ** 2, 0))


class TtbarAnalysis(processor.ProcessorABC):
    """The AGC ttbar analysis. Output: ``hist`` (the histograms), ``nevents`` and
    ``selected`` (events read and events per region, per dataset, unweighted).

    Datasets need the metadata ``process``, ``variation``, ``xsec`` and ``nevts`` that
    :func:`construct_fileset` writes. ``systematics=False`` fills the nominal only.
    """

    def __init__(self, systematics: bool = True) -> None:
        self.systematics = systematics

    def process(self, events: Any) -> dict[str, Any]:
        histogram = new_histogram()
        meta = events.metadata
        process, variation, dataset = meta["process"], meta["variation"], meta["dataset"]
        xsec_weight = meta["xsec"] * LUMI / meta["nevts"]
        selected = {region: 0 for region in REGIONS}

        # Jets as flat numpy arrays (one entry per jet, in the file's order): a few
        # calls per chunk whatever its size, so that small chunks stay cheap.
        jets = events.Jet
        counts = ak.to_numpy(ak.num(jets))
        owner = np.repeat(np.arange(len(counts)), counts)
        flat = {
            f: ak.to_numpy(ak.flatten(jets[f])).astype(np.float64)
            for f in ("pt", "eta", "phi", "mass", "btagCSVV2")
        }
        jet_ok = (np.abs(flat["eta"]) < 2.4) & ak.to_numpy(ak.flatten(jets.isTightLeptonVeto))
        one_lepton = count_leptons(events) == 1

        # the jet-kinematic variations, for nominal samples only
        variants = [(variation, flat["pt"])]
        if variation == "nominal" and self.systematics:
            variants.append(("pt_scale_up", flat["pt"] * 1.03))
            run, lumi, number = (
                ak.to_numpy(events[f]) for f in ("run", "luminosityBlock", "event")
            )
            factor = jet_pt_resolution(run, lumi, number, counts)
            variants.append(("pt_res_up", flat["pt"] * factor))

        for name, pt in variants:
            good = jet_ok & (pt > 30)
            tagged = good & (flat["btagCSVV2"] > B_TAG_THRESHOLD)
            n_jets = np.bincount(owner[good], minlength=len(counts))
            n_btag = np.bincount(owner[tagged], minlength=len(counts))
            base = one_lepton & (n_jets >= 4)
            masks = {"4j1b": base & (n_btag == 1), "4j2b": base & (n_btag >= 2)}
            for region, mask in masks.items():
                if not mask.any():
                    continue
                use = good & mask[owner]  # the selected jets of the selected events
                region_counts = n_jets[mask]
                region_pt = pt[use]
                if region == "4j1b":
                    observable = np.bincount(owner[use], weights=pt[use], minlength=len(mask))
                    observable = observable[mask]
                else:
                    observable = trijet_mass(
                        region_counts,
                        region_pt,
                        flat["eta"][use],
                        flat["phi"][use],
                        flat["mass"][use],
                        flat["btagCSVV2"][use],
                    )
                weights = np.full(len(observable), xsec_weight)
                fill = {"observable": observable, "region": region, "process": process}
                histogram.fill(**fill, variation=name, weight=weights)
                if name == variation:
                    selected[region] += int(mask.sum())
                if name != "nominal" or not self.systematics:
                    continue
                # event-weight variations of the nominal selection: the i-th selected jet
                first = np.cumsum(region_counts) - region_counts
                for i in range(4):
                    for direction in ("up", "down"):
                        histogram.fill(
                            **fill,
                            variation=f"btag_var_{i}_{direction}",
                            weight=weights * btag_weight(region_pt[first + i], direction),
                        )
                if process == "wjets":
                    for direction, scale in WJETS_SCALE.items():
                        histogram.fill(
                            **fill, variation=f"scale_var_{direction}", weight=weights * scale
                        )

        snap_to_grid(histogram, xsec_weight, meta["nevts"])
        return {
            "hist": histogram,
            "nevents": {dataset: len(events)},
            "selected": {dataset: selected},
        }

    def postprocess(self, accumulator: Any) -> Any:
        return accumulator


# ---------------------------------------------------------------------- outputs


def histogram_name(region: str, process: str, variation: str) -> str:
    """The AGC's naming of one histogram: ``{region}_{process}[_{variation}]``."""
    return f"{region}_{process}" + ("" if variation == "nominal" else f"_{variation}")


def filled_histograms(histogram: hist.Hist) -> dict[str, hist.Hist]:
    """Every non-empty (region, process, variation) slice, by its AGC name."""
    out: dict[str, hist.Hist] = {}
    for region in REGIONS:
        for process in PROCESSES:
            for variation in VARIATIONS:
                h: Any = histogram[:, region, process, variation]
                if h.values().sum() > 0:
                    out[histogram_name(region, process, variation)] = h
    return out


def save_root(histogram: hist.Hist, path: str | Path) -> list[str]:
    """Write every non-empty histogram with the AGC's naming, and the AGC's pseudo-data
    ``{region}_pseudodata``, to a ROOT file; returns the names."""
    import uproot

    hists = filled_histograms(histogram)
    for region in REGIONS:  # the AGC's pseudo-data: mean of two ttbar variations + W+jets
        parts = [f"{region}_ttbar_ME_var", f"{region}_ttbar_PS_var", f"{region}_wjets"]
        if all(p in hists for p in parts):
            me, ps, wjets = (hists[p] for p in parts)
            hists[f"{region}_pseudodata"] = (me + ps) * 0.5 + wjets
    with uproot.recreate(path) as f:
        for name, h in hists.items():
            f[name] = h
    return list(hists)


def compare(a: hist.Hist, b: hist.Hist) -> float:
    """Largest relative difference between two outputs' bins (sums and variances); 0.0
    when they are identical bit for bit, which the processor's outputs are whatever the
    executor (see :func:`snap_to_grid`)."""
    if a.axes != b.axes:
        raise ValueError("the histograms have different axes")
    worst = 0.0
    pairs: list[tuple[Any, Any]] = [
        (a.values(flow=True), b.values(flow=True)),
        (a.variances(flow=True), b.variances(flow=True)),
    ]
    for x, y in pairs:
        scale = np.maximum(np.abs(x), np.abs(y))
        diff = np.abs(x - y)
        if np.any((scale == 0) & (diff != 0)):
            return float("inf")
        rel = np.divide(diff, scale, out=np.zeros_like(diff), where=scale > 0)
        worst = max(worst, float(rel.max(initial=0.0)))
    return worst
