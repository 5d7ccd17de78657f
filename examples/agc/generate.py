"""Synthetic NanoAOD-like files for every sample of the AGC CMS ttbar analysis.

    python examples/agc/generate.py --files-per-sample 2 --events-per-file 50000

Writes, for each AGC sample (ttbar nominal/scaledown/scaleup/ME_var/PS_var, single top
s-, t- and tW-channel, W+jets), ROOT files with an ``Events`` TTree holding the branches
the analysis reads, with NanoAOD's names, types and jagged layouts, and a
``nanoaod_inputs.json`` in the AGC's format that points at them. Files are cached: a
second call with the same parameters returns at once.

The events are a toy Monte Carlo, not a simulation of CMS. Top quarks are decayed
(t -> bW, W -> qq' or lnu) with proper two-body kinematics, so the three jets of a
hadronic top decay have an invariant mass near 173 GeV; W+jets has few jets and few
b jets; jets get a 10% energy resolution, b-tag discriminants with realistic
efficiencies, and leptons from b decays fail identification and isolation. What it is
and is not is written down in docs/agc.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
import uproot

GENERATOR_VERSION = 1  # bump when the physics below changes: it is part of the cache key

# Samples of the AGC (its 2015 CMS Open Data inputs) and their variations.
SAMPLES: dict[str, tuple[str, ...]] = {
    "ttbar": ("nominal", "scaledown", "scaleup", "ME_var", "PS_var"),
    "single_top_s_chan": ("nominal",),
    "single_top_t_chan": ("nominal",),
    "single_top_tW": ("nominal",),
    "wjets": ("nominal",),
}

TOP_MASS, TOP_WIDTH = 172.5, 1.4
W_MASS, W_WIDTH = 80.4, 2.1
B_MASS = 4.8
ELECTRON_MASS, MUON_MASS = 0.000511, 0.10566
BR_W_TO_E_OR_MU = 0.25  # e and mu, with leptonic tau decays folded in
BLOCK = 5_000  # entries per TBasket: real NanoAOD clusters hold a few thousand events

# b-tag efficiency of btagCSVV2 > 0.5 for b, c and light jets
BTAG_EFFICIENCY = {5: 0.65, 4: 0.25, 0: 0.05}

Arrays = dict[str, np.ndarray]


def default_cache_dir() -> Path:
    """``$AGC_DATA_DIR``, else ``$XDG_CACHE_HOME/coffea-hq/agc`` (``~/.cache/...``)."""
    if os.environ.get("AGC_DATA_DIR"):
        return Path(os.environ["AGC_DATA_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "coffea-hq" / "agc"


@dataclass(frozen=True)
class Settings:
    files_per_sample: int = 2
    events_per_file: int = 50_000
    seed: int = 2015

    def key(self) -> str:
        text = f"v{GENERATOR_VERSION}-{self.files_per_sample}-{self.events_per_file}-{self.seed}"
        return (
            f"{self.files_per_sample}x{self.events_per_file}-s{self.seed}-"
            + (hashlib.sha256(text.encode()).hexdigest()[:8])
        )


# ---------------------------------------------------------------------- kinematics


class P4:
    """Four-vectors of many particles as numpy arrays (px, py, pz, E), any common shape."""

    __slots__ = ("px", "py", "pz", "e")

    def __init__(self, px: np.ndarray, py: np.ndarray, pz: np.ndarray, e: np.ndarray) -> None:
        self.px, self.py, self.pz, self.e = px, py, pz, e

    @classmethod
    def from_ptetaphim(cls, pt: np.ndarray, eta: np.ndarray, phi: np.ndarray, m: np.ndarray) -> P4:
        pz = pt * np.sinh(eta)
        return cls(pt * np.cos(phi), pt * np.sin(phi), pz, np.sqrt(pt**2 + pz**2 + m**2))

    @property
    def pt(self) -> np.ndarray:
        return np.hypot(self.px, self.py)

    @property
    def mass(self) -> np.ndarray:
        return np.sqrt(np.maximum(self.e**2 - self.px**2 - self.py**2 - self.pz**2, 0))

    @property
    def eta(self) -> np.ndarray:
        return np.arcsinh(self.pz / np.maximum(self.pt, 1e-9))

    @property
    def phi(self) -> np.ndarray:
        return np.arctan2(self.py, self.px)


def two_body_decay(
    rng: np.random.Generator, parent: P4, mass: np.ndarray, m1: Any, m2: Any
) -> tuple[P4, P4]:
    """Decay each parent of ``mass`` isotropically in its rest frame into masses m1, m2."""
    n = mass.shape
    p = np.sqrt(np.maximum((mass**2 - (m1 + m2) ** 2) * (mass**2 - (m1 - m2) ** 2), 0)) / (2 * mass)
    cos_t = rng.uniform(-1, 1, n)
    sin_t = np.sqrt(1 - cos_t**2)
    phi = rng.uniform(-np.pi, np.pi, n)
    qx, qy, qz = p * sin_t * np.cos(phi), p * sin_t * np.sin(phi), p * cos_t
    d1 = boost(P4(qx, qy, qz, np.sqrt(p**2 + m1**2)), parent, mass)
    d2 = boost(P4(-qx, -qy, -qz, np.sqrt(p**2 + m2**2)), parent, mass)
    return d1, d2


def boost(q: P4, parent: P4, mass: np.ndarray) -> P4:
    """``q`` given in the rest frame of ``parent`` (of ``mass``), in the lab frame."""
    bx, by, bz = parent.px / parent.e, parent.py / parent.e, parent.pz / parent.e
    gamma = parent.e / mass
    bq = bx * q.px + by * q.py + bz * q.pz
    b2 = np.maximum(bx**2 + by**2 + bz**2, 1e-18)
    k = (gamma - 1) * bq / b2 + gamma * q.e
    return P4(q.px + k * bx, q.py + k * by, q.pz + k * bz, gamma * (q.e + bq))


def breit_wigner(rng: np.random.Generator, n: int, mass: float, width: float) -> np.ndarray:
    return np.clip(mass + width / 2 * rng.standard_cauchy(n), mass - 5 * width, mass + 5 * width)


def produce(
    rng: np.random.Generator, n: int, mass: np.ndarray, pt_scale: float, eta_sigma: float
) -> P4:
    """Particles of ``mass`` with a falling pT spectrum, central rapidities, any phi."""
    pt = rng.gamma(2.0, pt_scale, n)
    eta = rng.normal(0, eta_sigma, n)
    return P4.from_ptetaphim(pt, eta, rng.uniform(-np.pi, np.pi, n), mass)


@dataclass
class Event:
    """Truth objects of a sample, as fixed-width (events x slots) arrays with masks."""

    partons: list[tuple[P4, np.ndarray, np.ndarray]]  # (four-vector, flavour, present)
    leptons: list[tuple[P4, np.ndarray, np.ndarray]]  # (four-vector, |pdgId|, present)


def top_decay(rng: np.random.Generator, top: P4, n: int, ev: Event) -> None:
    """t -> b W, W -> e/mu nu (25%) or q q'; appends the b, the W's daughters."""
    mt = top.mass
    mw = np.minimum(breit_wigner(rng, n, W_MASS, W_WIDTH), mt - B_MASS - 1)
    b, w = two_body_decay(rng, top, mt, B_MASS, mw)
    leptonic = rng.random(n) < BR_W_TO_E_OR_MU
    flavour = np.where(rng.random(n) < 0.5, 11, 13)
    d1, d2 = two_body_decay(rng, w, mw, 0.0, 0.0)
    ev.partons.append((b, np.full(n, 5), np.ones(n, bool)))
    charm = rng.random(n) < 0.5  # W -> c s in half of the hadronic decays
    ev.partons.append((d1, np.where(charm, 4, 0), ~leptonic))
    ev.partons.append((d2, np.zeros(n, int), ~leptonic))
    ev.leptons.append((d1, flavour, leptonic))


def w_decay(rng: np.random.Generator, w: P4, mw: np.ndarray, n: int, ev: Event, br: float) -> None:
    leptonic = rng.random(n) < br
    d1, d2 = two_body_decay(rng, w, mw, 0.0, 0.0)
    ev.partons.append((d1, np.zeros(n, int), ~leptonic))
    ev.partons.append((d2, np.zeros(n, int), ~leptonic))
    ev.leptons.append((d1, np.where(rng.random(n) < 0.5, 11, 13), leptonic))


def extra_jets(
    rng: np.random.Generator,
    n: int,
    ev: Event,
    mean: float,
    pt_min: float,
    pt_slope: float,
    eta_sigma: float,
    max_jets: int = 8,
    heavy: float = 0.04,
) -> None:
    """Initial/final-state radiation (or the W's recoil): Poisson many, falling pT."""
    count = np.minimum(rng.poisson(mean, n), max_jets)
    for i in range(max_jets):
        pt = pt_min + rng.exponential(pt_slope, n)
        p4 = P4.from_ptetaphim(
            pt, rng.normal(0, eta_sigma, n), rng.uniform(-np.pi, np.pi, n), np.zeros(n)
        )
        u = rng.random(n)
        flavour = np.where(u < heavy / 3, 5, np.where(u < heavy, 4, 0))
        ev.partons.append((p4, flavour, count > i))


def generate_truth(rng: np.random.Generator, process: str, variation: str, n: int) -> Event:
    ev = Event([], [])
    isr = {"scaleup": 1.25, "scaledown": 0.8}.get(variation, 1.0)
    if process == "ttbar":
        top_pt = 60.0 if variation != "ME_var" else 66.0  # ME_var: a harder top spectrum
        t1 = produce(rng, n, breit_wigner(rng, n, TOP_MASS, TOP_WIDTH), top_pt, 1.2)
        # the second top recoils against the first in the transverse plane
        pt2 = t1.pt * rng.lognormal(0, 0.3, n)
        phi2 = t1.phi + np.pi + rng.normal(0, 0.4, n)
        t2 = P4.from_ptetaphim(pt2, rng.normal(0, 1.2, n), phi2, np.full(n, TOP_MASS))
        top_decay(rng, t1, n, ev)
        top_decay(rng, t2, n, ev)
        extra_jets(rng, n, ev, 1.0 * isr, 20, 25, 2.0, heavy=0.06)
    elif process.startswith("single_top"):
        top = produce(rng, n, breit_wigner(rng, n, TOP_MASS, TOP_WIDTH), 45.0, 1.4)
        top_decay(rng, top, n, ev)
        if process == "single_top_t_chan":  # the forward light-quark jet and a soft b
            ev.partons.append(
                (produce(rng, n, np.zeros(n), 25.0, 2.6), np.zeros(n, int), np.ones(n, bool))
            )
            ev.partons.append(
                (produce(rng, n, np.full(n, B_MASS), 12.0, 1.8), np.full(n, 5), np.ones(n, bool))
            )
        elif process == "single_top_s_chan":  # the recoiling b
            ev.partons.append(
                (produce(rng, n, np.full(n, B_MASS), 35.0, 1.4), np.full(n, 5), np.ones(n, bool))
            )
        else:  # tW: the associated W
            mw = breit_wigner(rng, n, W_MASS, W_WIDTH)
            w_decay(rng, produce(rng, n, mw, 40.0, 1.4), mw, n, ev, BR_W_TO_E_OR_MU)
        extra_jets(rng, n, ev, 0.8, 20, 25, 2.0)
    elif process == "wjets":  # W -> e/mu nu (the cross section counts only those)
        mw = breit_wigner(rng, n, W_MASS, W_WIDTH)
        w_decay(rng, produce(rng, n, mw, 18.0, 1.8), mw, n, ev, 1.0)
        extra_jets(rng, n, ev, 1.8, 18, 28, 1.8, heavy=0.07)
    else:
        raise ValueError(f"unknown AGC process {process!r}")
    extra_jets(rng, n, ev, 1.5, 15, 6, 2.8, max_jets=6, heavy=0.0)  # pile-up jets
    return ev


# ---------------------------------------------------------------------- reconstruction


def stack(objects: list[tuple[P4, np.ndarray, np.ndarray]]) -> tuple[P4, np.ndarray, np.ndarray]:
    def cols(name: str) -> np.ndarray:
        return np.stack([getattr(o[0], name) for o in objects], axis=1)

    p4 = P4(cols("px"), cols("py"), cols("pz"), cols("e"))
    return p4, np.stack([o[1] for o in objects], 1), np.stack([o[2] for o in objects], 1)


def sort_rows(keep: np.ndarray, pt: np.ndarray, *columns: np.ndarray) -> list[np.ndarray]:
    """Order each event's objects by decreasing pT, the kept ones first (NanoAOD's order)."""
    order = np.argsort(np.where(keep, -pt, np.inf), axis=1, kind="stable")
    return [np.take_along_axis(c, order, axis=1) for c in (keep, pt, *columns)]


def reconstruct_jets(rng: np.random.Generator, ev: Event, variation: str) -> Arrays:
    p4, flavour, present = stack(ev.partons)
    response = 0.985 if variation == "PS_var" else 1.0  # PS_var: softer fragmentation
    pt = p4.pt * rng.normal(response, 0.10, p4.pt.shape)
    eta = p4.eta + rng.normal(0, 0.02, pt.shape)
    phi = p4.phi + rng.normal(0, 0.02, pt.shape)
    phi = (phi + np.pi) % (2 * np.pi) - np.pi
    mass = np.sqrt(np.maximum(p4.e**2 - p4.px**2 - p4.py**2 - p4.pz**2, 0))
    mass = np.hypot(mass, pt * rng.uniform(0.04, 0.12, pt.shape))  # hadronisation mass
    keep = present & (pt > 15) & (np.abs(eta) < 4.7)
    tagged = rng.random(pt.shape) < np.select(
        [flavour == 5, flavour == 4], [BTAG_EFFICIENCY[5], BTAG_EFFICIENCY[4]], BTAG_EFFICIENCY[0]
    )
    csv = np.where(
        tagged, 0.5 + 0.5 * rng.beta(2.0, 1.0, pt.shape), 0.5 * rng.beta(1.0, 2.5, pt.shape)
    ).astype(np.float32)
    csv = np.minimum(csv, np.float32(0.99999))
    u = rng.random(pt.shape)
    # jetId bits: 1 tight, 2 tight + lepton veto (NanoAOD v9 values 0, 2, 6)
    jet_id = np.where(u < 0.965, 6, np.where(u < 0.99, 2, 0)).astype(np.int32)
    cols = sort_rows(keep, pt, eta, phi, mass, csv, jet_id)
    names = ("keep", "pt", "eta", "phi", "mass", "btagCSVV2", "jetId")
    return dict(zip(names, cols, strict=True))


def nonprompt_leptons(
    rng: np.random.Generator, ev: Event, n: int, mean: float
) -> list[tuple[P4, np.ndarray, np.ndarray]]:
    """Leptons from heavy-flavour decays, near a b or c quark: soft, displaced, not isolated."""
    p4, flavour, present = stack(ev.partons)
    heavy = present & (flavour > 0)
    out = []
    count = rng.poisson(mean, n)
    for i in range(2):
        # pick a random heavy-flavour parton of the event, else any direction
        score = np.where(heavy, rng.random(heavy.shape), -1)
        pick = np.argmax(score, axis=1)
        has = heavy[np.arange(n), pick]
        eta = np.where(has, p4.eta[np.arange(n), pick], rng.normal(0, 1.5, n))
        phi = np.where(has, p4.phi[np.arange(n), pick], rng.uniform(-np.pi, np.pi, n))
        pt = 3 + rng.exponential(7, n)
        lep = P4.from_ptetaphim(
            pt, eta + rng.normal(0, 0.05, n), phi + rng.normal(0, 0.05, n), np.zeros(n)
        )
        out.append((lep, np.where(rng.random(n) < 0.5, 11, 13), count > i))
    return out


def reconstruct_leptons(
    rng: np.random.Generator, ev: Event, n: int, flavour: int, fake_rate: float
) -> Arrays:
    prompt = len(ev.leptons)
    p4, pdg, present = stack(ev.leptons + nonprompt_leptons(rng, ev, n, fake_rate))
    is_prompt = np.zeros(pdg.shape, bool)
    is_prompt[:, :prompt] = True
    sigma = 0.02 if flavour == 11 else 0.015
    pt = p4.pt * rng.normal(1.0, sigma, pdg.shape)
    eta, phi = p4.eta, p4.phi
    keep = present & (pdg == flavour) & (np.abs(eta) < (2.5 if flavour == 11 else 2.4))
    keep &= pt > (5 if flavour == 11 else 3)
    sip3d = np.abs(rng.normal(0, np.where(is_prompt, 1.4, 6.0))).astype(np.float32)
    charge = np.where(rng.random(pdg.shape) < 0.5, -1, 1).astype(np.int32)
    mass = np.full(pdg.shape, ELECTRON_MASS if flavour == 11 else MUON_MASS, np.float32)
    out: Arrays = {}
    if flavour == 11:
        # cutBased: 0 fail, 1 veto, 2 loose, 3 medium, 4 tight
        u = rng.random(pdg.shape)
        tight_p = np.where(is_prompt, 0.80, 0.15)
        cut = np.where(
            u < tight_p,
            4,
            np.where(
                u < tight_p + 0.08,
                3,
                np.where(u < tight_p + 0.14, 2, np.where(u < tight_p + 0.18, 1, 0)),
            ),
        )
        extra: dict[str, np.ndarray] = {"cutBased": cut.astype(np.int32)}
    else:
        tight = rng.random(pdg.shape) < np.where(is_prompt, 0.95, 0.55)
        iso = np.where(
            is_prompt, rng.exponential(0.03, pdg.shape), 0.05 + rng.exponential(0.5, pdg.shape)
        ).astype(np.float32)
        extra = {"tightId": tight, "pfRelIso04_all": iso}
    names = ["pt", "eta", "phi", "mass", "charge", "sip3d", *extra]
    cols = sort_rows(keep, pt, eta, phi, mass, charge, sip3d, *extra.values())
    out = dict(zip(["keep", *names], cols, strict=True))
    return out


def match(lep: Arrays, jets: Arrays) -> np.ndarray:
    """Index of the closest jet within dR < 0.4 for each lepton slot, else -1 (jetIdx)."""
    deta = lep["eta"][:, :, None] - jets["eta"][:, None, :]
    dphi = (lep["phi"][:, :, None] - jets["phi"][:, None, :] + np.pi) % (2 * np.pi) - np.pi
    dr = np.where(jets["keep"][:, None, :], np.hypot(deta, dphi), np.inf)
    best = np.argmin(dr, axis=2)
    close = np.take_along_axis(dr, best[:, :, None], axis=2)[:, :, 0] < 0.4
    return np.where(close & lep["keep"], best, -1).astype(np.int32)


def reverse_match(lep_jet: np.ndarray, lep_keep: np.ndarray, n_jets: int) -> list[np.ndarray]:
    """For each jet slot, the first two leptons matched to it (Jet_*Idx1/2), else -1."""
    first = np.full((lep_jet.shape[0], n_jets), -1, np.int32)
    second = first.copy()
    jet_index = np.arange(n_jets)[None, :]
    for i in range(lep_jet.shape[1]):
        hit = (lep_jet[:, i : i + 1] == jet_index) & lep_keep[:, i : i + 1]
        second = np.where(hit & (first >= 0) & (second < 0), i, second)
        first = np.where(hit & (first < 0), i, first)
    return [first, second]


def jagged(keep: np.ndarray, values: np.ndarray, dtype: Any) -> ak.Array:
    counts = keep.sum(axis=1)
    return ak.unflatten(np.asarray(values[keep], dtype=dtype), counts)


def empty_collection(n: int, fields: tuple[str, ...]) -> ak.Array:
    """A collection with no entries in any event, carrying only cross-reference indices."""
    offsets = ak.index.Index64(np.zeros(n + 1, np.int64))
    content = np.zeros(0, np.int32)
    return ak.zip(
        {
            f: ak.Array(ak.contents.ListOffsetArray(offsets, ak.contents.NumpyArray(content)))
            for f in fields
        }
    )


def make_events(
    rng: np.random.Generator, process: str, variation: str, n: int, first_event: int
) -> dict[str, Any]:
    """One block of events, as the arrays uproot writes (collections as records)."""
    ev = generate_truth(rng, process, variation, n)
    jets = reconstruct_jets(rng, ev, variation)
    fake = 0.35 if process in ("ttbar", "single_top_tW") else 0.15
    electrons = reconstruct_leptons(rng, ev, n, 11, fake)
    muons = reconstruct_leptons(rng, ev, n, 13, fake)
    e_jet = match(electrons, jets)
    m_jet = match(muons, jets)
    width = jets["keep"].shape[1]
    j_e = reverse_match(e_jet, electrons["keep"], width)
    j_m = reverse_match(m_jet, muons["keep"], width)

    k = jets["keep"]
    jet = {
        "pt": jagged(k, jets["pt"], np.float32),
        "eta": jagged(k, jets["eta"], np.float32),
        "phi": jagged(k, jets["phi"], np.float32),
        "mass": jagged(k, jets["mass"], np.float32),
        "btagCSVV2": jagged(k, jets["btagCSVV2"], np.float32),
        "jetId": jagged(k, jets["jetId"], np.int32),
        "electronIdx1": jagged(k, j_e[0], np.int32),
        "electronIdx2": jagged(k, j_e[1], np.int32),
        "muonIdx1": jagged(k, j_m[0], np.int32),
        "muonIdx2": jagged(k, j_m[1], np.int32),
    }
    ke, km = electrons["keep"], muons["keep"]
    electron = {
        "pt": jagged(ke, electrons["pt"], np.float32),
        "eta": jagged(ke, electrons["eta"], np.float32),
        "phi": jagged(ke, electrons["phi"], np.float32),
        "mass": jagged(ke, electrons["mass"], np.float32),
        "charge": jagged(ke, electrons["charge"], np.int32),
        "cutBased": jagged(ke, electrons["cutBased"], np.int32),
        "sip3d": jagged(ke, electrons["sip3d"], np.float32),
        "jetIdx": jagged(ke, e_jet, np.int32),
        "photonIdx": jagged(ke, np.full(ke.shape, -1), np.int32),
    }
    muon = {
        "pt": jagged(km, muons["pt"], np.float32),
        "eta": jagged(km, muons["eta"], np.float32),
        "phi": jagged(km, muons["phi"], np.float32),
        "mass": jagged(km, muons["mass"], np.float32),
        "charge": jagged(km, muons["charge"], np.int32),
        "tightId": jagged(km, muons["tightId"], np.bool_),
        "sip3d": jagged(km, muons["sip3d"], np.float32),
        "pfRelIso04_all": jagged(km, muons["pfRelIso04_all"], np.float32),
        "jetIdx": jagged(km, m_jet, np.int32),
        "fsrPhotonIdx": jagged(km, np.full(km.shape, -1), np.int32),
    }
    number = np.arange(first_event, first_event + n, dtype=np.uint64)
    return {
        "run": np.ones(n, np.uint32),
        "luminosityBlock": (1 + number // 1000).astype(np.uint32),
        "event": number,
        "Jet": ak.zip(jet),
        "Electron": ak.zip(electron),
        "Muon": ak.zip(muon),
        # Collections this file does not have, present and empty so that NanoAODSchema
        # finds every cross-reference it resolves (it warns about each missing one).
        "Photon": empty_collection(n, ("electronIdx", "jetIdx")),
        "FsrPhoton": empty_collection(n, ("muonIdx",)),
        "Tau": empty_collection(n, ("jetIdx",)),
        "LowPtElectron": empty_collection(n, ("electronIdx", "photonIdx")),
        "FatJet": empty_collection(n, ("subJetIdx1", "subJetIdx2")),
        "SubJet": empty_collection(n, ("pt",)),
    }


# ---------------------------------------------------------------------- files


def sample_seed(
    settings: Settings, process: str, variation: str, index: int
) -> np.random.Generator:
    name = f"{process}__{variation}".encode()
    return np.random.default_rng([settings.seed, zlib.crc32(name), index])


def write_file(args: tuple[Settings, str, str, int, str]) -> tuple[str, int]:
    settings, process, variation, index, path = args
    if Path(path).exists():
        return path, settings.events_per_file
    rng = sample_seed(settings, process, variation, index)
    tmp = f"{path}.{os.getpid()}.tmp"
    sample_number = list(_sample_names()).index(f"{process}__{variation}")
    first = sample_number * 10**9 + index * settings.events_per_file + 1
    with uproot.recreate(tmp, compression=uproot.LZ4(1)) as f:
        tree = None
        for start in range(0, settings.events_per_file, BLOCK):
            size = min(BLOCK, settings.events_per_file - start)
            block = make_events(rng, process, variation, size, first + start)
            if tree is None:
                tree = f.mktree(
                    "Events",
                    {k: v.type if isinstance(v, ak.Array) else v.dtype for k, v in block.items()},
                )
            tree.extend(block)
    os.replace(tmp, path)
    return path, settings.events_per_file


def _sample_names() -> Iterator[str]:
    for process, variations in SAMPLES.items():
        for variation in variations:
            yield f"{process}__{variation}"


def generate(
    files_per_sample: int = 2,
    events_per_file: int = 50_000,
    seed: int = 2015,
    cache_dir: str | Path | None = None,
    jobs: int = 1,
    verbose: bool = True,
) -> Path:
    """Write (or find in the cache) the synthetic samples; return the inputs JSON's path.

    >>> inputs = generate(files_per_sample=1, events_per_file=10_000)
    >>> fileset = analysis.construct_fileset(inputs)
    """
    settings = Settings(files_per_sample, events_per_file, seed)
    directory = Path(cache_dir or default_cache_dir()) / settings.key()
    inputs = directory / "nanoaod_inputs.json"
    if inputs.exists():
        return inputs
    directory.mkdir(parents=True, exist_ok=True)
    work = [
        (settings, process, variation, i, str(directory / f"{process}__{variation}__{i}.root"))
        for process, variations in SAMPLES.items()
        for variation in variations
        for i in range(files_per_sample)
    ]
    start = time.perf_counter()
    if verbose:
        total = len(work) * events_per_file
        print(f"generating {len(work)} files, {total:,} events, into {directory}", flush=True)
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            written = list(pool.map(write_file, work))
    else:
        written = [write_file(w) for w in work]
    catalogue: dict[str, dict[str, Any]] = {}
    for (_, process, variation, _, _), (path, nevts) in zip(work, written, strict=True):
        entry = catalogue.setdefault(process, {}).setdefault(
            variation, {"nevts_total": 0, "files": []}
        )
        entry["files"].append({"path": path, "nevts": nevts})
        entry["nevts_total"] += nevts
    tmp = inputs.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(catalogue, indent=1))
    os.replace(tmp, inputs)
    if verbose:
        print(f"generated in {time.perf_counter() - start:.1f} s", flush=True)
    return inputs


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the diagnostic scripts (timeline.py, profile_slot.py): how many
    files to generate, how large, the chunk size and the number of workers."""
    parser.add_argument("--files-per-sample", type=int, default=4)
    parser.add_argument("--events-per-file", type=int, default=100_000)
    parser.add_argument("--chunksize", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files-per-sample", type=int, default=2)
    parser.add_argument("--events-per-file", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=2015)
    parser.add_argument("--cache-dir", default=None, help="default: $AGC_DATA_DIR or ~/.cache")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    path = generate(
        args.files_per_sample, args.events_per_file, args.seed, args.cache_dir, args.jobs
    )
    print(path)


if __name__ == "__main__":
    main()
