"""HTTP to the queue server with retries: the one place client and worker talk HTTP.

A transport may be given several server URLs (replicas of one server on one store:
any of them serves any request). A request whose connection fails (refused, reset,
timed out; not an HTTP error answer) moves to the next URL at once, and stays there
for the requests after it; once every URL has failed, the retries below back off.

Connection failures and 502/503/504 answers are retried with exponential backoff
for up to ``retry_for`` seconds, so a server restart or a network blip is ridden
out (the first retry of an outage logs a warning); every request the protocol defines
is idempotent, which makes retrying safe.
A 429 (a quota) or 507 (the store is full) is retried after the ``Retry-After`` the
server sends, within the same budget; giving up raises :class:`ServerError` with the
server's sentence. Any other 4xx answer is never retried: it raises
:class:`ServerError` with the server's own sentence. Neither is a TLS failure (a
certificate not trusted, plaintext to a TLS port or the reverse): it raises
:class:`TLSError` at once, saying why.

The access token is ``token=``, else ``$HQ_TOKEN``, else the contents of the file
``$HQ_TOKEN_FILE`` names (see :func:`resolve_token`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import socket
import ssl
import time
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import msgspec

from . import protocol
from .errors import HQError, ServerError, ServerUnreachable, TLSError
from .tls import client_context, describe_failure, refusal, speaks_tls

__all__ = [
    "Response",
    "ServerError",
    "ServerUnreachable",
    "TLSError",
    "Transport",
    "parse_urls",
]

log = logging.getLogger(__name__)

H = TypeVar("H")

RETRY_STATUSES = frozenset({502, 503, 504})
BACKOFF_STATUSES = frozenset({429, 507})  # wait as long as the server says, then retry
RETRY_AFTER_MAX = 60.0


def resolve_token(token: str | None = None) -> str | None:
    """The access token to send: ``token``, else ``$HQ_TOKEN``, else the first line of the
    file ``$HQ_TOKEN_FILE`` (what a JupyterHub spawner or a Kubernetes Secret provides);
    None when none is given (a server in open mode needs none)."""
    if token:
        return token.strip()
    if os.environ.get(protocol.ENV_TOKEN):
        return os.environ[protocol.ENV_TOKEN].strip()
    path = os.environ.get(protocol.ENV_TOKEN_FILE)
    if not path:
        return None
    try:
        with open(os.path.expanduser(path)) as f:
            text = f.read().strip()
    except OSError as e:
        raise HQError(
            f"cannot read the access token file {protocol.ENV_TOKEN_FILE}={path}: {e}"
        ) from e
    if not text:
        raise HQError(f"the access token file {protocol.ENV_TOKEN_FILE}={path} is empty")
    return text.splitlines()[0].strip()


def parse_urls(urls: str | Sequence[str]) -> tuple[str, ...]:
    """The server URLs in ``urls``: a list, or one string of comma-separated URLs (what
    ``$HQ_URL`` and the command lines take), each ``http://host[:port]`` or
    ``https://...``, trailing slashes dropped. Raises :class:`HQError` saying what is
    wrong with an empty list or an entry that is not such a URL."""
    items = urls.split(",") if isinstance(urls, str) else list(urls)
    found: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise HQError(f"a coffea-hq server URL must be a string, got {item!r}")
        url = item.strip().rstrip("/")
        if not url:
            continue  # "a,,b" or a trailing comma
        parts = urllib.parse.urlsplit(url)
        try:
            parts.port  # noqa: B018 (raises on a port that is not a number)
        except ValueError:
            raise HQError(f"coffea-hq server URL {url!r} has a bad port") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise HQError(
                f"coffea-hq server URL must look like http://host:port or https://host:port, "
                f"got {url!r}"
            )
        if url not in found:
            found.append(url)
    if not found:
        raise HQError(f"no coffea-hq server URL in {urls!r}")
    return tuple(found)


def _retry_after(value: str | None) -> float:
    try:
        return min(max(float(value or 1), 0.05), RETRY_AFTER_MAX)
    except ValueError:
        return 1.0


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


_BODILESS = {  # what a refusal means when it carries no sentence (the answer to a HEAD)
    401: "the server requires an access token and got none, or one it does not accept: pass "
    f"token=..., or set {protocol.ENV_TOKEN} or {protocol.ENV_TOKEN_FILE}",
    403: "this access token's role may not do that",
}


def _error_from(status: int, body: bytes) -> ServerError:
    if not body:
        return ServerError(status, "error", _BODILESS.get(status, f"HTTP {status}, no body"))
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


def _ssl_failure(e: BaseException) -> BaseException | None:
    """The TLS error behind a failed request, if that is what it was."""
    seen: BaseException | None = e
    for _ in range(4):  # aiohttp wraps the ssl module's error once or twice
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLError | aiohttp.ClientSSLError):
            return seen
        seen = getattr(seen, "os_error", None) or seen.__cause__ or seen.__context__
    return None


class Transport:
    """A retrying aiohttp session bound to one server, at one URL or several (replicas,
    failed over in turn; see :func:`parse_urls`). Use within one event loop.

    An ``https://`` URL is verified with ``tls`` (default: ``coffea_hq.tls.client_context()``,
    which reads ``$HQ_TLS_CA``, ``$HQ_TLS_CERT`` and ``$HQ_TLS_KEY``).
    """

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        retry_for: float = 300.0,
        token: str | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.urls = parse_urls(url)
        self._at = 0  # index in urls of the replica requests go to
        self.retry_for = retry_for
        token = resolve_token(token)
        self.https = any(u.startswith("https://") for u in self.urls)
        self._tls = tls if tls is not None or not self.https else client_context()
        self._probed: set[str] = set()  # plaintext URLs asked whether their port speaks TLS
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._session: aiohttp.ClientSession | None = None
        self._warned = False  # an outage has been logged and the server not heard since

    @property
    def url(self) -> str:
        """The URL requests go to now (the first, until a connection to it fails)."""
        return self.urls[self._at]

    def _fail_over(self, used: str) -> bool:
        """A connection to ``used`` failed: move on to the next URL, unless a concurrent
        request already did. False when there is no other URL."""
        if len(self.urls) == 1:
            return False
        if self.urls[self._at] == used:
            self._at = (self._at + 1) % len(self.urls)
            log.warning("coffea-hq server at %s unreachable: trying %s", used, self.url)
        return True

    def _where(self) -> str:
        return self.urls[0] if len(self.urls) == 1 else "any of " + ", ".join(self.urls)

    def _answered(self) -> None:
        if self._warned:
            self._warned = False
            log.warning("coffea-hq server at %s answers again", self.url)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=64, enable_cleanup_closed=True, ssl=self._tls or True
                ),
                headers=self._headers,
                # Long polls set their own read timeout per request.
                timeout=aiohttp.ClientTimeout(total=None, connect=10, sock_read=120),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def hold(
        self, path: str, body: AsyncIterator[bytes], *, content_type: str, idle: float
    ) -> None:
        """One long-lived ``POST``: stream ``body`` while reading the reply until either
        ends. No retries (the caller reconnects, to the next URL if the connection
        failed); raises if the connection fails or the server stays silent for ``idle``
        seconds."""
        timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=idle)
        headers = {"Content-Type": content_type}
        used = self.url
        try:
            async with self._client().post(
                used + path, data=body, headers=headers, timeout=timeout
            ) as resp:
                if resp.status != 200:
                    if resp.status in RETRY_STATUSES:  # (see call())
                        self._fail_over(used)
                    raise _error_from(resp.status, await resp.read())
                async for _ in resp.content:  # keep-alive lines
                    pass
        except (TimeoutError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError):
            self._fail_over(used)
            raise

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
        attempt_timeout: float | None = None,
    ) -> Response:
        """Send one request, retrying transient failures; raise on anything not in ``accept``.

        The first retry of an outage logs a warning (unless ``warn`` is false); after
        ``retry_for`` seconds (default: the transport's) it raises :class:`ServerUnreachable`.
        ``attempt_timeout``: seconds one attempt may take before it counts as a failed
        connection (the next URL is tried); default: the session's read timeout.
        """
        budget = self.retry_for if retry_for is None else retry_for
        deadline = time.monotonic() + budget
        delay = 0.05
        headers = {"Content-Type": content_type} if content_type else None
        # A message of coffea_hq.messages, or a plain JSON document.
        data = body if json_body is None else msgspec.json.encode(json_body)
        if json_body is not None:
            headers = {"Content-Type": "application/json"}
        hops = 0  # URLs failed over to since the last pause
        timeout = None if attempt_timeout is None else aiohttp.ClientTimeout(total=attempt_timeout)
        while True:
            used = self.url
            try:
                async with self._client().request(
                    method, used + path, data=data, headers=headers, params=params, timeout=timeout
                ) as resp:
                    payload = await resp.read()
                    status = resp.status
                    ctype = resp.content_type
                    wait_hint = resp.headers.get("Retry-After")
            except (TimeoutError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
                await self._fail_if_tls_mismatch(e, used)
                failure: str = f"{used}: {_describe(e)}" if len(self.urls) > 1 else _describe(e)
                if self._fail_over(used) and hops < len(self.urls) - 1:
                    hops += 1  # another replica may answer: no pause before asking it
                    if time.monotonic() < deadline:
                        continue
            else:
                if status in accept:
                    self._answered()
                    return Response(status, ctype, payload)
                if status in BACKOFF_STATUSES:
                    self._answered()
                    refused = _error_from(status, payload)
                    pause = _retry_after(wait_hint)
                    if time.monotonic() + pause > deadline:
                        raise ServerError(
                            status,
                            refused.code,
                            f"{refused.message} (gave up after retrying for {budget:.0f}s)",
                        )
                    if warn:
                        log.warning(
                            "coffea-hq server: %s; retrying in %.0fs", refused.message, pause
                        )
                    await asyncio.sleep(pause)
                    continue
                if status not in RETRY_STATUSES:
                    self._answered()
                    raise _error_from(status, payload)
                failure = f"HTTP {status}: {payload[:200]!r}"
                if len(self.urls) > 1:
                    failure = f"{used}: {failure}"
                # A proxy in front of a replica that is gone answers 502/503/504: the next
                # replica may answer, as for a connection refused.
                if self._fail_over(used) and hops < len(self.urls) - 1:
                    hops += 1
                    if time.monotonic() < deadline:
                        continue
            if time.monotonic() + delay > deadline:
                raise ServerUnreachable(
                    f"coffea-hq server at {self._where()} unreachable for {budget:.0f}s "
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
                    self._where(),
                    failure,
                    budget,
                )
            log.debug("%s %s failed (%s); retrying in %.2fs", method, path, failure, delay)
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 5.0)
            hops = 0

    async def _fail_if_tls_mismatch(self, e: BaseException, url: str) -> None:
        """Raise :class:`TLSError` if ``e`` (met at ``url``) is a TLS failure, or if this
        plaintext URL's port turns out to speak TLS: no retry would change either."""
        cause = _ssl_failure(e)
        if cause is not None and url.startswith("https://"):
            raise TLSError(describe_failure(url, cause), url=url) from None
        if url in self._probed or not isinstance(
            e, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError
        ):
            return
        self._probed.add(url)  # once: a restarting server disconnects too
        if url.startswith("https://"):
            assert self._tls is not None
            why = await refusal(url, self._tls)
            if why is not None:
                raise TLSError(why, url=url) from None
            return
        if await speaks_tls(url):
            secure = "https://" + url.removeprefix("http://")
            raise TLSError(
                f"the server at {url} speaks TLS, not plain HTTP: use {secure} "
                "(and tls_ca=, --tls-ca or HQ_TLS_CA if a private CA signed its certificate)",
                url=url,
            ) from None
