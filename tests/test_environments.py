"""Per-task environments (issue 14): real hq-server and hq-worker processes, real uv
installs from a local wheel directory (offline), failures named by environment and step."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import cloudpickle
import pytest

from coffea_hq import Client, Environment, TaskFailed, protocol
from coffea_hq.embedded import EmbeddedRedis
from coffea_hq.remote import RemoteWarning
from tests.conftest import Processes
from tests.util import make_wheel, poll_until

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("uv") is None, reason="needs the uv wheel (coffea-hq[envs])"
)

PROBE_PACKAGE = "hqenvprobe"  # exists only in the wheel directory, never in this venv


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cloudpickle (copied from this venv) and a probe package, as wheels."""
    directory = tmp_path_factory.mktemp("wheels")
    source = Path(cloudpickle.__file__).parent
    files = {f"cloudpickle/{p.relative_to(source)}": p.read_bytes() for p in source.rglob("*.py")}
    make_wheel(directory, "cloudpickle", cloudpickle.__version__, files)
    make_wheel(directory, PROBE_PACKAGE, "1.0", {f"{PROBE_PACKAGE}/__init__.py": b"VALUE = 42\n"})
    return directory


class Cluster:
    def __init__(self, url: str, cache: Path, processes: Processes) -> None:
        self.url = url
        self.cache = cache
        self.processes = processes

    def worker_logs(self) -> str:
        return "\n".join(p.read_text() for p in self.processes.log_dir.glob("worker-*.log"))


@contextlib.contextmanager
def _cluster(logs: Path, cache: Path, workers: int) -> Iterator[Cluster]:
    """A server and ``workers`` two-slot workers sharing one environment cache (as the
    workers of one node do)."""
    logs.mkdir(parents=True, exist_ok=True)
    store = EmbeddedRedis().start()
    processes = Processes(logs)
    try:
        url, _ = processes.server(store.url, prefix="envs")
        for _ in range(workers):
            processes.worker(url, "--slots", "2", "--env-cache", str(cache), "--lease-wait", "1")
        with Client(url) as client:
            poll_until(lambda: len(client.workers()) == workers, 30, "workers registered")
        yield Cluster(url, cache, processes)
    finally:
        processes.stop_all()
        store.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with _cluster(tmp_path_factory.mktemp("logs"), tmp_path_factory.mktemp("cache"), 1) as c:
        yield c


def _pip_env(wheels: Path, *extra: str, strict: bool = False) -> Environment:
    return Environment.pip(
        ["cloudpickle", f"{PROBE_PACKAGE}==1.0", *extra],
        find_links=str(wheels),
        index=False,
        strict=strict,
    )


def _failure(
    cluster: Cluster, environment: Environment, function: Callable[[int], int] | None = None
) -> TaskFailed:
    def task(x: int) -> int:
        return x

    with Client(cluster.url) as client:
        before = client.queue()["counters"].get("tasks_failed", 0)
        job = client.map(function or task, [1], environment=environment)
        with pytest.raises(TaskFailed) as failed:
            job.result(timeout=120)
        # The server failed the task for good (not retried, not run elsewhere).
        assert client.queue()["counters"]["tasks_failed"] - before == 1
    return failed.value


def _check_isolated(cluster: Cluster, env: Environment, n: int) -> None:
    """``n`` tasks then 2 more of ``env`` ran in it, and only in it; built once."""
    assert importlib.util.find_spec(PROBE_PACKAGE) is None  # only the environment has it

    def task(x: int) -> tuple[int, str, bool, list[str]]:  # by value: the env lacks tests/
        import importlib.util
        import sys

        import hqenvprobe

        leaked = importlib.util.find_spec("msgspec") is not None  # a worker's package
        return x * hqenvprobe.VALUE, sys.prefix, leaked, list(sys.path)

    with Client(cluster.url) as client:
        before = client.queue()["counters"]
        out = client.map(task, range(n), environment=env).result(timeout=120)
        again = client.map(task, range(2), environment=env).result(timeout=60)
        after = client.queue()["counters"]
    assert [o[0] for o in out] == [x * 42 for x in range(n)]
    prefix = str(cluster.cache / "envs" / env.sha)
    assert {o[1] for o in out + again} == {prefix}
    assert not any(o[2] for o in out)
    site = str(Path(sys.prefix) / "lib")
    assert not any(p.startswith(site) for o in out for p in o[3]), "worker venv on sys.path"
    assert after["tasks_ok"] - before["tasks_ok"] == n + 2  # the server counted every task
    assert len(list((cluster.cache / "envs").glob("*/.hq-ready"))) == 1
    assert cluster.worker_logs().count(f"environment {env.label}: built in") == 1


@pytest.mark.slow  # ~6 s on a loaded machine: a venv built, two jobs started in it
def test_pip_environment_is_built_once_and_isolated(cluster: Cluster, wheels: Path) -> None:
    _check_isolated(cluster, _pip_env(wheels), 4)  # two slots ask for it at once


@pytest.mark.slow
def test_two_workers_of_a_node_build_once(tmp_path: Path, wheels: Path) -> None:
    with _cluster(tmp_path / "logs", tmp_path / "cache", 2) as cluster:
        _check_isolated(cluster, _pip_env(wheels), 12)


@pytest.mark.slow  # ~4 s: two jobs, each a fresh subprocess in a fresh working directory
def test_files_reach_the_working_directory(cluster: Cluster, tmp_path: Path) -> None:
    calib = tmp_path / "calib.json"

    def task(x: int) -> str:
        with open("calib.json") as f:
            return f.read()

    with Client(cluster.url) as client:
        calib.write_text('{"v": 1}')
        first = client.map(task, range(3), files=[calib]).result(timeout=60)
        calib.write_text('{"v": 2}')  # changed: a new blob, a new hash
        second = client.map(task, range(3), files=[str(calib)]).result(timeout=60)
    assert first == ['{"v": 1}'] * 3
    assert second == ['{"v": 2}'] * 3


def test_files_bad_input_is_refused_before_submitting(tmp_path: Path, cluster: Cluster) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x.json").write_text("1")
    (tmp_path / "b" / "x.json").write_text("2")
    with Client(cluster.url) as client:
        jobs = len(client.queue().get("jobs", []) or [])
        with pytest.raises(ValueError, match="same name"):
            client.map(abs, [1], files=[tmp_path / "a" / "x.json", tmp_path / "b" / "x.json"])
        with pytest.raises(FileNotFoundError, match="no file"):
            client.map(abs, [1], files=[tmp_path / "missing.json"])
        with pytest.raises(TypeError, match="Environment"):
            client.map(abs, [1], environment="pixi.toml")  # type: ignore[arg-type]
        assert len(client.queue().get("jobs", []) or []) == jobs


def test_missing_package_names_environment_and_step(cluster: Cluster, wheels: Path) -> None:
    env = Environment.pip(["cloudpickle", "no-such-package"], find_links=str(wheels), index=False)
    failure = _failure(cluster, env)
    assert failure.exc_type == "coffea_hq.errors.EnvironmentFailed"
    assert f"environment {env.label}: step 'uv pip install' failed" in failure.message
    assert "no-such-package" in failure.message


def test_bad_hash_fails_the_install(cluster: Cluster, wheels: Path) -> None:
    env = Environment.pip(
        [f"{PROBE_PACKAGE}==1.0 --hash=sha256:{'0' * 64}", "cloudpickle"],
        find_links=str(wheels),
        index=False,
    )
    failure = _failure(cluster, env)
    assert "step 'uv pip install' failed" in failure.message
    assert not (cluster.cache / "envs" / env.sha).exists()  # nothing half-built is kept


def test_nonexistent_interpreter(cluster: Cluster) -> None:
    env = Environment.interpreter("/nonexistent/bin/python3")
    failure = _failure(cluster, env)
    assert f"environment {env.label}: step 'find interpreter' failed" in failure.message
    assert "/nonexistent/bin/python3 does not exist" in failure.message


def test_interpreter_without_cloudpickle_says_what_to_add(
    cluster: Cluster, venvs: dict[str, Path]
) -> None:
    failure = _failure(cluster, Environment.interpreter(venvs["bare"]))
    assert "step 'check requirements' failed" in failure.message
    assert "add cloudpickle" in failure.message


@pytest.fixture(scope="module")
def venvs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Interpreters of two venvs made here: ``bare`` (nothing installed) and ``pickle``
    (this session's cloudpickle, none of its coffea stack)."""
    from uv import find_uv_bin

    root = tmp_path_factory.mktemp("venvs")
    made = {}
    for name in ("bare", "pickle"):
        argv = [find_uv_bin(), "venv", "-q", "--python", sys.executable, str(root / name)]
        subprocess.run(argv, check=True)
        made[name] = root / name / "bin" / "python"
    site = next((root / "pickle" / "lib").glob("python*/site-packages"))
    (site / "cloudpickle").symlink_to(Path(cloudpickle.__file__).parent)
    return made


def test_missing_module_at_run_time_names_what_to_add(cluster: Cluster) -> None:
    env = Environment.interpreter(sys.executable)

    def task(x: int) -> int:
        import not_in_the_environment  # noqa: F401

        return x

    failure = _failure(cluster, env, task)
    assert "has no module 'not_in_the_environment'" in failure.message
    assert env.label in failure.message


def test_version_mismatch_warns_or_fails_with_strict(
    cluster: Cluster, venvs: dict[str, Path]
) -> None:
    python = venvs["pickle"]  # no coffea, awkward, ... in it

    def task(x: int) -> int:
        return x + 1

    with Client(cluster.url) as client, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        job = client.map(task, range(4), environment=Environment.interpreter(python))
        assert job.result(timeout=60) == [1, 2, 3, 4]
    texts = [str(w.message) for w in caught if issubclass(w.category, RemoteWarning)]
    assert texts and "versions differ" in texts[0] and "absent in the environment" in texts[0]
    failure = _failure(cluster, Environment.interpreter(python, strict=True), task)
    assert "step 'version check' failed" in failure.message


def test_environment_api_checks_its_input(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="pixi.lock"):
        (tmp_path / "pixi.toml").write_text("[workspace]\n")
        Environment.pixi(tmp_path / "pixi.toml")
    with pytest.raises(ValueError, match="absolute"):
        Environment.interpreter("python3")
    with pytest.raises(ValueError, match="no requirements"):
        Environment.pip([])
    with pytest.raises(FileNotFoundError, match="uv.lock"):
        Environment.pip(tmp_path / "uv.lock")
    (tmp_path / "pixi.lock").write_text("version: 6\n")
    a = Environment.pixi(tmp_path / "pixi.toml")
    assert a.sha == Environment.pixi(tmp_path / "pixi.toml").sha  # content-addressed
    (tmp_path / "pixi.lock").write_text("version: 6\n# changed\n")
    assert Environment.pixi(tmp_path / "pixi.toml").sha != a.sha
    req = tmp_path / "requirements.txt"
    req.write_text("# pinned\ncoffea==2025.3.0\n\nnumpy\n")
    assert Environment.pip(req).spec.requirements == ["coffea==2025.3.0", "numpy"]
    assert protocol.blob_name(a.spec_bytes) == a.sha
    hashed = tmp_path / "hashed.txt"  # as pip-compile writes it
    hashed.write_text("numpy==2.0.0 \\\n    --hash=sha256:aa \\\n    --hash=sha256:bb\n")
    assert Environment.pip(hashed).spec.requirements == [
        "numpy==2.0.0      --hash=sha256:aa      --hash=sha256:bb"
    ]


def test_uv_lock_is_exported_to_pinned_requirements(tmp_path: Path, wheels: Path) -> None:
    from uv import find_uv_bin

    project = tmp_path / "analysis"
    project.mkdir()
    (project / "pyproject.toml").write_text(
        '[project]\nname = "ana"\nversion = "0.1"\nrequires-python = ">=3.8"\n'
        f'dependencies = ["{PROBE_PACKAGE}"]\n'
    )
    argv = [find_uv_bin(), "lock", "--offline", "--no-index", "--find-links", str(wheels)]
    subprocess.run([*argv, "--quiet", "--project", str(project)], check=True, timeout=120)
    env = Environment.pip(project / "uv.lock", find_links=str(wheels), index=False)
    assert env.spec.requirements == [f"{PROBE_PACKAGE}==1.0"]
    assert env.spec.name == "analysis/uv.lock"


@pytest.mark.slow
def test_full_disk_is_a_clear_failure(tmp_path: Path, wheels: Path) -> None:
    """An environment cache on a 256 KiB tmpfs: the install fails naming its step."""
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(tiny)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    store = EmbeddedRedis().start()
    processes = Processes(tmp_path)
    try:
        url, _ = processes.server(store.url, prefix="full")
        processes.worker(url, "--env-cache", str(tiny), "--lease-wait", "1")
        big = {f"{PROBE_PACKAGE}/data.py": b"X = '" + b"x" * 600_000 + b"'\n"}
        wheel_dir = tmp_path / "bigwheels"
        wheel_dir.mkdir()
        for w in wheels.iterdir():
            shutil.copy(w, wheel_dir)
        make_wheel(wheel_dir, "hqbig", "1.0", big)
        env = Environment.pip(["cloudpickle", "hqbig"], find_links=str(wheel_dir), index=False)
        with Client(url) as client:
            job = client.map(abs, [1], environment=env)
            with pytest.raises(TaskFailed) as failed:
                job.result(timeout=120)
        message = failed.value.message
        assert f"environment {env.label}: step " in message
        assert any(s in message.lower() for s in ("no space", "space left", "quota")), message
    finally:
        processes.stop_all()
        store.stop()
        subprocess.run(["umount", "-l", str(tiny)], check=False)


@pytest.mark.slow
def test_coffea_run_in_an_interpreter_environment(cluster: Cluster, tmp_path: Path) -> None:
    """A whole coffea run (pre-processing, chunks, merges on workers) through the task
    runner for foreign interpreters: here this venv's own Python, run isolated (-I), so
    coffea_hq itself is not importable there and must travel by value."""
    from coffea_hq import HQExecutor
    from tests.test_executor import (
        MuonHistograms,
        assert_same,
        iterative,
        nano_fileset,
        run_with,
        write_nanoaod,
    )

    data = {name: tmp_path / f"{name}.root" for name in ("dy0", "dy1", "tt0")}
    for seed, (path, n) in enumerate(zip(data.values(), (600, 400, 500), strict=True)):
        write_nanoaod(path, n, seed)
    fileset = nano_fileset(data)
    hq = HQExecutor(cluster.url, status=False, environment=Environment.interpreter(sys.executable))
    ours = run_with(hq, fileset, MuonHistograms())
    assert_same(ours, run_with(iterative(), fileset, MuonHistograms()))
    assert ours["events"] == 1500


def test_cache_evicts_least_recently_used_but_never_one_in_use(tmp_path: Path) -> None:
    """The LRU limit over environments some worker holds in use (flock) or not."""
    import fcntl
    import json
    import time

    from coffea_hq.worker.environments import EnvironmentCache

    cache = EnvironmentCache(tmp_path, size_limit=2500)
    (tmp_path / "locks").mkdir()
    now = time.time()
    for age, sha in enumerate(["c" * 64, "b" * 64, "a" * 64]):  # a: the oldest use
        ready = tmp_path / "envs" / sha / ".hq-ready"
        ready.parent.mkdir(parents=True)
        ready.write_text(json.dumps({"interpreter": "/x", "bytes": 1000}))
        os.utime(ready, (now - 100 * age, now - 100 * age))
    held = os.open(tmp_path / "locks" / f"{'a' * 64}.use", os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(held, fcntl.LOCK_SH)  # another worker runs tasks in "a"
        assert cache.evict() == ["b" * 64]  # the oldest not in use goes; 2000 bytes fit
        assert (tmp_path / "envs" / ("a" * 64)).is_dir()
    finally:
        os.close(held)
    cache.size_limit = 1000
    assert cache.evict(keep="c" * 64) == ["a" * 64]
    assert sorted(p.name for p in (tmp_path / "envs").iterdir()) == ["c" * 64]


def test_env_variables_reach_a_task_in_an_environment(cluster: Cluster) -> None:
    """``env=`` wraps the function in coffea_hq's own class, which the environment does
    not have installed: it travels by value."""

    def task(x: int) -> str:
        import os

        return os.environ.get("HQ_ENV_TEST", "unset") + str(x)

    with Client(cluster.url) as client:
        job = client.map(
            task,
            [1, 2],
            env={"HQ_ENV_TEST": "set"},
            environment=Environment.interpreter(sys.executable),
        )
        assert job.result(timeout=60) == ["set1", "set2"]


def test_task_limits_apply_in_an_environment(cluster: Cluster) -> None:
    """HQExecutor's per-task limits (here the wrapper it uses, LimitedTask) reach a task
    run by the foreign runner: over its memory or wall time, it fails with that reason."""
    import time

    from coffea_hq.chunks import LimitedTask

    def hog(x: int) -> int:  # by value: the env lacks tests/
        import time

        blocks = [b"x" * 2**20 for _ in range(400 * x)]  # touched pages: resident
        time.sleep(20)
        return len(blocks)

    def dawdle(x: int) -> int:
        import time

        time.sleep(20 * x)
        return x

    env = Environment.interpreter(sys.executable)
    started = time.monotonic()
    failure = _failure(cluster, env, LimitedTask(hog, memory=200 * 2**20))
    assert failure.exc_type == protocol.MEMORY_EXCEEDED_TYPE, failure
    failure = _failure(cluster, env, LimitedTask(dawdle, walltime=1.0))
    assert failure.exc_type == protocol.WALLTIME_EXCEEDED_TYPE, failure
    assert time.monotonic() - started < 30  # killed, not run to their end


def test_log_records_of_a_task_in_an_environment_reach_the_session(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    def task(x: int) -> int:  # by value: the env lacks tests/
        import logging

        logging.getLogger("analysis.env").warning("fallback for run %d", x)
        logging.getLogger("analysis.env").info("below the level: not sent")
        return x

    caplog.set_level(logging.INFO, logger="analysis.env")
    env = Environment.interpreter(sys.executable)
    with Client(cluster.url) as client:
        assert client.map(task, range(3), environment=env).result(timeout=60) == [0, 1, 2]
    records = [r for r in caplog.records if r.name == "analysis.env"]
    assert sorted(r.getMessage().split(" [on worker")[0] for r in records) == [
        f"fallback for run {x}" for x in range(3)
    ]
    assert all(r.levelno == logging.WARNING for r in records)
