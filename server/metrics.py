"""``GET METRICS``: the Prometheus exposition, read from the store on each scrape.

Everything but the lease wait comes from the store (counters, the duration histogram the
complete script fills, the queue and the workers' last heartbeats), so every replica of
hq-server answers the same numbers. A scrape costs two round trips whatever the load: the
job index with the global hashes, then one pipeline of two reads per unfinished job.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from coffea_hq import protocol
from coffea_hq.protocol import Counter

from .store import WORKER_STALE, Store

__all__ = ["LeaseWait", "Telemetry", "exposition", "read_telemetry"]

# Counter -> (metric name without _total, its label if it shares a metric, help).
_COUNTERS: dict[Counter, tuple[str, dict[str, str], str]] = {
    Counter.TASKS_OK: ("coffea_hq_tasks", {"outcome": "ok"}, "Client tasks finished, by outcome."),
    Counter.TASKS_FAILED: ("coffea_hq_tasks", {"outcome": "failed"}, ""),
    Counter.MERGES_OK: ("coffea_hq_merges", {"outcome": "ok"}, "Merge tasks finished, by outcome."),
    Counter.MERGES_FAILED: ("coffea_hq_merges", {"outcome": "failed"}, ""),
    Counter.REQUEUED: (
        "coffea_hq_attempts_requeued",
        {},
        "Attempts that crashed or whose lease expired, sent back to the queue.",
    ),
    Counter.RELEASED: (
        "coffea_hq_leases_released",
        {},
        "Leases handed back unstarted (draining workers, lost lease replies).",
    ),
    Counter.DUPLICATES: (
        "coffea_hq_reports_duplicate",
        {},
        "Reports of an attempt already accepted (harmless retries).",
    ),
    Counter.REFUSED: (
        "coffea_hq_reports_refused",
        {},
        "Reports of leases the worker no longer held.",
    ),
    Counter.KEPT: (
        "coffea_hq_results_kept",
        {},
        "Results kept in the store for other tasks of their job (dask intermediates).",
    ),
    Counter.KEPT_BYTES: ("coffea_hq_results_kept_bytes", {}, "Bytes of the results kept."),
    Counter.KEPT_FETCHED: (
        "coffea_hq_results_kept_fetched",
        {},
        "Kept results fetched by workers, for the tasks that take them.",
    ),
}


@dataclass
class WorkerTelemetry:
    """What a worker's last heartbeat says, as the metrics need it."""

    slots: int
    busy: int
    rss_bytes: int  # its slot subprocesses' resident sets together


@dataclass
class Telemetry:
    """One scrape's view of the store."""

    counters: dict[str, int]
    queued: int
    running: int
    jobs: int
    workers: dict[str, WorkerTelemetry]
    buckets: list[int]  # attempts per duration bucket (not cumulative), then longer ones
    duration_count: int
    duration_sum: float  # seconds


def _int(raw: bytes | None) -> int:
    return int(raw) if raw else 0


async def read_telemetry(store: Store) -> Telemetry:
    """The store's counters, queue, live workers and duration histogram (two round trips)."""
    keys = store.keys
    pipe = store.redis.pipeline(transaction=False)
    pipe.zrange(keys.jobs, 0, -1)
    pipe.hgetall(keys.counters)
    pipe.hgetall(keys.durations)
    pipe.hgetall(keys.workers)
    pipe.zrangebyscore(keys.workers_seen, time.time() - WORKER_STALE, "+inf")
    jobs, counters, durations, workers, live = await pipe.execute()
    queued = running = 0
    if jobs:
        pipe = store.redis.pipeline(transaction=False)
        for job in jobs:
            job_keys = keys.job(job.decode())
            pipe.llen(job_keys.queue)
            pipe.zcard(job_keys.leases)
        sizes = await pipe.execute()
        queued, running = sum(sizes[0::2]), sum(sizes[1::2])
    got = {k.decode(): int(v) for k, v in counters.items()}
    live_ids = {w.decode() for w in live}
    seen: dict[str, WorkerTelemetry] = {}
    for raw_id, raw in workers.items():
        worker = raw_id.decode()
        if worker not in live_ids:
            continue
        beat = json.loads(raw)
        stats = beat.get("stats") or {}
        rss = sum(int(b) for b in stats.get("slot_rss_bytes") or [] if isinstance(b, int | float))
        seen[worker] = WorkerTelemetry(
            int(beat.get("slots", 0)), int(stats.get("busy_slots") or 0), rss
        )
    n = len(protocol.TASK_DURATION_BUCKETS) + 1
    return Telemetry(
        counters={c.value: got.get(c.value, 0) for c in Counter},
        queued=queued,
        running=running,
        jobs=len(jobs),
        workers=seen,
        buckets=[_int(durations.get(str(i).encode())) for i in range(1, n + 1)],
        duration_count=_int(durations.get(b"count")),
        duration_sum=_int(durations.get(b"sum_us")) / 1e6,
    )


class StoreCollector(Collector):
    """The metrics of one :class:`Telemetry` (read before the scrape: collectors are sync)."""

    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry

    def describe(self) -> list[Metric]:
        return []  # no registration-time names: one collector per scrape

    def collect(self) -> Iterator[Metric]:
        t = self.telemetry
        families: dict[str, CounterMetricFamily] = {}
        for counter, (name, labels, help_text) in _COUNTERS.items():
            family = families.get(name)
            if family is None:
                family = CounterMetricFamily(name, help_text, labels=list(labels))
                families[name] = family
            family.add_metric(list(labels.values()), t.counters[counter.value])
        yield from families.values()
        queue = GaugeMetricFamily(
            "coffea_hq_queue_tasks",
            "Tasks of unfinished jobs, by state (queued: waiting; running: leased).",
            labels=["state"],
        )
        queue.add_metric(["queued"], t.queued)
        queue.add_metric(["running"], t.running)
        yield queue
        yield GaugeMetricFamily("coffea_hq_jobs", "Unfinished jobs.", value=t.jobs)
        yield GaugeMetricFamily(
            "coffea_hq_workers", "Workers heard from recently.", value=len(t.workers)
        )
        rss = GaugeMetricFamily(
            "coffea_hq_worker_rss_bytes",
            "Resident memory of a worker's slot subprocesses together, at its last heartbeat.",
            labels=["worker"],
        )
        slots = GaugeMetricFamily(
            "coffea_hq_worker_slots", "A worker's task slots.", labels=["worker"]
        )
        busy = GaugeMetricFamily(
            "coffea_hq_worker_busy_slots",
            "A worker's slots running a task, at its last heartbeat.",
            labels=["worker"],
        )
        for worker, w in sorted(t.workers.items()):
            rss.add_metric([worker], w.rss_bytes)
            slots.add_metric([worker], w.slots)
            busy.add_metric([worker], w.busy)
        yield from (rss, slots, busy)
        cumulative, buckets = 0, []
        for bound, n in zip(protocol.TASK_DURATION_BUCKETS, t.buckets, strict=False):
            cumulative += n
            buckets.append((repr(float(bound)), cumulative))
        buckets.append(("+Inf", t.duration_count))
        yield HistogramMetricFamily(
            "coffea_hq_task_duration_seconds",
            "Wall time of task attempts as their workers measured it (every replica: the same).",
            buckets=buckets,
            sum_value=t.duration_sum,
        )


class LeaseWait:
    """How long lease requests that got tasks waited for them, on this replica alone."""

    def __init__(self) -> None:
        self.histogram = Histogram(
            "coffea_hq_lease_wait_seconds",
            "Seconds a lease request that got tasks waited for them, on this server replica "
            "(per replica: not shared through the store; sum over replicas).",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0),
            registry=None,
        )

    def observe(self, seconds: float) -> None:
        self.histogram.observe(seconds)


def exposition(telemetry: Telemetry, lease_wait: LeaseWait) -> bytes:
    """The text exposition of one scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(telemetry))
    registry.register(lease_wait.histogram)
    return generate_latest(registry)
