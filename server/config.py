"""hq-server's settings (one dataclass; the CLI fills it)."""

from __future__ import annotations

from dataclasses import dataclass

from coffea_hq import protocol


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
    presence_grace: float = protocol.PRESENCE_GRACE

    @property
    def reap_interval(self) -> float:
        """How often this replica looks for expired leases."""
        return min(1.0, self.lease_timeout / 4)
