#!/usr/bin/env python
"""Throughput of coffea-hq's control plane alone, without any execution.

An embedded Valkey and a real ``hq-server`` process, driven over HTTP by this process
acting as client and workers through ``coffea_hq.api`` (the calls Client and hq-worker
make): submit -> lease -> complete ("ok") -> results, timed per phase, with Redis
commands per task from ``INFO commandstats`` (which counts the commands run inside Lua
scripts as well as the EVALSHA calls) and the CPU time each process spent. A second pass
runs the same cycle with several concurrent "workers" on separate connections. The
target: >= 50,000 tasks/s for the whole cycle.

    python benchmarks/control_plane.py                            # 100,000 tasks x 3
    python benchmarks/control_plane.py --tasks 2000 --repeat 1    # a quick check
    python benchmarks/control_plane.py --profile-server           # where the server's time goes

``benchmarks/end_to_end.py`` runs tasks through coffea-hq, Dask and Parsl. Everything
started is stopped in ``finally`` blocks; a watchdog (``--time-limit``) interrupts a run
that hangs, cleans up, and as a last resort kills this process's children by pid and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import (
    CLIENT,
    CpuMeter,
    add_run_options,
    print_table,
    run_benchmark,
    wait_for_quiet,
    warn_if_loaded,
)

CONTROL_PLANE_TARGET = 50_000.0


def noop(x: Any) -> Any:
    """The job's function (never run here: no worker executes anything)."""
    return x


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

    def __init__(self, profile_dir: str | None, auth: bool = False) -> None:
        from coffea_hq.embedded import EmbeddedRedis, free_port

        self.auth = auth  # hq-server --auth, with a user token and a worker token
        self.user_token: str | None = None
        self.worker_token: str | None = None

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
                *(["--auth"] if self.auth else []),
            ]
            if self.auth:
                import redis
                from coffea_hq.server import tokens
                from coffea_hq.server.keys import Keys

                from coffea_hq.protocol import Role

                store = redis.Redis.from_url(self.redis.url)
                try:
                    make = tokens.create
                    self.user_token = make(store, Keys(), user="bench", role=Role.USER)[0]
                    self.worker_token = make(store, Keys(), user="pool", role=Role.WORKER)[0]
                finally:
                    store.close()
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
        from coffea_hq.local import terminate

        proc, self.server = self.server, None
        if proc is not None:
            terminate([proc], 20)
        self.redis.stop()
        if self._log is not None:
            self._log.close()
        log = Path(self.logdir) / "server.log"
        if log.exists() and log.stat().st_size:  # it logs warnings and errors only
            print(f"hq-server said (log tail):\n{log.read_text(errors='replace')[-1500:]}")
        shutil.rmtree(self.logdir, ignore_errors=True)


class Driver:
    """Acts as the client and as workers would, through coffea_hq.api (the same calls)."""

    def __init__(self, cp: ControlPlane, batch: int) -> None:
        from coffea_hq.api import API

        self.url = cp.url
        self.batch = batch
        self.client = API(cp.url, retry_for=30.0, token=cp.user_token)
        self.worker = API(cp.url, retry_for=30.0, token=cp.worker_token)
        self.requests = 0
        self.releases = 0  # tasks leased with attempt > 1: a lease was lost and expired

    async def close(self) -> None:
        await self.client.close()
        await self.worker.close()

    async def create_job(self) -> str:
        import cloudpickle

        from coffea_hq import messages, protocol

        sha = await self.client.put_blob(protocol.compress(cloudpickle.dumps(noop)))
        job = "bench-" + uuid.uuid4().hex[:16]
        await self.client.create_job(job, messages.CreateJob(function=sha, label="bench"))
        return job

    async def submit(self, job: str, payloads: list[bytes], in_flight: int) -> None:
        from coffea_hq import messages

        limit = asyncio.Semaphore(in_flight)

        async def one(start: int) -> None:
            chunk = payloads[start : start + self.batch]
            header = messages.SubmitTasks(tasks=[str(i) for i in range(start, start + len(chunk))])
            async with limit:
                added = await self.client.submit_tasks(job, header, chunk)
            self.requests += 1
            if added != len(chunk):
                raise AssertionError(f"submit added {added} of {len(chunk)} tasks")

        await asyncio.gather(*(one(s) for s in range(0, len(payloads), self.batch)))
        await self.client.seal(job, messages.Seal(total=len(payloads)))
        self.requests += 1

    async def start_worker(self, api: Any, worker: str) -> None:
        """A first heartbeat, as a real worker sends: the server fills parked lease
        requests only of workers it hears from."""
        from coffea_hq import messages

        await api.heartbeat(messages.Heartbeat(worker=worker, slots=1))
        self.requests += 1

    async def lease(self, api: Any, worker: str, wait: float) -> list[Any]:
        from coffea_hq import messages

        reply, _payloads = await api.lease(
            messages.LeaseRequest(worker=worker, max=self.batch, wait=wait)
        )
        self.requests += 1
        self.releases += sum(1 for t in reply.tasks if t.attempt > 1)
        return list(reply.tasks)

    async def complete(self, api: Any, worker: str, tasks: list[Any], values: list[bytes]) -> None:
        from coffea_hq import messages

        report = messages.Complete(
            worker=worker, items=[[t.job, t.task, t.attempt, "ok", None] for t in tasks]
        )
        reply = await api.complete(report, [values[int(t.task)] for t in tasks])
        self.requests += 1
        if any(s != "accepted" for s in reply.items):
            raise AssertionError(f"completion not accepted: {Counter(reply.items)}")

    async def results(self, job: str, wait: float) -> tuple[list[Any], list[memoryview]]:
        """Read every result with after/ack cursors until the job's end, then delete it."""
        cursor, items, parts = "0", [], []
        while True:
            header, got = await self.client.results(job, cursor, wait)
            self.requests += 1
            cursor = header.cursor
            items += [(item.task, item.outcome) for item in header.items]
            parts += got
            if header.end:
                break
        await self.client.delete_job(job)
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
    driver = Driver(cp, batch)
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
                got = await driver.lease(driver.worker, "bench-worker-0", 0.0)
                if not got:
                    raise AssertionError(f"queue empty after leasing {len(leased)} of {n}")
                leased.extend(got)

        async def complete_all() -> None:
            for start in range(0, len(leased), batch):
                chunk = leased[start : start + batch]
                await driver.complete(driver.worker, "bench-worker-0", chunk, values)

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
    from coffea_hq.api import API

    payloads, values = _inputs(n)
    driver = Driver(cp, batch)
    apis = [API(cp.url, retry_for=30.0, token=cp.worker_token) for _ in range(workers)]
    phase = Phase(f"concurrent, {workers} workers")
    completed = 0
    try:
        job = await driver.create_job()

        for w, api in enumerate(apis):
            await driver.start_worker(api, f"bench-worker-{w}")

        async def work(w: int) -> None:
            nonlocal completed
            name = f"bench-worker-{w}"
            while completed < n:
                tasks = await driver.lease(apis[w], name, 0.5)
                if tasks:
                    await driver.complete(apis[w], name, tasks, values)
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
        for api in apis:
            await api.close()
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


CPU_COLUMNS = (CLIENT, "hq-server", "valkey")


def _print_commands(p: Phase, n: int, top: int = 14) -> None:
    print(f"  Redis commands in '{p.name}' (calls per task, usec per call; EVALSHA's usec")
    print("  includes the commands it runs):")
    for name, calls in p.commands.most_common(top):
        print(
            f"    {name:<22} {calls:>9,} calls {calls / n:>7.3f}/task "
            f"{p.usec[name] / max(calls, 1):>9.2f} us/call {p.usec[name] / n:>7.2f} us/task"
        )


def control_plane(args: argparse.Namespace) -> bool:
    n = args.tasks
    batch = args.batch
    repeat = args.repeat
    profile_dir = tempfile.mkdtemp(prefix="hq-bench-prof-") if args.profile_server else None
    print(
        f"\n== control plane: {n:,} tasks, batches of {batch}, embedded Valkey + one hq-server"
        f"{' --auth (user and worker tokens)' if args.auth else ''}, no execution; "
        f"median of {repeat}"
    )
    cycles: list[list[Phase]] = []
    concurrent: list[Phase] = []
    problems: list[str] = []
    try:
        with ControlPlane(profile_dir, args.auth) as cp:
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
    median_conc = None
    if concurrent:
        median_conc = sorted(concurrent, key=lambda p: p.seconds)[len(concurrent) // 2]
    rows = [*median_cycle, whole, *([median_conc] if median_conc else [])]
    print_table(head, [_phase_row(p, n) for p in rows])
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
    warn_if_loaded([p.foreign for c in cycles for p in c] + [p.foreign for p in concurrent])
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=100_000, help="tasks per run")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per pass (median)")
    p.add_argument(
        "--batch", type=int, default=4096, help="tasks per submit/lease/complete request"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=4,
        help="concurrent workers in the concurrent pass (0: skip it)",
    )
    p.add_argument(
        "--auth",
        action="store_true",
        help="run hq-server --auth: the client and workers send tokens (costs of checking them)",
    )
    p.add_argument(
        "--profile-server",
        action="store_true",
        help="run hq-server under cProfile and print the top functions",
    )
    add_run_options(p)
    args = p.parse_args(argv)
    if args.tasks < 1:
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
    return run_benchmark(lambda: control_plane(args), args.time_limit, ("aiohttp", "redis"))


if __name__ == "__main__":
    sys.exit(main())
