"""Per-user quotas, per-request limits, concurrent long polls, and the store-full check.

Quota checks run before the request changes anything; a refusal is a 429 with
``Retry-After`` (the client waits and tries again, and says why if it gives up). The
usage they compare against is read from the store just before the change, so two
requests of one user racing each other may overshoot a quota by one batch.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from coffea_hq import protocol

from .store import StoreError

MEMORY_CHECK_EVERY = 1.0  # seconds an INFO memory reading is trusted


class QuotaExceeded(StoreError):
    status = 429
    code = "quota_exceeded"

    def __init__(self, message: str, retry_after: int = protocol.RETRY_AFTER_QUOTA) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TooManyTasks(StoreError):
    status = 413
    code = "too_many_tasks"


class StoreFull(StoreError):
    status = 507
    code = "store_full"
    retry_after = protocol.RETRY_AFTER_STORE_FULL


@dataclass(frozen=True)
class Limits:
    """The limits one server enforces; 0 (or None) switches one off."""

    max_tasks_per_request: int = 0
    queued_tasks_per_user: int = 0  # queued + running tasks over a user's unfinished jobs
    blob_bytes_per_user: int = 0
    result_bytes_per_user: int = 0  # results stored and not yet collected
    long_polls_per_client: int = 0
    store_full_at: float = 0.9  # share of the store's maxmemory where user writes stop


_NOTHING = contextlib.nullcontext()


class LongPolls:
    """Long polls in flight in this process, per client (token id, else address)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: Counter[str] = Counter()

    def hold(self, client: str) -> contextlib.AbstractContextManager[None]:
        """Count one long poll of ``client`` while the block runs (refused past the limit;
        with no limit, nothing to count: every lease request passes here)."""
        if not self.limit:
            return _NOTHING
        return self._held(client)

    @contextlib.contextmanager
    def _held(self, client: str) -> Iterator[None]:
        if self._open[client] >= self.limit:
            raise QuotaExceeded(
                f"{self._open[client]} long polls of this client are open already (limit "
                f"{self.limit}, hq-server --max-long-polls): close some first",
                retry_after=1,
            )
        self._open[client] += 1
        try:
            yield
        finally:
            self._open[client] -= 1
            if not self._open[client]:
                del self._open[client]


class MemoryGauge:
    """Whether the store is near its ``maxmemory`` (INFO memory, read at most once a second)."""

    def __init__(self, redis: Any, full_at: float) -> None:
        self.redis = redis
        self.full_at = full_at
        self._checked = -MEMORY_CHECK_EVERY
        self._used = 0
        self._max = 0

    async def check(self) -> None:
        """Raise :class:`StoreFull` if the store holds ``full_at`` of its maxmemory."""
        if self.full_at <= 0:
            return
        now = time.monotonic()
        if now - self._checked >= MEMORY_CHECK_EVERY:
            self._checked = now
            try:
                info = await self.redis.info("memory")
            except Exception:  # a store that hides INFO: nothing to compare against
                info = {}
            self._used = int(info.get("used_memory", 0) or 0)
            self._max = int(info.get("maxmemory", 0) or 0)
        if self._max and self._used >= self.full_at * self._max:
            raise StoreFull(
                f"the queue's store is full ({self._used:,} of {self._max:,} bytes used): "
                "it takes no new work until jobs finish and their results are collected"
            )

    def forget(self) -> None:
        """Read INFO again at the next check."""
        self._checked = -MEMORY_CHECK_EVERY
