"""Warm slot subprocesses: each job's slot process is a fork of the worker's zygote (which
has imported the preload and what earlier jobs imported, and ran no job code), keeping
issue 12's promise that nothing of job A is visible in job B; exits, kills and memory
limits of forked processes work as for spawned ones; without a zygote, slots spawn."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from coffea_hq.worker import zygote
from coffea_hq.worker.child import MARKER_SIZE
from coffea_hq.worker.slots import private_bytes, rss_bytes

from coffea_hq import Client
from coffea_hq.errors import TaskFailed

from .conftest import Processes
from .util import poll_until

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def worker_stats(url: str) -> dict[str, Any]:
    """The one worker's last heartbeat, as the server keeps it."""
    with Client(url) as client:
        workers = client.run(client.api.workers())
    assert len(workers) <= 1
    return next(iter(workers.values())).stats if workers else {}


def wait_preloaded(url: str, module: str) -> dict[str, Any]:
    stats: dict[str, Any] = {}

    def ready() -> bool:
        nonlocal stats
        stats = worker_stats(url)
        return module in stats.get("zygote_preloaded", [])

    poll_until(ready, 60, f"the worker's zygote has {module} imported", every=0.2)
    return stats


def parent_cmdline() -> str:
    with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


def mark(x: int) -> tuple[int, bool, float]:
    """Job A: changes a module it did not import itself (the zygote did), and computes."""
    warm = "numpy" in sys.modules  # before this task imports anything
    import numpy

    numpy.hq_mark = 1  # type: ignore[attr-defined]
    a = numpy.arange(10_000, dtype=float).reshape(100, 100)
    return os.getpid(), warm, float((a @ a).trace())


def look(x: int) -> tuple[object, int, str]:
    """Job B: sees numpy as a fresh interpreter would."""
    import numpy

    return getattr(numpy, "hq_mark", None), os.getpid(), parent_cmdline()


def uses_yaml(x: int) -> str:
    import yaml

    return str(yaml.safe_load(f"v: {x}")["v"])


def yaml_is_warm(x: int) -> tuple[bool, str]:
    return "yaml" in sys.modules, parent_cmdline()


def exit_7(x: int) -> int:
    os._exit(7)


def kill_me(x: int) -> int:
    os.kill(os.getpid(), signal.SIGKILL)
    return x


def zygote_pid(x: int) -> int:
    """The pid of the zygote that forked this process (0: it was spawned)."""
    return os.getppid() if "coffea_hq.worker.zygote" in parent_cmdline() else 0


def test_a_module_changed_by_job_a_in_the_zygote_is_fresh_in_job_b(
    server_url: str, processes: Processes
) -> None:
    processes.worker(server_url, "--slots", "1", "--preload", "numpy")
    wait_preloaded(server_url, "numpy")
    forks = worker_stats(server_url)["zygote_forks"]
    with Client(server_url) as client:
        a = client.map(mark, range(10)).result(timeout=60)
        b = client.map(look, range(10)).result(timeout=60)
    # Job A ran in a process forked warm (numpy there before its first task), and numpy
    # computes correctly after the fork (OpenBLAS started its threads in the zygote).
    import numpy

    m = numpy.arange(10_000, dtype=float).reshape(100, 100)
    expected = float((m @ m).trace())
    assert all(warm for _, warm, _ in a)
    assert [t for _, _, t in a] == [expected] * 10
    assert all(mark is None for mark, _, _ in b)
    assert {pid for pid, _, _ in a}.isdisjoint(pid for _, pid, _ in b)
    assert all("coffea_hq.worker.zygote" in parent for _, _, parent in b)
    # The worker's own accounting: both jobs' processes came from the zygote.
    poll_until(lambda: worker_stats(server_url)["zygote_forks"] >= forks + 2, 15, "two more forks")


def test_the_zygote_learns_what_jobs_import(server_url: str, processes: Processes) -> None:
    processes.worker(server_url, "--slots", "1")
    wait_preloaded(server_url, "coffea_hq")  # the first zygote: child.py's imports only
    assert "yaml" not in worker_stats(server_url)["zygote_preloaded"]
    with Client(server_url) as client:
        assert client.map(uses_yaml, range(3)).result(timeout=60) == ["0", "1", "2"]
        # One job is not enough (a worker that runs one job would pay for nothing) ...
        assert "yaml" not in worker_stats(server_url)["zygote_preloaded"]
        assert client.map(uses_yaml, range(3)).result(timeout=60) == ["0", "1", "2"]
        wait_preloaded(server_url, "yaml")  # ... two are: a new zygote, switched to once ready
        warm = client.map(yaml_is_warm, range(3)).result(timeout=60)
    assert all(w for w, _ in warm)
    assert all("coffea_hq.worker.zygote" in parent for _, parent in warm)


def test_exits_of_forked_processes_name_the_task_and_the_zygote_can_die(
    server_url: str, processes: Processes
) -> None:
    processes.worker(server_url, "--slots", "1")
    wait_preloaded(server_url, "coffea_hq")
    with Client(server_url) as client:
        with pytest.raises(TaskFailed, match="exited with code 7"):
            client.map(exit_7, [0], max_attempts=1).result(timeout=60)
        with pytest.raises(TaskFailed, match="killed by SIGKILL"):
            client.map(kill_me, [0], max_attempts=1).result(timeout=60)
        # The zygote dies between jobs: the next job's processes are spawned, nothing is
        # lost, and a new zygote takes over.
        first = client.map(zygote_pid, [0]).result(timeout=60)[0]
        assert first
        os.kill(first, signal.SIGKILL)
        assert client.map(uses_yaml, range(20)).result(timeout=60) == [str(i) for i in range(20)]
        poll_until(
            lambda: client.map(zygote_pid, [0]).result(timeout=60)[0] not in (0, first),
            30,
            "a new zygote forks the slot processes",
            every=0.2,
        )
        counters = client.queue()["counters"]
    assert counters.get("tasks_failed", 0) >= 2
    assert "zygote" in processes.logs() and "exited" in processes.logs()


def test_bad_preload_is_refused_at_once() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "coffea_hq.worker", "http://127.0.0.1:1", "--preload", "a b"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "--preload takes comma-separated module names" in out.stderr


# ------------------------------------------------------ the zygote itself, in this process


async def fork_and_run(forker: zygote.Forker, source: str) -> tuple[int, str, int]:
    """Fork one child, have it run ``source`` as a task; (pid, what it printed, its
    private bytes while alive)."""
    import tempfile

    from coffea_hq.worker import pipe

    from coffea_hq import protocol

    fd, path = tempfile.mkstemp()
    os.unlink(path)
    os.write(fd, bytes(MARKER_SIZE))
    child = await forker.fork(fd, None)
    assert child is not None and child.stdin is not None and child.stdout is not None
    try:

        def task() -> str:
            scope: dict[str, Any] = {}
            exec(source, scope)
            return str(scope.get("out"))

        child.stdin.write(pipe.encode(("function", "f", protocol.dumps(task))))
        child.stdin.write(pipe.encode(("run", [(1, "f", protocol.dumps(()), False)])))
        await child.stdin.drain()
        while True:
            (size,) = pipe.HEADER.unpack(await child.stdout.readexactly(pipe.HEADER.size))
            kind, body = pipe.decode(await child.stdout.readexactly(size))
            if kind == "done":
                break
        (_, outcome, error, data, _, _) = body[0]
        assert outcome == "ok", error
        private = private_bytes(child.pid)
        assert 0 < private < rss_bytes(child.pid)  # the zygote's pages are not its own
        child.stdin.close()
        assert await asyncio.wait_for(child.wait(), 30) == 0
        return child.pid, str(protocol.loads(data)), private
    finally:
        os.close(fd)


async def test_preload_skips_what_fails_and_leaves_out_what_starts_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "hq_starts_a_thread.py").write_text(
        "import threading\nthreading.Thread(target=threading.Event().wait, daemon=True).start()\n"
    )
    (tmp_path / "hq_broken.py").write_text("raise RuntimeError('broken on purpose')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    caplog.set_level(logging.INFO, logger="coffea_hq")
    forker = zygote.Forker(["hq_broken", "hq_starts_a_thread", "numpy"], learn=False)
    forker.start()
    try:
        await asyncio.wait_for(_until(lambda: forker.ready), 60)
        loaded = forker.stats()["zygote_preloaded"]
        assert "numpy" in loaded and "hq_starts_a_thread" not in loaded
        pid, out, _ = await fork_and_run(
            forker,
            "import sys, threading, numpy\n"
            "a = numpy.ones((200, 200))\n"
            "out = (sys.modules.get('hq_broken'), threading.active_count(), float((a @ a)[0, 0]))",
        )
        assert out == "(None, 1, 200.0)"
    finally:
        await forker.close()
    text = caplog.text
    assert "preload of hq_broken (RuntimeError: broken on purpose) skipped" in text
    assert "importing hq_starts_a_thread started a thread" in text


async def _until(condition: Any) -> None:
    while not condition():
        await asyncio.sleep(0.05)
