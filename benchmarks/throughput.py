#!/usr/bin/env python
"""Throughput of coffea-hq against Dask and Parsl, and of its control plane alone.

End-to-end mode (the default) runs ``--tasks`` no-op tasks (a module-level function
returning its argument) through three systems on this machine, each with two worker
processes of one slot/thread:

- coffea-hq: ``LocalCluster(workers=2, slots=1)`` + ``Client.map(...).result()``
- Dask: ``distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True)``
  + ``client.map`` + ``client.gather``
- Parsl: ``HighThroughputExecutor`` (``max_workers_per_node=2``, ``LocalProvider``, one
  block, loopback only, run directory in a temporary directory) + a ``python_app``

Startup (cluster start until a one-task probe returns) is timed apart; then a warm-up
run, then ``--repeat`` timed runs whose median is reported. Every run's results are
checked against the inputs. The target: coffea-hq >= 10x the faster of Dask and Parsl.

``--control-plane`` measures the queue alone, without any execution: an embedded
Valkey and a real ``hq-server`` process, driven over HTTP by this process acting as
client and workers with the protocol's own pieces (Transport, pack/unpack, routes):
submit -> lease -> complete ("ok") -> results, timed per phase, with Redis commands
per task from ``INFO commandstats`` (which counts the commands run inside Lua scripts
as well as the EVALSHA calls) and the CPU time each process spent. A second pass runs
the same cycle with several concurrent "workers" on separate connections. The
target: >= 50,000 tasks/s for the whole cycle.

    python benchmarks/throughput.py                    # end to end, 20,000 tasks x 3
    python benchmarks/throughput.py --control-plane    # the queue alone
    python benchmarks/throughput.py --all              # both

Everything started is stopped in ``finally`` blocks; a watchdog (``--time-limit``)
interrupts a run that hangs, cleans up, and as a last resort kills this process's
children by pid and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

HQ_TARGET_RATIO = 10.0
CONTROL_PLANE_TARGET = 50_000.0
WARMUP_TASKS = 2_000


def noop(x: Any) -> Any:
    """The task every system runs: return the argument unchanged."""
    return x


# ============================================================================ process CPU


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


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


def _role(pid: int) -> str:
    """A short name for a process of ours, from its command line."""
    text = _cmdline(pid)
    if not text:
        return "gone"
    for needle, role in (
        ("coffea_hq.worker.child", "hq task process"),
        ("coffea_hq.worker", "hq-worker"),
        ("coffea_hq.server", "hq-server"),
        ("valkey", "valkey"),
        ("redis-server", "redis"),
        ("process_worker_pool", "parsl worker pool"),
        ("HTEX int", "parsl interchange"),
        ("parsl", "parsl worker"),
        ("resource_tracker", "mp resource tracker"),
        ("dask worker", "dask worker"),
        ("multiprocessing", "multiprocessing worker"),
    ):
        if needle in text:
            return role
    return Path(text.split()[0]).name


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
    """CPU seconds spent by this process and each of its descendants over a span, and by
    every other process on the machine (``foreign``: another job's load skews the figures)."""

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
        me = os.getpid()
        for pid, cpu in end.items():
            role = "this process (client)" if pid == me else _role(pid)
            self.spent[role] += cpu - self.start.get(pid, 0.0)
        # Processes of ours that ended within the span are missed: a small overestimate.
        self.foreign = max(0.0, busy - sum(self.spent.values()))

    @property
    def foreign_share(self) -> float:
        """Other processes' CPU as a share of the machine's capacity over the span."""
        capacity = self.wall * (os.cpu_count() or 1)
        return self.foreign / capacity if capacity > 0 else 0.0

    def per_task_us(self, n: int) -> dict[str, float]:
        ranked = sorted(self.spent.items(), key=lambda kv: -kv[1])
        return {role: s / n * 1e6 for role, s in ranked if s > 0}


LOADED = 0.10  # other processes' CPU share above which figures are flagged


def wait_for_quiet(max_wait: float, sample: float = 0.5) -> None:
    """Wait (up to ``max_wait`` seconds) until processes not ours leave the CPUs mostly idle:
    on a shared machine another job's load would be measured as ours."""
    deadline = time.monotonic() + max_wait
    said = False
    while True:
        with CpuMeter() as cpu:
            time.sleep(sample)
        if cpu.foreign_share < LOADED or time.monotonic() > deadline:
            if said:
                print(f"  (machine load from other processes now {cpu.foreign_share:.0%})")
            return
        if not said:
            print(
                f"  waiting up to {max_wait:.0f}s for other processes' load "
                f"({cpu.foreign_share:.0%} of the CPUs) to drop",
                flush=True,
            )
            said = True


def _warn_if_loaded(shares: list[float]) -> None:
    if shares and max(shares) >= LOADED:
        print(
            f"WARNING: other processes used up to {max(shares):.0%} of the CPUs during the "
            "measurements: the figures above are pessimistic; rerun on a quiet machine."
        )


def kill_descendants() -> None:
    """Last resort: SIGKILL every process this benchmark started (by pid)."""
    for pid in reversed(descendants()):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


# ============================================================================ watchdog


class BenchmarkTimeout(Exception):
    pass


@contextlib.contextmanager
def watchdog(seconds: float) -> Iterator[None]:
    """Raise BenchmarkTimeout in the main thread after ``seconds`` (so ``finally`` blocks
    clean up); if cleanup itself hangs for another minute, kill our children and exit."""

    def interrupt(signum: int, frame: Any) -> None:
        raise BenchmarkTimeout(f"benchmark exceeded --time-limit {seconds:.0f}s")

    def hard_stop() -> None:
        print(f"\nbenchmark: cleanup hung past {seconds + 60:.0f}s; killing children", flush=True)
        kill_descendants()
        os._exit(124)

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    hard = threading.Timer(seconds + 60, hard_stop)
    hard.daemon = True
    hard.start()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        hard.cancel()


# ============================================================================ end to end


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


Runner = Callable[[int], list[Any]]


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
def hq_system(timeout: float) -> Iterator[Runner]:
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
def dask_system(timeout: float) -> Iterator[Runner]:
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
def parsl_system(timeout: float) -> Iterator[Runner]:
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
    n, repeat = args.tasks or 20_000, args.repeat
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
    print(head)
    print("-" * len(head))
    for r in results:
        runs = " ".join(f"{x:,.0f}" for x in r.rates(n)) or "-"
        status = "FAILED: " + r.error if r.error else ("correct" if r.correct else "WRONG")
        load = f"{max(r.foreign):.0%}" if r.foreign else "-"
        print(
            f"{r.name:<11} {r.startup:>9.2f} {r.median_rate(n):>9,.0f}  {runs:<26} "
            f"{load:>10}  {status}"
        )
    _warn_if_loaded([f for r in results for f in r.foreign])
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


# ============================================================================ control plane


@dataclass
class Phase:
    name: str
    seconds: float = 0.0
    requests: int = 0
    commands: Counter[str] = field(default_factory=Counter)  # calls by command
    usec: Counter[str] = field(default_factory=Counter)  # Redis time by command
    cpu: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))  # CPU s
    foreign: float = 0.0  # other processes' share of the CPUs meanwhile
    releases: int = 0  # tasks leased again after a lease expired (lost by the server)


def _add(into: defaultdict[str, float], more: dict[str, float]) -> None:
    for key, value in more.items():
        into[key] += value


class RedisStats:
    """INFO commandstats of the store, diffed around a span."""

    def __init__(self, url: str) -> None:
        import redis

        self.redis = redis.Redis.from_url(url)

    def snapshot(self) -> dict[str, tuple[int, int]]:
        stats = self.redis.info("commandstats")
        return {
            k.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"])) for k, v in stats.items()
        }

    def diff(self, before: Any, after: Any, phase: Phase) -> None:
        for name, (calls, usec) in after.items():
            c0, u0 = before.get(name, (0, 0))
            if name == "info" or calls == c0:  # our own probes are not the queue's cost
                continue
            phase.commands[name] += calls - c0
            phase.usec[name] += usec - u0

    def close(self) -> None:
        self.redis.close()


class ControlPlane:
    """An embedded Valkey and one real hq-server process, started and always stopped."""

    def __init__(self, profile_dir: str | None) -> None:
        from coffea_hq.embedded import EmbeddedRedis, free_port

        self.redis = EmbeddedRedis()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server: subprocess.Popen[bytes] | None = None
        self.logdir = tempfile.mkdtemp(prefix="hq-bench-server-")
        self.profile_dir = profile_dir
        self._log: Any = None

    def __enter__(self) -> ControlPlane:
        from coffea_hq.local import wait_healthy

        try:
            self.redis.start()
            argv = [sys.executable]
            if self.profile_dir:
                argv += ["-m", "cProfile", "-o", str(Path(self.profile_dir) / "server.prof")]
            argv += [
                "-m",
                "coffea_hq.server",
                "--redis",
                self.redis.url,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "WARNING",
            ]
            self._log = open(Path(self.logdir) / "server.log", "wb")  # noqa: SIM115
            self.server = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                cwd=self.logdir,  # import coffea_hq as this process does, not from the cwd
            )
            wait_healthy(self.url, self.server, 30.0)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        proc, self.server = self.server, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.redis.stop()
        if self._log is not None:
            self._log.close()
        log = Path(self.logdir) / "server.log"
        if log.exists() and log.stat().st_size:  # it logs warnings and errors only
            print(f"hq-server said (log tail):\n{log.read_text(errors='replace')[-1500:]}")
        shutil.rmtree(self.logdir, ignore_errors=True)


class Driver:
    """Speaks the protocol as a client and as workers would, with the shared pieces."""

    def __init__(self, url: str, batch: int) -> None:
        from coffea_hq.transport import Transport

        self.url = url
        self.batch = batch
        self.client = Transport(url, retry_for=30.0)
        self.requests = 0
        self.releases = 0  # tasks leased with attempt > 1: a lease was lost and expired

    async def close(self) -> None:
        await self.client.close()

    async def create_job(self) -> str:
        import cloudpickle

        from coffea_hq import protocol

        blob = protocol.compress(cloudpickle.dumps(noop))
        sha = protocol.blob_name(blob)
        await self.client.call(
            "PUT", protocol.BLOB.format(sha=sha), body=blob, content_type=protocol.BLOB_CONTENT_TYPE
        )
        job = "bench-" + uuid.uuid4().hex[:16]
        await self.client.call(
            "PUT",
            protocol.JOB.format(job=job),
            json_body={"function": sha, "max_attempts": 3, "fail_fast": True, "label": "bench"},
        )
        return job

    async def submit(self, job: str, payloads: list[bytes], in_flight: int) -> None:
        from coffea_hq import protocol

        limit = asyncio.Semaphore(in_flight)

        async def one(start: int) -> None:
            chunk = payloads[start : start + self.batch]
            header = {"tasks": [str(i) for i in range(start, start + len(chunk))]}
            async with limit:
                reply = await self.client.call(
                    "POST",
                    protocol.JOB_TASKS.format(job=job),
                    body=protocol.pack(header, chunk),
                    content_type=protocol.FRAMES_CONTENT_TYPE,
                )
            self.requests += 1
            if reply.json()["added"] != len(chunk):
                raise AssertionError(f"submit added {reply.json()} of {len(chunk)} tasks")

        await asyncio.gather(*(one(s) for s in range(0, len(payloads), self.batch)))
        await self.client.call(
            "POST", protocol.JOB_SEAL.format(job=job), json_body={"total": len(payloads)}
        )
        self.requests += 1

    async def lease(self, transport: Any, worker: str, wait: float) -> list[list[Any]]:
        from coffea_hq import protocol

        reply = await transport.call(
            "POST",
            protocol.LEASE,
            json_body={"worker": worker, "max": self.batch, "wait": wait},
        )
        self.requests += 1
        header, _payloads = reply.frames()
        self.releases += sum(1 for t in header["tasks"] if t[2] > 1)
        return list(header["tasks"])

    async def complete(
        self, transport: Any, worker: str, tasks: list[list[Any]], values: list[bytes]
    ) -> None:
        from coffea_hq import protocol

        header = {
            "worker": worker,
            "items": [[job, task, attempt, "ok", None] for job, task, attempt, _ in tasks],
        }
        body = protocol.pack(header, [values[int(t[1])] for t in tasks])
        reply = await transport.call(
            "POST", protocol.COMPLETE, body=body, content_type=protocol.FRAMES_CONTENT_TYPE
        )
        self.requests += 1
        statuses = reply.json()["items"]
        if any(s != "accepted" for s in statuses):
            raise AssertionError(f"completion not accepted: {Counter(statuses)}")

    async def results(self, job: str, wait: float) -> tuple[list[Any], list[memoryview]]:
        """Read every result with after/ack cursors until the job's end, then delete it."""
        from coffea_hq import protocol

        cursor, items, parts = "0", [], []
        while True:
            reply = await self.client.call(
                "GET",
                protocol.JOB_RESULTS.format(job=job),
                params={"after": cursor, "ack": cursor, "wait": str(wait)},
            )
            self.requests += 1
            header, got = reply.frames()
            cursor = header["cursor"]
            items += header["items"]
            parts += got
            if header.get("end"):
                break
        await self.client.call("DELETE", protocol.JOB.format(job=job), accept=(200, 404))
        self.requests += 1
        return items, parts


def _check_results(n: int, items: list[Any], parts: list[memoryview]) -> str:
    from coffea_hq import protocol

    seen = bytearray(n)
    for (task, outcome), part in zip(items, parts, strict=True):
        i = int(task)
        if outcome != "ok" or protocol.loads(part) != i:
            return f"task {task}: {outcome} {bytes(part)[:40]!r}"
        seen[i] += 1
    if any(c != 1 for c in seen):
        return f"{seen.count(0)} results missing, {sum(c > 1 for c in seen)} duplicated"
    return ""


def _inputs(n: int) -> tuple[list[bytes], list[bytes]]:
    """The client's pickled arguments and the workers' pickled return values."""
    from coffea_hq import protocol

    return [protocol.dumps((i,)) for i in range(n)], [protocol.dumps(i) for i in range(n)]


async def phased_cycle(
    cp: ControlPlane, stats: RedisStats, n: int, batch: int
) -> tuple[list[Phase], str]:
    """One connection, one phase after another: submit all, lease all, complete all, read all."""
    payloads, values = _inputs(n)
    driver = Driver(cp.url, batch)
    phases: list[Phase] = []
    leased: list[list[Any]] = []
    try:
        job = await driver.create_job()

        async def timed(name: str, work: Callable[[], Any]) -> Any:
            phase = Phase(name)
            before = stats.snapshot()
            r0 = driver.requests
            with CpuMeter() as cpu:
                t0 = time.perf_counter()
                out = await work()
                phase.seconds = time.perf_counter() - t0
            _add(phase.cpu, cpu.spent)
            phase.foreign = cpu.foreign_share
            stats.diff(before, stats.snapshot(), phase)
            phase.requests = driver.requests - r0
            phases.append(phase)
            return out

        async def lease_all() -> None:
            while len(leased) < n:
                got = await driver.lease(driver.client, "bench-worker-0", 0.0)
                if not got:
                    raise AssertionError(f"queue empty after leasing {len(leased)} of {n}")
                leased.extend(got)

        async def complete_all() -> None:
            for start in range(0, len(leased), batch):
                chunk = leased[start : start + batch]
                await driver.complete(driver.client, "bench-worker-0", chunk, values)

        await timed("submit", lambda: driver.submit(job, payloads, in_flight=1))
        await timed("lease", lease_all)
        await timed("complete", complete_all)
        items, parts = await timed("results", lambda: driver.results(job, wait=0.0))
        problem = _check_results(n, items, parts)
    finally:
        await driver.close()
    return phases, problem


async def concurrent_cycle(
    cp: ControlPlane, stats: RedisStats, n: int, batch: int, workers: int
) -> tuple[Phase, str]:
    """Everything at once, as in a real run: a client submitting (2 requests in flight) and
    streaming results, ``workers`` workers each on its own connection leasing and completing."""
    from coffea_hq.transport import Transport

    payloads, values = _inputs(n)
    driver = Driver(cp.url, batch)
    transports = [Transport(cp.url, retry_for=30.0) for _ in range(workers)]
    phase = Phase(f"concurrent, {workers} workers")
    completed = 0
    try:
        job = await driver.create_job()

        async def work(w: int) -> None:
            nonlocal completed
            name = f"bench-worker-{w}"
            while completed < n:
                tasks = await driver.lease(transports[w], name, 0.5)
                if tasks:
                    await driver.complete(transports[w], name, tasks, values)
                    completed += len(tasks)

        before = stats.snapshot()
        with CpuMeter() as cpu:
            t0 = time.perf_counter()
            worker_tasks = [asyncio.create_task(work(w)) for w in range(workers)]
            reader = asyncio.create_task(driver.results(job, wait=5.0))
            await driver.submit(job, payloads, in_flight=2)
            items, parts = await reader
            phase.seconds = time.perf_counter() - t0
        await asyncio.gather(*worker_tasks)
        _add(phase.cpu, cpu.spent)
        phase.foreign = cpu.foreign_share
        stats.diff(before, stats.snapshot(), phase)
        phase.requests = driver.requests
        phase.releases = driver.releases
        problem = _check_results(n, items, parts)
    finally:
        for t in transports:
            await t.close()
        await driver.close()
    return phase, problem


def _phase_row(p: Phase, n: int) -> str:
    calls = sum(p.commands.values())
    evalsha = p.commands.get("evalsha", 0) + p.commands.get("eval", 0)
    script_us = p.usec.get("evalsha", 0) + p.usec.get("eval", 0)
    cpu = " ".join(f"{p.cpu[k] / n * 1e6:6.1f}" for k in CPU_COLUMNS)
    return (
        f"{p.name:<24} {p.seconds:>7.3f} {n / p.seconds:>9,.0f} {p.requests:>5} "
        f"{calls / n:>8.2f} {evalsha:>7} {script_us / n:>7.2f}  {cpu} {p.foreign:>6.0%}"
    )


CPU_COLUMNS = ("this process (client)", "hq-server", "valkey")


def _print_commands(p: Phase, n: int, top: int = 14) -> None:
    print(f"  Redis commands in '{p.name}' (calls per task, usec per call; EVALSHA's usec")
    print("  includes the commands it runs):")
    for name, calls in p.commands.most_common(top):
        print(
            f"    {name:<22} {calls:>9,} calls {calls / n:>7.3f}/task "
            f"{p.usec[name] / max(calls, 1):>9.2f} us/call {p.usec[name] / n:>7.2f} us/task"
        )


def control_plane(args: argparse.Namespace) -> bool:
    n = args.tasks or 100_000
    batch = args.batch
    repeat = args.repeat
    profile_dir = tempfile.mkdtemp(prefix="hq-bench-prof-") if args.profile_server else None
    print(
        f"\n== control plane: {n:,} tasks, batches of {batch}, embedded Valkey + one hq-server, "
        f"no execution; median of {repeat}"
    )
    cycles: list[list[Phase]] = []
    concurrent: list[Phase] = []
    problems: list[str] = []
    try:
        with ControlPlane(profile_dir) as cp:
            stats = RedisStats(cp.redis.url)
            try:
                # Warm-up: script loading, connection pools, the server's first requests.
                asyncio.run(phased_cycle(cp, stats, min(n, 5000), batch))
                for _ in range(repeat):
                    wait_for_quiet(args.wait_quiet)
                    phases, problem = asyncio.run(phased_cycle(cp, stats, n, batch))
                    cycles.append(phases)
                    problems.append(problem)
                    total = sum(p.seconds for p in phases)
                    print(f"  phased cycle: {n / total:,.0f} tasks/s ({total:.2f}s)", flush=True)
                for _ in range(repeat if args.workers else 0):
                    wait_for_quiet(args.wait_quiet)
                    phase, problem = asyncio.run(
                        concurrent_cycle(cp, stats, n, batch, args.workers)
                    )
                    concurrent.append(phase)
                    problems.append(problem)
                    print(
                        f"  concurrent cycle ({args.workers} workers): "
                        f"{n / phase.seconds:,.0f} tasks/s ({phase.seconds:.2f}s)"
                        + (
                            f"; {phase.releases} task(s) leased again after their lease "
                            "expired unreported (a lease lost between server and worker)"
                            if phase.releases
                            else ""
                        ),
                        flush=True,
                    )
            finally:
                stats.close()
        if profile_dir:
            _print_profile(Path(profile_dir) / "server.prof")
    finally:
        if profile_dir:
            shutil.rmtree(profile_dir, ignore_errors=True)

    # Medians: pick the run whose whole cycle is the median one, and report its phases.
    def cycle_time(phases: list[Phase]) -> float:
        return sum(p.seconds for p in phases)

    median_cycle = sorted(cycles, key=cycle_time)[len(cycles) // 2]
    whole = Phase("whole cycle (phased)")
    for p in median_cycle:
        whole.seconds += p.seconds
        whole.requests += p.requests
        whole.commands.update(p.commands)
        whole.usec.update(p.usec)
        _add(whole.cpu, p.cpu)
        whole.foreign += p.foreign * p.seconds
    whole.foreign /= whole.seconds
    print(f"\n== control plane: {n:,} tasks (median run of {repeat}; one connection per role)")
    print(
        "  cmd/task: Redis commands per task, those run inside scripts included; script us: "
        "EVALSHA time\n  per task; CPU us/task of this process (client and workers), hq-server "
        "and valkey;\n  other: CPU share used by processes not ours (another job's load skews "
        "the figures)"
    )
    head = (
        f"{'phase':<24} {'seconds':>7} {'tasks/s':>9} {'reqs':>5} {'cmd/task':>8} "
        f"{'EVALSHA':>7} {'script':>7}  {'client':>6} {'server':>6} {'valkey':>6} {'other':>6}"
    )
    print(head)
    print("-" * len(head))
    for p in [*median_cycle, whole]:
        print(_phase_row(p, n))
    median_conc = None
    if concurrent:
        median_conc = sorted(concurrent, key=lambda p: p.seconds)[len(concurrent) // 2]
        print(_phase_row(median_conc, n))
    print()
    _print_commands(whole, n)
    print(
        "\n  phased whole-cycle tasks/s per run: "
        + ", ".join(f"{n / cycle_time(c):,.0f}" for c in cycles)
    )
    if concurrent:
        print(
            "  concurrent tasks/s per run: "
            + ", ".join(f"{n / p.seconds:,.0f}" for p in concurrent)
        )
    stalled = [p for p in concurrent if p.releases]
    if stalled:
        print(
            f"NOTE: {len(stalled)} concurrent run(s) re-leased {sum(p.releases for p in stalled)} "
            "task(s) whose lease the server granted but no worker received: they waited for "
            "the lease timeout (a lost-lease race in the server's long-poll dispatcher)."
        )
    _warn_if_loaded([p.foreign for c in cycles for p in c] + [p.foreign for p in concurrent])
    bad = [p for p in problems if p]
    if bad:
        print(f"  RESULTS WRONG: {bad[0]}")
    rate = n / whole.seconds
    best = max(rate, n / median_conc.seconds) if median_conc else rate
    met = best >= CONTROL_PLANE_TARGET and not bad
    print(
        f"SUMMARY control plane: {rate:,.0f} tasks/s phased"
        + (f", {n / median_conc.seconds:,.0f} tasks/s concurrent" if median_conc else "")
        + f"; {sum(whole.commands.values()) / n:.2f} Redis commands/task; results "
        + ("correct" if not bad else "WRONG")
        + f"; target >= {CONTROL_PLANE_TARGET:,.0f} tasks/s: {'MET' if met else 'NOT MET'}"
    )
    return met


def _print_profile(path: Path, top: int = 30) -> None:
    import pstats

    if not path.exists():
        print(f"(no server profile at {path}: did hq-server exit cleanly?)")
        return
    print(f"\n== hq-server cProfile (all runs including warm-up), top {top} by own time")
    stats = pstats.Stats(str(path))
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)


# ============================================================================ main


def _describe_machine() -> None:
    versions = []
    for module in ("coffea_hq", "aiohttp", "redis", "dask", "distributed", "parsl"):
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--tasks",
        type=int,
        default=None,
        help="tasks per run (default: 20,000 end to end, 100,000 for the control plane)",
    )
    p.add_argument("--repeat", type=int, default=3, help="timed runs per system (median)")
    p.add_argument("--skip-dask", action="store_true", help="leave Dask out")
    p.add_argument("--skip-parsl", action="store_true", help="leave Parsl out")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--control-plane", action="store_true", help="measure the queue alone (no execution)"
    )
    mode.add_argument("--all", action="store_true", help="end to end, then the control plane")
    p.add_argument(
        "--batch", type=int, default=4096, help="tasks per submit/lease/complete request"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=4,
        help="concurrent workers in the control plane's concurrent pass (0: skip it)",
    )
    p.add_argument(
        "--profile-server",
        action="store_true",
        help="run hq-server under cProfile in the control-plane mode and print the top functions",
    )
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
    args = p.parse_args(argv)
    if args.tasks is not None and args.tasks < 1:
        p.error("--tasks must be positive")
    if args.repeat < 1:
        p.error("--repeat must be positive")
    if not 1 <= args.batch <= 4096:
        p.error("--batch must be from 1 to 4096 (the server's lease limit)")
    if args.workers < 0:
        p.error("--workers must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _describe_machine()
    results: list[bool] = []
    try:
        with watchdog(args.time_limit):
            if not args.control_plane:
                results.append(end_to_end(args))
            if args.control_plane or args.all:
                results.append(control_plane(args))
    except BenchmarkTimeout as e:
        print(f"\nbenchmark: {e}", file=sys.stderr)
        return 3
    finally:
        # Everything should be stopped by now; don't leave strays behind. (multiprocessing's
        # resource tracker, started by Dask, ends with this process.)
        deadline = time.monotonic() + 5.0
        while True:
            leftovers = [p for p in descendants() if _role(p) != "mp resource tracker"]
            if not leftovers or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if leftovers:
            print(
                f"benchmark: stopping {len(leftovers)} leftover process(es): "
                + ", ".join(f"{pid} ({_role(pid)})" for pid in leftovers)
            )
            for pid in leftovers:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
