"""HTTP to the queue server with retries: the one place client and worker talk HTTP.

Connection failures and 502/503/504 answers are retried with exponential backoff
for up to ``retry_for`` seconds, so a server restart or a network blip is ridden
out (the first retry of an outage logs a warning); every request the protocol defines
is idempotent, which makes retrying safe.
A 4xx answer is never retried: it raises :class:`ServerError` with the server's
own sentence.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import time
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import msgspec

from . import protocol
from .errors import ServerError, ServerUnreachable

__all__ = ["Response", "ServerError", "ServerUnreachable", "Transport"]

log = logging.getLogger(__name__)

H = TypeVar("H")

RETRY_STATUSES = frozenset({502, 503, 504})


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    content_type: str
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def frames(self, kind: type[H]) -> tuple[H, list[memoryview]]:
        """The body as frames whose header is message ``kind``."""
        return protocol.unpack(self.body, kind)


def _error_from(status: int, body: bytes) -> ServerError:
    try:
        doc = json.loads(body)
        return ServerError(status, str(doc.get("error", "error")), str(doc.get("message", doc)))
    except (ValueError, AttributeError):
        return ServerError(status, "error", body.decode(errors="replace")[:500])


def _describe(e: BaseException) -> str:
    """What a failed connection met, in a few words where the cause is a common one."""
    cause = getattr(e, "os_error", None)
    if isinstance(cause, socket.gaierror):
        return f"host not found: {cause.strerror or cause}"
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, TimeoutError):
        return "no answer (timed out)"
    return f"{type(e).__name__}: {e}"


class Transport:
    """A retrying aiohttp session bound to one server URL. Use within one event loop."""

    def __init__(self, url: str, *, retry_for: float = 300.0, token: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.retry_for = retry_for
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._session: aiohttp.ClientSession | None = None
        self._warned = False  # an outage has been logged and the server not heard since

    def _answered(self) -> None:
        if self._warned:
            self._warned = False
            log.warning("coffea-hq server at %s answers again", self.url)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=64, enable_cleanup_closed=True),
                headers=self._headers,
                # Long polls set their own read timeout per request.
                timeout=aiohttp.ClientTimeout(total=None, connect=10, sock_read=120),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        body: bytes | None = None,
        content_type: str | None = None,
        params: dict[str, str] | None = None,
        accept: tuple[int, ...] = (200, 201),
        retry_for: float | None = None,
        warn: bool = True,
    ) -> Response:
        """Send one request, retrying transient failures; raise on anything not in ``accept``.

        The first retry of an outage logs a warning (unless ``warn`` is false); after
        ``retry_for`` seconds (default: the transport's) it raises :class:`ServerUnreachable`.
        """
        budget = self.retry_for if retry_for is None else retry_for
        deadline = time.monotonic() + budget
        delay = 0.05
        headers = {"Content-Type": content_type} if content_type else None
        # A message of coffea_hq.messages, or a plain JSON document.
        data = body if json_body is None else msgspec.json.encode(json_body)
        if json_body is not None:
            headers = {"Content-Type": "application/json"}
        while True:
            try:
                async with self._client().request(
                    method, self.url + path, data=data, headers=headers, params=params
                ) as resp:
                    payload = await resp.read()
                    status = resp.status
                    ctype = resp.content_type
            except (TimeoutError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
                failure: str = _describe(e)
            else:
                if status in accept:
                    self._answered()
                    return Response(status, ctype, payload)
                if status not in RETRY_STATUSES:
                    self._answered()
                    raise _error_from(status, payload)
                failure = f"HTTP {status}: {payload[:200]!r}"
            if time.monotonic() + delay > deadline:
                raise ServerUnreachable(
                    f"coffea-hq server at {self.url} unreachable for {budget:.0f}s "
                    f"({method} {path}): {failure}",
                    url=self.url,
                    reason=failure,
                )
            if warn and not self._warned:
                # Once per outage, however many requests are retrying: the user sees why
                # nothing moves (the error itself comes only when the budget runs out).
                self._warned = True
                log.warning(
                    "coffea-hq server at %s unreachable (%s), retrying for %.0f s ...",
                    self.url,
                    failure,
                    budget,
                )
            log.debug("%s %s failed (%s); retrying in %.2fs", method, path, failure, delay)
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 5.0)
