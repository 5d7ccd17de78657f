"""Chaos: a reducing coffea analysis on HQExecutor under seeded random faults, every
histogram bin and every counter exactly equal to a reference, every chunk counted once.

Each run starts its own hq-server (own key prefix, so the server's task counters are the
run's own) and three 2-slot hq-workers on one shared store, a Valkey with
``appendfsync everysec`` (so a SIGKILL loses up to its last second of writes). While the
analysis runs, a chaos thread injects the run's planned faults at seeded random times:

- ``worker_kill``: SIGKILL a worker (sometimes with its slot subprocesses), start another;
- ``worker_stop``: SIGSTOP a worker (sometimes with its slots) for over twice the lease
  timeout, then SIGCONT it: its leases expired and moved, its late reports must be refused;
- ``drain_crash``: arm a crash; the next chunk to start claims it, names its worker, and
  ``os._exit``\\ s a second later on that first attempt only; meanwhile the worker is
  SIGTERM-drained (a replacement is started): it must still exit, cleanly;
- ``server_kill``: SIGKILL hq-server, restart it on the same port;
- ``store_kill``: SIGKILL the store, restart it on its port and directory (AOF replay).

Some chunks sleep longer than the lease timeout (heartbeats must hold their lease), and one
chunk per run (the "gate") waits until the run's fault plan is done, so every fault lands
while the job is alive. Replay a failure with ``CHAOS_SEED=<seed printed at the start>``.

Marked slow: ``pytest -m slow tests/test_chaos.py -s``.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cloudpickle
import hist
import numpy as np
import psutil
import pytest
from coffea import processor
from coffea.nanoevents import BaseSchema
from coffea.processor import accumulate

from coffea_hq import Client, HQExecutor, protocol
from coffea_hq.embedded import EmbeddedRedis, free_port
from coffea_hq.local import terminate

from .conftest import Processes
from .test_executor import write_flat
from .util import get_json, poll_until

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # for the warm-up tasks

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.filterwarnings("ignore:Missing cross-reference index:RuntimeWarning"),
]

LEASE_TIMEOUT = 2.0
FANIN = 3  # treereduction: many merges
FILES, ENTRIES, CHUNKSIZE = 4, 3000, 100  # 4 x 30 = 120 chunks per run
NAP = 0.4  # seconds per ordinary chunk
LONG_NAP = LEASE_TIMEOUT + 0.8  # chunks that outlive a lease without heartbeats
LONG_CHUNKS = 4
WORKERS, SLOTS = 3, 2
RUN_TIMEOUT = 75.0  # HQExecutor(timeout=...) per run
GATE_MAX_WAIT = 60.0
DRAIN_BOUND = 20.0  # seconds a drain may take: its running tasks are short (gate excused)
KINDS = ("worker_kill", "worker_stop", "drain_crash", "server_kill", "store_kill")


# ---------------------------------------------------------------------- the analysis


def chunk_key(meta: Any) -> str:
    return f"{os.path.basename(meta['filename'])}:{meta['entrystart']}-{meta['entrystop']}"


def _worker_pid() -> int:
    """The hq-worker running this task: the slot process's parent, or its grandparent
    when the slot process was forked by the worker's zygote."""
    parent = psutil.Process(os.getppid())
    if any("coffea_hq.worker.zygote" in part for part in parent.cmdline()):
        return int(parent.ppid())
    return parent.pid


class ChaosProcessor(processor.ProcessorABC):
    """A hist (Weight storage, weights multiples of 1/4: exact sums in any merge order), an
    event count, a sum of weights and a per-chunk counter (a chunk counted twice shows 2).

    With ``markers`` set (the HQ runs) it also sleeps, crashes once when armed, and holds
    the gate chunk; without (the reference) it computes the same output at once."""

    def __init__(
        self,
        markers: str | None = None,
        run: int = 0,
        long_chunks: frozenset[str] = frozenset(),
        gate_chunk: str = "",
        nap: float = NAP,
    ) -> None:
        self.markers = markers
        self.run = run
        self.long_chunks = long_chunks
        self.gate_chunk = gate_chunk
        self.nap = nap

    def _maybe_crash(self) -> None:
        """Claim an armed crash (atomically, once), name our worker, die a second later."""
        assert self.markers is not None
        for name in sorted(os.listdir(self.markers)):
            if not name.startswith("arm-"):
                continue
            claimed = os.path.join(self.markers, f"claimed-{name[4:]}-{_worker_pid()}")
            try:
                os.rename(os.path.join(self.markers, name), claimed)
            except OSError:
                continue  # another slot claimed it first
            time.sleep(1.0)  # the test drains our worker meanwhile
            os._exit(7)

    def process(self, events: Any) -> dict[str, Any]:
        key = chunk_key(events.metadata)
        if self.markers is not None:
            self._maybe_crash()
            if key == self.gate_chunk:
                gate = os.path.join(self.markers, f"gate-{self.run}")
                leaving = os.path.join(self.markers, f"ungate-{_worker_pid()}")  # drained
                deadline = time.monotonic() + GATE_MAX_WAIT
                while (
                    not os.path.exists(gate)
                    and not os.path.exists(leaving)
                    and time.monotonic() < deadline
                ):
                    time.sleep(0.1)
                    self._maybe_crash()
            time.sleep(LONG_NAP if key in self.long_chunks else self.nap)
        h = hist.Hist.new.IntCat([0, 1, 2, 3, 4], name="k").Reg(20, -4, 4, name="x").Weight()
        h.fill(k=np.asarray(events.k), x=np.asarray(events.x), weight=np.asarray(events.w))
        chunks: defaultdict[str, int] = defaultdict(int)
        chunks[key] += 1
        return {
            "x": h,
            "events": len(events),
            "sumw": float(np.sum(np.asarray(events.w))),
            "chunks": chunks,
        }

    def postprocess(self, accumulator: Any) -> Any:
        return accumulator


def assert_exact(ours: Any, ref: Any) -> None:
    """Bin for bin, count for count; names every chunk missing or counted more than once."""
    assert set(ours) == set(ref), f"output keys differ: {set(ours) ^ set(ref)}"
    wrong = {k: v for k, v in ours["chunks"].items() if v != 1}
    missing = sorted(set(ref["chunks"]) - set(ours["chunks"]))
    assert not wrong and not missing, f"chunks counted twice or more: {wrong}; missing: {missing}"
    assert dict(ours["chunks"]) == dict(ref["chunks"])
    assert ours["events"] == ref["events"], f"events {ours['events']} != {ref['events']}"
    assert ours["sumw"] == ref["sumw"], f"sumw {ours['sumw']} != {ref['sumw']}"
    a, b = ours["x"], ref["x"]
    assert a.axes == b.axes
    np.testing.assert_array_equal(a.values(flow=True), b.values(flow=True), err_msg="hist values")
    np.testing.assert_array_equal(
        a.variances(flow=True), b.variances(flow=True), err_msg="hist variances"
    )


# ---------------------------------------------------------------------- the cluster of a run


@dataclass
class Run:
    """One analysis: its server, its workers, what the chaos thread did to them."""

    index: int
    store: EmbeddedRedis
    processes: Processes
    markers: Path
    rng: random.Random
    prefix: str = field(default_factory=lambda: "chaos" + uuid.uuid4().hex[:8])
    port: int = field(default_factory=free_port)
    server: subprocess.Popen[bytes] | None = None
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    draining: list[subprocess.Popen[bytes]] = field(default_factory=list)
    orphans: list[psutil.Process] = field(default_factory=list)
    injected: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    crashes: int = 0
    defects: list[str] = field(default_factory=list)
    names: dict[int, str] = field(default_factory=dict)  # worker pid -> its name
    log: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def note(self, text: str) -> None:
        line = f"[run {self.index} +{time.monotonic() - self.started:6.2f}s] {text}"
        self.log.append(line)
        print(line, flush=True)

    def start_server(self) -> None:
        _, self.server = self.processes.server(
            self.store.url,
            "--lease-timeout",
            str(LEASE_TIMEOUT),
            port=self.port,
            prefix=self.prefix,
        )

    def add_worker(self) -> subprocess.Popen[bytes]:
        name = f"chaos-r{self.index}-w{len(self.workers) + len(self.draining)}-{os.getpid()}"
        proc = self.processes.worker(self.url, "--slots", str(SLOTS), "--name", name)
        self.workers.append(proc)
        self.names[proc.pid] = name
        return proc

    def live_workers(self) -> list[subprocess.Popen[bytes]]:
        return [w for w in self.workers if w.poll() is None]

    # ------------------------------------------------------------------ faults

    def fault(self, kind: str, stop: threading.Event) -> None:
        getattr(self, kind)(stop)

    def worker_kill(self, stop: threading.Event) -> None:
        victim = self.rng.choice(self.live_workers())
        children = psutil.Process(victim.pid).children(recursive=True)
        with_slots = self.rng.random() < 0.5
        victim.kill()
        victim.wait()
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                if with_slots:
                    child.kill()
                else:
                    self.orphans.append(child)  # killed at the end if still there
        self.workers.remove(victim)
        self.add_worker()
        self.note(f"worker_kill pid {victim.pid} ({'with' if with_slots else 'without'} slots)")
        self.injected.append("worker_kill")

    def worker_stop(self, stop: threading.Event) -> None:
        victim = self.rng.choice(self.live_workers())
        procs = [psutil.Process(victim.pid)]
        tree = self.rng.random() < 0.5
        if tree:
            procs += procs[0].children(recursive=True)
        seconds = 2 * LEASE_TIMEOUT + self.rng.uniform(0.5, 2.0)
        for p in procs:
            p.send_signal(signal.SIGSTOP)
        self.note(f"worker_stop pid {victim.pid} ({'tree' if tree else 'agent'}) {seconds:.1f}s")
        self.injected.append("worker_stop")
        try:
            stop.wait(seconds)
        finally:
            for p in procs:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.send_signal(signal.SIGCONT)
        self.note(f"worker_stop pid {victim.pid}: SIGCONT")

    def drain_crash(self, stop: threading.Event) -> None:
        fault_id = f"{self.index}x{len(self.injected) + len(self.skipped)}"
        arm = self.markers / f"arm-{fault_id}"
        arm.write_text("")
        deadline = time.monotonic() + 20
        claimed: list[Path] = []
        while time.monotonic() < deadline and not stop.is_set():
            claimed = list(self.markers.glob(f"claimed-{fault_id}-*"))
            if claimed:
                break
            time.sleep(0.02)
        if not claimed:
            with contextlib.suppress(OSError):
                arm.rename(self.markers / f"void-{fault_id}")
            claimed = list(self.markers.glob(f"claimed-{fault_id}-*"))
        if not claimed:
            self.note("drain_crash: no chunk started to claim the crash: skipped")
            self.skipped.append("drain_crash")
            return
        pid = int(claimed[0].name.rsplit("-", 1)[1])
        self.crashes += 1
        victim = next((w for w in self.workers if w.pid == pid), None)
        if victim is None or victim.poll() is not None:
            self.note(f"drain_crash: crash claimed in worker {pid}, not a live one: crash only")
            self.skipped.append("drain_crash")
            return
        (self.markers / f"ungate-{pid}").write_text("")  # a gate chunk there need not wait
        victim.send_signal(signal.SIGTERM)
        drained = time.monotonic()
        self.workers.remove(victim)
        self.draining.append(victim)
        self.add_worker()
        self.note(f"drain_crash: SIGTERM pid {pid} while its slot is about to crash")
        self.injected.append("drain_crash")
        # No other fault until it has left: nothing may unstick (or excuse) a stuck drain.
        try:
            rc = victim.wait(timeout=DRAIN_BOUND)
        except subprocess.TimeoutExpired:
            self.defects.append(
                f"run {self.index}: worker pid {pid} SIGTERM-drained with a crashing slot "
                f"had not exited {DRAIN_BOUND:.0f} s later (its running tasks take at most "
                f"{LONG_NAP + 1:.1f} s)"
            )
            self.note(f"drain_crash: pid {pid} still draining after {DRAIN_BOUND:.0f}s")
            return
        self.note(f"drain_crash: pid {pid} exited {rc} {time.monotonic() - drained:.1f}s later")
        if rc != 0:
            self.defects.append(f"run {self.index}: drained worker pid {pid} exited {rc}")

    def server_kill(self, stop: threading.Event) -> None:
        assert self.server is not None
        self.server.kill()
        self.server.wait()
        down = self.rng.uniform(0.2, 1.5)
        time.sleep(down)
        self.start_server()
        self.note(f"server_kill: down {down:.1f}s, restarted on port {self.port}")
        self.injected.append("server_kill")

    def store_kill(self, stop: threading.Event) -> None:
        self.store.kill()
        down = self.rng.uniform(0.2, 1.0)
        time.sleep(down)
        self.store.start()  # same port, same directory: replays its AOF
        self.note(f"store_kill: down {down:.1f}s, restarted (AOF everysec)")
        self.injected.append("store_kill")

    # ------------------------------------------------------------------ the end

    def stop_all(self) -> None:
        terminate([*self.workers, *self.draining], 15)
        if self.server is not None:
            terminate([self.server], 10)
        for orphan in self.orphans:
            with contextlib.suppress(psutil.NoSuchProcess):
                orphan.kill()


def plan_faults(rng: random.Random) -> list[tuple[str, list[str]]]:
    """Three runs, (profile, faults); every kind at least once; store kills only in the
    last run, so the first two can check the server's counters exactly.

    Profile "slow": chunks of NAP seconds, run one at a time per slot, some longer than a
    lease. Profile "fast": the workers first learn that tasks are short, so they lease
    many and run them in batches; its drain_crash is armed at once, so the crash takes
    down a slot in the middle of a batch (the rest of it comes back to a draining agent).
    """
    worker_faults = ["worker_kill", "worker_stop"]
    plans = [
        ("slow", ["worker_kill", "worker_stop", "drain_crash"]),
        ("fast", ["server_kill", rng.choice(worker_faults)]),
        ("slow", ["store_kill", rng.choice(["server_kill", *worker_faults]), "store_kill"]),
    ]
    for _, plan in plans:
        if rng.random() < 0.5:
            plan.append(rng.choice(["worker_kill", "worker_stop", "drain_crash", "server_kill"]))
        rng.shuffle(plan)
    plans[1][1].insert(0, "drain_crash")
    return plans


def noop(x: int) -> int:
    return x


def warm_up(run: Run, timeout: float = 60.0) -> None:
    """Short tasks until every worker has measured a runtime (so it leases in batches)."""
    with Client(run.url) as client:

        def measured() -> bool:
            client.map(noop, range(40)).result(timeout=30)
            time.sleep(0.8)  # a heartbeat carries the workers' stats
            stats = get_json(run.url + protocol.WORKERS)
            names = {run.names[w.pid] for w in run.live_workers()}
            return all(stats.get(n, {}).get("stats", {}).get("mean_runtime") for n in names)

        poll_until(measured, timeout, "every worker measured a task runtime", every=0)


def chaos(
    run: Run, plan: list[str], first: float, stop: threading.Event, errors: list[BaseException]
) -> None:
    try:
        if stop.wait(first):
            return
        for i, kind in enumerate(plan):
            run.fault(kind, stop)
            if i + 1 < len(plan) and stop.wait(run.rng.uniform(0.3, 2.5)):
                break
    except BaseException as e:  # fail the test, not silently the thread
        errors.append(e)
        run.note(f"chaos thread failed: {e!r}")
    finally:
        (run.markers / f"gate-{run.index}").write_text("")  # let the gate chunk go
    for kind in plan[len(run.injected) + len(run.skipped) :]:
        run.skipped.append(kind)
        run.note(f"{kind}: not injected, the run had ended")


def wait_workers_idle(run: Run, timeout: float = 15.0) -> dict[str, Any]:
    """Every live worker's own bookkeeping must come back to nothing held, nothing busy."""
    deadline = time.monotonic() + timeout
    busy: dict[str, Any] = {}
    while time.monotonic() < deadline:
        live = {run.names[w.pid] for w in run.live_workers()}
        with contextlib.suppress(OSError, ValueError):
            stats = get_json(run.url + protocol.WORKERS)
            busy = {
                name: {k: w["stats"].get(k) for k in ("held", "busy_slots")}
                for name, w in stats.items()
                if name in live and (w["stats"].get("held") or w["stats"].get("busy_slots"))
            }
            if not busy:
                return {}
        time.sleep(0.3)
    return busy


# ---------------------------------------------------------------------- the test


def test_reducing_analysis_exactly_once_under_chaos(tmp_path: Path, processes: Processes) -> None:
    seed = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(10**6))
    print(f"\nCHAOS_SEED={seed}  (logs in {tmp_path})", flush=True)
    rng = random.Random(seed)
    wall = time.monotonic()

    data = tmp_path / "data"
    data.mkdir()
    for i in range(FILES):
        write_flat(data / f"flat_{i}.root", ENTRIES, 100 + i)
    fileset = {"flat": {"treename": "tree", "files": [str(p) for p in sorted(data.glob("*"))]}}
    iterative = processor.IterativeExecutor(status=False)
    ref_runner = processor.Runner(
        executor=iterative, schema=BaseSchema, chunksize=CHUNKSIZE, metadata_cache={}
    )
    chunks = list(ref_runner.preprocess(fileset))
    keys = [f"{os.path.basename(c.filename)}:{c.entrystart}-{c.entrystop}" for c in chunks]
    reference = ref_runner(chunks, processor_instance=ChaosProcessor())
    n = len(chunks)
    assert n == FILES * ENTRIES // CHUNKSIZE and reference["events"] == FILES * ENTRIES

    # The comparison can fail: one chunk counted twice, or one missing, is caught.
    once = ref_runner(chunks[:1], processor_instance=ChaosProcessor())
    with pytest.raises(AssertionError, match="counted twice"):
        assert_exact(accumulate([reference, once]), reference)
    with pytest.raises(AssertionError, match="missing"):
        assert_exact(ref_runner(chunks[1:], processor_instance=ChaosProcessor()), reference)
    doubled_hist = dict(reference, x=reference["x"] + once["x"])
    with pytest.raises(AssertionError, match="hist values"):
        assert_exact(doubled_hist, reference)

    (tmp_path / "store").mkdir()
    store = EmbeddedRedis(appendfsync="everysec", directory=tmp_path / "store").start()
    plans = plan_faults(rng)
    runs: list[Run] = []
    failures: list[str] = []
    try:
        for index, (profile, plan) in enumerate(plans):
            markers = tmp_path / f"markers-{index}"
            markers.mkdir()
            run = Run(index, store, processes, markers, random.Random(rng.random()))
            runs.append(run)
            run.start_server()
            for _ in range(WORKERS):
                run.add_worker()
            fast = profile == "fast"
            if fast:
                warm_up(run)
            run.started = time.monotonic()
            if fast:
                long_chunks: frozenset[str] = frozenset()  # they would end the batching
                gate = keys[-1]
            else:
                long_chunks = frozenset(run.rng.sample(keys, LONG_CHUNKS))
                gate = keys[-1 - run.rng.randrange(5)]
            proc = ChaosProcessor(str(markers), index, long_chunks, gate, 0.0 if fast else NAP)
            run.note(f"{profile} plan {plan}; {n} chunks, long {sorted(long_chunks)}, gate {gate}")
            first = 0.0 if fast else run.rng.uniform(0.5, 2.5)
            executor = HQExecutor(
                run.url, status=False, treereduction=FANIN, max_attempts=10, timeout=RUN_TIMEOUT
            )
            runner = processor.Runner(
                executor=executor,
                pre_executor=iterative,
                schema=BaseSchema,
                chunksize=CHUNKSIZE,
                metadata_cache={},
            )
            before = get_json(run.url + protocol.QUEUE)["counters"]  # after any warm-up
            stop = threading.Event()
            errors: list[BaseException] = []
            thread = threading.Thread(
                target=chaos, args=(run, plan, first, stop, errors), daemon=True
            )
            thread.start()
            try:
                ours = runner(chunks, processor_instance=proc)
            except Exception as e:
                with contextlib.suppress(Exception):
                    run.note(f"run failed: {e!r}; queue {get_json(run.url + protocol.QUEUE)}")
                    run.note(f"workers {get_json(run.url + protocol.WORKERS)}")
                if run.defects:  # the cause, more useful than the timeout it led to
                    raise AssertionError("\n".join([*failures, *run.defects])) from e
                raise
            finally:
                stop.set()
                thread.join(timeout=30)
            run.note(f"analysis done; injected {run.injected}, skipped {run.skipped}")
            assert not thread.is_alive(), "the chaos thread did not stop"
            assert not errors, f"a fault could not be injected: {errors[0]!r}"

            assert_exact(ours, reference)

            # A drained worker exits by itself, cleanly, even though a slot crashed.
            failures += run.defects
            for proc_ in run.draining:
                try:
                    proc_.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    failures.append(f"run {index}: drained worker pid {proc_.pid} never exited")

            # The workers' own bookkeeping returns to idle (nothing held, no busy slot).
            busy = wait_workers_idle(run)
            if busy:
                failures.append(f"run {index}: workers still hold work after the run: {busy}")

            queue = get_json(run.url + protocol.QUEUE)
            counters = {k: v - before.get(k, 0) for k, v in queue["counters"].items()}
            run.note(f"queue after the run: {queue}; this run's counters {counters}")
            assert queue["work"] == 0 and queue["jobs"] == 0, queue
            assert counters["tasks_failed"] == 0 and counters["merges_failed"] == 0, counters
            if "store_kill" not in run.injected:
                assert counters["tasks_ok"] == n, f"tasks_ok {counters['tasks_ok']} != {n}"
                low, high = math.ceil((n - 1) / (FANIN - 1)), n - 1
                assert low <= counters["merges_ok"] <= high, counters
                assert counters["requeued"] >= run.crashes, counters
            run.stop_all()
        assert not failures, "\n".join(failures)
    finally:
        for run in runs:
            run.stop_all()
        processes.stop_all()
        store.stop()
        injected = Counter(kind for run in runs for kind in run.injected)
        skipped = Counter(kind for run in runs for kind in run.skipped)
        print(
            f"\nCHAOS_SEED={seed}: {len(runs)} runs x faults {[r.injected for r in runs]}; "
            f"by kind {dict(injected)}; skipped {dict(skipped)}; "
            f"wall {time.monotonic() - wall:.1f}s",
            flush=True,
        )
    missing_kinds = set(KINDS) - set(injected)
    assert not missing_kinds, f"faults never injected (a flaw of the test): {missing_kinds}"
