"""The coffea-hq demo: the AGC CMS ttbar analysis on a local coffea-hq cluster.

    python examples/agc/run.py

Generates the synthetic NanoAOD samples (once; cached), starts an embedded Redis, an
hq-server and two hq-workers on this machine, runs the analysis with ``HQExecutor``,
prints a summary and writes the plots and the histograms (ROOT, AGC naming) into
``agc-output/``. ``--inputs nanoaod_inputs.json`` runs on the real CMS Open Data files
instead; ``--url`` uses a running coffea-hq server instead of a local cluster.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import analysis  # noqa: E402
import generate  # noqa: E402

PROCESS_LABELS = {
    "ttbar": r"$t\bar{t}$",
    "single_top_s_chan": "single top, s-channel",
    "single_top_t_chan": "single top, t-channel",
    "single_top_tW": "tW",
    "wjets": "W+jets",
}
REGION_LABELS = {
    "4j1b": (r"$H_T$ [GeV]", r"$\geq$4 jets, 1 b-tag"),
    "4j2b": (r"$m_{bjj}$ [GeV]", r"$\geq$4 jets, $\geq$2 b-tags"),
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files-per-sample", type=int, default=2, help="synthetic files per sample")
    p.add_argument("--events-per-file", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=2015)
    p.add_argument("--cache-dir", default=None, help="where synthetic files are kept")
    p.add_argument(
        "--inputs",
        default=None,
        help="an AGC nanoaod_inputs.json (real files) instead of synthetic ones",
    )
    p.add_argument(
        "--max-files", type=int, default=-1, help="files per sample to use from --inputs (-1: all)"
    )
    p.add_argument(
        "--rewrite-prefix",
        nargs=2,
        metavar=("OLD", "NEW"),
        default=None,
        help="replace OLD at the start of each path in --inputs with NEW",
    )
    p.add_argument("--chunksize", type=int, default=25_000)
    p.add_argument("--workers", type=int, default=2, help="hq-workers of the local cluster")
    p.add_argument("--url", default=None, help="a running hq-server (default: start one)")
    p.add_argument("--no-systematics", action="store_true")
    p.add_argument("--output", default="agc-output", help="directory for plots and ROOT file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


@contextlib.contextmanager
def hq_server(url: str | None, workers: int) -> Iterator[str]:
    if url:
        yield url
        return
    from coffea_hq import LocalCluster

    with LocalCluster(workers=workers) as cluster:
        print(f"local coffea-hq cluster: {cluster.url}, {workers} workers")
        yield cluster.url


def run_analysis(fileset: dict[str, Any], url: str, args: argparse.Namespace) -> tuple[Any, Any]:
    from coffea import processor
    from coffea.nanoevents import NanoAODSchema

    from coffea_hq import HQExecutor

    runner = processor.Runner(
        executor=HQExecutor(url, status=not args.quiet),
        schema=NanoAODSchema,
        chunksize=args.chunksize,
        savemetrics=True,
        metadata_cache={},
    )
    return runner(fileset, processor_instance=analysis.TtbarAnalysis(not args.no_systematics))


def dataset_order(item: tuple[str, int]) -> tuple[int, str]:
    process, _, variation = item[0].partition("__")
    rank = analysis.PROCESSES.index(process) if process in analysis.PROCESSES else 99
    return rank, "" if variation == "nominal" else variation


def summary(out: dict[str, Any], metrics: dict[str, Any], wall: float) -> str:
    events = sum(out["nevents"].values())
    lines = [
        "",
        f"{'events processed':<24}{events:>16,}",
        f"{'chunks':<24}{metrics.get('chunks', 0):>16,}",
        f"{'wall time':<24}{wall:>14.1f} s",
        f"{'event rate':<24}{events / wall / 1e3:>12.1f} kHz",
        f"{'rate inside process()':<24}"
        f"{events / max(metrics.get('processtime', 0.0), 1e-9) / 1e3:>12.1f} kHz",
        "",
        f"{'dataset':<30}{'events':>10}{'4j1b':>8}{'4j2b':>8}",
    ]
    for dataset, n in sorted(out["nevents"].items(), key=dataset_order):
        sel = out["selected"].get(dataset, {})
        lines.append(f"{dataset:<30}{n:>10,}{sel.get('4j1b', 0):>8,}{sel.get('4j2b', 0):>8,}")
    h = out["hist"]
    lines += ["", "expected events (3378 /pb), nominal:"]
    lines.append(f"{'process':<22}{'4j1b':>12}{'4j2b':>12}")
    totals = dict.fromkeys(analysis.REGIONS, 0.0)
    for process in analysis.PROCESSES:
        row = [
            h[:, region, process, "nominal"].values(flow=True).sum() for region in analysis.REGIONS
        ]
        for region, value in zip(analysis.REGIONS, row, strict=True):
            totals[region] += value
        lines.append(f"{process:<22}{row[0]:>12,.0f}{row[1]:>12,.0f}")
    lines.append(f"{'total':<22}{totals['4j1b']:>12,.0f}{totals['4j2b']:>12,.0f}")
    return "\n".join(lines)


def plot(histogram: Any, directory: Path) -> list[Path]:
    """Both regions stacked by process (nominal), one PNG each."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import mplhep
    except ImportError:
        print("(no plots: pip install matplotlib mplhep)")
        return []
    written = []
    order = ["wjets", "single_top_s_chan", "single_top_t_chan", "single_top_tW", "ttbar"]
    for region, (xlabel, title) in REGION_LABELS.items():
        fig, ax = plt.subplots(figsize=(7, 5))
        hists = [histogram[:, region, p, "nominal"] for p in order]
        mplhep.histplot(
            hists,
            stack=True,
            histtype="fill",
            ax=ax,
            edgecolor="black",
            linewidth=0.5,
            label=[PROCESS_LABELS[p] for p in order],
        )
        ax.set_xlabel(xlabel)
        ax.set_ylabel("events / 20 GeV")
        ax.set_title(f"{title}, 3378 pb$^{{-1}}$ (13 TeV)")
        ax.legend(reverse=True, frameon=False)
        ax.set_xlim(50, 550)
        fig.tight_layout()
        path = directory / f"{region}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.inputs:
        fileset = analysis.construct_fileset(
            args.inputs,
            args.max_files,
            rewrite_prefix=tuple(args.rewrite_prefix) if args.rewrite_prefix else None,
        )
    else:
        inputs = generate.generate(
            args.files_per_sample,
            args.events_per_file,
            args.seed,
            args.cache_dir,
            jobs=min(2, os.cpu_count() or 1),
        )
        fileset = analysis.construct_fileset(inputs)
    with hq_server(args.url, args.workers) as url:
        start = time.perf_counter()
        out, metrics = run_analysis(fileset, url, args)
        wall = time.perf_counter() - start
    print(summary(out, metrics, wall))

    directory = Path(args.output)
    directory.mkdir(parents=True, exist_ok=True)
    names = analysis.save_root(out["hist"], directory / "histograms.root")
    pngs = plot(out["hist"], directory)
    print(
        f"\nwrote {len(names)} histograms to {directory / 'histograms.root'}"
        + "".join(f"\nwrote {p}" for p in pngs)
    )


if __name__ == "__main__":
    main()
