"""Local autoscaling end to end: a real server, Redis and worker processes."""

from __future__ import annotations

import time

import pytest

from coffea_hq import Client, LocalCluster

from .tasks import nap, slow_square
from .util import poll_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def test_local_autoscaler_goes_to_max_under_backlog_and_back_to_min() -> None:
    with LocalCluster(
        slots=1, adaptive=(1, 3), scale_interval=0.25, scale_cooldown=1.0, lease_timeout=3
    ) as cluster:
        scaler = cluster.scaler
        assert scaler is not None
        time.sleep(1.0)  # idle: it sits at min
        assert len(scaler.live) == 1 and len(cluster.workers) == 1
        with Client(cluster.url) as client:
            # max_attempts=1: a task handed back by a draining worker must not count.
            submitted = time.monotonic()
            job = client.map(slow_square, range(300), max_attempts=1)
            poll_until(lambda: len(scaler.live) == 3, 20, "the scaler is up at max")
            up = time.monotonic() - submitted
            assert up < 20
            assert job.result(timeout=120) == [i * i for i in range(300)]
            down = poll_until(
                lambda: len(scaler.live) == 1 and not scaler.draining,
                30,
                "the scaler is back at min",
            )
            assert client.queue()["workers"] == 1
        print(
            f"\nlocal autoscale: min->max {up:.2f}s under backlog, max->min {down:.2f}s "
            "after the queue drained (cooldown 1 s, cycle 0.25 s)"
        )
        reasons = [d.reason for _, _, d in scaler.history if not d.idle]
        assert any("submit 2" in r or "submit 1" in r for r in reasons)
        assert any("remove" in r for r in reasons)


def test_a_job_running_across_a_scale_down_completes_exactly_once() -> None:
    with LocalCluster(
        slots=1, adaptive=(1, 3), scale_interval=0.25, scale_cooldown=0.5, lease_timeout=3
    ) as cluster:
        scaler = cluster.scaler
        assert scaler is not None
        with Client(cluster.url) as client:
            first = client.map(slow_square, range(200), max_attempts=1)
            poll_until(lambda: len(scaler.live) == 3, 20, "the scaler is up at max")
            got = {}
            for index, value in first.as_completed(timeout=120):
                assert index not in got
                got[index] = value
            # One long task: the policy drains the two idle workers while it runs.
            long = client.map(nap, [4.0], max_attempts=1)
            poll_until(lambda: len(scaler.live) == 1, 10, "the idle workers are drained")
            assert long.status()["state"] == "running"
            assert long.result(timeout=60) == [4.0]
        assert got == {i: i * i for i in range(200)}
