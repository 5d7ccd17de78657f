"""The HTCondor factory against a real hq-server with real queue depths.

No HTCondor pool exists here. The submit description is checked as text (golden files)
and through the real htcondor bindings' Submit object; the scaling loop runs against a
real server with two stand-ins for the schedd: the factory's own dry-run pool, and a
pool that runs each submitted job's executable and arguments as a local process and
removes it the way condor_rm with graceful removal does (SIGTERM, wait), so real
hq-workers pull, drain and exit.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import cloudpickle
import pytest

from coffea_hq import Client
from coffea_hq.embedded import EmbeddedRedis
from coffea_hq.factory import condor
from coffea_hq.factory.condor import DryRunPool, Factory, WorkerSpec
from coffea_hq.factory.policy import BatchState, Bounds, Cooldown, WorkerJob

from ..conftest import Processes
from .conftest import wait_until

cloudpickle.register_pickle_by_value(sys.modules[__name__])

GOLDEN = Path(__file__).parent / "golden"
HQ_WORKER = str(Path(sys.executable).with_name("hq-worker"))

# The two golden submit descriptions: the defaults, and every option set.
GOLDEN_ARGS = {
    "condor-default.sub": [
        "http://hq.example.org:8786",
        "--worker-command",
        "/opt/coffea-hq/bin/hq-worker",
    ],
    "condor-custom.sub": [
        "https://hq.example.org:8786",
        "--slots",
        "4",
        "--cpus",
        "4",
        "--memory",
        "8GB",
        "--disk",
        "20GB",
        "--requirements",
        '(OpSysAndVer == "AlmaLinux9") && (HasCVMFS =?= true)',
        "--submit-key",
        '+ProjectName="cms"',
        "--submit-key",
        "accounting_group=group_cms.hq",
        "--submit-key",
        "universe=container",
        "--submit-key",
        "container_image=/cvmfs/unpacked.cern.ch/coffea-hq:0.1.0-coffea",
        "--worker-command",
        "/usr/local/bin/hq-worker",
        "--drain-grace",
        "1800",
        "--name",
        "cms-analysis",
        "--log-dir",
        "/scratch/hq/logs",
    ],
}


def parse_args(argv: list[str]) -> condor.argparse.Namespace:
    p = condor.argparse.ArgumentParser()
    condor.add_condor_arguments(p)
    return p.parse_args(argv)


def description_text(argv: list[str]) -> str:
    return condor.render_submit(condor.submit_description(condor.spec_from_args(parse_args(argv))))


@pytest.mark.timeout(10)
@pytest.mark.parametrize("name", sorted(GOLDEN_ARGS))
def test_submit_description_matches_golden_file(name: str) -> None:
    text = description_text(GOLDEN_ARGS[name])
    if os.environ.get("UPDATE_GOLDEN"):
        (GOLDEN / name).write_text(text)
    assert text == (GOLDEN / name).read_text()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", sorted(GOLDEN_ARGS))
def test_htcondor_bindings_accept_the_submit_description(name: str) -> None:
    htcondor = condor.import_htcondor()
    desc = condor.submit_description(condor.spec_from_args(parse_args(GOLDEN_ARGS[name])))
    submit = htcondor.Submit(desc)
    for key, value in desc.items():
        # The bindings spell +Attr as MY.Attr; the value is kept as given.
        assert submit[re.sub(r"^\+", "MY.", key)] == value
    golden = (GOLDEN / name).read_text()
    assert str(submit) == re.sub(r"(?m)^\+", "MY.", golden)


@pytest.mark.timeout(10)
def test_submit_description_drains_on_removal() -> None:
    desc = condor.submit_description(WorkerSpec(url="http://hq:8786", drain_grace=900))
    assert desc["kill_sig"] == desc["remove_kill_sig"] == "SIGTERM"
    assert desc["want_graceful_removal"] == "true"
    assert desc["job_max_vacate_time"] == "900"
    # The worker stops waiting for its tasks before HTCondor's deadline, so it hands
    # back what is left itself instead of being killed.
    assert split_condor_arguments(desc["arguments"])[-2:] == ["--drain-timeout", "870"]


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["http://hq:8786", "--min", "5", "--max", "2"],
            "--max must be at least 1 and at least --min",
        ),
        (["http://hq:8786", "--submit-key", "ProjectName"], "--submit-key takes KEY=VALUE"),
        (["hq:8786"], "server URL must start with http:// or https://"),
        (["http://hq:8786", "--cpus", "0"], "--cpus must be at least 1"),
    ],
)
def test_bad_options_are_refused_with_a_sentence(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert condor.run_condor(parse_args([*argv, "--dry-run", "--once"])) == 2
    assert message in capsys.readouterr().err


@pytest.mark.timeout(20)
def test_missing_bindings_say_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "htcondor2", None)
    monkeypatch.setitem(sys.modules, "htcondor", None)
    with pytest.raises(condor.FactoryError, match="pip install htcondor.*--dry-run"):
        condor.CondorPool("coffea-hq")


# ----------------------------------------------------------------------------- real server


def split_condor_arguments(text: str) -> list[str]:
    """HTCondor's new argument syntax, as a starter splits it."""
    assert text.startswith('"') and text.endswith('"'), text
    inner = text[1:-1].replace('""', '"')
    return shlex.split(inner.replace("''", "\\'"))


class ProcessPool:
    """A schedd + startd on this machine: a submitted job runs its executable and
    arguments as a local process; a removed one gets its remove_kill_sig and
    job_max_vacate_time seconds before SIGKILL, as condor_rm with graceful removal."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.clusters = 0
        self.live: dict[str, subprocess.Popen[bytes]] = {}
        self.removed: dict[str, subprocess.Popen[bytes]] = {}
        self.vacate = 60.0
        self.signal = signal.SIGTERM

    def jobs(self) -> list[WorkerJob]:
        for job_id, proc in list(self.live.items()):
            if proc.poll() is not None:  # exited: the job leaves the queue
                del self.live[job_id]
        return [WorkerJob(job_id, BatchState.RUNNING) for job_id in self.live]

    def submit(self, desc: dict[str, str], count: int) -> list[str]:
        self.clusters += 1
        self.vacate = float(desc["job_max_vacate_time"])
        self.signal = getattr(signal, desc["remove_kill_sig"])
        ids = []
        for proc_id in range(count):
            job_id = f"{self.clusters}.{proc_id}"
            args = [
                a.replace("$(ClusterId)", str(self.clusters)).replace("$(ProcId)", str(proc_id))
                for a in split_condor_arguments(desc["arguments"])
            ]
            log = open(self.log_dir / f"worker-{job_id}.out", "wb")  # noqa: SIM115
            self.live[job_id] = subprocess.Popen(
                [desc["executable"], *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
            log.close()
            ids.append(job_id)
        return ids

    def remove(self, ids: Sequence[str], reason: str) -> None:
        for job_id in ids:
            proc = self.live.pop(job_id)
            proc.send_signal(self.signal)
            self.removed[job_id] = proc

    def wait_removed(self) -> dict[str, int]:
        codes = {}
        for job_id, proc in self.removed.items():
            try:
                codes[job_id] = proc.wait(timeout=self.vacate)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[job_id] = proc.wait()
        return codes

    def stop(self) -> None:
        for proc in [*self.live.values(), *self.removed.values()]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def logs(self) -> str:
        return "\n".join(
            f"== {p.name}\n{p.read_text()[-2000:]}"
            for p in sorted(self.log_dir.glob("worker-*.out"))
        )


@pytest.fixture
def server(embedded_store: EmbeddedRedis, processes: Processes) -> str:
    url, _ = processes.server(embedded_store.url, "--lease-timeout", "5")
    return url


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[ProcessPool]:
    p = ProcessPool(tmp_path)
    yield p
    p.stop()


def record(directory: str, index: int, seconds: float) -> int:
    """A task that leaves one file per execution, so reruns would show."""
    time.sleep(seconds)
    Path(directory, f"{index}-{uuid.uuid4().hex}").touch()
    return index * index


def executions(directory: Path) -> list[int]:
    return sorted(int(p.name.split("-")[0]) for p in directory.iterdir())


@pytest.mark.timeout(60)
def test_dry_run_follows_the_real_queue_depth(server: str) -> None:
    lines: list[str] = []
    spec = WorkerSpec(url=server, slots=2, worker_command=HQ_WORKER)
    factory = Factory(
        server, spec, Bounds(1, 5, 2), DryRunPool(), Cooldown(0), dry_run=True, out=lines.append
    )
    first = factory.cycle()
    assert (first.target, first.submit) == (1, 1)  # an empty queue sits at min
    assert factory.cycle().idle
    with Client(server) as client:
        job = client.map(time.sleep, [30] * 7)  # no workers: it stays queued
        wait_until(lambda: client.queue()["queued"] == 7, "the backlog")
        grow = factory.cycle()
        assert (grow.target, grow.submit) == (4, 3)  # ceil(7 / 2) = 4 workers
        assert "work 7 at 2 slot(s) per worker needs 4 worker(s)" in grow.reason
        assert "would submit 3 worker job(s)" in lines[-1]
        big = client.map(time.sleep, [30] * 20)
        wait_until(lambda: client.queue()["work"] == 27, "the larger backlog")
        capped = factory.cycle()
        assert (capped.target, capped.submit) == (5, 1)
        job.cancel()
        big.cancel()
        wait_until(lambda: client.queue()["work"] == 0, "the cancelled jobs to leave")
    shrink = factory.cycle()
    assert shrink.target == 1 and len(shrink.remove) == 4
    assert "would remove" in lines[-1]
    assert factory.cycle().idle


@pytest.mark.timeout(60)
def test_dry_run_command_prints_description_and_decision(server: str) -> None:
    with Client(server) as client:
        job = client.map(time.sleep, [30] * 3)
        wait_until(lambda: client.queue()["queued"] == 3, "the backlog")
        argv = [
            sys.executable,
            "-m",
            "coffea_hq.factory.condor",
            "--dry-run",
            "--once",
            "--max",
            "2",
            "--worker-command",
            HQ_WORKER,
        ]
        done = subprocess.run(
            argv, env={**os.environ, "HQ_URL": server}, capture_output=True, text=True, timeout=30
        )
        job.cancel()
    assert done.returncode == 0, done.stderr
    expected = description_text([server, "--worker-command", HQ_WORKER])
    assert expected in done.stdout
    assert (
        "queued=3 running=0 target=2: work 3 at 1 slot(s) per worker needs 3 worker(s), "
        "max 2; have 0 running + 0 idle: submit 2" in done.stdout
    )
    assert "would submit 2 worker job(s)" in done.stdout


@pytest.mark.slow  # a scale test: real workers started and drained
@pytest.mark.timeout(120)
def test_factory_scales_real_workers_and_drains_them_without_losing_a_task(
    server: str, pool: ProcessPool, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    lines: list[str] = []
    spec = WorkerSpec(url=server, slots=1, worker_command=HQ_WORKER, drain_grace=60)
    factory = Factory(server, spec, Bounds(1, 3, 1), pool, Cooldown(0), out=lines.append)
    try:
        with Client(server) as client:
            # No work: the factory sits at min.
            assert factory.cycle().submit == 1
            assert factory.cycle().idle and len(pool.jobs()) == 1

            # A backlog: max within one cycle.
            job = client.map(record, [str(runs)] * 18, range(18), [0.4] * 18)
            wait_until(lambda: client.queue()["work"] >= 15, "the backlog")
            grown = factory.cycle()
            assert (grown.target, grown.submit) == (3, 2)
            assert len(pool.jobs()) == 3

            # The operator lowers max while every worker holds tasks: two are removed
            # mid-job and drain (their running task finishes, the rest goes back).
            wait_until(
                lambda: client.queue()["workers"] == 3 and client.queue()["running"] >= 3,
                "three busy workers",
            )
            factory.bounds = Bounds(1, 1, 1)
            shrunk = factory.cycle()
            assert len(shrunk.remove) == 2, shrunk.reason
            assert all(code == 0 for code in pool.wait_removed().values()), pool.logs()
            for job_id in shrunk.remove:  # they drained, they were not killed
                assert " draining: " in (tmp_path / f"worker-{job_id}.out").read_text()
            assert job.result(timeout=60) == [i * i for i in range(18)]

            # Back to 1..3: a second backlog grows the pool, and once the queue drains
            # the pool returns to min.
            factory.bounds = Bounds(1, 3, 1)
            job = client.map(record, [str(runs)] * 9, range(100, 109), [0.4] * 9)
            wait_until(lambda: client.queue()["work"] >= 6, "the second backlog")
            assert factory.cycle().submit == 2
            assert job.result(timeout=60) == [i * i for i in range(100, 109)]
            wait_until(lambda: client.queue()["work"] == 0, "the queue to drain")
            back = factory.cycle()
            assert back.target == 1 and len(back.remove) == 2, back.reason
            assert len(pool.jobs()) == 1
            assert factory.cycle().idle
        assert all(code == 0 for code in pool.wait_removed().values()), pool.logs()
        # Every task ran exactly once: the drains finished tasks, none was killed and rerun.
        assert executions(runs) == [*range(18), *range(100, 109)]
    except AssertionError:
        print("\n".join(lines))
        print(pool.logs())
        raise
