"""What the benchmarks share: CPU accounting per kind of process, the wait for a quiet
machine, the time limit, stopping what they started, and result tables.

Used by ``benchmarks/end_to_end.py``, ``benchmarks/control_plane.py`` and
``examples/agc/benchmark.py`` (which puts this directory on ``sys.path``). Linux only:
processes and CPU time are read from ``/proc``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

LOADED = 0.10  # other processes' CPU share above which figures are flagged
CLIENT = "this process (client)"  # the role of the benchmark's own process

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# ============================================================================ processes


def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, user+system CPU seconds) for every live (not zombie) process."""
    table: dict[int, tuple[int, float]] = {}
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rfind(b")") + 2 :].split()
            if fields[0] in (b"Z", b"X"):
                continue
            table[int(name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / _CLK_TCK)
    return table


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return " ".join(a.decode(errors="replace") for a in f.read().split(b"\0") if a)
    except OSError:
        return ""


# Command-line markers of processes we started that are not our descendants (Parsl's
# LocalProvider launches its worker pool through a shell that exits, so init adopts it).
ADOPTED_MARKERS: list[str] = []


def descendants() -> list[int]:
    """Every live process this benchmark started: descendants of this process, and of the
    processes whose command line holds one of ``ADOPTED_MARKERS``."""
    me = os.getpid()
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    roots = [me]
    if ADOPTED_MARKERS:
        roots += [
            pid for pid in table if pid != me and any(m in _cmdline(pid) for m in ADOPTED_MARKERS)
        ]
    seen, todo = set(roots), list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    seen.discard(me)
    return sorted(seen)


# (command-line marker, kind of process), first match wins: the task subprocess before
# the worker agent, whose module name is a prefix of its own.
ROLES = (
    ("coffea_hq.worker.child", "hq task process"),
    ("coffea_hq.worker.zygote", "hq zygote + forked task processes"),
    ("coffea_hq.worker", "hq-worker"),
    ("coffea_hq.server", "hq-server"),
    ("valkey", "valkey"),
    ("redis-server", "redis"),
    ("process_worker_pool", "parsl worker pool"),
    ("HTEX int", "parsl interchange"),
    ("interchange", "parsl interchange"),
    ("parsl", "parsl worker"),
    ("resource_tracker", "mp resource tracker"),
    ("loky", "loky worker"),
    ("dask worker", "dask worker"),
    ("distributed", "dask worker"),
    ("multiprocessing", "multiprocessing worker"),
)


def role(pid: int) -> str:
    """A short name for a process of ours (its kind), from its command line."""
    if pid == os.getpid():
        return CLIENT
    text = _cmdline(pid)
    if not text:
        return "gone"
    for needle, kind in ROLES:
        if needle in text:
            return kind
    return Path(text.split()[0]).name


def kill_descendants() -> None:
    """Last resort: SIGKILL every process this benchmark started (by pid)."""
    for pid in reversed(descendants()):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def stop_leftovers(grace: float = 5.0) -> None:
    """At exit: wait up to ``grace`` seconds for what we started to end by itself, then
    SIGKILL what is left, by pid, saying what it was. (multiprocessing's resource tracker,
    started by Dask and loky, ends with this process.)"""
    deadline = time.monotonic() + grace
    while True:
        leftovers = [p for p in descendants() if role(p) != "mp resource tracker"]
        if not leftovers or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if leftovers:
        print(
            f"benchmark: stopping {len(leftovers)} leftover process(es): "
            + ", ".join(f"{pid} ({role(pid)})" for pid in leftovers)
        )
        for pid in leftovers:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


# ============================================================================ CPU


def machine_busy() -> float:
    """CPU seconds the whole machine has spent busy since boot (from /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return float("nan")
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks) - idle) / _CLK_TCK


class CpuMeter:
    """CPU seconds spent by this process and its descendants over a span, by kind of
    process (``spent``), and by every other process on the machine (``foreign``: another
    job's load skews the figures)."""

    def __init__(self) -> None:
        self.start: dict[int, float] = {}
        self.spent: defaultdict[str, float] = defaultdict(float)
        self.foreign = 0.0  # CPU seconds used by processes not ours
        self.wall = 0.0
        self._busy0 = 0.0
        self._t0 = 0.0

    @staticmethod
    def _snapshot() -> dict[int, float]:
        table = _proc_table()
        pids = [os.getpid(), *descendants()]
        return {pid: table[pid][1] for pid in pids if pid in table}

    def __enter__(self) -> CpuMeter:
        self.start = self._snapshot()
        self._busy0, self._t0 = machine_busy(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._snapshot()
        busy = machine_busy() - self._busy0
        self.wall = time.perf_counter() - self._t0
        for pid, cpu in end.items():
            self.spent[role(pid)] += cpu - self.start.get(pid, 0.0)
        # Processes of ours that ended within the span are missed: a small overestimate.
        self.foreign = max(0.0, busy - sum(self.spent.values()))

    @property
    def foreign_share(self) -> float:
        """Other processes' CPU as a share of the machine's capacity over the span."""
        capacity = self.wall * (os.cpu_count() or 1)
        return self.foreign / capacity if capacity > 0 else 0.0

    def per_task_us(self, n: int) -> dict[str, float]:
        ranked = sorted(self.spent.items(), key=lambda kv: -kv[1])
        return {kind: s / n * 1e6 for kind, s in ranked if s > 0}


def wait_for_quiet(max_wait: float, sample: float = 0.5) -> float:
    """Wait (up to ``max_wait`` seconds) until processes not ours leave the CPUs mostly idle:
    on a shared machine another job's load would be measured as ours. Returns that load."""
    deadline = time.monotonic() + max_wait
    said = False
    while True:
        with CpuMeter() as cpu:
            time.sleep(sample)
        if cpu.foreign_share < LOADED or time.monotonic() > deadline:
            if said:
                print(f"  (machine load from other processes now {cpu.foreign_share:.0%})")
            return cpu.foreign_share
        if not said:
            print(
                f"  waiting up to {max_wait:.0f}s for other processes' load "
                f"({cpu.foreign_share:.0%} of the CPUs) to drop",
                flush=True,
            )
            said = True


def warn_if_loaded(shares: list[float]) -> None:
    if shares and max(shares) >= LOADED:
        print(
            f"WARNING: other processes used up to {max(shares):.0%} of the CPUs during the "
            "measurements: the figures above are pessimistic; rerun on a quiet machine."
        )


# ============================================================================ time limit


class BenchmarkTimeout(Exception):
    pass


def hard_stop_after(seconds: float, why: str) -> threading.Timer:
    """A daemon timer that, unless cancelled, kills our children and exits (code 124):
    for cleanup that hangs."""

    def hard_stop() -> None:
        print(f"\nbenchmark: {why}; killing children", flush=True)
        kill_descendants()
        os._exit(124)

    timer = threading.Timer(seconds, hard_stop)
    timer.daemon = True
    timer.start()
    return timer


@contextlib.contextmanager
def watchdog(seconds: float, flag: str = "--time-limit") -> Iterator[None]:
    """Raise BenchmarkTimeout in the main thread after ``seconds`` (so ``finally`` blocks
    clean up); if cleanup itself hangs for another minute, kill our children and exit."""

    def interrupt(signum: int, frame: Any) -> None:
        raise BenchmarkTimeout(f"benchmark exceeded {flag} {seconds:.0f}s")

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    hard = hard_stop_after(seconds + 60, f"cleanup hung past {seconds + 60:.0f}s")
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        hard.cancel()


# ============================================================================ options


def add_run_options(p: argparse.ArgumentParser) -> None:
    """``--wait-quiet`` and ``--time-limit``, as every benchmark here takes them."""
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=30.0,
        help="before each timed run, wait up to this many seconds for other processes' CPU "
        "load to drop below 10%% (0: don't wait; the load is reported either way)",
    )
    p.add_argument(
        "--time-limit",
        type=float,
        default=900.0,
        help="seconds after which the benchmark stops, cleans up and fails",
    )


# ============================================================================ reporting


def print_table(head: str, rows: list[str]) -> None:
    """A result table: its header line, a rule as wide, then its rows."""
    print(head)
    print("-" * len(head))
    for row in rows:
        print(row)


def describe_machine(modules: tuple[str, ...]) -> None:
    """One line: CPUs, architecture, Python, the versions of ``modules``, our git tree."""
    versions = []
    for module in ("coffea_hq", *modules):
        with contextlib.suppress(Exception):
            mod = __import__(module)
            versions.append(f"{module} {getattr(mod, '__version__', '?')}")
    rev = ""
    with contextlib.suppress(Exception):
        rev = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    print(
        f"machine: {os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}"
        f"; {', '.join(versions)}" + (f"; coffea-hq tree {rev}" if rev else "")
    )


def run_benchmark(body: Callable[[], bool], time_limit: float, modules: tuple[str, ...]) -> int:
    """A benchmark script's exit code: 0 if ``body()`` met its targets, 1 if not, 3 if the
    watchdog stopped it; whatever it started is stopped on the way out."""
    describe_machine(modules)
    try:
        with watchdog(time_limit):
            met = body()
    except BenchmarkTimeout as e:
        print(f"\nbenchmark: {e}", file=sys.stderr)
        return 3
    finally:
        stop_leftovers()  # everything should be stopped by now: don't leave strays
    return 0 if met else 1
