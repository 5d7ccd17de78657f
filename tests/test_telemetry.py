"""Telemetry you can see: GET /metrics (Prometheus), ``coffea-hq status``, the HTML summaries.

Real hq-server replicas on one real store, a real hq-worker, real jobs."""

from __future__ import annotations

import sys
import time
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
    store: EmbeddedRedis, processes: Processes, prefix: str
) -> None:
    # (--lease-timeout 3: a heartbeat a second, so the worker's gauges show at once.)
    a, _ = processes.server(store.url, "--lease-timeout", "3", prefix=prefix)
    b, _ = processes.server(store.url, "--lease-timeout", "3", prefix=prefix)
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


def test_two_replicas_report_the_same_heartbeat_windows_after_a_real_job(
    embedded_store: EmbeddedRedis, processes: Processes, prefix: str
) -> None:
    # (--lease-timeout 3: a heartbeat a second. One store kind: the windows are plain lists.)
    store = embedded_store
    a, _ = processes.server(store.url, "--lease-timeout", "3", prefix=prefix)
    b, _ = processes.server(store.url, "--lease-timeout", "3", prefix=prefix)
    processes.worker(a, "--slots", "2", "--name", "w-window")
    naps = [0.3] * 8
    with Client(b) as client:
        job = client.map(nap, naps)
        assert job.result(timeout=60) == naps

    def windows(url: str) -> dict[str, Any]:
        return get_json(url + protocol.TELEMETRY)

    def job_done(url: str) -> int:
        return sum(s["done"] for s in windows(url)["jobs"].get(job.id, []))

    # The heartbeats after the last result carry its count: every task once, on both.
    poll_until(lambda: job_done(a) == len(naps) and job_done(b) == len(naps), 20, "counts")
    poll_until(lambda: windows(a) == windows(b), 10, "the same windows from both replicas")
    got = windows(b)
    samples = got["workers"]["w-window"]
    assert 1 <= len(samples) <= protocol.TELEMETRY_SAMPLES
    assert [s["time"] for s in samples] == sorted(s["time"] for s in samples)
    assert all(s["slots"] == 2 and 0 <= s["busy_slots"] <= 2 for s in samples)
    assert all(len(s["slot_rss_bytes"]) == 2 for s in samples)
    assert any(s["tasks_per_second"] > 0 and s["cpu_percent"] > 0 for s in samples)
    assert sum(s.get("jobs", {}).get(job.id, 0) for s in samples) == len(naps)
    assert {s["worker"] for s in got["jobs"][job.id]} == {"w-window"}


def test_metrics_names_units_and_types_follow_prometheus_conventions(
    embedded_store: EmbeddedRedis, processes: Processes, prefix: str
) -> None:
    url, _ = processes.server(embedded_store.url, prefix=prefix)
    found = families(url)
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


# ---------------------------------------------------------------------- coffea-hq status


def fail_first(i: int) -> int:
    """Task 0 fails at once; the others take a while."""
    if i == 0:
        raise ValueError("the first one fails")
    time.sleep(0.25)
    return i


def _running_job(processes: Processes, url: str, client: Client) -> Any:
    """A job of 2-slot worker ``w-status`` caught running: some tasks done (and said so in
    a heartbeat, one a second with the server's --lease-timeout 3), some not."""
    processes.worker(url, "--slots", "2", "--name", "w-status")
    job = client.map(nap, [0.25] * 24, label="naps")

    def under_way() -> bool:
        stats = client.workers().get("w-status")
        return stats is not None and stats.stats["done"] >= 2 and stats.stats["busy_slots"] == 2

    poll_until(under_way, 30, "the job under way")
    return job


def _row(text: str, first: str) -> list[str]:
    """The cells of the one table row of ``text`` whose first cell is ``first``."""
    rows = [[c.strip() for c in line.strip("│ ").split("│")] for line in text.splitlines()]
    (row,) = [r for r in rows if r[0] == first]
    return row


@pytest.mark.slow
def test_status_renders_queue_workers_and_a_running_jobs_progress_and_watches(
    embedded_store: EmbeddedRedis,
    processes: Processes,
    prefix: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from rich.console import Console

    from coffea_hq import cli
    from coffea_hq.status import render, snapshot, watch

    url, _ = processes.server(embedded_store.url, "--lease-timeout", "3", prefix=prefix)
    with Client(url) as client:
        job = _running_job(processes, url, client)
        poll_until(lambda: client.workers()["w-status"].stats.get("busy_slots") == 2, 10, "busy")
        first = snapshot(client)
        console = Console(record=True, width=80)
        console.print(render(first))
        text = console.export_text()
        assert job.id in text and "naps" in text and "/24" in text
        worker, _, busy, rss, *_ = _row(text, "w-status")
        assert busy == "2/2" and rss.endswith("MiB")  # slots busy, the slots' memory
        assert "queued" in text and "running" in text
        assert max(len(line) for line in text.splitlines()) <= 80
        # A second look measures tasks per second between two heartbeats.
        time.sleep(1.5)
        console = Console(record=True, width=80)
        console.print(render(snapshot(client), first))
        rate = float(_row(console.export_text(), "w-status")[4])
        assert 2 < rate < 20  # 2 slots of 0.25 s naps: about 8 per second
        # --watch redraws (here three times); the command prints the same picture.
        console = Console(record=True, width=80, force_terminal=True)
        started = time.monotonic()
        watch(client, console, every=0.2, refreshes=3)
        assert 0.4 <= time.monotonic() - started < 10
        assert "w-status" in console.export_text()
        assert cli.main(["status", url]) == 0
        out = capsys.readouterr().out
        assert "w-status" in out and job.id in out
        job.cancel()


@pytest.mark.slow  # (the client gives an unreachable server a few seconds)
def test_status_without_a_server_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    from coffea_hq import cli

    # No server there: a clear sentence and exit status 2, not a traceback.
    assert cli.main(["status", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "no coffea-hq server answers at http://127.0.0.1:9" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------------- _repr_html_


@pytest.mark.slow
def test_html_summaries_of_cluster_client_and_job(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from html.parser import HTMLParser

    from coffea_hq import LocalCluster

    def well_formed(html: str) -> str:
        HTMLParser().feed(html)  # (raises on nothing, but runs the tokenizer over it)
        assert html.startswith("<div>") and html.endswith("</div>")
        return html

    monkeypatch.setattr(sys, "ps1", ">>> ", raising=False)  # as at a prompt: it says the link
    with LocalCluster(workers=1, slots=2) as cluster:
        assert f"coffea-hq dashboard: {cluster.url}/" in capsys.readouterr().err
        client = Client(cluster.url)
        poll_until(lambda: client.workers(), 20, "the worker's first heartbeat")
        html = well_formed(cluster._repr_html_())
        assert f'href="{cluster.url}"' in html and "1 worker(s) × 2 slot(s)" in html
        assert "0/2 slots busy" in html or "1/2 slots busy" in html
        assert f'href="{cluster.url}/metrics"' in html
        job = client.map(nap, [0.4] * 4, label="<naps & co>")
        poll_until(lambda: job.status()["done"] >= 1, 20, "a task done")
        html = well_formed(job._repr_html_())
        assert job.id in html and "running" in html and 'max="4"' in html
        assert "&lt;naps &amp; co&gt;" in html and "<naps" not in html  # escaped
        html = well_formed(client._repr_html_())
        assert "coffea-hq Client" in html and " running" in html and "1 (" in html
        job.result(timeout=30)
        html = well_formed(job._repr_html_())  # the server forgot it: what the client holds
        assert "collected" in html and "4/4 (100%)" in html
    # The server is gone: the summary says so, promptly, and raises nothing.
    try:
        started = time.monotonic()
        html = well_formed(client._repr_html_())
        assert "does not answer (within 2 s)" in html and time.monotonic() - started < 6
    finally:
        client.close()


# ---------------------------------------------------------------------- the dashboard


@pytest.mark.slow  # (starts a browser)
def test_dashboard_shows_a_running_jobs_progress_advancing_in_headless_chromium(
    embedded_store: EmbeddedRedis, processes: Processes, prefix: str, tmp_path: Any
) -> None:
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    browser, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    assert browser and driver_path, "apt-get install chromium chromium-driver (see .ci/run)"
    url, _ = processes.server(embedded_store.url, "--lease-timeout", "3", prefix=prefix)
    with urllib.request.urlopen(url + protocol.DASHBOARD, timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/html")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    with Client(url) as client:
        processes.worker(url, "--slots", "2", "--name", "w-status")
        # Long enough to be caught running on a loaded machine (about 25 s on 2 slots), and
        # a job whose first task fails while the rest go on (fail_fast off: it stays listed).
        job = client.map(nap, [0.25] * 160, label="naps")
        failing = client.map(fail_first, range(40), fail_fast=False, label="failing")
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
        try:
            driver.set_window_size(1000, 900)
            driver.set_page_load_timeout(30)
            driver.get(url + protocol.DASHBOARD)
            poll_until(
                lambda: (
                    int(driver.find_element(By.TAG_NAME, "body").get_attribute("data-updates") or 0)
                    >= 1
                ),
                30,
                "the page's first data",
            )

            def cells(table: str) -> list[list[str]]:
                # Read in one script: the page replaces its rows every second.
                return driver.execute_script(
                    f"return [...document.querySelectorAll('#{table} tbody tr')]"
                    ".map(r => [...r.cells].map(c => c.textContent))"
                )

            def done_cell() -> int:
                for row in cells("jobs"):
                    if row and row[0] == job.id:
                        return int(row[3].split("/")[0])
                return -1

            poll_until(lambda: done_cell() >= 0, 30, "the job on the page")
            first = done_cell()
            driver.save_screenshot(str(tmp_path / "dashboard-1.png"))
            poll_until(lambda: done_cell() > first, 60, "the job's progress advancing")
            driver.save_screenshot(str(tmp_path / "dashboard-2.png"))

            def failure_text() -> str:
                return driver.execute_script(
                    "return [...document.querySelectorAll('#failures details')]"
                    ".map(d => d.textContent).join('\\n')"
                )

            poll_until(lambda: failing.id in failure_text(), 60, "the failure on the page")
            shown = failure_text()
            assert "ValueError: the first one fails" in shown and "Traceback" in shown
            assert "in fail_first" in shown  # the task's own frame, from the worker
            poll_until(lambda: cells("stream"), 30, "the task stream")
            assert any(row[1] == "w-status" for row in cells("stream"))
            poll_until(lambda: driver.find_element(By.ID, "live").text == "(live)", 30, "the SSE")
            driver.save_screenshot(str(tmp_path / "dashboard-3.png"))
            (worker,) = cells("workers")
            assert worker[0] == "w-status" and worker[2].endswith("/2")
            assert worker[4].endswith("MiB")
            assert "queued" in driver.find_element(By.ID, "queue").text
            assert driver.find_element(By.ID, "error").text == ""
            errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            assert not errors, errors
            assert (tmp_path / "dashboard-3.png").stat().st_size > 1000
        finally:
            driver.quit()
        job.cancel()
        failing.cancel()
