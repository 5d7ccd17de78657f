"""Adversarial review of the zygote (worker/zygote.py, worker/slots.py) against real
processes: a zygote killed under busy slots, what a forked task inherits (signal
dispositions, file descriptors), what a task changes in its process (not seen by the
next job), and descriptors over many jobs. Each asserts on the server's own accounting
or on /proc, never on what the client dedupes."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import cloudpickle
import pytest

from coffea_hq import Client
from coffea_hq.errors import TaskFailed

from .conftest import Processes
from .test_zygote import wait_preloaded
from .util import poll_until

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def zygote_of(pid: int) -> int:
    """The parent of ``pid`` if it is a zygote (0 otherwise)."""
    with open(f"/proc/{pid}/stat") as f:
        parent = int(f.read().rsplit(")", 1)[1].split()[1])
    with open(f"/proc/{parent}/cmdline", "rb") as f:
        return parent if b"coffea_hq.worker.zygote" in f.read() else 0


def children_of(pid: int) -> list[int]:
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found += [int(p) for p in f.read().split()]
    return found


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def first_attempt_hangs(directory: str, x: int) -> int:
    """Notes its pid in ``directory``/x; the first attempt hangs (until killed), a later
    one returns ``x``."""
    path = os.path.join(directory, str(x))
    again = os.path.exists(path)
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    if not again:
        time.sleep(120)
    return x


def test_a_zygote_killed_under_busy_slots_requeues_each_task_once(
    server_url: str, processes: Processes, tmp_path: Path
) -> None:
    worker = processes.worker(server_url, "--slots", "2")
    wait_preloaded(server_url, "coffea_hq")
    with Client(server_url) as client:
        job = client.map(first_attempt_hangs, [str(tmp_path)] * 2, range(2))
        started = [tmp_path / "0", tmp_path / "1"]
        poll_until(lambda: all(p.exists() for p in started), 60, "both tasks started")
        pids = [int(p.read_text().split()[0]) for p in started]
        zygote = {zygote_of(pid) for pid in pids}
        assert len(zygote) == 1 and 0 not in zygote, "both slot processes forked by one zygote"
        os.kill(zygote.pop(), signal.SIGKILL)
        assert job.result(timeout=90) == [0, 1]
        counters = client.queue()["counters"]
    # Each task ran twice (the killed attempt, then one more), never a third time, and the
    # server counted two requeued attempts and two results, nothing refused or duplicated.
    assert [len(p.read_text().split()) for p in started] == [2, 2]
    assert counters.get("tasks_ok") == 2
    assert counters.get("requeued") == 2
    assert not counters.get("tasks_failed")
    assert not counters.get("duplicates") and not counters.get("refused")
    for pid in pids:  # the killed attempts' processes died with their zygote
        poll_until(lambda p=pid: not os.path.exists(f"/proc/{p}"), 10, f"process {pid} gone")  # type: ignore[misc]
    assert worker.poll() is None
    # The crash is put down to the zygote, not to memory.
    assert "crashed: the task subprocess was killed with its zygote" in processes.logs()


def changes_its_process(directory: str) -> int:
    """Changes what a process holds: cwd, environment, a signal handler, sys.modules, a
    module attribute, an open file; returns its pid."""
    import json

    import coffea_hq

    os.chdir(directory)
    os.environ["HQ_REVIEW_LEAK"] = "1"
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, lambda *_: None)
    sys.modules["hq_review_leak"] = json
    coffea_hq.hq_review_leak = True
    sys.path.insert(0, directory)
    os.open(os.path.join(directory, "held"), os.O_WRONLY | os.O_CREAT)  # left open
    return os.getpid()


def what_it_sees(directory: str) -> tuple[bool, bool, str, str, bool, bool, bool, int]:
    import contextlib

    import coffea_hq

    fds = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own descriptor
            fds.append(os.readlink(f"/proc/self/fd/{fd}"))
    return (
        os.getcwd() == directory,
        "HQ_REVIEW_LEAK" in os.environ,
        str(signal.getsignal(signal.SIGTERM)),
        str(signal.getsignal(signal.SIGUSR1)),
        "hq_review_leak" in sys.modules,
        hasattr(coffea_hq, "hq_review_leak") or directory in sys.path,
        any(path.endswith("/held") for path in fds),
        os.getpid(),
    )


def test_what_a_task_changes_in_its_process_is_not_seen_by_the_next_job(
    server_url: str, processes: Processes, tmp_path: Path
) -> None:
    processes.worker(server_url, "--slots", "1")
    wait_preloaded(server_url, "coffea_hq")
    with Client(server_url) as client:
        first = client.map(changes_its_process, [str(tmp_path)]).result(timeout=60)[0]
        seen = client.map(what_it_sees, [str(tmp_path)]).result(timeout=60)[0]
    assert seen[:7] == (
        False,
        False,
        str(signal.Handlers.SIG_DFL),
        str(signal.Handlers.SIG_DFL),
        False,
        False,
        False,
    )
    assert seen[7] != first


def leave_processes_behind(x: int) -> tuple[int, int]:
    """Starts a daemon (its own session) and a plain grandchild, and returns leaving both."""
    import subprocess

    daemon = subprocess.Popen(["sleep", "300"], start_new_session=True)
    plain = subprocess.Popen(["sleep", "300"])
    return daemon.pid, plain.pid


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def leave_then_die(where: str) -> None:
    """Leaves a daemon and a grandchild running (their pids in ``where``), then its
    process is killed outright."""
    with open(where, "w") as f:
        f.write(" ".join(map(str, leave_processes_behind(0))))
    os.kill(os.getpid(), signal.SIGKILL)


def test_what_a_task_leaves_running_ends_with_its_process(
    server_url: str, processes: Processes, tmp_path: Path
) -> None:
    processes.worker(server_url, "--slots", "1")
    wait_preloaded(server_url, "coffea_hq")
    left: list[int] = []
    try:
        with Client(server_url) as client:
            left += client.map(leave_processes_behind, [0]).result(timeout=60)[0]
            assert all(running(pid) for pid in left)  # the job's process still serves it
            # The next job gets a fresh process: the first one's leftovers end with its own.
            left += client.map(leave_processes_behind, [0]).result(timeout=60)[0]
            poll_until(lambda: not any(map(running, left[:2])), 10, "the first job's leftovers end")
            # A slot process killed outright: what it left is adopted by the zygote, and ended.
            where = tmp_path / "pids"
            with pytest.raises(TaskFailed, match="killed by SIGKILL"):
                client.map(leave_then_die, [str(where)], max_attempts=1).result(timeout=60)
            left += [int(pid) for pid in where.read_text().split()]
            poll_until(lambda: not any(map(running, left[4:])), 10, "a killed task's leftovers end")
        processes.stop_all()  # the worker stops: the second job's process ends, and with it
        poll_until(lambda: not any(map(running, left[2:4])), 10, "the last job's leftovers end")
    finally:
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def nothing(x: int) -> int:
    return x


# An event loop that kept each job's stdout pipe open (uvloop) leaked one descriptor per
# job: 28 -> 76 fds over 50 jobs.
JOBS = 12


def test_no_descriptor_leaks_over_many_jobs(server_url: str, processes: Processes) -> None:
    worker = processes.worker(server_url, "--slots", "1")
    wait_preloaded(server_url, "coffea_hq")
    with Client(server_url) as client:
        client.map(nothing, range(2)).result(timeout=60)  # every lazy import, every pool
        zygote = {p for p in children_of(worker.pid) if zygote_of_pid(p)}
        assert len(zygote) == 1
        (z,) = zygote
        before = open_fds(worker.pid), open_fds(z)
        for _ in range(JOBS):
            assert client.map(nothing, range(2)).result(timeout=60) == [0, 1]
        after = open_fds(worker.pid), open_fds(z)
    # Some slack for a connection the worker's HTTP pool opened meanwhile; a leak of one
    # descriptor per job would be JOBS.
    assert after[0] <= before[0] + 4, f"worker fds {before[0]} -> {after[0]} over {JOBS} jobs"
    assert after[1] <= before[1], f"zygote fds {before[1]} -> {after[1]} over {JOBS} jobs"


def zygote_of_pid(pid: int) -> bool:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return b"coffea_hq.worker.zygote" in f.read()


def brief(x: int) -> int:
    time.sleep(0.02)
    return x


DRAIN_JOBS = 12  # one task each: a slot process forked per job, many forks in flight


@pytest.mark.slow
def test_a_worker_drained_while_its_zygote_forks_loses_and_leaves_nothing(
    server_url: str, processes: Processes
) -> None:
    first = processes.worker(server_url, "--slots", "2")
    wait_preloaded(server_url, "coffea_hq")
    with Client(server_url) as client:
        jobs = [client.map(brief, [i]) for i in range(DRAIN_JOBS)]
        poll_until(lambda: client.queue()["counters"].get("tasks_ok", 0) >= 2, 30, "jobs under way")
        descendants = children_of(first.pid)
        descendants += [p for z in descendants if zygote_of_pid(z) for p in children_of(z)]
        first.send_signal(signal.SIGTERM)  # mid-stream: slots switching jobs, forks asked
        assert first.wait(timeout=60) == 0
        for pid in descendants:  # the zygote and its slot processes ended with the worker
            poll_until(lambda p=pid: not running(p), 10, f"process {pid} ended")  # type: ignore[misc]
        processes.worker(server_url, "--slots", "2")  # takes over what was handed back
        assert [job.result(timeout=90) for job in jobs] == [[i] for i in range(DRAIN_JOBS)]
        counters = client.queue()["counters"]
    assert counters.get("tasks_ok") == DRAIN_JOBS
    assert not counters.get("duplicates") and not counters.get("refused")
    assert not counters.get("tasks_failed")
