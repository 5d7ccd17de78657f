"""Local autoscaling: grow and shrink a LocalCluster's worker processes with the queue.

Every ``interval`` seconds it reads the queue's work (queued + running tasks) and asks
the same policy the HTCondor factory uses (:mod:`coffea_hq.factory.policy`) how many
workers to have. New workers start at once; surplus ones are sent SIGTERM, which makes
an hq-worker drain (hand back unstarted tasks, finish running ones, exit), and only
after the work stayed low for ``cooldown`` seconds.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import threading
import time
import urllib.request
from typing import TYPE_CHECKING, Any

from . import protocol
from .factory.policy import BatchState, Bounds, Cooldown, Decision, WorkerJob, decide, wanted

if TYPE_CHECKING:
    from .local import LocalCluster

log = logging.getLogger(__name__)


class LocalScaler:
    """Runs in a thread beside a started :class:`~coffea_hq.LocalCluster`."""

    def __init__(
        self,
        cluster: LocalCluster,
        minimum: int,
        maximum: int,
        *,
        interval: float = 1.0,
        cooldown: float = 10.0,
    ) -> None:
        self.cluster = cluster
        self.bounds = Bounds(minimum, maximum, cluster.slots)
        self.interval = interval
        self.cooldown = Cooldown(cooldown)
        self.draining: list[subprocess.Popen[bytes]] = []
        self.history: list[tuple[float, int, Decision]] = []  # (time, workers, decision)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="coffea-hq-autoscale", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    @property
    def live(self) -> list[subprocess.Popen[bytes]]:
        """Workers running and not draining."""
        return [w for w in self.cluster.workers if w.poll() is None and w not in self.draining]

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(self.cluster.url + path, timeout=5) as r:
            return json.load(r)

    def step(self) -> Decision:
        """One scaling cycle."""
        self.draining = [w for w in self.draining if w.poll() is None]
        work = int(self._get(protocol.QUEUE)["work"])
        held = {name: doc.get("leases", 0) for name, doc in self._get(protocol.WORKERS).items()}
        jobs = [
            WorkerJob(
                self.cluster.worker_name(w),
                BatchState.RUNNING,
                busy=held.get(self.cluster.worker_name(w), 0) > 0,
            )
            for w in self.live
        ]
        allow = self.cooldown.allows_scale_down(
            wanted(work, self.bounds), len(jobs), time.monotonic()
        )
        decision = decide(work, jobs, self.bounds, scale_down=allow)
        for _ in range(decision.submit):
            self.cluster.add_worker()
        by_name = {self.cluster.worker_name(w): w for w in self.live}
        for name in decision.remove:
            worker = by_name[name]
            worker.send_signal(signal.SIGTERM)  # drain, never kill
            self.draining.append(worker)
        if not decision.idle:
            log.info("autoscale: %s", decision.reason)
        self.history.append((time.monotonic(), len(self.live), decision))
        del self.history[:-1000]
        return decision

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.step()
            except Exception as e:  # the server may be restarting: try again next cycle
                log.warning("autoscale cycle failed: %s", e)
