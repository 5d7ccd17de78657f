"""pixi environments on the worker: from a manifest + ``pixi.lock``, or from a pixi-pack archive.

Where a ``pixi`` binary is on PATH, :func:`install_pixi` runs ``pixi install --frozen`` (exactly
what the user's laptop would do). Otherwise it installs the locked conda records itself with
py-rattler, the library pixi is built on: parse the lock, take the named environment's records
for this platform and link them into the prefix. Nothing is solved and nothing is fetched but
the URLs in the lock (or, for a pixi-pack archive, the packages inside it). Every failure is an
:class:`~coffea_hq.errors.EnvironmentFailed` naming the step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import zstandard

from coffea_hq import protocol
from coffea_hq.errors import EnvironmentFailed

__all__ = ["install_pixi", "unpack_pixi_pack", "PIXI_PACK_VERSIONS"]

Log = Callable[[str], None]
T = TypeVar("T")

PIXI_PACK_VERSIONS = ("1",)  # pixi-pack.json "version"s this unpacker reads
PACKAGE_CACHE = ".hq-rattler-pkgs"  # rattler's package cache while a prefix is built, then removed
TAIL_LINES = 15  # lines of the pixi CLI's output a failure quotes


def _rattler() -> Any:
    try:
        import rattler
    except ImportError as e:
        raise EnvironmentFailed(
            "load py-rattler",
            "no pixi CLI on PATH and py-rattler is not installed on this worker "
            "(pip install 'coffea-hq[envs]')",
        ) from e
    return rattler


def _run(coro: Coroutine[Any, Any, T], timeout: float = protocol.ENV_STEP_TIMEOUT) -> T:
    """Run a rattler coroutine from synchronous code (also when this thread has a loop),
    for at most ``timeout`` seconds (a download that stalls must not hang the worker)."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(bounded())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, bounded()).result()


def _say(e: BaseException) -> str:
    """One line for a rattler exception (their messages can run over several lines)."""
    text = " ".join(str(e).split()) or "(no message)"
    return f"{type(e).__name__}: {text}"


def _platform() -> str:
    return str(_rattler().platform.Subdir.current())


def _interpreter(prefix: Path) -> Path:
    python = prefix / "bin" / "python"
    if not python.exists():
        raise EnvironmentFailed(
            "check interpreter",
            f"the environment has no {python.relative_to(prefix)}: "
            "add python to its [dependencies] (and cloudpickle, which tasks need)",
        )
    return python


def _local_path(url: str) -> Path | None:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme != "file":
        return None
    return Path(urllib.request.url2pathname(parsed.path))


def _verify_local(records: list[Any], log: Log) -> None:
    """Check each ``file://`` package against the hash its record locks.

    rattler checks the hash of what it downloads, but links a local file as it finds it; a
    channel on a shared filesystem can hold a different build under the same name.
    """
    checked = 0
    for record in records:
        path = _local_path(str(record.url))
        if path is None:
            continue
        if not path.is_file():
            raise EnvironmentFailed(
                "verify packages", f"{record.file_name}: no such file {path} (named by the lock)"
            )
        want, algorithm = (record.sha256, "sha256") if record.sha256 else (record.md5, "md5")
        if want is None:
            continue
        with path.open("rb") as f:
            got = hashlib.file_digest(f, algorithm).digest()
        if got != bytes(want):
            raise EnvironmentFailed(
                "verify packages",
                f"{record.file_name}: {algorithm} of {path} is {got.hex()[:16]}..., "
                f"its record says {bytes(want).hex()[:16]}...: the file is not the one locked",
            )
        checked += 1
    if checked:
        log(f"step 'verify packages': {checked} local packages match their locked hashes")


def _install_records(records: list[Any], prefix: Path, log: Log) -> None:
    rattler = _rattler()
    _verify_local(records, log)
    cache = prefix / PACKAGE_CACHE
    log(f"step 'rattler install': {len(records)} packages into {prefix}")
    try:
        _run(
            rattler.install(
                records,
                target_prefix=prefix,
                cache_dir=cache,
                show_progress=False,
                execute_link_scripts=False,
            )
        )
    except TimeoutError as e:
        raise EnvironmentFailed(
            "rattler install", f"still running after {protocol.ENV_STEP_TIMEOUT:.0f} s, stopped"
        ) from e
    except Exception as e:  # rattler raises its own exception types, one per cause
        raise EnvironmentFailed("rattler install", _say(e)) from e
    finally:
        # The prefix's files are hard links (or copies) of the cache's: dropping it frees nothing
        # the environment uses, and a per-prefix cache would count twice against the size limit.
        shutil.rmtree(cache, ignore_errors=True)


def _locked_records(lock: bytes, environment: str, log: Log) -> list[Any]:
    rattler = _rattler()
    with tempfile.TemporaryDirectory(prefix="hq-pixi-lock-") as tmp:
        path = Path(tmp) / "pixi.lock"
        path.write_bytes(lock)
        try:
            parsed = rattler.LockFile.from_path(path)
        except Exception as e:
            raise EnvironmentFailed("read pixi.lock", f"not a pixi lock file: {_say(e)}") from e
    env = parsed.environment(environment)
    if env is None:
        names = ", ".join(sorted(name for name, _ in parsed.environments())) or "none"
        raise EnvironmentFailed(
            "select environment",
            f"pixi.lock has no environment {environment!r} (it has: {names})",
        )
    here = _platform()
    platforms = {p.name: p for p in env.platforms()}
    if here not in platforms:
        raise EnvironmentFailed(
            "select platform",
            f"pixi.lock's environment {environment!r} has no packages for {here}, this worker's "
            f"platform (it has: {', '.join(sorted(platforms)) or 'none'}): "
            f"run `pixi workspace platform add {here}` and `pixi lock`",
        )
    platform = platforms[here]
    pypi = env.pypi_packages_for_platform(platform) or []
    if pypi:
        names = ", ".join(sorted(str(p.name) for p in pypi)[:5])
        raise EnvironmentFailed(
            "select packages",
            f"environment {environment!r} locks PyPI packages ({names}); without the pixi CLI "
            "this worker installs conda packages only: put pixi on the worker's PATH, or take "
            "these from conda-forge",
        )
    records = env.conda_repodata_records_for_platform(platform) or []
    if not records:
        raise EnvironmentFailed(
            "select packages", f"environment {environment!r} locks no conda packages for {here}"
        )
    log(f"pixi.lock: environment {environment!r}, {here}: {len(records)} packages")
    return list(records)


def _manifest_name(manifest: bytes) -> str:
    # A pixi workspace is either a pixi.toml or a pyproject.toml with [tool.pixi.*] tables.
    return "pyproject.toml" if b"[tool.pixi" in manifest else "pixi.toml"


def _tail(text: str) -> str:
    return "\n".join([line for line in text.splitlines() if line.strip()][-TAIL_LINES:])


def _install_with_cli(
    pixi: str, manifest: bytes, lock: bytes, environment: str, prefix: Path, log: Log
) -> Path:
    # The workspace lives inside the prefix, so the cache's accounting and eviction see the
    # environment pixi makes (under .pixi/envs/<name>) as this prefix's.
    workspace = prefix / "workspace"
    workspace.mkdir(parents=True, exist_ok=True)
    manifest_path = workspace / _manifest_name(manifest)
    manifest_path.write_bytes(manifest)
    (workspace / "pixi.lock").write_bytes(lock)
    # The workspace's own config outranks the worker's global one: keep the env in the prefix.
    (workspace / ".pixi").mkdir(exist_ok=True)
    (workspace / ".pixi" / "config.toml").write_text("detached-environments = false\n")
    argv = [
        pixi,
        "install",
        "--frozen",
        "--manifest-path",
        str(manifest_path),
        "--environment",
        environment,
    ]
    env = dict(os.environ)
    env.pop("PIXI_PROJECT_MANIFEST", None)  # a worker started from a pixi shell
    env["PIXI_NO_PROGRESS"] = "1"
    _pixi(argv, "pixi install", workspace, env, log)
    return _interpreter(_cli_prefix(pixi, manifest_path, environment, workspace, env, log))


def _pixi(argv: list[str], step: str, cwd: Path, env: dict[str, str], log: Log) -> str:
    log(f"step {step!r}: {' '.join(argv)}")
    try:
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,  # stdout apart: `pixi info --json` is parsed
            env=env,
            cwd=cwd,
            timeout=protocol.ENV_STEP_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise EnvironmentFailed(
            step, f"still running after {protocol.ENV_STEP_TIMEOUT:.0f} s, stopped"
        ) from e
    except OSError as e:
        raise EnvironmentFailed(step, f"{argv[0]} cannot be run ({e})") from e
    if done.returncode != 0:
        out = (done.stdout + done.stderr).decode("utf-8", "replace")
        raise EnvironmentFailed(step, f"exit code {done.returncode}:\n{_tail(out)}")
    return done.stdout.decode("utf-8", "replace")


def _cli_prefix(
    pixi: str, manifest_path: Path, environment: str, workspace: Path, env: dict[str, str], log: Log
) -> Path:
    """Where pixi put the environment: ``pixi info --json`` says (a worker's pixi config can
    detach environments from the workspace); ``.pixi/envs/<name>`` if it does not."""
    fallback = workspace / ".pixi" / "envs" / environment
    argv = [pixi, "info", "--json", "--manifest-path", str(manifest_path)]
    try:
        info = json.loads(_pixi(argv, "pixi info", workspace, env, log))
        for entry in info.get("environments_info", []):
            if entry.get("name") == environment and entry.get("prefix"):
                return Path(entry["prefix"])
    except (EnvironmentFailed, ValueError, AttributeError) as e:
        log(f"pixi info gave no prefix ({e}); using {fallback}")
    return fallback


def install_pixi(
    manifest: bytes,
    lock: bytes,
    environment: str,
    prefix: Path,
    log: Log,
    *,
    use_cli: bool | None = None,
) -> Path:
    """Materialise ``environment`` of a pixi workspace (its manifest and ``pixi.lock``) in
    ``prefix``; the environment's interpreter.

    With ``use_cli`` None (the default) the pixi CLI is used when one is on PATH and
    py-rattler otherwise; True or False forces one. The lock is used as it is (``--frozen``):
    nothing is solved. Raises :class:`EnvironmentFailed` naming the step that failed.
    """
    environment = environment or "default"
    prefix = Path(prefix)
    pixi = shutil.which("pixi")
    if use_cli or (use_cli is None and pixi is not None):
        if pixi is None:
            raise EnvironmentFailed("pixi install", "no pixi binary on this worker's PATH")
        return _install_with_cli(pixi, manifest, lock, environment, prefix, log)
    records = _locked_records(lock, environment, log)
    _install_records(records, prefix, log)
    return _interpreter(prefix)


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # older pixi-pack versions wrote environment.tar.zstd


def _read_archive(archive: Path, into: Path) -> None:
    try:
        with archive.open("rb") as f:
            if f.read(4) == ZSTD_MAGIC:
                f.seek(0)
                with (
                    zstandard.ZstdDecompressor().stream_reader(f) as stream,
                    tarfile.open(fileobj=stream, mode="r|") as tar,
                ):
                    tar.extractall(into, filter="data")
                return
        with tarfile.open(archive) as tar:  # plain, gzip, bzip2 or xz
            # "data": no absolute paths, no links out of the tree, no device files.
            tar.extractall(into, filter="data")
    except (tarfile.TarError, zstandard.ZstdError, OSError, EOFError) as e:
        raise EnvironmentFailed("unpack", f"{archive.name} is not a readable tar: {_say(e)}") from e


def _packed_records(unpacked: Path, log: Log) -> list[Any]:
    rattler = _rattler()
    try:
        meta = json.loads((unpacked / "pixi-pack.json").read_text())
    except (OSError, ValueError) as e:
        raise EnvironmentFailed(
            "read pixi-pack.json", f"not a pixi-pack archive (no readable pixi-pack.json: {e})"
        ) from e
    version = str(meta.get("version", "")) if isinstance(meta, dict) else ""
    if version not in PIXI_PACK_VERSIONS:
        raise EnvironmentFailed(
            "read pixi-pack.json",
            f"pixi-pack format version {version or '(none)'!r} is not one this worker reads "
            f"({', '.join(PIXI_PACK_VERSIONS)})",
        )
    here = _platform()
    packed_for = str(meta.get("platform", ""))
    if packed_for not in (here, "noarch"):
        raise EnvironmentFailed(
            "select platform",
            f"the archive was packed for {packed_for or '(no platform)'}, this worker is {here}: "
            f"run `pixi-pack --platform {here}`",
        )
    for wheels in ("pypi", "simple"):  # the directory's name differs between versions
        if (unpacked / wheels).is_dir() and any((unpacked / wheels).iterdir()):
            raise EnvironmentFailed(
                "select packages",
                f"the archive holds PyPI packages ({wheels}/); this worker installs the conda "
                "packages of pixi-pack archives only",
            )
    channel_dir = unpacked / "channel"
    channel = rattler.Channel(channel_dir.resolve().as_uri())
    records: list[Any] = []
    for repodata in sorted(channel_dir.glob("*/repodata.json")):
        try:
            records += rattler.RepoData.from_path(repodata).into_repo_data(channel)
        except Exception as e:
            raise EnvironmentFailed(
                "read channel", f"{repodata.relative_to(unpacked)}: {_say(e)}"
            ) from e
    if not records:
        raise EnvironmentFailed("read channel", "the archive's channel/ holds no packages")
    log(f"pixi-pack archive for {packed_for}: {len(records)} packages")
    return records


def unpack_pixi_pack(archive: Path, prefix: Path, log: Log) -> Path:
    """Make ``prefix`` from a pixi-pack archive (a tar of ``pixi-pack.json``,
    ``environment.yml`` and a ``channel/`` of the packages); the environment's interpreter.

    The packed channel is installed with py-rattler, as ``pixi-pack unpack`` does. Raises
    :class:`EnvironmentFailed` naming the step that failed.
    """
    archive, prefix = Path(archive), Path(prefix)
    prefix.mkdir(parents=True, exist_ok=True)
    # Unpacked beside the prefix's files, so no second filesystem is needed; removed after.
    with tempfile.TemporaryDirectory(prefix=".hq-pixi-pack-", dir=prefix) as tmp:
        log(f"step 'unpack': {archive.name}")
        _read_archive(archive, Path(tmp))
        records = _packed_records(Path(tmp), log)
        _install_records(records, prefix, log)
    return _interpreter(prefix)
