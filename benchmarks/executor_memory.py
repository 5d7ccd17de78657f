#!/usr/bin/env python
"""What the analysis process pays for its results: HQExecutor against FuturesExecutor.

One coffea analysis (NanoAOD-like files written here, ``--chunks`` chunks, a processor
filling a 5-dimensional weighted histogram of ~2 MB per chunk: dataset x systematic x pt
x eta x phi) runs through

- ``futures``: coffea's ``FuturesExecutor`` with ``--workers`` loky processes (warm),
  outputs merged in the analysis process as they arrive (its default);
- ``hq``: ``HQExecutor`` on a ``LocalCluster`` with ``--workers`` workers of one slot,
  outputs merged on the workers by tree reduction (``treereduction=20``, the default);
- ``hq-noreduce``: the same with ``treereduction=None``: every chunk's output comes to
  the analysis process, as with FuturesExecutor, to show what the tree reduction buys.

Each run happens in a fresh analysis process, which measures about itself only:

- peak RSS growth: ``ru_maxrss`` after the run minus before it (after imports, the
  chunk list and the warm-up, so only the run itself counts);
- bytes received: the result payloads it was handed (FuturesExecutor: the compressed
  outputs its futures returned; HQExecutor: every HTTP response body);
- CPU seconds it spent (user + sys; workers not included), and wall time.

The outputs of every run are checked equal (bin sums and a count). Medians over
``--repeat`` runs are printed with the ratios futures / hq.

    python benchmarks/executor_memory.py                    # 1,000 chunks x 3
    python benchmarks/executor_memory.py --chunks 4000 --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

EVENTS_PER_FILE = 40_000
SYSTEMATICS = ("nominal", "jes_up", "jes_down", "mu_sf_up", "mu_sf_down")
MODES = ("futures", "hq", "hq-noreduce")


# ---------------------------------------------------------------------- the analysis


def make_processor() -> Any:
    import awkward as ak
    import hist
    import numpy as np
    from coffea import processor

    class DimuonSystematics(processor.ProcessorABC):
        def process(self, events: Any) -> dict[str, Any]:
            h = (
                hist.Hist.new.StrCat([], growth=True, name="dataset")
                .StrCat(list(SYSTEMATICS), name="syst")
                .Reg(60, 0, 300, name="pt")
                .Reg(24, -2.4, 2.4, name="eta")
                .Reg(16, -np.pi, np.pi, name="phi")
                .Weight()
            )
            muons = events.Muon[events.Muon.pt > 5]
            pt, eta, phi = (ak.flatten(getattr(muons, f)) for f in ("pt", "eta", "phi"))
            scale = {"jes_up": 1.02, "jes_down": 0.98}
            weight = {"mu_sf_up": 1.25, "mu_sf_down": 0.75}
            for syst in SYSTEMATICS:
                h.fill(
                    dataset=events.metadata["dataset"],
                    syst=syst,
                    pt=pt * scale.get(syst, 1.0),
                    eta=eta,
                    phi=phi,
                    weight=weight.get(syst, 1.0),
                )
            return {"muons": h, "events": len(events)}

        def postprocess(self, accumulator: Any) -> Any:
            return accumulator

    return DimuonSystematics()


def write_files(directory: Path, n_files: int) -> dict[str, Any]:
    import awkward as ak
    import numpy as np
    import uproot

    files: dict[str, list[str]] = {"DYJets": [], "TTbar": []}
    for i in range(n_files):
        rng = np.random.default_rng(i)
        counts = rng.poisson(2.0, EVENTS_PER_FILE)
        total = int(counts.sum())
        muon = ak.zip(
            {
                "pt": rng.exponential(25.0, total).astype(np.float32) + 3,
                "eta": rng.uniform(-2.4, 2.4, total).astype(np.float32),
                "phi": rng.uniform(-np.pi, np.pi, total).astype(np.float32),
                "mass": np.full(total, 0.1057, np.float32),
                "charge": rng.choice(np.array([-1, 1], np.int32), total),
            }
        )
        path = directory / f"f{i}.root"
        with uproot.recreate(path) as f:
            f.mktree(
                "Events",
                {
                    "run": np.ones(EVENTS_PER_FILE, np.uint32),
                    "luminosityBlock": (np.arange(EVENTS_PER_FILE) // 1000).astype(np.uint32),
                    "event": np.arange(EVENTS_PER_FILE, dtype=np.uint64),
                    "Muon": ak.unflatten(muon, counts),
                },
                field_name=lambda outer, inner: f"{outer}_{inner}",
                counter_name=lambda counted: "n" + counted,
            )
        files["DYJets" if i % 2 == 0 else "TTbar"].append(str(path))
    return {name: {"treename": "Events", "files": paths} for name, paths in files.items()}


# ---------------------------------------------------------------------- one measured run


def child(mode: str, url: str, fileset_json: str, chunksize: int, workers: int) -> None:
    """Run the analysis once in this (fresh) process; print one JSON line about it."""
    import warnings

    warnings.filterwarnings("ignore")
    from coffea import processor
    from coffea.nanoevents import NanoAODSchema

    fileset = json.loads(fileset_json)
    pre = processor.Runner(
        executor=processor.IterativeExecutor(status=False),
        schema=NanoAODSchema,
        chunksize=chunksize,
    )
    chunks = list(pre.preprocess(fileset))
    received = [0]
    if mode == "futures":
        import loky
        from coffea.processor import executor as coffea_executor

        pool = loky.get_reusable_executor(max_workers=workers)
        list(pool.map(_warm, range(workers * 2)))
        fetch = coffea_executor._FuturesHolder.fetch

        def counting_fetch(self: Any, n: int) -> list[Any]:
            out = fetch(self, n)
            received[0] += sum(len(x) for x in out if isinstance(x, bytes))
            return out

        coffea_executor._FuturesHolder.fetch = counting_fetch
        executor: Any = processor.FuturesExecutor(pool=pool, workers=workers, status=False)
    else:
        from coffea_hq import HQExecutor
        from coffea_hq.transport import Transport

        call = Transport.call

        async def counting_call(self: Transport, *args: Any, **kwargs: Any) -> Any:
            response = await call(self, *args, **kwargs)
            received[0] += len(response.body)
            return response

        Transport.call = counting_call  # type: ignore[method-assign]
        treereduction = None if mode == "hq-noreduce" else 20
        executor = HQExecutor(url, status=False, treereduction=treereduction)

    runner = processor.Runner(executor=executor, schema=NanoAODSchema, chunksize=chunksize)
    proc = make_processor()
    baseline = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    out = runner(chunks, processor_instance=proc)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    h = out["muons"]
    print(
        json.dumps(
            {
                "mode": mode,
                "chunks": len(chunks),
                "rss_growth_mb": max(0, after.ru_maxrss - baseline.ru_maxrss) / 1024,
                "peak_rss_mb": after.ru_maxrss / 1024,
                "received_mb": received[0] / 1e6,
                "cpu_s": (after.ru_utime + after.ru_stime)
                - (baseline.ru_utime + baseline.ru_stime),
                "wall_s": wall,
                "check": [float(h.values().sum()), float(h.variances().sum()), out["events"]],
                "output_mb": len(__import__("pickle").dumps(out)) / 1e6,
            }
        ),
        flush=True,
    )


def _warm(_: int) -> int:
    import coffea.nanoevents  # noqa: F401  (the loky workers pay their imports before timing)

    return os.getpid()


# ---------------------------------------------------------------------- driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=1000, help="chunks per run (≈)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--fileset", help=argparse.SUPPRESS)
    parser.add_argument("--chunksize", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.url, args.fileset, args.chunksize, args.workers)
        return

    from coffea_hq import LocalCluster

    modes = args.modes.split(",")
    n_files = 4
    chunksize = max(1, n_files * EVENTS_PER_FILE // args.chunks)
    with tempfile.TemporaryDirectory(prefix="hq-bench-") as tmp:
        fileset = write_files(Path(tmp), n_files)
        with LocalCluster(workers=args.workers, slots=1) as cluster:
            print(
                f"{args.chunks} chunks of {chunksize} events, {args.workers} workers, "
                f"{args.repeat} runs per mode, python {sys.version.split()[0]}, "
                f"{os.cpu_count()} cpus",
                flush=True,
            )
            # Warm the hq-workers (their slot processes import coffea on first use).
            run_child("hq", cluster.url, fileset, 40_000, args.workers)
            results: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
            for i in range(args.repeat):
                for mode in modes:
                    r = run_child(mode, cluster.url, fileset, chunksize, args.workers)
                    results[mode].append(r)
                    print(
                        f"  run {i + 1} {mode:12s} rss +{r['rss_growth_mb']:7.1f} MB  "
                        f"received {r['received_mb']:8.2f} MB  cpu {r['cpu_s']:6.2f} s  "
                        f"wall {r['wall_s']:6.2f} s",
                        flush=True,
                    )
    report(results)


def run_child(
    mode: str, url: str, fileset: dict[str, Any], chunksize: int, workers: int
) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--child", mode, "--url", url]
    argv += ["--fileset", json.dumps(fileset), "--chunksize", str(chunksize)]
    argv += ["--workers", str(workers)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(results: dict[str, list[dict[str, Any]]]) -> None:
    checks = {json.dumps(r["check"]) for runs in results.values() for r in runs}
    if len(checks) != 1:
        raise SystemExit(f"outputs differ between runs: {checks}")
    keys = ("rss_growth_mb", "peak_rss_mb", "received_mb", "cpu_s", "wall_s")
    med = {
        m: {k: statistics.median(r[k] for r in runs) for k in keys} for m, runs in results.items()
    }
    any_run = next(iter(results.values()))[0]
    print(f"\nmedians ({any_run['chunks']} chunks, merged output {any_run['output_mb']:.1f} MB):")
    header = ("RSS growth", 12), ("peak RSS", 10), ("received", 11), ("CPU", 8), ("wall", 8)
    print("  " + " " * 12 + "".join(f" {name:>{width}s}" for name, width in header))
    for mode, m in med.items():
        print(
            f"  {mode:12s} {m['rss_growth_mb']:9.1f} MB {m['peak_rss_mb']:7.0f} MB "
            f"{m['received_mb']:8.2f} MB {m['cpu_s']:6.2f} s {m['wall_s']:6.2f} s"
        )
    if "futures" in med and "hq" in med:
        f, h = med["futures"], med["hq"]
        print("\nratios futures / hq (higher: hq better):")
        for key, label in (
            ("rss_growth_mb", "RSS growth"),
            ("received_mb", "bytes received"),
            ("cpu_s", "analysis-process CPU"),
            ("wall_s", "wall time"),
        ):
            ratio = f[key] / h[key] if h[key] > 0 else float("inf")
            print(f"  {label:22s} {ratio:8.1f}x")


if __name__ == "__main__":
    main()
