"""Per-task environments: what a pip environment costs on first use, on a cached start,
and per task, against the worker's own environment.

A LocalCluster (one worker, one slot, its own environment cache) runs, each --repeats
times:

- *default start*: a one-task job in the worker's own environment (a fresh subprocess);
- *first use*: a one-task job naming a pip environment never seen before (uv venv + uv
  pip install from a local wheel directory, offline), so the difference is the build;
- *cached start*: a one-task job naming an environment already built;
- *per task*: jobs of --tasks trivial tasks, default vs environment (the foreign runner
  decompresses payloads in the worker and compresses results after).

    python benchmarks/environments.py --repeats 5 --tasks 500
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cloudpickle
from harness import REPO, add_run_options, print_table, run_benchmark, wait_for_quiet

from coffea_hq import Client, Environment, LocalCluster
from coffea_hq.remote import RemoteWarning

sys.path.insert(0, str(REPO))
from tests.util import make_wheel  # noqa: E402


def _wheels(directory: Path, repeats: int) -> None:
    source = Path(cloudpickle.__file__).parent
    files = {f"cloudpickle/{p.relative_to(source)}": p.read_bytes() for p in source.rglob("*.py")}
    make_wheel(directory, "cloudpickle", cloudpickle.__version__, files)
    for i in range(repeats + 1):  # one version per fresh environment
        make_wheel(directory, "hqbench", f"1.{i}", {"hqbench/__init__.py": b"VALUE = 1\n"})


def _timed(client: Client, n: int, environment: Environment | None) -> float:
    def task(x: int) -> int:
        return x + 1

    start = time.perf_counter()
    out = client.map(task, range(n), environment=environment).result(timeout=600)
    seconds = time.perf_counter() - start
    if out != [x + 1 for x in range(n)]:
        raise RuntimeError("wrong results")
    return seconds


def environments(args: argparse.Namespace) -> bool:
    with tempfile.TemporaryDirectory(prefix="hq-bench-envs-") as tmp:
        wheels, cache = Path(tmp) / "wheels", Path(tmp) / "cache"
        wheels.mkdir()
        _wheels(wheels, args.repeats)

        def env(i: int) -> Environment:
            return Environment.pip(
                ["cloudpickle", f"hqbench==1.{i}"], find_links=str(wheels), index=False
            )

        cluster_args: dict[str, Any] = {"worker_args": ("--env-cache", str(cache))}
        with (
            LocalCluster(workers=1, slots=1, **cluster_args) as cluster,
            Client(cluster.url) as client,
        ):
            _timed(client, 1, None)  # warm up: the worker's first function
            _timed(client, 1, env(args.repeats))  # and its first environment
            rows: dict[str, list[float]] = {
                "default start": [],
                "first use": [],
                "cached start": [],
            }
            per_task: dict[str, list[float]] = {"default": [], "environment": []}
            for i in range(args.repeats):
                wait_for_quiet(args.wait_quiet)
                one = _timed(client, 1, None)
                rows["default start"].append(one)
                rows["first use"].append(_timed(client, 1, env(i)))
                cached = _timed(client, 1, env(i))
                rows["cached start"].append(cached)
                # Per task: a long job less a one-task job (its start), per extra task.
                n = args.tasks
                per_task["default"].append((_timed(client, n, None) - one) / (n - 1))
                per_task["environment"].append((_timed(client, n, env(i)) - cached) / (n - 1))
    base = statistics.median(rows["default start"])
    table = []
    for name, times in rows.items():
        median = statistics.median(times)
        table.append(f"{name:<16}{median * 1e3:>12.0f}{(median - base) * 1e3:>14.0f}")
    print_table(f"{'one-task job':<16}{'median ms':>12}{'vs default':>14}", table)
    print()
    default = statistics.median(per_task["default"])
    mine = statistics.median(per_task["environment"])
    print_table(
        f"{'per task':<16}{'median ms':>12}{'ratio':>14}",
        [
            f"{'default':<16}{default * 1e3:>12.2f}{1:>13.2f}x",
            f"{'environment':<16}{mine * 1e3:>12.2f}{mine / default:>13.2f}x",
        ],
    )
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (default: %(default)s)")
    p.add_argument("--tasks", type=int, default=500, help="tasks per per-task job")
    add_run_options(p)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.tasks < 2:
        p.error("--repeats must be at least 1 and --tasks at least 2")
    # Versions differ from this session's (the environment has no coffea): warned per job.
    warnings.filterwarnings("ignore", category=RemoteWarning)
    body: Callable[[], bool] = lambda: environments(args)  # noqa: E731
    return run_benchmark(body, args.time_limit, ())


if __name__ == "__main__":
    sys.exit(main())
