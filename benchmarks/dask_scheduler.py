#!/usr/bin/env python
"""coffea-hq's dask scheduler against dask.distributed, on the same dask-awkward analysis.

The analysis is examples/dask/analysis.py (NanoAOD-like ROOT files it writes, a coffea
processor over ``apply_to_fileset``, hist outputs). It is computed with

- coffea-hq: ``dask.compute(..., scheduler=coffea_hq.Scheduler(url))`` on
  ``LocalCluster(workers=2, slots=1)``;
- Dask: ``distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True)``
  and ``dask.compute(..., scheduler=client.get)``;

after one untimed warm-up compute on each; ``--repeat`` timed computes each, checked
bin for bin against ``scheduler="sync"``. coffea-hq runs twice: as it does by default
(intermediate values kept in the server's store, fetched by the workers that need them)
and with ``Scheduler(keep=False)`` (every group's outputs through the session, as before
issue 16's first bullet was done). Reported: the median wall time, the scheduler overhead
per task: (wall - sync time / 2 workers) / tasks in the optimised graph, i.e. what each
task costs beyond its own work when the work is spread perfectly, and for coffea-hq the
bytes through the session per compute (payloads sent plus results received).

    python benchmarks/dask_scheduler.py                      # 8 files x 20,000 events, 3 runs
    python benchmarks/dask_scheduler.py --files 2 --repeat 1 # a quick check

Every coffea-hq compute is one job, and each worker slot starts a fresh process for a
job (no state shared between jobs): each compute pays the import of coffea once per slot,
where Dask's worker processes stay warm from one compute to the next.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from harness import add_run_options, print_table, run_benchmark, wait_for_quiet

WORKERS = 2
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "dask" / "analysis.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dask_example_analysis", EXAMPLE)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def same(a: Any, b: Any) -> bool:
    """Bin for bin (values and variances, flow included), and plain values equal."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if hasattr(a, "values") and hasattr(a, "axes"):
        import numpy as np

        return bool(
            a.axes == b.axes
            and np.array_equal(a.values(flow=True), b.values(flow=True))
            and np.array_equal(a.variances(flow=True), b.variances(flow=True))
        )
    return bool(a == b)


def timed(get: Any, outputs: Any, want: Any, repeat: int, quiet: float) -> list[float]:
    """Wall times of ``repeat`` computes after a warm-up."""
    import dask

    dask.compute(outputs, scheduler=get)  # warm-up, untimed
    walls = []
    for _ in range(repeat):
        wait_for_quiet(quiet)
        start = time.perf_counter()
        (got,) = dask.compute(outputs, scheduler=get)
        walls.append(time.perf_counter() - start)
        assert same(got, want), "results differ from scheduler='sync'"
    return walls


def compare(args: argparse.Namespace) -> bool:
    import dask
    from distributed import Client as DaskClient
    from distributed import LocalCluster as DaskCluster

    import coffea_hq

    analysis = load_example()
    with tempfile.TemporaryDirectory(prefix="hq-dask-bench-") as tmp:
        paths = analysis.write_files(Path(tmp), files=args.files, events=args.events)
        outputs = analysis.build(analysis.make_fileset(paths, step=args.step))
        start = time.perf_counter()
        (want,) = dask.compute(outputs, scheduler="sync")
        sync = time.perf_counter() - start
        rows = {}
        session: dict[str, str] = {}
        with coffea_hq.LocalCluster(workers=WORKERS, slots=1) as cluster:
            for name, keep in (("coffea-hq", True), ("coffea-hq keep=False", False)):
                scheduler = coffea_hq.Scheduler(cluster.url, keep=keep)
                rows[name] = timed(scheduler, outputs, want, args.repeat, args.wait_quiet)
                stats = scheduler.stats
                session[name] = f"{(stats['bytes_sent'] + stats['bytes_received']) / 1e3:,.1f}"
            groups = stats["groups"]
            tasks = stats["tasks"]  # of the optimised graph it was given
        with (
            DaskCluster(
                n_workers=WORKERS, threads_per_worker=1, processes=True, dashboard_address=None
            ) as dcluster,
            DaskClient(dcluster) as client,
        ):
            rows["dask.distributed"] = timed(
                client.get, outputs, want, args.repeat, args.wait_quiet
            )
    print(
        f"\n{args.files} files x {args.events} events, steps of {args.step}: {tasks} tasks "
        f"({groups} coffea-hq groups); sync scheduler {sync:.2f} s"
    )
    medians = {name: statistics.median(w) for name, w in rows.items()}
    table = []
    for name, wall in medians.items():
        overhead = (wall - sync / WORKERS) / tasks * 1e3
        kb = session.get(name, "-")
        table.append(f"{name:<22} {wall:>10.2f} {overhead:>20.1f} {kb:>18}")
    print_table(
        f"{'scheduler':<22} {'wall (s)':>10} {'overhead/task (ms)':>20} {'session kB/compute':>18}",
        table,
    )
    ratio = medians["coffea-hq"] / medians["dask.distributed"]
    print(f"\ncoffea-hq / dask.distributed wall time: {ratio:.2f}")
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=8, help="ROOT files written (default: 8)")
    p.add_argument("--events", type=int, default=20_000, help="events per file")
    p.add_argument("--step", type=int, default=5_000, help="events per partition")
    p.add_argument("--repeat", type=int, default=3, help="timed computes of each")
    add_run_options(p)
    args = p.parse_args(argv)
    if min(args.files, args.events, args.step, args.repeat) < 1:
        p.error("--files, --events, --step and --repeat must be positive")
    return run_benchmark(lambda: compare(args), args.time_limit, ("dask", "distributed", "coffea"))


if __name__ == "__main__":
    sys.exit(main())
