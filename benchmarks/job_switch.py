#!/usr/bin/env python
"""What a job switch costs a worker slot: one task subprocess serves one job, so a task
of another job waits for a fresh subprocess (the price of no state shared between jobs).

Drives a real slot (``coffea_hq.worker.slots.Slot``, the subprocess hq-worker runs
tasks in) directly, without server or network, and times one-task batches:

- same job: every batch is a task of the job the subprocess already serves (the fast
  path, what every task but a job's first on a slot pays);
- switch after a job: batches alternate between two jobs, each after a pause (``--pause``,
  untimed: the previous job running), so the slot's spare subprocess has started;
- switch back to back: batches alternate with no pause, so every one waits for an
  interpreter to start (the worst case: one-task jobs in a tight loop).

Prints the median of each, their ratios and the cost per switch (the difference).

    python benchmarks/job_switch.py               # 200 batches of each
    python benchmarks/job_switch.py --batches 20  # a quick check
    python benchmarks/job_switch.py --zygote --imports coffea.processor

``--zygote``: the slot's subprocesses are forks of a zygote (as hq-worker's by default),
which preloads the ``--imports`` module; ``--imports``: each task imports that module
(what a coffea job's first task on a fresh subprocess pays).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

from coffea_hq.worker.environments import Plan
from coffea_hq.worker.slots import HeldTask, Result, Slot
from coffea_hq.worker.zygote import Forker
from harness import add_run_options, print_table, run_benchmark

from coffea_hq import protocol

# A builtin: the subprocess unpickles it without this script on its path.
FUNCTION = protocol.dumps(abs)
SHA = protocol.blob_name(FUNCTION)


IMPORTS = ""  # set by --imports: the module each task imports


def imports(x: int) -> int:
    import importlib

    importlib.import_module(IMPORTS)
    return x


async def fetch(sha: str) -> Plan:
    return Plan(FUNCTION)


async def timed_batches(jobs: list[str], pause: float = 0.0, zygote: bool = False) -> list[float]:
    """Seconds per one-task batch, the batches' jobs in turn from ``jobs``, each after
    ``pause`` seconds."""
    forker = None
    if zygote:
        forker = Forker([IMPORTS] if IMPORTS else [], learn=False)
        forker.start()
        deadline = time.monotonic() + 120
        while not forker.ready and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if not forker.ready:
            raise RuntimeError("the zygote did not start")
    slot = Slot(0, fetch, forker=forker)
    await slot.start()
    results: list[Result] = []
    times = []
    try:
        for i, job in enumerate(jobs):
            task = HeldTask(job, f"t{i}", 1, SHA, protocol.dumps((i,)))
            await asyncio.sleep(pause)
            start = time.perf_counter()
            await slot.run([task], results.extend)
            times.append(time.perf_counter() - start)
    finally:
        await slot.stop()
        if forker is not None:
            await forker.close()
    bad = [r for r in results if r.outcome is not protocol.Outcome.OK]
    if bad or len(results) != len(jobs):
        raise RuntimeError(f"{len(bad)} failed of {len(results)} results: {bad[:1]}")
    return times


def job_switch(args: argparse.Namespace) -> bool:
    global FUNCTION, SHA, IMPORTS
    if args.imports:
        import cloudpickle

        IMPORTS = args.imports
        cloudpickle.register_pickle_by_value(sys.modules[__name__])
        FUNCTION = protocol.dumps(imports)
        SHA = protocol.blob_name(FUNCTION)
    n, z = args.batches, args.zygote
    # The first batch of each run starts the subprocess's first job: not timed.
    runs = {
        "same job": asyncio.run(timed_batches(["a"] * (n + 1), zygote=z))[1:],
        "switch after a job": asyncio.run(
            timed_batches(["a", "b"] * (n // 2 + 1), args.pause, zygote=z)
        )[1 : n + 1],
        "switch back to back": asyncio.run(timed_batches(["a", "b"] * (n // 2 + 1), zygote=z))[
            1 : n + 1
        ],
    }
    same = statistics.median(runs["same job"]) * 1e3
    rows = []
    for name, times in runs.items():
        median = statistics.median(times) * 1e3
        p90 = statistics.quantiles(times, n=10)[-1] * 1e3
        rows.append(f"{name:<22}{median:>12.2f}{p90:>10.2f}{median / same:>10.0f}x")
    print_table(f"{'one-task batch':<22}{'median ms':>12}{'p90 ms':>10}{'ratio':>11}", rows)
    warm = statistics.median(runs["switch after a job"]) * 1e3
    cold = statistics.median(runs["switch back to back"]) * 1e3
    print(
        f"\ncost per job switch: {warm - same:.1f} ms once the previous job ran "
        f"{args.pause:g} s, {cold - same:.1f} ms back to back; a job's other tasks on that "
        "slot pay nothing extra"
    )
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=100, help="timed batches of each kind")
    p.add_argument(
        "--pause",
        type=float,
        default=0.5,
        help="seconds between the batches of 'switch after a job' (default: %(default)s)",
    )
    p.add_argument("--zygote", action="store_true", help="fork subprocesses from a zygote")
    p.add_argument("--imports", default="", help="a module each task imports")
    add_run_options(p)
    args = p.parse_args(argv)
    if args.batches < 2:
        p.error("--batches must be at least 2")
    return run_benchmark(lambda: job_switch(args), args.time_limit, ())


if __name__ == "__main__":
    sys.exit(main())
