"""Telemetry you can see: GET /metrics (Prometheus), ``coffea-hq status``, the HTML summaries.

Real hq-server replicas on one real store, a real hq-worker, real jobs."""

from __future__ import annotations

import sys
import urllib.request
from typing import Any

import cloudpickle
import pytest
from prometheus_client.parser import text_string_to_metric_families

from coffea_hq import Client, protocol
from coffea_hq.embedded import EmbeddedRedis

from .conftest import Processes
from .tasks import fail_on, nap
from .util import get_json, poll_until

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def scrape(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """``GET /metrics`` parsed: sample name -> labels -> value (checks the content type)."""
    with urllib.request.urlopen(url + protocol.METRICS, timeout=10) as r:
        assert r.headers["Content-Type"] == protocol.METRICS_CONTENT_TYPE
        text = r.read().decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def families(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + protocol.METRICS, timeout=10) as r:
        return {f.name: f for f in text_string_to_metric_families(r.read().decode())}


def _store_wide(metrics: dict[str, Any]) -> dict[str, Any]:
    """What comes from the store's accounting: not this replica's own lease waits, nor the
    workers' gauges (a heartbeat may land between two scrapes)."""
    return {
        k: v
        for k, v in metrics.items()
        if not k.startswith(("coffea_hq_lease_wait", "coffea_hq_worker"))
    }


def test_two_replicas_report_the_same_totals_and_histogram_after_a_real_job(
    processes: Processes, store: EmbeddedRedis, prefix: str
) -> None:
    a, _ = processes.server(store.url, prefix=prefix)
    b, _ = processes.server(store.url, prefix=prefix)
    processes.worker(a, "--slots", "2")
    naps = [0.02] * 6 + [0.3] * 2
    with Client(b) as client:
        assert client.map(nap, naps).result(timeout=60) == naps
        with pytest.raises(Exception, match="cannot take 3"):
            client.map(fail_on, range(5), [3] * 5, fail_fast=False).result(timeout=60)

    def counters() -> dict[str, int]:
        return get_json(a + protocol.QUEUE)["counters"]

    poll_until(lambda: sum(counters()[c] for c in ("tasks_ok", "tasks_failed")) == 13, 20, "all")
    from_a, from_b = scrape(a), scrape(b)
    assert _store_wide(from_a) == _store_wide(from_b)
    tasks = from_a["coffea_hq_tasks_total"]
    assert tasks[(("outcome", "ok"),)] == counters()["tasks_ok"] == len(naps) + 4
    assert tasks[(("outcome", "failed"),)] == counters()["tasks_failed"] == 1
    # Every accepted attempt is in the histogram, in the bucket of its wall time.
    buckets = from_a["coffea_hq_task_duration_seconds_bucket"]
    assert from_a["coffea_hq_task_duration_seconds_count"][()] == len(naps) + 5
    assert buckets[(("le", "+Inf"),)] == len(naps) + 5
    assert buckets[(("le", "0.25"),)] == 6 + 5  # the short naps and the quick tasks
    assert buckets[(("le", "0.01"),)] <= 5
    assert 0.6 + 0.12 <= from_a["coffea_hq_task_duration_seconds_sum"][()] < 5
    assert from_a["coffea_hq_queue_tasks"] == {
        (("state", "queued"),): 0,
        (("state", "running"),): 0,
    }
    # The worker's heartbeat shows on both; the lease waits only where it leases.
    poll_until(lambda: scrape(b)["coffea_hq_workers"][()] == 1, 10, "the worker on b's scrape")
    (rss,) = scrape(b)["coffea_hq_worker_rss_bytes"].values()
    assert rss > 1_000_000
    assert from_a["coffea_hq_lease_wait_seconds_count"][()] >= 1
    assert from_b["coffea_hq_lease_wait_seconds_count"][()] == 0


def test_metrics_names_units_and_types_follow_prometheus_conventions(server_url: str) -> None:
    found = families(server_url)
    expected = {
        "coffea_hq_tasks": "counter",
        "coffea_hq_merges": "counter",
        "coffea_hq_attempts_requeued": "counter",
        "coffea_hq_queue_tasks": "gauge",
        "coffea_hq_jobs": "gauge",
        "coffea_hq_workers": "gauge",
        "coffea_hq_worker_rss_bytes": "gauge",
        "coffea_hq_task_duration_seconds": "histogram",
        "coffea_hq_lease_wait_seconds": "histogram",
    }
    assert {name: found[name].type for name in expected} == expected
    for family in found.values():
        assert family.name.startswith("coffea_hq_") and family.documentation
        # Units are base units, spelled out as a suffix; no milliseconds, no kilobytes.
        assert not any(u in family.name for u in ("_ms", "_kb", "_millis", "_mb"))
    assert "per replica" in found["coffea_hq_lease_wait_seconds"].documentation
    bounds = [
        s.labels["le"]
        for s in found["coffea_hq_task_duration_seconds"].samples
        if s.name.endswith("_bucket")
    ]
    assert bounds == [repr(float(b)) for b in protocol.TASK_DURATION_BUCKETS] + ["+Inf"]
