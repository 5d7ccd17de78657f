"""Who may call which route: bearer tokens with roles, checked before any handler runs.

:data:`ROUTE_ROLES` maps every route of :data:`coffea_hq.routes.ROUTES`, keyed by
(method, path), to the roles that may call it (admin may call all); ``None`` marks the
public routes. :func:`auth_middleware` resolves the caller's
token to a :class:`Principal` and refuses the request before any state changes:
no token or an unknown one is a 401, a role the route does not admit a 403. Which
*job* a user may touch is checked by the handlers (a job of another user is a 404).

Verified tokens are cached in the process for ``token_cache_ttl`` seconds (default
:data:`DEFAULT_TOKEN_CACHE_TTL`), so the hot path (lease, complete, heartbeat) costs no
store lookup; a revoked token stops working within that time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from coffea_hq import messages as m
from coffea_hq import protocol
from coffea_hq.protocol import Role
from coffea_hq.routes import ROUTES

from .tokens import TokenRecord, digest

log = logging.getLogger("coffea_hq.server.auth")

DEFAULT_TOKEN_CACHE_TTL = 5.0
CACHE_MAX = 10_000  # distinct tokens remembered at once (a flood of bad ones cannot grow it)

# The roles besides admin that may call each route (coffea_hq.routes says, per route);
# None: anyone, without a token.
ROUTE_ROLES: dict[tuple[str, str], frozenset[Role] | None] = {
    (route.method, route.path): route.roles for route in ROUTES
}

_MISSING = object()


def roles_for(method: str, path: str) -> frozenset[Role] | None | object:
    """The roles admitted to ``method path`` (a HEAD that aiohttp adds to a GET route has
    the GET's); ``_MISSING`` for a route without an entry (refused: fail closed)."""
    found = ROUTE_ROLES.get((method, path), _MISSING)
    if found is _MISSING and method == "HEAD":
        found = ROUTE_ROLES.get(("GET", path), _MISSING)
    return found


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller of one request."""

    user: str
    role: Role
    token_id: str
    users: tuple[str, ...] = ()  # a worker token limited to these users' jobs

    @property
    def admin(self) -> bool:
        return self.role is Role.ADMIN


# Open mode (no --auth): everyone is an anonymous admin; jobs are recorded with user ''.
OPEN = Principal("", Role.ADMIN, "open")
PRINCIPAL = "hq_principal"  # request key of the caller's Principal


def principal(request: web.Request) -> Principal:
    return request.get(PRINCIPAL, OPEN)


class TokenCache:
    """Token digest -> Principal for tokens verified in the last ``ttl`` seconds."""

    def __init__(
        self,
        lookup: Callable[[str], Awaitable[Any]],
        ttl: float,
        static: dict[str, Principal] | None = None,
    ) -> None:
        self._lookup = lookup  # digest -> stored JSON record or None
        self.ttl = ttl
        self._entries: dict[str, tuple[float, Principal]] = {}
        # Tokens given to the server itself (--worker-token-file: a Kubernetes Secret), by
        # digest; not in the store, so rotating the Secret (and restarting) revokes them.
        self._static = dict(static or {})

    def clear(self) -> None:
        self._entries.clear()

    async def verify(self, token: str) -> Principal | None:
        sha = digest(token)
        if sha in self._static:
            return self._static[sha]
        now = time.monotonic()
        hit = self._entries.get(sha)
        if hit is not None and hit[0] > now:
            return hit[1]
        raw = await self._lookup(sha)
        if raw is None:
            self._entries.pop(sha, None)
            return None
        record = TokenRecord.from_json(raw)
        if record.expired():
            return None
        until = now + self.ttl
        if record.expires is not None:  # never trust a cached token past its expiry
            until = min(until, now + record.expires - time.time())
        if len(self._entries) >= CACHE_MAX:
            self._entries.clear()
        who = Principal(record.user, record.role, record.id, tuple(record.users))
        if self.ttl > 0:
            self._entries[sha] = (until, who)
        return who


def _refuse(status: int, code: str, message: str) -> web.Response:
    headers = {"WWW-Authenticate": 'Bearer realm="coffea-hq"'} if status == 401 else None
    return web.Response(
        body=m.encode(m.ErrorReply(code, message)),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def auth_middleware(cache: TokenCache | None) -> Any:
    """The middleware; ``cache`` None is open mode (every caller an anonymous admin)."""

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        resource = request.match_info.route.resource
        if cache is None or resource is None:  # open mode; or no such route (404/405)
            return await handler(request)
        path = resource.canonical
        allowed = roles_for(request.method, path)
        if allowed is _MISSING:
            log.error("route %s %s has no entry in auth.ROUTE_ROLES: refused", request.method, path)
            return _refuse(403, "forbidden", f"{request.method} {path} admits no role")
        if allowed is None:
            return await handler(request)
        token = bearer(request)
        if token is None:
            return _refuse(
                401,
                "unauthenticated",
                "this server requires an access token: pass token=..., or set "
                f"{protocol.ENV_TOKEN} or {protocol.ENV_TOKEN_FILE} "
                "(an operator makes one with `coffea-hq token create`)",
            )
        who = await cache.verify(token)
        if who is None:
            return _refuse(
                401,
                "bad_token",
                "the access token is not valid on this server (revoked, expired, or made for "
                "another deployment): ask the operator for a new one",
            )
        assert isinstance(allowed, frozenset)
        if not who.admin and who.role not in allowed:
            return _refuse(
                403,
                "forbidden",
                f"a {who.role} token may not call {request.method} {path}",
            )
        request[PRINCIPAL] = who
        return await handler(request)

    return middleware
