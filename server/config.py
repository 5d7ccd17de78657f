"""hq-server's settings (one dataclass; the CLI fills it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from coffea_hq import protocol

from .auth import DEFAULT_TOKEN_CACHE_TTL
from .limits import Limits


@dataclass(frozen=True)
class ServerConfig:
    redis_url: str
    host: str = "127.0.0.1"
    port: int = protocol.DEFAULT_PORT
    prefix: str = "hq"
    lease_timeout: float = protocol.DEFAULT_LEASE_TIMEOUT
    max_request_size: int = protocol.DEFAULT_MAX_REQUEST_SIZE
    result_ttl: int = protocol.DEFAULT_RESULT_TTL
    unsealed_timeout: float = protocol.DEFAULT_UNSEALED_TIMEOUT
    allow_eviction: bool = False
    # Require a token on every route but /health (see auth.py); off: open mode, which the
    # CLI allows only on a loopback address unless told --insecure.
    auth: bool = False
    token_cache_ttl: float = DEFAULT_TOKEN_CACHE_TTL
    worker_token_digest: str = ""  # sha256 of --worker-token-file's token ('' for none)
    limits: Limits = field(default_factory=Limits)
    presence_grace: float = protocol.PRESENCE_GRACE
    # HTTPS: the server's certificate chain and key; with tls_ca, clients must present a
    # certificate signed by that CA (mutual TLS).
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    # The store: an ACL user and its password, and for rediss:// the CA that signed the
    # store's certificate and this server's client certificate and key.
    store_user: str | None = None
    store_password: str | None = None
    store_ca: str | None = None
    store_cert: str | None = None
    store_key: str | None = None

    def store_options(self) -> dict[str, Any]:
        """The redis-py connection options these settings add to ``redis_url``."""
        options: dict[str, Any] = {}
        if self.store_user:
            options["username"] = self.store_user
        if self.store_password:
            options["password"] = self.store_password
        for name, value in (
            ("ssl_ca_certs", self.store_ca),
            ("ssl_certfile", self.store_cert),
            ("ssl_keyfile", self.store_key),
        ):
            if value:
                options[name] = value
        return options

    @property
    def reap_interval(self) -> float:
        """How often this replica looks for expired leases."""
        return min(1.0, self.lease_timeout / 4)
