"""The Lua scripts behind every task state change, registered once per connection pool.

Each ``lua/<name>.lua`` is prefixed with ``lua/common.lua`` (shared helpers and
the KEYS layout) and called by SHA through redis-py's :class:`AsyncScript`.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

SCRIPT_NAMES = (
    "create",
    "submit",
    "seal",
    "lease",
    "complete",
    "heartbeat",
    "release",
    "reap",
    "cancel",
    "ack",
)


def _source(name: str) -> str:
    folder = resources.files(__package__).joinpath("lua")
    common = folder.joinpath("common.lua").read_text()
    return common + "\n" + folder.joinpath(f"{name}.lua").read_text()


@dataclass(frozen=True)
class Scripts:
    create: AsyncScript
    submit: AsyncScript
    seal: AsyncScript
    lease: AsyncScript
    complete: AsyncScript
    heartbeat: AsyncScript
    release: AsyncScript
    reap: AsyncScript
    cancel: AsyncScript
    ack: AsyncScript

    @classmethod
    def register(cls, redis: Redis) -> Scripts:
        return cls(**{name: redis.register_script(_source(name)) for name in SCRIPT_NAMES})
