"""Where the wall time of one HQExecutor run of the AGC analysis goes: a timeline.

    python examples/agc/timeline.py --files-per-sample 1    # 90 chunks
    python examples/agc/timeline.py                         # 360 chunks

Runs the analysis on a ``LocalCluster`` (2 workers of 1 slot, as ``benchmark.py`` does),
warms it up, then times ``--runs`` whole ``Runner`` calls with every task stamped in its
slot subprocess (wall clock, so the slots' and the session's stamps line up): when the
preprocessing and processing tasks and the merges started and ended, and inside each
chunk how long opening the file, building the NanoEvents and ``process()`` took. Prints,
per run, the session's phases and each slot's share of the wall time by what it did,
and the idle gaps: before its first task, between tasks, and after its last one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p
)

import analysis  # noqa: E402
import generate  # noqa: E402


class Stamped:
    """``function`` run in a slot subprocess with its start and end (and, for chunks, the
    file open and the NanoEvents build) appended to ``outdir/slot-PID.jsonl``."""

    def __init__(self, function: Callable[..., Any], outdir: str, kind: str) -> None:
        self.function = function
        self.outdir = outdir
        self.kind = kind

    def __call__(self, *args: Any) -> Any:
        inner = _instrument()
        inner.clear()
        start = time.time()
        out = self.function(*args)
        end = time.time()
        kind = self.kind
        record: dict[str, Any] = {"kind": kind, "start": start, "end": end}
        if kind == "task":
            metrics = out.get("metrics", {}) if isinstance(out, dict) else {}
            record["kind"] = "chunk" if isinstance(out, dict) and "out" in out else "pre"
            record["process"] = float(metrics.get("processtime", 0.0))
            record.update(inner)
        with open(os.path.join(self.outdir, f"slot-{os.getpid()}.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        return out


_INNER: dict[str, float] | None = None


def _instrument() -> dict[str, float]:
    """Patch coffea's work function's file open and NanoEvents build (once per process)."""
    global _INNER
    if _INNER is not None:
        return _INNER
    from coffea.processor import executor as coffea_executor

    inner: dict[str, float] = {}
    real_open = coffea_executor.uproot.open
    real_factory = coffea_executor.NanoEventsFactory.from_root

    def timed_open(*args: Any, **kwargs: Any) -> Any:
        t = time.time()
        try:
            return real_open(*args, **kwargs)
        finally:
            inner["open"] = inner.get("open", 0.0) + time.time() - t

    def timed_factory(*args: Any, **kwargs: Any) -> Any:
        t = time.time()
        factory = real_factory(*args, **kwargs)
        real_events = factory.events

        def events() -> Any:
            t2 = time.time()
            try:
                return real_events()
            finally:
                inner["events"] = inner.get("events", 0.0) + time.time() - t2

        factory.events = events
        inner["factory"] = inner.get("factory", 0.0) + time.time() - t
        return factory

    coffea_executor.uproot.open = timed_open
    coffea_executor.NanoEventsFactory.from_root = timed_factory
    _INNER = inner
    return inner


def stamped_merge(outdir: str) -> Callable[[list[Any]], Any]:
    from coffea_hq.executor import merge_outputs

    return Stamped(merge_outputs, outdir, "merge")


def read_stamps(outdir: str) -> dict[str, list[dict[str, Any]]]:
    by_slot: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(Path(outdir).glob("slot-*.jsonl")):
        by_slot[path.stem] = [json.loads(line) for line in path.read_text().splitlines()]
    return by_slot


def breakdown(
    phases: dict[str, float], by_slot: dict[str, list[dict[str, Any]]], t0: float, t1: float
) -> list[str]:
    """The session's phases and each slot's time, in seconds from the Runner call's start."""
    wall = t1 - t0
    lines = [f"Runner call: {wall:.2f} s"]
    for name, t in sorted(phases.items(), key=lambda kv: kv[1]):
        lines.append(f"  session {name:<28} {t - t0:7.3f} s")
    # Slots whose processes served this run, grouped by worker slot would need the worker's
    # name: a job's subprocess is new for each job, so list processes by their first stamp.
    totals: dict[str, float] = defaultdict(float)
    rows = []
    for name, records in by_slot.items():
        records = [r for r in records if r["end"] >= t0 and r["start"] <= t1]
        if not records:
            continue
        records.sort(key=lambda r: r["start"])
        kinds: dict[str, float] = defaultdict(float)
        gaps = 0.0
        for prev, cur in zip(records, records[1:], strict=False):
            gaps += max(0.0, cur["start"] - prev["end"])
        for r in records:
            span = r["end"] - r["start"]
            kinds[r["kind"]] += span
            if r["kind"] == "chunk":
                kinds["  open"] += r.get("open", 0.0)
                kinds["  factory"] += r.get("factory", 0.0)
                kinds["  events()"] += r.get("events", 0.0)
                kinds["  process()"] += r["process"]
        first, last = records[0]["start"] - t0, t1 - records[-1]["end"]
        n = sum(1 for r in records if r["kind"] == "chunk")
        rows.append(
            f"  {name}: {len(records)} tasks ({n} chunks) from {first:.3f} to "
            f"{records[-1]['end'] - t0:.3f} s; gaps between tasks {gaps:.3f} s; "
            + ", ".join(f"{k.strip()} {v:.3f}" for k, v in kinds.items())
        )
        for k, v in kinds.items():
            totals[k] += v
        totals["gaps between tasks"] += gaps
        totals["before first task"] += first
        totals["after last task"] += last
    lines += rows
    lines.append("  all processes, seconds (share of wall x processes would mislead: per job):")
    lines += [f"    {k.strip():<22} {v:7.3f}" for k, v in totals.items()]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    generate.add_run_arguments(p)
    p.add_argument("--runs", type=int, default=2)
    args = p.parse_args(argv)

    from coffea import processor
    from coffea.nanoevents import NanoAODSchema

    from coffea_hq import Client, HQExecutor, LocalCluster
    from coffea_hq import client as hq_client
    from coffea_hq import executor as hq_executor

    inputs = generate.generate(args.files_per_sample, args.events_per_file, jobs=2)
    fileset = analysis.construct_fileset(inputs)
    outdir = tempfile.mkdtemp(prefix="agc-timeline-")
    phases: dict[str, float] = {}
    calls = [0]

    real_ship = hq_executor.ship_code
    real_merge = hq_executor.merge_outputs
    real_map = hq_client.Client.map
    real_call = HQExecutor.__call__
    real_receive = hq_client.Job._receive

    def ship_stamped(function: Any, *rest: Any) -> Any:
        shipped, registered = real_ship(function, *rest)
        return Stamped(shipped, outdir, "task"), registered

    def map_stamped(self: Any, *a: Any, **k: Any) -> Any:
        phases[f"{calls[0]} submit start"] = time.time()
        job = real_map(self, *a, **k)
        phases[f"{calls[0]} submitted"] = time.time()
        return job

    def call_stamped(self: Any, items: Any, function: Any, accumulator: Any) -> Any:
        calls[0] += 1
        phases[f"{calls[0]} {self.desc} call"] = time.time()
        try:
            return real_call(self, items, function, accumulator)
        finally:
            phases[f"{calls[0]} returned"] = time.time()

    def receive_stamped(self: Any, *a: Any) -> Any:
        out = real_receive(self, *a)
        key = f"{calls[0]} first results"
        if key not in phases:
            phases[key] = time.time()
        phases[f"{calls[0]} last results"] = time.time()
        return out

    with LocalCluster(workers=args.workers, slots=1) as cluster, Client(cluster.url) as client:
        executor = HQExecutor(client=client, status=False)
        runner = processor.Runner(
            executor=executor, schema=NanoAODSchema, chunksize=args.chunksize, savemetrics=True
        )
        warm = processor.Runner(
            executor=executor, schema=NanoAODSchema, chunksize=args.chunksize, maxchunks=1
        )
        warm(fileset, processor_instance=analysis.TtbarAnalysis())
        hq_executor.ship_code = ship_stamped  # type: ignore[assignment]
        hq_executor.merge_outputs = stamped_merge(outdir)  # type: ignore[assignment]
        hq_client.Client.map = map_stamped  # type: ignore[method-assign]
        HQExecutor.__call__ = call_stamped  # type: ignore[method-assign]
        hq_client.Job._receive = receive_stamped  # type: ignore[method-assign,assignment]
        walls = []
        try:
            for run in range(args.runs):
                for f in Path(outdir).glob("*.jsonl"):
                    f.unlink()
                phases.clear()
                calls[0] = 0
                runner.metadata_cache = {}
                t0 = time.time()
                runner(fileset, processor_instance=analysis.TtbarAnalysis())
                t1 = time.time()
                walls.append(t1 - t0)
                print(f"\nrun {run + 1}")
                print("\n".join(breakdown(phases, read_stamps(outdir), t0, t1)))
        finally:
            hq_executor.ship_code = real_ship
            hq_executor.merge_outputs = real_merge
            hq_client.Client.map = real_map  # type: ignore[method-assign]
            HQExecutor.__call__ = real_call  # type: ignore[method-assign]
            hq_client.Job._receive = real_receive  # type: ignore[method-assign]
    print(f"\nmedian wall {statistics.median(walls):.2f} s over {len(walls)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
