"""The worker's pixi backend (issue 14): pixi.lock and pixi-pack archives installed with
py-rattler from a local channel the tests build, the pixi CLI path where a binary exists, and
each failure an EnvironmentFailed naming its step."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import tarfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard

from coffea_hq import Client, Environment, TaskFailed, protocol
from coffea_hq.embedded import EmbeddedRedis
from coffea_hq.errors import EnvironmentFailed
from tests.conftest import Processes
from tests.util import poll_until

pytest.importorskip("rattler", reason="py-rattler is not installed (pip install 'coffea-hq[envs]')")

from coffea_hq.worker.environments.pixi import install_pixi, unpack_pixi_pack  # noqa: E402

from . import pixi_channel  # noqa: E402
from .pixi_channel import LocalChannel  # noqa: E402

PROBE = (
    "import sys, hqmarker, cloudpickle\n"
    "try:\n"
    "    import aiohttp\n"
    "    leaked = aiohttp.__file__\n"
    "except ImportError:\n"
    "    leaked = None\n"
    "print(hqmarker.VALUE, sys.prefix, leaked)\n"
)


@pytest.fixture(scope="module")
def channel(tmp_path_factory: pytest.TempPathFactory) -> LocalChannel:
    return pixi_channel.build_channel(tmp_path_factory.mktemp("pixi") / "channel")


def _probe(python: Path) -> list[str]:
    done = subprocess.run(
        [str(python), "-c", PROBE], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def _installed(prefix: Path) -> set[str]:
    """Package names in the prefix's own record of what is linked into it."""
    return (
        {json.loads(p.read_text())["name"] for p in (prefix / "conda-meta").glob("*.json")}
        if (prefix / "conda-meta").is_dir()
        else set()
    )


@pytest.mark.parametrize("writer", ["v6", "rattler"])
def test_install_from_lock(channel: LocalChannel, tmp_path: Path, writer: str) -> None:
    lock = tmp_path / "pixi.lock"
    if writer == "v6":
        pixi_channel.write_lock_v6(channel, lock)
        assert lock.read_text().startswith("version: 6")
    else:
        pixi_channel.write_lock(channel, lock)
    prefix = tmp_path / "env"
    lines: list[str] = []
    python = install_pixi(
        channel.manifest(), lock.read_bytes(), "default", prefix, lines.append, use_cli=False
    )
    assert python == prefix / "bin" / "python"
    assert _installed(prefix) == {"python", "cloudpickle", "hqmarker"}
    value, sys_prefix, leaked = _probe(python)
    assert value == "42"
    assert Path(sys_prefix) == prefix
    assert leaked == "None", f"the worker's aiohttp leaked into the environment: {leaked}"
    assert not (prefix / ".hq-rattler-pkgs").exists()  # the package cache is not kept
    assert any("3 packages" in line for line in lines)


def test_named_environment(channel: LocalChannel, tmp_path: Path) -> None:
    lock = pixi_channel.write_lock(channel, tmp_path / "pixi.lock", environment="analysis")
    python = install_pixi(
        channel.manifest(), lock.read_bytes(), "analysis", tmp_path / "env", print, use_cli=False
    )
    assert _probe(python)[0] == "42"


@pytest.mark.skipif(
    shutil.which("pixi") is None,
    reason="no pixi binary on PATH: the `pixi install --frozen` path is tested only where one is",
)
def test_install_with_pixi_cli(channel: LocalChannel, tmp_path: Path) -> None:
    lock = pixi_channel.write_lock_v6(channel, tmp_path / "pixi.lock")
    python = install_pixi(
        channel.manifest(), lock.read_bytes(), "default", tmp_path / "env", print, use_cli=True
    )
    assert _probe(python)[0] == "42"


def test_cli_forced_without_a_pixi_binary(
    channel: LocalChannel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    lock = pixi_channel.write_lock_v6(channel, tmp_path / "pixi.lock")
    with pytest.raises(EnvironmentFailed) as caught:
        install_pixi(b"", lock.read_bytes(), "default", tmp_path / "env", print, use_cli=True)
    assert caught.value.step == "pixi install" and "no pixi binary" in str(caught.value)


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_unpack_pixi_pack(channel: LocalChannel, tmp_path: Path, compression: str) -> None:
    archive = pixi_channel.build_pixi_pack(channel, tmp_path / "environment.tar")
    if compression == "zstd":  # what older pixi-pack versions wrote
        packed = tmp_path / "environment.tar.zstd"
        packed.write_bytes(zstandard.ZstdCompressor().compress(archive.read_bytes()))
        archive = packed
    prefix = tmp_path / "env"
    python = unpack_pixi_pack(archive, prefix, print)
    assert _installed(prefix) == {"python", "cloudpickle", "hqmarker"}
    value, sys_prefix, leaked = _probe(python)
    assert (value, Path(sys_prefix), leaked) == ("42", prefix, "None")
    assert [p.name for p in prefix.iterdir() if p.name.startswith(".hq-")] == []


# --- failures: each names its step and leaves no half-made environment behind -------------


def _fails(step: str, lock: bytes, tmp_path: Path, environment: str = "default") -> str:
    prefix = tmp_path / "env"
    with pytest.raises(EnvironmentFailed) as caught:
        install_pixi(b"", lock, environment, prefix, print, use_cli=False)
    assert caught.value.step == step, str(caught.value)
    assert "hqmarker" not in _installed(prefix)
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_broken_lock(tmp_path: Path) -> None:
    why = _fails("read pixi.lock", b"version: [6\n  ::: not yaml {{", tmp_path)
    assert "not a pixi lock file" in why


def test_missing_environment(channel: LocalChannel, tmp_path: Path) -> None:
    lock = pixi_channel.write_lock(channel, tmp_path / "pixi.lock", environment="analysis")
    why = _fails("select environment", lock.read_bytes(), tmp_path, environment="default")
    assert "no environment 'default'" in why and "analysis" in why


def test_no_records_for_this_platform(channel: LocalChannel, tmp_path: Path) -> None:
    other = "osx-arm64" if channel.platform != "osx-arm64" else "linux-64"
    lock = pixi_channel.write_lock(
        channel, tmp_path / "pixi.lock", names=["cloudpickle"], platform_name=other
    )
    why = _fails("select platform", lock.read_bytes(), tmp_path)
    assert channel.platform in why and other in why


def test_missing_package_file(channel: LocalChannel, tmp_path: Path) -> None:
    own = pixi_channel.build_channel(tmp_path / "channel")
    lock = pixi_channel.write_lock_v6(own, tmp_path / "pixi.lock")
    own.packages["hqmarker"].unlink()
    why = _fails("verify packages", lock.read_bytes(), tmp_path)
    assert "hqmarker-1.0-0.tar.bz2: no such file" in why


def test_sha256_mismatch(channel: LocalChannel, tmp_path: Path) -> None:
    lock = pixi_channel.write_lock_v6(channel, tmp_path / "pixi.lock").read_text()
    record = next(r for r in pixi_channel.records(channel, ["hqmarker"]))
    good = record.sha256.hex()  # type: ignore[attr-defined]
    assert good in lock
    bad = lock.replace(good, ("0" if good[0] != "0" else "1") + good[1:])
    why = _fails("verify packages", bad.encode(), tmp_path)
    assert "hqmarker-1.0-0.tar.bz2: sha256" in why


def test_lock_without_python(channel: LocalChannel, tmp_path: Path) -> None:
    lock = pixi_channel.write_lock(channel, tmp_path / "pixi.lock", names=["hqmarker"])
    with pytest.raises(EnvironmentFailed) as caught:
        install_pixi(b"", lock.read_bytes(), "default", tmp_path / "env", print, use_cli=False)
    assert caught.value.step in ("rattler install", "check interpreter"), str(caught.value)
    assert "python" in str(caught.value)


def test_pixi_pack_failures(channel: LocalChannel, tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar archive")
    (tmp_path / "x").write_text("x")
    with pytest.raises(EnvironmentFailed) as caught:
        unpack_pixi_pack(junk, tmp_path / "a", print)
    assert caught.value.step == "unpack"
    other = "osx-arm64" if channel.platform != "osx-arm64" else "linux-64"
    archive = pixi_channel.build_pixi_pack(channel, tmp_path / "o.tar", platform_name=other)
    with pytest.raises(EnvironmentFailed) as caught:
        unpack_pixi_pack(archive, tmp_path / "b", print)
    assert caught.value.step == "select platform" and other in str(caught.value)
    assert _installed(tmp_path / "b") == set()
    # A member that would land outside the prefix is refused, not written.
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        tar.add(tmp_path / "x", "../outside")
    with pytest.raises(EnvironmentFailed) as caught:
        unpack_pixi_pack(evil, tmp_path / "c" / "env", print)
    assert caught.value.step == "unpack"
    assert not (tmp_path / "c" / "outside").exists()
    no_meta = tmp_path / "no-meta.tar"
    with tarfile.open(no_meta, "w") as tar:
        tar.add(tmp_path / "x", "environment.yml")
    with pytest.raises(EnvironmentFailed) as caught:
        unpack_pixi_pack(no_meta, tmp_path / "d", print)
    assert caught.value.step == "read pixi-pack.json" and "not a pixi-pack archive" in str(
        caught.value
    )


# --- end to end: real hq-server and hq-worker, the task imports what only the env has -------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """One server and one worker with an environment cache; (url, cache)."""
    store = EmbeddedRedis().start()
    processes = Processes(tmp_path_factory.mktemp("logs"))
    cache = tmp_path_factory.mktemp("envcache")
    try:
        url, _ = processes.server(store.url, prefix="pixi")
        processes.worker(url, "--slots", "2", "--env-cache", str(cache), "--lease-wait", "1")
        with Client(url) as client:
            poll_until(lambda: len(client.workers()) == 1, 30, "the worker registered")
        yield url, cache
    finally:
        processes.stop_all()
        store.stop()


def _marker_task() -> Callable[[int], tuple[int, str, bool]]:
    """The task, made here so that cloudpickle sends it by value (the environment has no
    ``tests`` package to import it from)."""

    def task(x: int) -> tuple[int, str, bool]:
        import importlib.util
        import sys

        import hqmarker

        return x * hqmarker.VALUE, sys.prefix, importlib.util.find_spec("aiohttp") is not None

    return task


def _run_in(url: str, environment: Environment, n: int) -> tuple[list[Any], int]:
    with Client(url) as client:
        before = client.queue()["counters"].get(protocol.Counter.TASKS_OK, 0)
        out = client.map(_marker_task(), range(n), environment=environment).result(timeout=120)
        done = client.queue()["counters"].get(protocol.Counter.TASKS_OK, 0) - before
    return out, done


def test_client_map_in_a_pixi_environment(
    channel: LocalChannel, cluster: tuple[str, Path], tmp_path: Path
) -> None:
    url, cache = cluster
    assert importlib.util.find_spec("hqmarker") is None  # only the environment has it
    (tmp_path / "pixi.toml").write_bytes(channel.manifest())
    pixi_channel.write_lock_v6(channel, tmp_path / "pixi.lock")
    environment = Environment.pixi(tmp_path / "pixi.toml")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # coffea, numpy... are absent in the test environment
        out, done = _run_in(url, environment, 4)
    assert [o[0] for o in out] == [0, 42, 84, 126]
    assert {o[1] for o in out} == {str(cache / "envs" / environment.sha)}
    assert not any(o[2] for o in out), "the worker's aiohttp is importable in the environment"
    assert done == 4  # the server counted every task


@pytest.mark.slow  # the unpacking itself is in the default run (test_unpack_pixi_pack)
def test_client_map_in_a_pixi_pack_archive(
    channel: LocalChannel, cluster: tuple[str, Path], tmp_path: Path
) -> None:
    url, cache = cluster
    archive = pixi_channel.build_pixi_pack(channel, tmp_path / "environment.tar")
    environment = Environment.pixi_pack(archive)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, done = _run_in(url, environment, 3)
    assert [o[0] for o in out] == [0, 42, 84] and done == 3
    assert {o[1] for o in out} == {str(cache / "envs" / environment.sha)}


def test_broken_pixi_lock_fails_the_task_naming_the_step(
    channel: LocalChannel, cluster: tuple[str, Path], tmp_path: Path
) -> None:
    url, cache = cluster
    (tmp_path / "pixi.toml").write_bytes(channel.manifest())
    pixi_channel.write_lock(channel, tmp_path / "pixi.lock", environment="analysis")
    environment = Environment.pixi(tmp_path / "pixi.toml")  # "default": not in the lock
    failed_count = protocol.Counter.TASKS_FAILED
    with Client(url) as client:
        before = client.queue()["counters"].get(failed_count, 0)
        job = client.map(_marker_task(), [1], environment=environment)
        with pytest.raises(TaskFailed) as failed:
            job.result(timeout=120)
        assert client.queue()["counters"].get(failed_count, 0) - before == 1
    assert failed.value.exc_type == "coffea_hq.errors.EnvironmentFailed"
    assert f"environment {environment.label}: step 'select environment'" in failed.value.message
    assert not (cache / "envs" / environment.sha).exists()  # nothing half-made is kept


def test_lock_with_pypi_packages_needs_the_cli(channel: LocalChannel, tmp_path: Path) -> None:
    from rattler import LockChannel, LockFile, LockPlatform

    platform = LockPlatform(channel.platform)
    lock = LockFile([platform])
    lock.set_channels("default", [LockChannel(channel.url)])
    for record in pixi_channel.records(channel):
        lock.add_conda_package("default", platform, record)  # type: ignore[arg-type]
    lock.add_pypi_package("default", platform, "hqwheel", "1.0", "https://example.invalid/x.whl")
    lock.to_path(tmp_path / "pixi.lock")
    why = _fails("select packages", (tmp_path / "pixi.lock").read_bytes(), tmp_path)
    assert "hqwheel" in why and "pixi" in why
