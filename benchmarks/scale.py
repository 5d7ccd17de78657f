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

Three sweeps: workers (100, 500, 2000; with ``--task-seconds`` of work each, lease latency
is the figure), tasks (10^3, 10^4, 10^5; server CPU, commands and memory per task should
stay flat) and replicas (1, 2, 4 with no-op tasks: the server is the bottleneck, so
throughput should grow). This process competes with the servers for the CPUs: the
figures say how much CPU each side used and what other processes took meanwhile.

    python benchmarks/scale.py                 # the three sweeps, up to 10^5 tasks
    python benchmarks/scale.py --quick         # a small version, < 60 s
    python benchmarks/scale.py --million       # the tasks sweep up to 10^6
    python benchmarks/scale.py --profile DIR   # cProfile every server (DIR/server-R-i-N.prof)

Everything started is stopped in ``finally`` blocks; ``--time-limit`` bounds the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
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
    client_cpu: float = 0.0  # this process's
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
            self.client_cpu / wall,
            self.server_cpu / self.replicas / wall,
            self.store_cpu / wall,
        )

    def bottleneck(self) -> str:
        """Which side the figures point at: the harness (its loop lags or it uses a whole
        core), the server (a replica uses a whole core), or neither."""
        client, server, store = self.busy()
        if client > 0.85:
            return "harness"
        if server > 0.85:
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


class Cluster:
    """An embedded Valkey and ``replicas`` hq-server processes on it, always stopped."""

    def __init__(self, replicas: int, profile_dir: str | None) -> None:
        from coffea_hq.embedded import EmbeddedRedis

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


async def _workers_run(
    cluster: Cluster, run: Run, job: str, lease_max: int, lease_wait: float
) -> None:
    """The simulated workers and the client's result stream, until every result is in."""
    from coffea_hq import messages, protocol
    from coffea_hq.api import API

    n = run.tasks
    urls = cluster.urls
    done = asyncio.Event()
    value = protocol.dumps(None)

    async def worker(i: int) -> None:
        mine = urls[i % len(urls) :] + urls[: i % len(urls)]  # start at its own replica
        api = API(mine, retry_for=60.0)
        name = f"sim-{i}"
        try:
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
                run.latencies.append(time.perf_counter() - t0)
                if run.task_seconds:
                    await asyncio.sleep(run.task_seconds)
                items = [[t.job, t.task, t.attempt, "ok", None] for t in reply.tasks]
                report = messages.Complete(worker=name, items=items)
                await api.complete(report, [value] * len(reply.tasks))
        finally:
            await api.close()

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

    async def probe() -> None:
        loop = asyncio.get_running_loop()
        while not done.is_set():
            due = loop.time() + LAG_PROBE
            await asyncio.sleep(LAG_PROBE)
            run.lags.append(max(0.0, loop.time() - due))

    sims = [asyncio.create_task(worker(i)) for i in range(run.workers)]
    lag = asyncio.create_task(probe())
    try:
        run.problem = await collect()
    finally:
        done.set()
        await lag
        # Every result is in: what is left are parked long polls, which a dropped
        # connection ends on the server as well.
        _, pending = await asyncio.wait(sims, timeout=0.5)
        for task in pending:
            task.cancel()
        await asyncio.gather(*sims, return_exceptions=True)
        for task in sims:
            if not task.cancelled() and task.exception() is not None and not run.problem:
                run.problem = f"a worker failed: {task.exception()!r}"


async def _one_run(cluster: Cluster, run: Run, lease_max: int, lease_wait: float) -> None:
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
            await _workers_run(cluster, run, job, lease_max, lease_wait)
            run.seconds = time.perf_counter() - t0
        run.server_cpu = cluster.server_cpu() - cpu0
        run.store_cpu = cluster.store_cpu() - store0
        run.client_cpu = meter.spent.get("this process (client)", 0.0)
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
    run = Run(replicas, workers, tasks, task_seconds)
    wait_for_quiet(args.wait_quiet)
    with Cluster(replicas, args.profile) as cluster:
        asyncio.run(_one_run(cluster, run, args.lease_max, args.lease_wait))
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
    print(LEGEND)
    print(f"\nworkers sweep: {args.task_seconds:g} s per task, 1 replica")
    print_table(HEAD, [])
    by_workers = [measure(1, w, max(n_workers, 3 * w), args.task_seconds, args) for w in workers]
    print(f"\ntasks sweep: {w_tasks} workers, no-op tasks, 1 replica")
    print_table(HEAD, [])
    by_tasks = [measure(1, w_tasks, n, 0.0, args) for n in tasks]
    print(f"\nreplicas sweep: {w_tasks} workers, {n_replicas:,} no-op tasks")
    print_table(HEAD, [])
    by_replicas = [measure(r, w_tasks, n_replicas, 0.0, args) for r in replicas]

    runs = by_workers + by_tasks + by_replicas
    if any(r.problem for r in runs):
        print("FAILED: " + "; ".join(r.problem for r in runs if r.problem))
        met = False
    top = by_workers[-1]
    print(
        f"\n{top.workers} workers: p99 lease latency {top.pct(0.99):.1f} ms "
        f"(goal < {P99_GOAL_MS:.0f} ms)"
    )
    met &= top.pct(0.99) < P99_GOAL_MS
    if top.task_seconds > 0 and top.server_cpu > 0:
        # Each worker asks once per task: past what the replicas can serve, requests
        # queue and the latency grows with the backlog, whatever else is fast.
        offered = top.workers * args.lease_max / top.task_seconds
        capacity = top.replicas * top.tasks / top.server_cpu
        print(
            f"  offered load {offered:,.0f} tasks/s ({top.workers} workers x {args.lease_max} "
            f"per {top.task_seconds:g} s) against the replicas' capacity of about "
            f"{capacity:,.0f} tasks/s at their CPU per task: "
            + ("over it, so leases queue" if offered > capacity else "within it")
        )
    if top.bottleneck() in ("harness", "cpus"):
        print(
            f"  ... limited by {'this process' if top.bottleneck() == 'harness' else 'the CPUs'}"
            f" there (this process {top.busy()[0]:.0%} of a core, servers "
            f"{top.busy()[1]:.0%}, store {top.busy()[2]:.0%}, others {top.foreign:.0%} of the "
            f"machine, event-loop lag p99 {top.lag_ms(0.99):.1f} ms): not the server's figure"
        )
    per_task = [r.server_cpu / r.tasks for r in by_tasks]
    flat = per_task[-1] / per_task[0]
    print(
        f"server CPU per task, {by_tasks[-1].tasks:,} over {by_tasks[0].tasks:,} tasks: "
        f"{flat:.2f}x (goal <= {CPU_FLAT})"
    )
    met &= flat <= CPU_FLAT
    rates = [r.tasks / r.seconds for r in by_replicas]
    print(
        "throughput against replicas: "
        + ", ".join(
            f"{r.replicas}: {rate:,.0f}/s" for r, rate in zip(by_replicas, rates, strict=True)
        )
        + f"; 2 over 1: {rates[1] / rates[0]:.2f}x (goal >= {REPLICA_GOAL})"
    )
    met &= rates[1] / rates[0] >= REPLICA_GOAL
    limits = {r.replicas: r.bottleneck() for r in by_replicas}
    if any(v in ("harness", "cpus") for v in limits.values()):
        print(
            "  ... limited by this process or the CPUs, not the servers, at "
            + ", ".join(f"{k} replica(s)" for k, v in limits.items() if v in ("harness", "cpus"))
            + ": more replicas cannot show there (the store and the harness share the CPUs)"
        )
    total_client = sum(r.client_cpu for r in runs)
    total_server = sum(r.server_cpu for r in runs)
    print(
        f"CPU: servers {total_server:.0f} s, this process (client + simulated workers) "
        f"{total_client:.0f} s, other processes up to {max(r.foreign for r in runs):.0%} of "
        "the CPUs: on a machine with few cores the simulated workers compete with the servers"
    )
    print(
        f"median lease latency over all runs: {statistics.median(r.pct(0.5) for r in runs):.1f} ms"
    )
    return met


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"comma-separated numbers above 0, got {text!r}")
    return values


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
        "--lease-wait", type=float, default=2.0, help="long-poll seconds (default: %(default)s)"
    )
    p.add_argument("--profile", metavar="DIR", help="cProfile every server into DIR")
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
    if len(args.replicas or [1, 2]) < 2 or (args.replicas or [1])[0] != 1:
        p.error("--replicas must start at 1 and list at least two counts (1,2,...)")
    if args.quick:
        args.task_seconds = min(args.task_seconds, 0.1)
        args.wait_quiet = 0.0  # the load is reported either way
    return run_benchmark(lambda: body(args), args.time_limit, ())


if __name__ == "__main__":
    sys.exit(main())
