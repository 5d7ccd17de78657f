"""The node's environment cache: each environment built once per content hash, kept in
least-recently-used order within a size limit.

Layout under the root (``hq-worker --env-cache``), shared by every worker of the node::

    envs/<sha>/               the environment (a venv, a conda prefix)
    envs/<sha>/.hq-ready      written last: {"interpreter", "bytes", "seconds"}; its
                              mtime is the last use
    locks/<sha>.build         flock: held exclusively while building, checking or evicting
    locks/<sha>.use           flock: held shared by each worker using the environment
    files/<sha>               data files shipped with jobs (``files=``)
    blobs/<sha>               pixi-pack archives while they unpack
    uv-cache/                 uv's download and wheel cache
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

from coffea_hq.errors import EnvironmentFailed
from coffea_hq.messages import EnvironmentSpec

READY = ".hq-ready"
HELD_MAX = 32  # environments a worker keeps marked in use (the rest may be evicted)

log = logging.getLogger("coffea_hq.worker.environments")


@contextlib.contextmanager
def _flock(path: Path, how: int) -> Iterator[int]:
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, how)
        yield fd
    finally:
        os.close(fd)


def _du(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


class EnvironmentCache:
    """Materialises environments under ``root``; ``size_limit`` bytes (None: unbounded)."""

    def __init__(self, root: str | os.PathLike[str], size_limit: int | None = None) -> None:
        self.root = Path(root)
        self.size_limit = size_limit
        self._held: OrderedDict[str, int] = OrderedDict()  # sha -> fd holding its use lock
        self.built = 0  # environments this worker built (not found ready)

    def _dir(self, name: str) -> Path:
        path = self.root / name
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise EnvironmentFailed("prepare cache", f"cannot create {path}: {e}") from e
        return path

    def materialise(
        self,
        sha: str,
        spec: EnvironmentSpec,
        archive: Callable[[Path], None] | None,
        say: Callable[[str], None],
    ) -> str:
        """The interpreter of environment ``sha``, built here unless some worker of the
        node built it already (blocking: run it in a thread). ``archive(path)`` writes a
        pixi-pack archive's bytes to ``path``."""
        if spec.kind == "interpreter":
            return spec.path
        envs, locks = self._dir("envs"), self._dir("locks")
        prefix = envs / sha
        ready = prefix / READY
        with _flock(locks / f"{sha}.build", fcntl.LOCK_EX):
            if ready.is_file():
                interpreter = str(json.loads(ready.read_text())["interpreter"])
            else:
                interpreter = self._build(sha, spec, prefix, archive, say)
            with contextlib.suppress(OSError):
                os.utime(ready)
            self._hold(sha, locks)
        self.evict(keep=sha)
        return interpreter

    def _build(
        self,
        sha: str,
        spec: EnvironmentSpec,
        prefix: Path,
        archive: Callable[[Path], None] | None,
        say: Callable[[str], None],
    ) -> str:
        shutil.rmtree(prefix, ignore_errors=True)  # a build that died half way
        started = time.monotonic()
        try:
            prefix.mkdir(parents=True)
            path = self._backend(sha, spec, prefix, archive, say)
            size = _du(prefix)
            tmp = prefix / f"{READY}.tmp"
            tmp.write_text(
                json.dumps(
                    {
                        "interpreter": str(path),
                        "bytes": size,
                        "seconds": time.monotonic() - started,
                    }
                )
            )
            tmp.rename(prefix / READY)
        except EnvironmentFailed:
            shutil.rmtree(prefix, ignore_errors=True)
            raise
        except OSError as e:  # a full disk, a read-only cache
            shutil.rmtree(prefix, ignore_errors=True)
            raise EnvironmentFailed("write environment", f"{e} (under {prefix})") from e
        self.built += 1
        say(f"built in {time.monotonic() - started:.1f} s, {size / 1e6:.1f} MB at {prefix}")
        return str(path)

    def _backend(
        self,
        sha: str,
        spec: EnvironmentSpec,
        prefix: Path,
        archive: Callable[[Path], None] | None,
        say: Callable[[str], None],
    ) -> Path:
        if spec.kind == "pip":
            from .pip import install_pip

            return install_pip(spec, prefix, self._dir("uv-cache"), say)
        try:
            from . import pixi
        except ImportError as e:
            raise EnvironmentFailed(
                "load pixi backend", f"this worker cannot install pixi environments: {e}"
            ) from e
        if spec.kind == "pixi":
            return Path(
                pixi.install_pixi(
                    spec.manifest.encode(), spec.lock.encode(), spec.environment, prefix, say
                )
            )
        assert archive is not None and spec.archive is not None
        where = self._dir("blobs") / spec.archive
        try:
            archive(where)
            return Path(pixi.unpack_pixi_pack(where, prefix, say))
        finally:
            with contextlib.suppress(OSError):
                where.unlink()

    def _hold(self, sha: str, locks: Path) -> None:
        """Mark ``sha`` in use by this worker (a shared lock no eviction can take)."""
        if sha in self._held:
            self._held.move_to_end(sha)
            return
        fd = os.open(locks / f"{sha}.use", os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(fd, fcntl.LOCK_SH)
        self._held[sha] = fd
        while len(self._held) > HELD_MAX:
            os.close(self._held.popitem(last=False)[1])

    def close(self) -> None:
        while self._held:
            os.close(self._held.popitem()[1])

    def evict(self, keep: str = "") -> list[str]:
        """Remove least recently used environments until the cache fits its size limit;
        never one a worker holds in use, nor ``keep``. Returns the evicted hashes."""
        if self.size_limit is None:
            return []
        envs, locks = self.root / "envs", self.root / "locks"
        entries = []
        for ready in envs.glob(f"*/{READY}"):
            try:
                size = int(json.loads(ready.read_text())["bytes"])
                entries.append((ready.stat().st_mtime, ready.parent.name, size))
            except (OSError, ValueError, KeyError):
                continue
        total = sum(size for _, _, size in entries)
        evicted = []
        for _, sha, size in sorted(entries):
            if total <= self.size_limit:
                break
            if sha == keep or sha in self._held:
                continue
            with contextlib.ExitStack() as stack:
                now = fcntl.LOCK_EX | fcntl.LOCK_NB
                try:
                    stack.enter_context(_flock(locks / f"{sha}.build", now))
                    stack.enter_context(_flock(locks / f"{sha}.use", now))
                except BlockingIOError:
                    continue  # being built or used: not ours to remove
                (envs / sha / READY).unlink(missing_ok=True)
                shutil.rmtree(envs / sha, ignore_errors=True)
            total -= size
            evicted.append(sha)
            log.info("environment cache: evicted %s (%.1f MB)", sha[:12], size / 1e6)
        return evicted

    def store_file(self, sha: str, data: bytes) -> Path:
        """A shipped data file's path in the cache (written once, atomically)."""
        path = self._dir("files") / sha
        if not path.is_file():
            tmp = ""
            try:  # a name of its own: slots and workers of the node may store it at once
                fd, tmp = tempfile.mkstemp(prefix=f"{sha}.", suffix=".tmp", dir=path.parent)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.chmod(tmp, 0o644)
                os.replace(tmp, path)
            except OSError as e:
                if tmp:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                raise EnvironmentFailed("store files", f"{e} (under {path.parent})") from e
        return path
