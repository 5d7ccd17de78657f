"""Per-task software environments on the worker (issue 14).

A job with an environment or files names a *bound function* blob
(:class:`coffea_hq.messages.BoundFunction`) instead of its function. :class:`Planner`
turns it into a :class:`Plan`: the function's bytes and the :class:`Launch` of the slot
subprocess that runs it (which interpreter, which files in its working directory), the
environment materialised once per content hash in the node's
:class:`~.cache.EnvironmentCache`. Backends: :mod:`.pip` (uv), ``.pixi`` (pixi CLI or
py-rattler), an existing interpreter (:mod:`.probe` only). Each failure is an
:class:`~coffea_hq.errors.EnvironmentFailed` naming the environment and the step.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from coffea_hq import protocol
from coffea_hq.errors import EnvironmentFailed
from coffea_hq.messages import BoundFunction, EnvironmentSpec, TaskWarning

from .cache import EnvironmentCache
from .probe import mismatches, probe

__all__ = ["EnvironmentCache", "EnvironmentFailed", "Launch", "Plan", "Planner"]

log = logging.getLogger("coffea_hq.worker.environments")

FAILURE_KEPT = 30.0  # seconds a failed environment fails tasks at once before a new try
PLANS_KEPT = 256


@dataclass(frozen=True)
class Launch:
    """How a slot subprocess starts: ``interpreter`` None is the worker's own (child.py),
    else that environment's (foreign.py); ``files`` (name, path) appear in its working
    directory."""

    interpreter: str | None = None
    label: str = ""
    files: tuple[tuple[str, str], ...] = ()

    @property
    def foreign(self) -> bool:
        return self.interpreter is not None


DEFAULT_LAUNCH = Launch()


@dataclass(frozen=True)
class Plan:
    """A function blob ready to run: its bytes (as the launch's runner takes them: raw
    pickle for a foreign one) and warnings its tasks' first result carries."""

    data: bytes
    launch: Launch = DEFAULT_LAUNCH
    notes: tuple[TaskWarning, ...] = field(default=())


class FunctionUnavailable(Exception):
    """A job's function could not be had from the server: its tasks fail with this text."""


def decode_bound(data: bytes) -> BoundFunction | None:
    """The bound function in a function blob, None for a plain function."""
    if not data.startswith(protocol.BOUND_FUNCTION_MAGIC):
        return None
    try:
        return msgspec.json.decode(data[len(protocol.BOUND_FUNCTION_MAGIC) :], type=BoundFunction)
    except msgspec.ValidationError as e:
        raise FunctionUnavailable(f"the job's bound-function blob is malformed: {e}") from e


class Planner:
    """Turns function blobs into :class:`Plan` objects, once each per worker."""

    def __init__(
        self,
        cache: EnvironmentCache,
        fetch: Callable[[str], Awaitable[bytes]],
        fetch_blob: Callable[[str], Awaitable[bytes]],
        worker: str = "",
    ) -> None:
        self.cache = cache
        # Verified bytes of a blob (raising FunctionUnavailable): functions, kept by the
        # worker; other blobs (specs, archives, files), not kept.
        self._fetch = fetch
        self._fetch_blob = fetch_blob
        self.worker = worker
        self._plans: dict[str, Plan] = {}
        self._envs: dict[str, tuple[str, dict[str, str]]] = {}  # sha -> interpreter, versions
        self._failed: dict[str, tuple[float, EnvironmentFailed]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def plan(self, sha: str) -> Plan:
        """The plan of function blob ``sha``; raises FunctionUnavailable or
        EnvironmentFailed (the task fails with it)."""
        found = self._plans.get(sha)
        if found is not None:
            used = found.launch.interpreter
            if used is None or os.path.exists(used):
                return found
            # Evicted by another worker of the node since (past what this one holds in
            # use): build it again.
            self._plans.pop(sha, None)
            self._envs = {k: v for k, v in self._envs.items() if v[0] != used}
        data = await self._fetch(sha)
        bound = decode_bound(data)
        if bound is None:
            return Plan(data)  # not kept: the worker caches the blob itself
        function = await self._fetch(bound.function)
        interpreter: str | None = None
        notes: tuple[TaskWarning, ...] = ()
        if bound.environment is not None:
            interpreter, versions = await self._environment(bound)
            notes = self._check_versions(bound, versions)
            function = protocol.decompress(function)  # the foreign runner has no lz4
        files = []
        for f in bound.files:
            path = await self._file(f.blob)
            files.append((f.name, str(path)))
        made = Plan(function, Launch(interpreter, bound.label, tuple(files)), notes)
        if len(self._plans) >= PLANS_KEPT:
            self._plans.pop(next(iter(self._plans)))
        self._plans[sha] = made
        return made

    def _check_versions(
        self, bound: BoundFunction, versions: dict[str, str]
    ) -> tuple[TaskWarning, ...]:
        differ = mismatches(bound.versions, versions)
        if not differ:
            return ()
        listed = "; ".join(differ)
        text = f"environment {bound.label}: versions differ from the session's: {listed}"
        if bound.strict:
            raise EnvironmentFailed(
                "version check",
                "; ".join(differ) + " (strict=True; pin the same versions, or strict=False)",
                bound.label,
            )
        return (TaskWarning("coffea_hq.remote.RemoteWarning", text[:4000]),)

    async def _environment(self, bound: BoundFunction) -> tuple[str, dict[str, str]]:
        sha = bound.environment
        assert sha is not None
        if sha in self._envs:
            return self._envs[sha]
        failed = self._failed.get(sha)
        if failed is not None and time.monotonic() - failed[0] < FAILURE_KEPT:
            raise failed[1]
        lock = self._locks.setdefault(sha, asyncio.Lock())
        async with lock:
            if sha in self._envs:
                return self._envs[sha]
            try:
                made = await self._materialise(sha, bound.label)
            except EnvironmentFailed as e:
                e.environment = e.environment or bound.label
                self._failed[sha] = (time.monotonic(), e)
                log.warning("%s", e)
                raise
            self._envs[sha] = made
            return made

    async def _materialise(self, sha: str, label: str) -> tuple[str, dict[str, str]]:
        try:
            spec = msgspec.json.decode(await self._fetch_blob(sha), type=EnvironmentSpec)
        except msgspec.ValidationError as e:
            raise EnvironmentFailed("read spec", f"the environment's spec is malformed: {e}") from e
        except FunctionUnavailable as e:
            raise EnvironmentFailed("fetch spec", str(e)) from e
        archive = None
        if spec.kind == "pixi-pack" and spec.archive is not None:
            try:
                data = await self._fetch_blob(spec.archive)
            except FunctionUnavailable as e:
                raise EnvironmentFailed("fetch archive", str(e)) from e

            def archive(path: Path, data: bytes = data) -> None:
                path.write_bytes(data)

        def say(line: str) -> None:
            log.info("environment %s: %s", label, line)

        loop = asyncio.get_running_loop()

        def build() -> tuple[str, dict[str, str]]:
            interpreter = self.cache.materialise(sha, spec, archive, say)
            return interpreter, probe(interpreter, say)

        return await loop.run_in_executor(None, build)

    async def _file(self, sha: str) -> Path:
        path = self.cache.root / "files" / sha
        if path.is_file():
            return path
        try:
            data = await self._fetch_blob(sha)
        except FunctionUnavailable as e:
            raise EnvironmentFailed("fetch files", str(e)) from e
        return await asyncio.get_running_loop().run_in_executor(
            None, self.cache.store_file, sha, data
        )
