#!/usr/bin/env python
"""Throughput of coffea-hq end to end, against Dask and Parsl.

Runs ``--tasks`` no-op tasks (a module-level function returning its argument) through
three systems on this machine, each with two worker processes of one slot/thread:

- coffea-hq: ``LocalCluster(workers=2, slots=1)`` + ``Client.map(...).result()``
- Dask: ``distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True)``
  + ``client.map`` + ``client.gather``
- Parsl: ``HighThroughputExecutor`` (``max_workers_per_node=2``, ``LocalProvider``, one
  block, loopback only, run directory in a temporary directory) + a ``python_app``

Startup (cluster start until a one-task probe returns) is timed apart; then a warm-up
run, then ``--repeat`` timed runs whose median is reported. Every run's results are
checked against the inputs. The target: coffea-hq >= 10x the faster of Dask and Parsl.

    python benchmarks/end_to_end.py                          # 20,000 tasks x 3
    python benchmarks/end_to_end.py --tasks 2000 --repeat 1  # a quick check

``benchmarks/control_plane.py`` measures the queue alone; ``benchmarks/README.md`` holds
the figures measured for the cost of telemetry (issue 13). Everything started is stopped
in ``finally`` blocks; a watchdog (``--time-limit``) interrupts a run that hangs, cleans
up, and as a last resort kills this process's children by pid and exits.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import (
    ADOPTED_MARKERS,
    BenchmarkTimeout,
    CpuMeter,
    add_run_options,
    print_table,
    run_benchmark,
    wait_for_quiet,
    warn_if_loaded,
)

HQ_TARGET_RATIO = 10.0
WARMUP_TASKS = 2_000


def noop(x: Any) -> Any:
    """The task every system runs: return the argument unchanged."""
    return x


@dataclass
class SystemResult:
    name: str
    startup: float = float("nan")
    runs: list[float] = field(default_factory=list)  # seconds per timed run
    correct: bool = True
    error: str = ""
    cpu_us: dict[str, float] = field(default_factory=dict)  # CPU us per task, last run
    foreign: list[float] = field(default_factory=list)  # other processes' CPU share per run

    def rates(self, n: int) -> list[float]:
        return [n / t for t in self.runs]

    def median_rate(self, n: int) -> float:
        return statistics.median(self.rates(n)) if self.runs else float("nan")


RunTasks = Callable[[int], list[Any]]  # run(n): n tasks, their results in order


def measure(
    name: str, system: Callable[[], Any], n: int, repeat: int, timeout: float, quiet: float
) -> Any:
    """Start ``system`` (a context manager yielding ``run(n) -> results``), probe it, warm
    it up and time ``repeat`` runs of ``n`` tasks."""
    result = SystemResult(name)
    expected = list(range(n))
    print(f"\n[{name}] starting", flush=True)
    started = time.perf_counter()
    try:
        with system() as run:
            probe = run(1)
            result.startup = time.perf_counter() - started
            if probe != [0]:
                raise AssertionError(f"probe returned {probe!r}")
            print(f"[{name}] up in {result.startup:.2f}s; warm-up", flush=True)
            warm = min(n, WARMUP_TASKS)
            if run(warm) != list(range(warm)):
                result.correct = False
            for i in range(repeat):
                wait_for_quiet(quiet)
                with CpuMeter() as cpu:
                    t0 = time.perf_counter()
                    values = run(n)
                    elapsed = time.perf_counter() - t0
                ok = values == expected
                result.correct &= ok
                result.runs.append(elapsed)
                result.cpu_us = cpu.per_task_us(n)
                result.foreign.append(cpu.foreign_share)
                print(
                    f"[{name}] run {i + 1}/{repeat}: {n} tasks in {elapsed:.2f}s = "
                    f"{n / elapsed:,.0f} tasks/s, results {'correct' if ok else 'WRONG'}; "
                    f"other processes used {cpu.foreign_share:.0%} of the CPUs",
                    flush=True,
                )
                del values
            teardown = time.perf_counter()
        print(f"[{name}] stopped in {time.perf_counter() - teardown:.2f}s", flush=True)
    except BenchmarkTimeout:
        raise
    except Exception as e:  # one system failing should not hide the others' figures
        result.error = f"{type(e).__name__}: {e}"
        result.correct = False
        print(f"[{name}] FAILED: {result.error}", flush=True)
    return result


@contextlib.contextmanager
def hq_system(timeout: float) -> Iterator[RunTasks]:
    from coffea_hq import Client, LocalCluster

    cluster = LocalCluster(workers=2, slots=1)
    client = None
    try:
        cluster.start()
        client = Client(cluster.url)

        def run(n: int) -> list[Any]:
            assert client is not None
            return list(client.map(noop, range(n)).result(timeout=timeout))

        yield run
    finally:
        if client is not None:
            client.close()
        cluster.close()


@contextlib.contextmanager
def dask_system(timeout: float) -> Iterator[RunTasks]:
    import dask
    from distributed import Client, LocalCluster, wait

    with dask.config.set({"distributed.admin.system-monitor.gil.enabled": False}):
        cluster = LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        )
    client = None
    try:
        client = Client(cluster)

        def run(n: int) -> list[Any]:
            assert client is not None
            futures = client.map(noop, range(n), pure=False)
            wait(futures, timeout=timeout)
            values = client.gather(futures)
            del futures
            return list(values)

        yield run
    finally:
        if client is not None:
            client.close()
        cluster.close()


@contextlib.contextmanager
def parsl_system(timeout: float) -> Iterator[RunTasks]:
    # The worker pool is launched through a shell: make this interpreter's scripts findable.
    bindir = str(Path(sys.executable).parent)
    os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    import parsl
    from parsl.config import Config
    from parsl.executors import HighThroughputExecutor
    from parsl.providers import LocalProvider

    rundir = tempfile.mkdtemp(prefix="hq-bench-parsl-")
    ADOPTED_MARKERS.append(rundir)  # the worker pool's command line names its log directory
    config = Config(
        executors=[
            HighThroughputExecutor(
                label="htex",
                address="127.0.0.1",
                loopback_address="127.0.0.1",
                max_workers_per_node=2,
                cores_per_worker=1,
                encrypted=False,  # coffea-hq's loopback HTTP is not encrypted either
                provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1),
                worker_logdir_root=rundir,
            )
        ],
        run_dir=rundir,
        strategy="none",
        usage_tracking=0,
    )
    dfk = None
    try:
        dfk = parsl.load(config)
        app = parsl.python_app(noop, executors=["htex"])

        def run(n: int) -> list[Any]:
            futures = [app(i) for i in range(n)]
            deadline = time.monotonic() + timeout
            return [f.result(timeout=max(1.0, deadline - time.monotonic())) for f in futures]

        yield run
    finally:
        if dfk is not None:
            dfk.cleanup()
        parsl.clear()
        shutil.rmtree(rundir, ignore_errors=True)


def end_to_end(args: argparse.Namespace) -> bool:
    n, repeat = args.tasks, args.repeat
    timeout = max(120.0, n / 100)  # no system here is slower than 100 tasks/s
    systems: list[tuple[str, Callable[[], Any]]] = [
        ("coffea-hq", lambda: hq_system(timeout)),
    ]
    if not args.skip_dask:
        systems.append(("dask", lambda: dask_system(timeout)))
    if not args.skip_parsl:
        systems.append(("parsl", lambda: parsl_system(timeout)))
    print(f"== end to end: {n:,} no-op tasks, 2 workers x 1 slot, {repeat} timed runs each")
    results = [
        measure(name, system, n, repeat, timeout, args.wait_quiet) for name, system in systems
    ]

    print(f"\n== end to end: {n:,} no-op tasks, median of {repeat} runs")
    head = (
        f"{'system':<11} {'startup s':>9} {'tasks/s':>9}  {'runs (tasks/s)':<26} "
        f"{'other load':>10}  results"
    )
    rows = []
    for r in results:
        runs = " ".join(f"{x:,.0f}" for x in r.rates(n)) or "-"
        status = "FAILED: " + r.error if r.error else ("correct" if r.correct else "WRONG")
        load = f"{max(r.foreign):.0%}" if r.foreign else "-"
        rows.append(
            f"{r.name:<11} {r.startup:>9.2f} {r.median_rate(n):>9,.0f}  {runs:<26} "
            f"{load:>10}  {status}"
        )
    print_table(head, rows)
    warn_if_loaded([f for r in results for f in r.foreign])
    print(
        "\nCPU per task in the last run (us, all processes of each system; "
        f"{os.cpu_count()} CPUs here):"
    )
    for r in results:
        if r.cpu_us:
            total = sum(r.cpu_us.values())
            parts = ", ".join(f"{role} {us:.0f}" for role, us in r.cpu_us.items() if us >= 1)
            print(f"  {r.name:<10} {total:6.0f}  = {parts}")

    hq = results[0].median_rate(n) if results[0].runs and results[0].correct else 0.0
    others = {r.name: r.median_rate(n) for r in results[1:] if r.runs}
    met = bool(results[0].correct and hq > 0)
    ratios = []
    for name, rate in others.items():
        ratios.append(f"hq/{name} = {hq / rate:.1f}x")
    if others:
        best_name, best = max(others.items(), key=lambda kv: kv[1])
        ratio = hq / best
        ratios.append(f"hq/max(...) = {ratio:.1f}x (vs {best_name})")
        met = met and ratio >= HQ_TARGET_RATIO and all(r.correct for r in results)
        print("\nratios: " + ", ".join(ratios))
        verdict = "MET" if met else "NOT MET"
        print(
            f"SUMMARY end-to-end: coffea-hq {hq:,.0f} tasks/s vs best other {best:,.0f} "
            f"({best_name}) = {ratio:.1f}x; target >= {HQ_TARGET_RATIO:.0f}x: {verdict}"
        )
    else:
        print(f"\nSUMMARY end-to-end: coffea-hq {hq:,.0f} tasks/s (no other system run)")
    return met


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=20_000, help="tasks per run")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per system (median)")
    p.add_argument("--skip-dask", action="store_true", help="leave Dask out")
    p.add_argument("--skip-parsl", action="store_true", help="leave Parsl out")
    add_run_options(p)
    args = p.parse_args(argv)
    if args.tasks < 1:
        p.error("--tasks must be positive")
    if args.repeat < 1:
        p.error("--repeat must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_benchmark(
        lambda: end_to_end(args),
        args.time_limit,
        ("aiohttp", "redis", "dask", "distributed", "parsl"),
    )


if __name__ == "__main__":
    sys.exit(main())
