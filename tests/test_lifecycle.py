"""Process lifecycle: Ctrl-C returns in seconds, children die with their owner, orphaned
workers exit, LocalCluster restarts dead workers. Real scripts, real processes."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis

from coffea_hq import Client, LocalCluster, lifeline
from coffea_hq.embedded import EmbeddedRedis
from tests.conftest import Processes
from tests.util import get_json, poll_until

ROOT = Path(__file__).resolve().parent.parent

# Process lifecycle does not depend on which Redis-protocol server holds the state.
embedded_only = pytest.mark.parametrize("store", ["embedded"], indirect=True)


class Script:
    """A Python script run in its own process group, as a terminal would run it."""

    def __init__(self, tmp_path: Path, code: str) -> None:
        path = tmp_path / "analysis.py"
        path.write_text(textwrap.dedent(code))
        self.err = open(tmp_path / "stderr.txt", "w+b")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, str(path)],
            stdout=subprocess.PIPE,
            stderr=self.err,
            cwd=ROOT,
            start_new_session=True,  # its own group: our SIGINT to it reaches only it
        )

    def line(self, prefix: str, timeout: float = 60) -> str:
        """The first line of output starting with ``prefix`` (the rest of it)."""
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            text = self.proc.stdout.readline().decode()
            if not text:
                break
            if text.startswith(prefix):
                return text[len(prefix) :].strip()
        raise AssertionError(f"the script never printed {prefix!r}:\n{self.stderr()}")

    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read().decode(errors="replace")

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with_group = os.getpgid(self.proc.pid)
            os.killpg(with_group, signal.SIGKILL)
            self.proc.wait()
        self.err.close()


@pytest.fixture
def script(tmp_path: Path) -> Iterator[list[Script]]:
    made: list[Script] = []
    yield made
    for s in made:
        stray = [p for p in _alive(s.descendants())] if s.proc.poll() is None else []
        s.stop()
        for p in stray:
            p.kill()


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _job_state(r: redis.Redis, prefix: str, job: str) -> str | None:
    raw = r.hget(f"{prefix}:job:{{{job}}}", "state")
    return raw.decode() if raw else None


LOCAL_SCRIPT = """
import time
from coffea_hq import Client, LocalCluster, lifeline
with LocalCluster(workers=2, redis_url={redis!r}, server_args=("--prefix", {prefix!r})) as c:
    client = Client(c.url)
    job = client.map(time.sleep, [30.0] * 4)
    print("url", c.url, flush=True)
    print("job", job.id, flush=True)
    job.result()
"""


def _wait_running(url: str, n: int) -> None:
    poll_until(lambda: get_json(url + "/api/v1/queue")["running"] >= n, 30, f"{n} tasks running")


@embedded_only
def test_ctrl_c_with_a_local_cluster_returns_in_seconds_and_cancels_the_job(
    tmp_path: Path,
    script: list[Script],
    store: EmbeddedRedis,
    prefix: str,
    redis_client: redis.Redis,
) -> None:
    s = Script(tmp_path, LOCAL_SCRIPT.format(redis=store.url, prefix=prefix))
    script.append(s)
    url, job = s.line("url "), s.line("job ")
    _wait_running(url, 2)
    children = s.descendants()
    assert len(children) >= 5  # server, 2 workers, their slot subprocesses
    start = time.monotonic()
    os.killpg(os.getpgid(s.proc.pid), signal.SIGINT)  # what a terminal's Ctrl-C does
    s.proc.wait(timeout=15)
    took = time.monotonic() - start
    assert took < 10, f"Ctrl-C took {took:.1f}s:\n{s.stderr()}"
    assert "KeyboardInterrupt" in s.stderr()
    poll_until(lambda: not _alive(children), 5, "every child of the script exited")
    # The server was alive when Ctrl-C came: the job is cancelled in the store.
    assert _job_state(redis_client, prefix, job) == "cancelled"


INTERRUPT_SCRIPT = """
import time
from coffea_hq import Client
client = Client({url!r})
job = client.map(time.sleep, [30.0] * 2)
print("job", job.id, flush=True)
job.result()
"""


@embedded_only
def test_kernel_interrupt_with_an_external_server_cancels_the_job(
    tmp_path: Path,
    script: list[Script],
    processes: Processes,
    server_url: str,
    prefix: str,
    redis_client: redis.Redis,
) -> None:
    """A notebook's interrupt: SIGINT to the kernel process alone, KeyboardInterrupt
    raised in the main thread while Client.run waits."""
    processes.worker(server_url, "--slots", "2")
    s = Script(tmp_path, INTERRUPT_SCRIPT.format(url=server_url))
    script.append(s)
    job = s.line("job ")
    _wait_running(server_url, 2)
    start = time.monotonic()
    s.proc.send_signal(signal.SIGINT)
    s.proc.wait(timeout=15)
    assert time.monotonic() - start < 6, s.stderr()
    assert _job_state(redis_client, prefix, job) == "cancelled"
    # Its workers stop the cancelled tasks (heartbeat every lease_timeout / 3 = 1 s).
    poll_until(lambda: get_json(server_url + "/api/v1/queue")["running"] == 0, 10, "stopped")


@pytest.mark.slow
@embedded_only
def test_ctrl_c_with_the_server_gone_gives_up_in_seconds_with_one_line(
    tmp_path: Path, script: list[Script], processes: Processes, store: EmbeddedRedis, prefix: str
) -> None:
    url, server = processes.server(store.url, prefix=prefix)
    s = Script(tmp_path, INTERRUPT_SCRIPT.format(url=url))
    script.append(s)
    s.line("job ")
    server.kill()
    server.wait()
    time.sleep(0.5)  # the client is now retrying its results poll
    start = time.monotonic()
    s.proc.send_signal(signal.SIGINT)
    s.proc.wait(timeout=20)
    assert time.monotonic() - start < 8, s.stderr()
    said = [line for line in s.stderr().splitlines() if "not cancelled" in line]
    assert len(said) == 1 and url in said[0], s.stderr()


OWNER_SCRIPT = """
import time
from coffea_hq import Client, LocalCluster, lifeline
c = LocalCluster(workers=2).start()
client = Client(c.url)
job = client.map(time.sleep, [60.0] * 2)
print("url", c.url, flush=True)
time.sleep(600)
"""


def test_children_die_with_an_owner_killed_by_sigkill(tmp_path: Path, script: list[Script]) -> None:
    s = Script(tmp_path, OWNER_SCRIPT)
    script.append(s)
    url = s.line("url ")
    _wait_running(url, 2)
    children = s.descendants()
    names = {p.name() for p in children}
    assert len(children) >= 6, names  # valkey, server, 2 workers, 2 slots
    s.proc.kill()  # the kernel's OOM killer: no cleanup runs in the owner
    s.proc.wait()
    poll_until(lambda: not _alive(children), 5, "every child of the killed owner exited")


def test_lifeline_wrapper_stops_its_program_when_the_owner_goes() -> None:
    """Where there is no PDEATHSIG (macOS), the embedded Valkey runs under this wrapper."""
    wrapper = lifeline.spawn(
        [sys.executable, "-m", "coffea_hq.lifeline", "sleep", "60"], lifeline=True
    )
    try:
        # (Poll for the program itself: a short-lived child of the wrapper's start-up may
        # show up first and be gone by the next look.)
        def programs() -> list[psutil.Process]:
            found = []
            for child in psutil.Process(wrapper.pid).children():
                with contextlib.suppress(psutil.NoSuchProcess):  # a transient one went
                    if child.name() == "sleep":
                        found.append(child)
            return found

        poll_until(programs, 10, "program started")
        (program,) = programs()
        assert wrapper.stdin is not None
        wrapper.stdin.close()  # what the owner's death does to the pipe
        assert wrapper.wait(timeout=10) == 128 + signal.SIGTERM
        poll_until(lambda: not _alive([program]), 5, "the wrapped program exited")
    finally:
        if wrapper.poll() is None:
            os.killpg(wrapper.pid, signal.SIGKILL)
            wrapper.wait()


@pytest.mark.slow
def test_draining_worker_of_a_vanished_server_exits_in_seconds(
    processes: Processes, store: EmbeddedRedis, prefix: str
) -> None:
    url, server = processes.server(store.url, prefix=prefix)
    worker = processes.worker(url, "--drain-timeout", "300")
    with Client(url) as client:
        client.map(time.sleep, [60.0])
        _wait_running(url, 1)
        server.kill()
        server.wait()
        start = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
        took = time.monotonic() - start
    assert took < 12, f"the orphaned worker took {took:.1f}s to exit"
    said = processes.logs().count("server unreachable for")
    assert said == 1, processes.logs()


def test_local_cluster_restarts_a_worker_that_died(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "coffea_hq.local")
    with LocalCluster(workers=2, lease_timeout=5) as cluster:
        first = cluster.workers[0]
        poll_until(lambda: len(get_json(cluster.url + "/api/v1/workers")) == 2, 20, "2 workers up")
        first.kill()
        poll_until(
            lambda: f"local-{cluster.port}-2" in get_json(cluster.url + "/api/v1/workers"),
            20,
            "a new worker registered",
        )
        with Client(cluster.url) as client:
            assert client.map(abs, [-1, -2, -3]).result() == [1, 2, 3]
        said = [r.getMessage() for r in caplog.records if "died" in r.getMessage()]
        assert len(said) == 1 and "SIGKILL" in said[0], said


CLI_SCRIPT = """
import sys
from coffea_hq.cli import main
sys.argv = ["coffea-hq", "local", "--workers", "1", "--port", "0"]
main()
"""


@pytest.mark.slow
def test_ctrl_c_stops_coffea_hq_local_in_seconds_with_a_task_running(
    tmp_path: Path, script: list[Script]
) -> None:
    s = Script(tmp_path, CLI_SCRIPT)
    script.append(s)
    url = s.line("  export HQ_URL=")
    with Client(url) as client:
        client.map(time.sleep, [60.0])
        _wait_running(url, 1)
        children = s.descendants()
        start = time.monotonic()
        os.killpg(os.getpgid(s.proc.pid), signal.SIGINT)
        s.proc.wait(timeout=20)
    assert time.monotonic() - start < 8, s.stderr()
    poll_until(lambda: not _alive(children), 5, "every child of coffea-hq local exited")


EXECUTOR_SCRIPT = """
import time
from coffea_hq import HQExecutor, LocalCluster
with LocalCluster(workers=2, redis_url={redis!r}, server_args=("--prefix", {prefix!r})) as c:
    print("url", c.url, flush=True)
    HQExecutor(c.url, status=False)([30.0] * 4, time.sleep, None)
"""


@pytest.mark.slow
@embedded_only
def test_ctrl_c_in_hq_executor_with_a_local_cluster_returns_in_seconds(
    tmp_path: Path,
    script: list[Script],
    store: EmbeddedRedis,
    prefix: str,
    redis_client: redis.Redis,
) -> None:
    s = Script(tmp_path, EXECUTOR_SCRIPT.format(redis=store.url, prefix=prefix))
    script.append(s)
    url = s.line("url ")
    _wait_running(url, 2)
    children = s.descendants()
    start = time.monotonic()
    os.killpg(os.getpgid(s.proc.pid), signal.SIGINT)
    s.proc.wait(timeout=20)
    assert time.monotonic() - start < 10, s.stderr()
    poll_until(lambda: not _alive(children), 5, "every child of the script exited")
    metas = [k for k in redis_client.scan_iter(f"{prefix}:job:*") if k.endswith(b"}")]
    assert len(metas) == 1
    assert redis_client.hget(metas[0], "state") == b"cancelled"


@pytest.mark.slow
def test_a_crash_looping_worker_is_restarted_a_bounded_number_of_times(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from coffea_hq import local

    caplog.set_level(logging.WARNING, "coffea_hq.local")
    # "--slots 0" makes every hq-worker refuse to start (exit code 2).
    with LocalCluster(workers=1, worker_args=("--slots", "0")) as cluster:
        poll_until(
            lambda: (
                len(cluster.workers) == 1 + local.RESTART_BURST
                and all(w.poll() is not None for w in cluster.workers)
            ),
            30,
            "the restart budget spent",
        )
        time.sleep(4 * local.WATCH_EVERY)
        assert len(cluster.workers) == 1 + local.RESTART_BURST
    said = [r for r in caplog.records if "is not restarted" in r.getMessage()]
    assert len(said) == 1 and "exit code 2" in said[0].getMessage()
    restarted = [r for r in caplog.records if "in its place" in r.getMessage()]
    assert len(restarted) == local.RESTART_BURST
