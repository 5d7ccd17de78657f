#!/usr/bin/env python
"""Scale: thousands of simulated workers against 1, 2 and 4 real hq-server replicas.

One embedded Valkey and R real ``hq-server`` processes on it (replicas: same store, same
prefix). This process is the client and W simulated workers: asyncio tasks, each its own
HTTP connection through ``coffea_hq.api`` (the calls hq-worker makes), given every
replica's URL starting at its own (so the workers spread over the replicas and fail over
as hq-worker does). Each worker heartbeats, then leases (up to ``--lease-max`` tasks,
long-polling), "runs" each task for ``--task-seconds`` (asyncio.sleep), and completes it;
the client submits every task first (the store's memory per queued task is read around
that), then streams the results and checks each task came back exactly once, against
the server's own ``tasks_ok`` counter too.

Reported per run: p50/p99 lease latency (the round trip of lease requests that got
work), throughput (tasks/s from the first lease to the last result), server CPU per task
(psutil, all replicas), store commands per task (``INFO commandstats``, which counts the
commands inside Lua scripts) and store bytes per queued task (``INFO memory``).

The simulated workers run in this process's event loop, or spread over
``--harness-procs N`` processes (each its own loop, its lag probed and reported: one loop
serving 2,000 workers lags and then measures itself, not the server). ``--cpu-cap C``
puts each replica in a CPU cgroup of its own capped at C of a core (root only), so that
1, 2 and 4 replicas are 1, 2 and 4 small servers and the replicas, not the machine's
shared cores, limit the run. ``--sweeps`` picks the sweeps to run.

Three sweeps: workers (100, 500, 2000; with ``--task-seconds`` of work each, lease latency
is the figure), tasks (10^3, 10^4, 10^5; server CPU, commands and memory per task should
stay flat) and replicas (1, 2, 4 with no-op tasks: the server is the bottleneck, so
throughput should grow). This process competes with the servers for the CPUs: the
figures say how much CPU each side used and what other processes took meanwhile.

    python benchmarks/scale.py                 # the three sweeps, up to 10^5 tasks
    python benchmarks/scale.py --quick         # a small version, < 60 s
    python benchmarks/scale.py --million       # the tasks sweep up to 10^6
    python benchmarks/scale.py --profile DIR   # cProfile every server (DIR/server-R-i-N.prof)
    python benchmarks/scale.py --sweeps workers --workers 2000 --task-seconds 5 --harness-procs 4
    python benchmarks/scale.py --sweeps replicas --cpu-cap 0.3 --harness-procs 2

Everything started is stopped in ``finally`` blocks; ``--time-limit`` bounds the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import CpuMeter, add_run_options, print_table, run_benchmark, wait_for_quiet

P99_GOAL_MS = 50.0
REPLICA_GOAL = 1.8  # 2 replicas' throughput over one's, where the server is the bottleneck
CPU_FLAT = 1.5  # server CPU per task at the most tasks over that at the fewest, at most
SUBMIT_BATCH = 4096
_RUNS = itertools.count()  # numbers the profiles of successive runs


def noop(x: Any) -> Any:
    """The job's function (never run: the simulated workers only pretend)."""
    return x


@dataclass
class Run:
    replicas: int
    workers: int
    tasks: int
    task_seconds: float
    seconds: float = 0.0  # first lease to last result
    latencies: list[float] = field(default_factory=list)  # lease round trips with work, s
    server_cpu: float = 0.0  # CPU seconds of every replica over the work phase
    store_cpu: float = 0.0  # the store's (Valkey's) CPU seconds over the work phase
    client_cpu: float = 0.0  # this process's and the harness processes'
    harness_cpu: float = 0.0  # of that, the harness processes' (with --harness-procs > 1)
    harness_procs: int = 1
    cpu_cap: float = 0.0  # each replica's cgroup cap, share of a core (0: none)
    foreign: float = 0.0  # other processes' share of the CPUs
    commands: int = 0  # store commands over submit + work
    queued_bytes: int = 0  # store memory grown by the submit
    lags: list[float] = field(default_factory=list)  # this process's event-loop lag, s
    problem: str = ""

    def lag_ms(self, q: float) -> float:
        """This process's event-loop lag at quantile ``q`` (ms): how late a coroutine
        ready to run gets the loop. A lease reply waits that long before the simulated
        worker sees it, so it is part of every latency measured here."""
        if not self.lags:
            return float("nan")
        ranked = sorted(self.lags)
        return ranked[min(len(ranked) - 1, int(q * len(ranked)))] * 1e3

    def busy(self) -> tuple[float, float, float]:
        """(this process's, the average replica's, the store's) CPU over the work phase, as
        a share of one core: near 1 is saturated (each runs on one thread)."""
        wall = max(self.seconds, 1e-9)
        return (
            # The average harness process: each runs one loop, so it saturates at 1.
            self.client_cpu / self.harness_procs / wall,
            self.server_cpu / self.replicas / wall,
            self.store_cpu / wall,
        )

    def bottleneck(self) -> str:
        """Which side the figures point at: the harness (its loop lags or it uses a whole
        core), the server (a replica uses a whole core), or neither."""
        client, server, store = self.busy()
        if client > 0.85:
            return "harness"
        if server > 0.85 * min(1.0, self.cpu_cap or 1.0):  # a capped replica at its cap
            return "server"
        if store > 0.85:
            return "store"
        # A loop that lags while this process is not busy waited for a CPU: the others'
        # load (or the servers on the same cores) left the run too little to say more.
        if self.foreign > 0.5 or self.lag_ms(0.99) > P99_GOAL_MS / 2:
            return "cpus"
        return "-"

    def pct(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ranked = sorted(self.latencies)
        return ranked[min(len(ranked) - 1, int(q * len(ranked)))] * 1e3

    def row(self) -> str:
        return (
            f"{self.replicas:>3} {self.workers:>6} {self.tasks:>8,} {self.task_seconds:>6.2f} "
            f"{self.pct(0.5):>7.1f} {self.pct(0.99):>8.1f} {self.tasks / self.seconds:>9,.0f} "
            f"{self.server_cpu / self.tasks * 1e6:>8.0f} "
            f"{self.client_cpu / self.tasks * 1e6:>8.0f} "
            f"{self.commands / self.tasks:>7.1f} {self.queued_bytes / self.tasks:>7.0f} "
            f"{self.foreign:>6.0%} {self.busy()[1]:>5.2f} {self.busy()[2]:>5.2f} "
            f"{self.busy()[0]:>5.2f} "
            f"{self.lag_ms(0.99):>7.1f} {self.bottleneck():>7}  {self.problem or 'ok'}"
        )


HEAD = (
    "  R workers    tasks  task_s p50_ms   p99_ms   tasks/s srv_us/t cli_us/t "
    "cmds/t  B/task  other  srv%  sto%  cli%  lag_p99   limit  check"
)
# What the columns after "other" say (printed once under the first table).
LEGEND = (
    "srv%/sto%/cli%: CPU of the average replica / the store / this process (client "
    "and simulated workers) as a share of one core; lag_p99: this process's event-loop lag "
    "(a reply waits that long before its worker sees it, inside every latency here); "
    "limit: 'harness' if this process is saturated (cli% > 0.85), 'server' or 'store' "
    "if one of those is, 'cpus' if none is but the loop lagged (lag_p99 > 25 ms: it "
    "waited for a CPU) or other processes took over half of the machine"
)
LAG_PROBE = 0.01  # seconds between event-loop lag probes


CGROUP_V1 = Path("/sys/fs/cgroup/cpu")
CGROUP_V2 = Path("/sys/fs/cgroup")
CFS_PERIOD_US = 100_000


class CpuCaps:
    """One CPU cgroup per capped process, at ``share`` of a core each (CFS quota), so that
    1, 2 and 4 replicas are measured as 1, 2 and 4 small machines rather than as shares
    of the same few cores. cgroup v1 (``/sys/fs/cgroup/cpu``) or v2 (``cpu.max``); needs
    root. Every cgroup made is removed in :meth:`close`."""

    def __init__(self, share: float) -> None:
        if not 0.01 <= share <= 64:
            raise SystemExit(f"--cpu-cap takes a share of a core from 0.01 to 64, got {share}")
        self.quota = int(share * CFS_PERIOD_US)
        self.made: list[Path] = []
        if (CGROUP_V1 / "cpu.cfs_quota_us").exists():
            self.root, self.v2 = CGROUP_V1, False
        elif (CGROUP_V2 / "cgroup.controllers").exists():
            self.root, self.v2 = CGROUP_V2, True
        else:
            raise SystemExit(
                "--cpu-cap needs the cgroup CPU controller: neither /sys/fs/cgroup/cpu "
                "(v1) nor /sys/fs/cgroup/cgroup.controllers (v2) exists here"
            )
        if not os.access(self.root, os.W_OK):
            raise SystemExit(
                f"--cpu-cap needs to create cgroups under {self.root}, which this user "
                f"(uid {os.getuid()}) may not write: run as root, or leave --cpu-cap out"
            )

    def confine(self, pid: int) -> None:
        """Move process ``pid`` (every thread of it) into a cgroup of its own."""
        group = self.root / f"hq-scale-{os.getpid()}-{len(self.made)}"
        group.mkdir()
        self.made.append(group)
        try:
            if self.v2:
                (group / "cpu.max").write_text(f"{self.quota} {CFS_PERIOD_US}\n")
            else:
                (group / "cpu.cfs_period_us").write_text(f"{CFS_PERIOD_US}\n")
                (group / "cpu.cfs_quota_us").write_text(f"{self.quota}\n")
            (group / "cgroup.procs").write_text(f"{pid}\n")
        except OSError as e:
            raise SystemExit(f"--cpu-cap: could not confine process {pid} in {group}: {e}") from e

    def close(self) -> None:
        made, self.made = self.made, []
        for group in made:
            # A cgroup is removed once empty: move anything still in it back to the root.
            with contextlib.suppress(OSError):
                for pid in (group / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):
                        (self.root / "cgroup.procs").write_text(pid + "\n")
            for _ in range(50):
                try:
                    group.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)
            else:
                print(f"could not remove cgroup {group}: remove it by hand (rmdir)")


class Cluster:
    """An embedded Valkey and ``replicas`` hq-server processes on it, always stopped."""

    def __init__(
        self, replicas: int, profile_dir: str | None, cpu_cap: float | None = None
    ) -> None:
        from coffea_hq.embedded import EmbeddedRedis

        self.caps = CpuCaps(cpu_cap) if cpu_cap else None

        self.replicas = replicas
        self.redis = EmbeddedRedis()
        self.urls: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logdir = tempfile.mkdtemp(prefix="hq-scale-")
        self.profile_dir = profile_dir

    def __enter__(self) -> Cluster:
        from coffea_hq.embedded import free_port
        from coffea_hq.local import wait_healthy

        try:
            self.redis.start()
            for i in range(self.replicas):
                port = free_port()
                argv = [sys.executable]
                if self.profile_dir:
                    out = Path(self.profile_dir) / f"server-{self.replicas}-{i}-{next(_RUNS)}.prof"
                    argv += ["-m", "cProfile", "-o", str(out)]
                argv += ["-m", "coffea_hq.server", "--redis", self.redis.url]
                argv += ["--port", str(port), "--log-level", "WARNING"]
                with open(Path(self.logdir) / f"server-{i}.log", "wb") as log:
                    self.procs.append(
                        subprocess.Popen(
                            argv,
                            stdin=subprocess.DEVNULL,
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            cwd=self.logdir,
                        )
                    )
                self.urls.append(f"http://127.0.0.1:{port}")
                if self.caps is not None:
                    self.caps.confine(self.procs[-1].pid)
            for url, proc in zip(self.urls, self.procs, strict=True):
                wait_healthy(url, proc, 30.0)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        from coffea_hq.local import terminate

        procs, self.procs = self.procs, []
        # SIGINT first: a cProfile'd server writes its profile on KeyboardInterrupt.
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 15
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
        terminate(procs, 10)
        if self.caps is not None:
            self.caps.close()
        self.redis.stop()
        for log in sorted(Path(self.logdir).glob("*.log")):
            text = log.read_text(errors="replace")
            if "Traceback" in text or "ERROR" in text:
                print(f"{log.name} said (tail):\n{text[-1500:]}")
        shutil.rmtree(self.logdir, ignore_errors=True)

    def server_cpu(self) -> float:
        import psutil

        total = 0.0
        for proc in self.procs:
            try:
                t = psutil.Process(proc.pid).cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def store_cpu(self) -> float:
        """CPU seconds of the store process (and its wrapper, if it has one)."""
        import psutil

        if self.redis.process is None:
            return 0.0
        total = 0.0
        try:
            top = psutil.Process(self.redis.process.pid)
            for proc in [top, *top.children(recursive=True)]:
                t = proc.cpu_times()
                total += t.user + t.system
        except psutil.Error:
            pass
        return total

    def store_info(self) -> tuple[int, int]:
        """(commands run so far, bytes of memory used) of the store."""
        import redis

        r = redis.Redis.from_url(self.redis.url)
        try:
            stats = r.info("commandstats")
            calls = sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")
            return calls, int(r.info("memory")["used_memory"])
        finally:
            r.close()


@dataclass
class SimShare:
    """What one harness process's simulated workers saw (sent back to the parent)."""

    latencies: list[float] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)
    cpu: float = 0.0  # this process's CPU seconds from go to done
    problem: str = ""


async def _simulate(
    urls: list[str],
    ids: range,
    lease_max: int,
    lease_wait: float,
    task_seconds: float,
    stopped: Callable[[], bool],
    jitter: float = 0.0,
) -> SimShare:
    """Simulated workers ``ids`` (each its own HTTP client, starting at replica i % R) until
    ``stopped()``; their lease round trips with work and this loop's lag. With ``jitter``
    J, a task takes ``task_seconds`` x uniform(1 - J, 1 + J) and each worker starts at a
    random moment within one task's time, so the workers do not ask in lockstep."""
    from coffea_hq import messages, protocol
    from coffea_hq.api import API

    share = SimShare()
    done = asyncio.Event()
    value = protocol.dumps(None)

    async def worker(i: int) -> None:
        mine = urls[i % len(urls) :] + urls[: i % len(urls)]  # start at its own replica
        api = API(mine, retry_for=60.0)
        name = f"sim-{i}"
        draw = random.Random(i)
        try:
            if jitter and task_seconds:
                await asyncio.sleep(draw.uniform(0, task_seconds))
            beat = await api.heartbeat(messages.Heartbeat(worker=name, slots=lease_max))
            next_beat = time.monotonic() + beat.interval
            while not done.is_set():
                if time.monotonic() > next_beat:  # the server serves only workers it hears
                    beat = await api.heartbeat(messages.Heartbeat(worker=name, slots=lease_max))
                    next_beat = time.monotonic() + beat.interval
                t0 = time.perf_counter()
                reply, _ = await api.lease(
                    messages.LeaseRequest(worker=name, max=lease_max, wait=lease_wait)
                )
                if not reply.tasks:
                    continue
                share.latencies.append(time.perf_counter() - t0)
                if task_seconds:
                    await asyncio.sleep(task_seconds * draw.uniform(1 - jitter, 1 + jitter))
                items = [[t.job, t.task, t.attempt, "ok", None] for t in reply.tasks]
                report = messages.Complete(worker=name, items=items)
                await api.complete(report, [value] * len(reply.tasks))
        finally:
            await api.close()

    async def probe() -> None:
        loop = asyncio.get_running_loop()
        while not done.is_set():
            due = loop.time() + LAG_PROBE
            await asyncio.sleep(LAG_PROBE)
            share.lags.append(max(0.0, loop.time() - due))
            if stopped():
                done.set()

    cpu0 = time.process_time()
    sims = [asyncio.create_task(worker(i)) for i in ids]
    await probe()
    # Every result is in: what is left are parked long polls, which a dropped
    # connection ends on the server as well.
    _, pending = await asyncio.wait(sims, timeout=0.5)
    for task in pending:
        task.cancel()
    await asyncio.gather(*sims, return_exceptions=True)
    for task in sims:
        if not task.cancelled() and task.exception() is not None and not share.problem:
            share.problem = f"a worker failed: {task.exception()!r}"
    share.cpu = time.process_time() - cpu0
    return share


def _harness_child(
    conn: Any,
    urls: list[str],
    ids: range,
    args: tuple[int, float, float, float],
    go: Any,
    stop: Any,
) -> None:
    """A harness process (multiprocessing, spawned): its share of the simulated workers
    from ``go`` until ``stop``; sends its :class:`SimShare` back over ``conn``."""
    lease_max, lease_wait, task_seconds, jitter = args
    conn.send("ready")
    go.wait(120)
    try:
        share = asyncio.run(
            _simulate(urls, ids, lease_max, lease_wait, task_seconds, stop.is_set, jitter)
        )
    except BaseException as e:  # the parent reports it, whatever it was
        share = SimShare(problem=f"a harness process failed: {e!r}")
    conn.send(share)
    conn.close()


class Harness:
    """``procs`` spawned processes sharing the simulated workers (none for 1: they run in
    this process's loop). Started before the timed span; ``go`` starts their workers."""

    def __init__(
        self, procs: int, urls: list[str], workers: int, args: tuple[int, float, float, float]
    ) -> None:
        import multiprocessing

        self.procs = procs
        self.ctx = multiprocessing.get_context("spawn")
        self.go, self.stop = self.ctx.Event(), self.ctx.Event()
        self.children: list[tuple[Any, Any]] = []
        if procs <= 1:
            return
        try:
            for k in range(procs):
                ids = range(k, workers, procs)
                ours, theirs = self.ctx.Pipe()
                proc = self.ctx.Process(
                    target=_harness_child,
                    args=(theirs, urls, ids, args, self.go, self.stop),
                    daemon=True,
                )
                proc.start()
                theirs.close()
                self.children.append((proc, ours))
            for proc, conn in self.children:
                if not conn.poll(120) or conn.recv() != "ready":
                    raise RuntimeError(f"harness process {proc.pid} did not start")
        except BaseException:
            self.close()
            raise

    def pids(self) -> list[int]:
        return [proc.pid for proc, _ in self.children]

    def gather(self) -> list[SimShare]:
        """Each child's share, once ``stop`` is set."""
        shares = []
        for proc, conn in self.children:
            if conn.poll(60):
                shares.append(conn.recv())
            else:
                shares.append(SimShare(problem=f"harness process {proc.pid} sent nothing"))
        return shares

    def close(self) -> None:
        self.stop.set()
        self.go.set()
        for proc, conn in self.children:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
            conn.close()
        self.children = []


async def _workers_run(cluster: Cluster, run: Run, job: str, harness: Harness, args: Any) -> None:
    """The simulated workers and the client's result stream, until every result is in."""
    from coffea_hq.api import API

    n = run.tasks
    urls = cluster.urls

    async def collect() -> str:
        api = API(urls, retry_for=60.0)
        seen = bytearray(n)
        cursor = "0"
        try:
            while True:
                header, _parts = await api.results(job, cursor, 5.0)
                cursor = header.cursor
                for item in header.items:
                    seen[int(item.task)] += 1
                if header.end:
                    break
            await api.delete_job(job)
        finally:
            await api.close()
        missing, twice = seen.count(0), sum(c > 1 for c in seen)
        return f"{missing} missing, {twice} twice" if missing or twice else ""

    finished = False
    local = None
    if harness.procs <= 1:
        local = asyncio.create_task(
            _simulate(
                urls,
                range(run.workers),
                args.lease_max,
                args.lease_wait,
                run.task_seconds,
                lambda: finished,
                args.jitter,
            )
        )
    else:
        harness.go.set()
    try:
        run.problem = await collect()
    finally:
        finished = True
        harness.stop.set()
        if local is not None:
            shares = [await local]
        else:
            shares = await asyncio.get_running_loop().run_in_executor(None, harness.gather)
    for share in shares:
        run.latencies += share.latencies
        run.lags += share.lags
        run.harness_cpu += share.cpu
        if share.problem and not run.problem:
            run.problem = share.problem


async def _one_run(cluster: Cluster, run: Run, harness: Harness, args: Any) -> None:
    import cloudpickle

    from coffea_hq import messages, protocol
    from coffea_hq.api import API

    client = API(cluster.urls, retry_for=60.0)
    try:
        sha = await client.upload(protocol.compress(cloudpickle.dumps(noop)))
        job = "scale-" + uuid.uuid4().hex[:12]
        await client.create_job(job, messages.CreateJob(function=sha, label="scale"))
        ok0 = (await client.queue()).counters.get(protocol.Counter.TASKS_OK, 0)
        calls0, mem0 = cluster.store_info()
        payload = protocol.dumps((0,))
        for start in range(0, run.tasks, SUBMIT_BATCH):
            ids = [str(i) for i in range(start, min(start + SUBMIT_BATCH, run.tasks))]
            await client.submit_tasks(job, messages.SubmitTasks(tasks=ids), [payload] * len(ids))
        await client.seal(job, messages.Seal(total=run.tasks))
        calls1, mem1 = cluster.store_info()
        run.queued_bytes = mem1 - mem0
        cpu0, store0 = cluster.server_cpu(), cluster.store_cpu()
        with CpuMeter() as meter:
            t0 = time.perf_counter()
            await _workers_run(cluster, run, job, harness, args)
            run.seconds = time.perf_counter() - t0
        run.server_cpu = cluster.server_cpu() - cpu0
        run.store_cpu = cluster.store_cpu() - store0
        run.client_cpu = meter.spent.get("this process (client)", 0.0) + run.harness_cpu
        run.foreign = meter.foreign_share
        calls2, _ = cluster.store_info()
        run.commands = (calls1 - calls0) + (calls2 - calls1)
        ok = (await client.queue()).counters.get(protocol.Counter.TASKS_OK, 0) - ok0
        if ok != run.tasks and not run.problem:
            run.problem = f"server counted {ok} tasks_ok of {run.tasks}"
    finally:
        await client.close()


def measure(
    replicas: int, workers: int, tasks: int, task_seconds: float, args: argparse.Namespace
) -> Run:
    """One run on a fresh cluster (a fresh store: memory and commands are this run's)."""
    run = Run(
        replicas,
        workers,
        tasks,
        task_seconds,
        harness_procs=args.harness_procs,
        cpu_cap=args.cpu_cap or 0.0,
    )
    wait_for_quiet(args.wait_quiet)
    with Cluster(replicas, args.profile, args.cpu_cap) as cluster:
        harness = Harness(
            args.harness_procs,
            cluster.urls,
            workers,
            (args.lease_max, args.lease_wait, task_seconds, args.jitter),
        )
        try:
            asyncio.run(_one_run(cluster, run, harness, args))
        finally:
            harness.close()
    print(run.row(), flush=True)
    return run


def body(args: argparse.Namespace) -> bool:
    if args.quick:
        workers, tasks, replicas = [10, 40], [100, 300], [1, 2]
        n_workers, n_replicas, w_tasks = 120, 200, 20
    else:
        workers, tasks, replicas = [100, 500, 2_000], [1_000, 10_000, 100_000], [1, 2, 4]
        if args.million:
            tasks.append(1_000_000)
        n_workers, n_replicas, w_tasks = 20_000, 100_000, 200
    # Sizes given on the command line replace the defaults (a loaded or small machine).
    workers = args.workers or workers
    tasks = args.tasks or tasks
    replicas = args.replicas or replicas
    n_workers = args.worker_tasks or n_workers
    n_replicas = args.replica_tasks or n_replicas
    w_tasks = args.sweep_workers or w_tasks
    met = True
    sweeps = args.sweeps
    print(LEGEND)
    cap = f", each replica capped at {args.cpu_cap:g} core" if args.cpu_cap else ""
    procs = f", {args.harness_procs} harness processes" if args.harness_procs > 1 else ""
    by_workers: list[Run] = []
    by_tasks: list[Run] = []
    by_replicas: list[Run] = []
    if "workers" in sweeps:
        print(f"\nworkers sweep: {args.task_seconds:g} s per task, 1 replica{cap}{procs}")
        print_table(HEAD, [])
        by_workers = [
            measure(1, w, max(n_workers, 3 * w), args.task_seconds, args) for w in workers
        ]
    if "tasks" in sweeps:
        print(f"\ntasks sweep: {w_tasks} workers, no-op tasks, 1 replica{cap}{procs}")
        print_table(HEAD, [])
        by_tasks = [measure(1, w_tasks, n, 0.0, args) for n in tasks]
    if "replicas" in sweeps:
        print(f"\nreplicas sweep: {w_tasks} workers, {n_replicas:,} no-op tasks{cap}{procs}")
        print_table(HEAD, [])
        by_replicas = [measure(r, w_tasks, n_replicas, 0.0, args) for r in replicas]

    runs = by_workers + by_tasks + by_replicas
    if any(r.problem for r in runs):
        print("FAILED: " + "; ".join(r.problem for r in runs if r.problem))
        met = False
    if by_workers:
        met &= _workers_verdict(by_workers[-1], args)
    if len(by_tasks) > 1:
        per_task = [r.server_cpu / r.tasks for r in by_tasks]
        flat = per_task[-1] / per_task[0]
        print(
            f"server CPU per task, {by_tasks[-1].tasks:,} over {by_tasks[0].tasks:,} tasks: "
            f"{flat:.2f}x (goal <= {CPU_FLAT})"
        )
        met &= flat <= CPU_FLAT
    if len(by_replicas) > 1:
        met &= _replicas_verdict(by_replicas)
    total_client = sum(r.client_cpu for r in runs)
    total_server = sum(r.server_cpu for r in runs)
    print(
        f"CPU: servers {total_server:.0f} s, this process and the harness processes (client "
        f"+ simulated workers) {total_client:.0f} s, other processes up to "
        f"{max(r.foreign for r in runs):.0%} of "
        "the CPUs: on a machine with few cores the simulated workers compete with the servers"
    )
    print(
        f"median lease latency over all runs: {statistics.median(r.pct(0.5) for r in runs):.1f} ms"
    )
    return met


def _workers_verdict(top: Run, args: argparse.Namespace) -> bool:
    print(
        f"\n{top.workers} workers: p99 lease latency {top.pct(0.99):.1f} ms "
        f"(goal < {P99_GOAL_MS:.0f} ms)"
    )
    if top.task_seconds > 0 and top.server_cpu > 0:
        # Each worker asks once per task: past what the replicas can serve, requests
        # queue and the latency grows with the backlog, whatever else is fast.
        offered = top.workers * args.lease_max / top.task_seconds
        capacity = top.replicas * top.tasks / top.server_cpu
        if args.cpu_cap:
            capacity *= min(1.0, args.cpu_cap)
        print(
            f"  offered load {offered:,.0f} tasks/s ({top.workers} workers x {args.lease_max} "
            f"per {top.task_seconds:g} s) against the replicas' capacity of about "
            f"{capacity:,.0f} tasks/s at their CPU per task: "
            + ("over it, so leases queue" if offered > capacity else "within it")
        )
    if top.bottleneck() in ("harness", "cpus"):
        print(
            f"  ... limited by {'the harness' if top.bottleneck() == 'harness' else 'the CPUs'}"
            f" there (harness {top.busy()[0]:.0%} of a core per process, servers "
            f"{top.busy()[1]:.0%}, store {top.busy()[2]:.0%}, others {top.foreign:.0%} of the "
            f"machine, event-loop lag p99 {top.lag_ms(0.99):.1f} ms): not the server's figure"
        )
    return top.pct(0.99) < P99_GOAL_MS


def _replicas_verdict(by_replicas: list[Run]) -> bool:
    rates = [r.tasks / r.seconds for r in by_replicas]
    print(
        "throughput against replicas: "
        + ", ".join(
            f"{r.replicas}: {rate:,.0f}/s" for r, rate in zip(by_replicas, rates, strict=True)
        )
        + f"; 2 over 1: {rates[1] / rates[0]:.2f}x (goal >= {REPLICA_GOAL})"
    )
    limits = {r.replicas: r.bottleneck() for r in by_replicas}
    if any(v in ("harness", "cpus") for v in limits.values()):
        print(
            "  ... limited by the harness or the CPUs, not the servers, at "
            + ", ".join(f"{k} replica(s)" for k, v in limits.items() if v in ("harness", "cpus"))
            + ": more replicas cannot show there (the store and the harness share the CPUs;"
            " --cpu-cap makes the replicas the bottleneck)"
        )
    return rates[1] / rates[0] >= REPLICA_GOAL


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"comma-separated numbers above 0, got {text!r}")
    return values


SWEEPS = ("workers", "tasks", "replicas")


def _sweeps(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    wrong = [n for n in names if n not in SWEEPS]
    if wrong or not names:
        raise argparse.ArgumentTypeError(
            f"sweeps are {', '.join(SWEEPS)} (comma-separated), got {text!r}"
        )
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small version (< 60 s)")
    p.add_argument("--million", action="store_true", help="the tasks sweep up to 10^6")
    p.add_argument(
        "--task-seconds",
        type=float,
        default=0.5,
        help="seconds each task takes in the workers sweep (default: %(default)s)",
    )
    p.add_argument("--lease-max", type=int, default=1, help="tasks per lease (default: 1)")
    p.add_argument(
        "--jitter",
        type=float,
        default=0.5,
        help="a task takes --task-seconds x uniform(1-J, 1+J) and workers start spread over "
        "one task's time, as real ones drift apart (0: all in lockstep; default: %(default)s)",
    )
    p.add_argument(
        "--lease-wait", type=float, default=2.0, help="long-poll seconds (default: %(default)s)"
    )
    p.add_argument("--profile", metavar="DIR", help="cProfile every server into DIR")
    p.add_argument(
        "--harness-procs",
        type=int,
        default=1,
        help="processes the simulated workers are spread over (default: 1, this one)",
    )
    p.add_argument(
        "--cpu-cap",
        type=float,
        metavar="CORES",
        help="cap each hq-server replica at this share of a core, each in a cgroup of its "
        "own (root only; e.g. 0.3), so replicas, not the machine's cores, limit the run",
    )
    p.add_argument(
        "--sweeps",
        type=_sweeps,
        default=list(SWEEPS),
        help="which sweeps to run, comma-separated (default: workers,tasks,replicas)",
    )
    sizes = p.add_argument_group("sweep sizes (default: as --quick or the full run says)")
    sizes.add_argument("--workers", type=_ints, help="the workers sweep, e.g. 100,500,2000")
    sizes.add_argument("--tasks", type=_ints, help="the tasks sweep, e.g. 1000,10000,100000")
    sizes.add_argument("--replicas", type=_ints, help="the replicas sweep, e.g. 1,2,4")
    sizes.add_argument(
        "--worker-tasks", type=int, help="tasks per workers-sweep run (at least 3 per worker)"
    )
    sizes.add_argument("--replica-tasks", type=int, help="tasks per replicas-sweep run")
    sizes.add_argument("--sweep-workers", type=int, help="workers in the tasks and replicas sweeps")
    add_run_options(p)
    args = p.parse_args(argv)
    if "replicas" in args.sweeps and (
        len(args.replicas or [1, 2]) < 2 or (args.replicas or [1])[0] != 1
    ):
        p.error("--replicas must start at 1 and list at least two counts (1,2,...)")
    if not 1 <= args.harness_procs <= 64:
        p.error(f"--harness-procs takes 1 to 64 processes, got {args.harness_procs}")
    if not 0 <= args.jitter < 1:
        p.error(f"--jitter takes a share from 0 to below 1, got {args.jitter}")
    if args.quick:
        args.task_seconds = min(args.task_seconds, 0.1)
        args.wait_quiet = 0.0  # the load is reported either way
    return run_benchmark(lambda: body(args), args.time_limit, ())


if __name__ == "__main__":
    sys.exit(main())
