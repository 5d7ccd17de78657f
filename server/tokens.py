"""Access tokens kept in the store: made, listed and revoked by ``coffea-hq token``.

A token is a random secret shown once at creation. The store keeps only its sha256
(enough for a secret of 256 random bits: there is nothing to brute-force) in one hash,
``<prefix>:tokens``, field = the hex digest, value = the JSON of a :class:`TokenRecord`.
A token's id is the first :data:`ID_LENGTH` hex digits of its digest: printable, safe to
log, and what ``coffea-hq token revoke`` takes.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from coffea_hq import protocol
from coffea_hq.protocol import Role

from .keys import Keys

ID_LENGTH = 12


class TokenError(ValueError):
    """A token command that cannot be carried out (unknown id, bad user name, ...)."""


@dataclass(frozen=True)
class TokenRecord:
    """What the store knows about one token (never the secret itself)."""

    id: str
    user: str
    role: Role
    created: float  # unix seconds
    expires: float | None = None  # unix seconds; None: never
    # A worker token may be limited to these users' jobs (a per-user or per-group pool).
    users: list[str] = field(default_factory=list)

    def expired(self, now: float | None = None) -> bool:
        return self.expires is not None and (now or time.time()) >= self.expires

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> TokenRecord:
        doc = json.loads(raw)
        return cls(
            id=str(doc["id"]),
            user=str(doc["user"]),
            role=Role(doc["role"]),
            created=float(doc["created"]),
            expires=None if doc.get("expires") is None else float(doc["expires"]),
            users=[str(u) for u in doc.get("users") or []],
        )


def digest(token: str) -> str:
    """The hex sha256 of a token: how the store names it."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_secret() -> str:
    return protocol.TOKEN_PREFIX + secrets.token_urlsafe(32)


def make_record(
    token: str, *, user: str, role: Role, ttl: float | None = None, users: list[str] | None = None
) -> tuple[str, TokenRecord]:
    """The store field and record for a new token; checks the names it is given."""
    for name in [user, *(users or [])]:
        if not protocol.valid_id(name):
            raise TokenError(
                f"user name {name!r} must be 1-{protocol.ID_MAX_LENGTH} letters, digits, "
                "'-', '_' or '.'"
            )
    if users and role is not Role.WORKER:
        raise TokenError("only a worker token can be limited to users' jobs (--users)")
    if ttl is not None and ttl <= 0:
        raise TokenError("a token's lifetime must be positive")
    now = time.time()
    sha = digest(token)
    record = TokenRecord(
        sha[:ID_LENGTH], user, role, now, None if ttl is None else now + ttl, list(users or [])
    )
    return sha, record


# The synchronous side, for the ``coffea-hq token`` command (talks to the store itself).


def create(
    redis: Any,
    keys: Keys,
    *,
    user: str,
    role: Role,
    ttl: float | None = None,
    users: list[str] | None = None,
) -> tuple[str, TokenRecord]:
    """Make a token, store its digest; returns (the secret, its record)."""
    token = new_secret()
    sha, record = make_record(token, user=user, role=role, ttl=ttl, users=users)
    redis.hset(keys.tokens, sha, record.to_json())
    return token, record


def listing(redis: Any, keys: Keys) -> list[TokenRecord]:
    """Every stored token's record, oldest first."""
    records = [TokenRecord.from_json(v) for v in redis.hgetall(keys.tokens).values()]
    return sorted(records, key=lambda r: r.created)


def revoke(redis: Any, keys: Keys, token_id: str) -> TokenRecord:
    """Delete the token whose id is ``token_id`` (or starts with it, if only one does)."""
    if not token_id:
        raise TokenError("give the id of the token to revoke (coffea-hq token list shows them)")
    matches = [
        (f, v) for f, v in redis.hgetall(keys.tokens).items() if f.decode().startswith(token_id)
    ]
    if not matches:
        raise TokenError(f"no token with id {token_id!r} (coffea-hq token list shows them)")
    if len(matches) > 1:
        raise TokenError(f"{len(matches)} tokens have ids starting with {token_id!r}: give more")
    fieldname, raw = matches[0]
    redis.hdel(keys.tokens, fieldname)
    return TokenRecord.from_json(raw)
