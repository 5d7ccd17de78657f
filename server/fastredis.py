"""Cheaper redis-py on the hot path (lease, complete, heartbeat): what each request saves.

Profiles of hq-server at one task per lease put a quarter of its CPU in redis-py. Two
parts of that are overhead we do not need:

- redis-py's asyncio connections pack every command in Python, argument by argument
  (a report's script call has 37). hiredis, which parses the replies already, packs
  them in C: :func:`packed_pool` swaps the pool's connection class for one that does.
- A pipeline holding script calls first asks the store ``SCRIPT EXISTS`` (a whole
  round trip) before it sends anything. :func:`run_pipelined` sends ``EVALSHA`` in the
  pipeline directly and loads a script only where the store answers ``NOSCRIPT`` (a
  restarted or flushed store): such a call did not run, so running it again is safe.
- Each command through the client takes a connection from the blocking pool (a
  condition, a timeout and metrics hooks), through a retry wrapper and deprecation
  shims. :class:`Direct` keeps connections of its own for the hot calls and writes and
  reads them straight (redis-py's connections, parsers and errors all the same).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, TypeVar

from redis.asyncio.client import Pipeline, Redis
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    ConnectionPool,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.connection import HiredisRespSerializer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, NoScriptError, ResponseError
from redis.utils import HIREDIS_AVAILABLE

from .scripts import Call

# redis-py's own hiredis packer: its synchronous connections use it, its asyncio ones
# do not (they pack in Python, argument by argument).
_HIREDIS = HiredisRespSerializer() if HIREDIS_AVAILABLE else None

T = TypeVar("T")

__all__ = ["Direct", "packed_pool", "run_pipelined"]


class _HiredisPacking(AbstractConnection):
    """Packs commands with hiredis (one C call) instead of redis-py's Python loop."""

    def pack_command(self, *args: Any) -> list[bytes]:
        try:
            return _HIREDIS.pack(*args)  # type: ignore[union-attr]  # (None: not installed)
        except DataError:  # a type hiredis does not take: redis-py says what is wrong
            return super().pack_command(*args)


class PackedConnection(_HiredisPacking, Connection):
    """A TCP connection packing with hiredis."""


class PackedSSLConnection(_HiredisPacking, SSLConnection):
    """A TLS connection packing with hiredis."""


class PackedUnixConnection(_HiredisPacking, UnixDomainSocketConnection):
    """A Unix-socket connection packing with hiredis."""


_PACKED: dict[type, type] = {
    Connection: PackedConnection,
    SSLConnection: PackedSSLConnection,
    UnixDomainSocketConnection: PackedUnixConnection,
}


def packed_pool(pool: ConnectionPool) -> ConnectionPool:
    """``pool``, its new connections packing commands with hiredis (when installed and the
    pool's connection class is one of redis-py's own; otherwise unchanged)."""
    if _HIREDIS is not None and pool.connection_class in _PACKED:
        pool.connection_class = _PACKED[pool.connection_class]
    return pool


class Direct:
    """Up to ``size`` store connections of ``pool``'s kind (its address, TLS and timeouts),
    used one request at a time without the pool's and the client's bookkeeping: commands
    go out in one write, replies come back in order (an error reply as its exception
    object, as a pipeline's ``raise_on_error=False`` gives it). A connection that fails is
    dropped; a reused one that fails before any reply came (the store restarted since)
    is replaced, with every other idle one, and the commands sent once more, as
    redis-py's own retry would."""

    def __init__(self, pool: ConnectionPool, size: int) -> None:
        self._pool = pool
        self._idle: list[AbstractConnection] = []
        self._slots = asyncio.Semaphore(size)
        self._closed = False

    async def execute(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        async with self._slots:
            for attempt in (0, 1):
                reused = bool(self._idle)
                conn = self._idle.pop() if reused else self._pool.make_connection()
                got: list[Any] = []
                try:
                    await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
                    for _ in commands:
                        try:
                            got.append(await conn.read_response(disconnect_on_error=True))
                        except ResponseError as e:  # an error reply: the stream goes on
                            got.append(e)
                except (RedisConnectionError, OSError):
                    await conn.disconnect(nowait=True)
                    if attempt or not reused or got:
                        raise
                    # The store went away since: its other idle connections are as stale.
                    stale, self._idle = self._idle, []
                    for old in stale:
                        await old.disconnect(nowait=True)
                    continue
                except BaseException:  # cancelled or timed out mid-reply: never reuse it
                    await conn.disconnect(nowait=True)
                    raise
                if self._closed:
                    await conn.disconnect()
                else:
                    self._idle.append(conn)
                return got
        raise AssertionError("unreachable")

    async def call(self, call: Call[T]) -> T:
        """One script call, by EVALSHA (loaded first if the store answers NOSCRIPT)."""
        (reply,) = await self.execute([_evalsha(call)])
        if isinstance(reply, NoScriptError):
            return await call.run()
        if isinstance(reply, Exception):
            raise reply
        return call.parse(reply)

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.disconnect()


def _evalsha(call: Call[Any]) -> tuple[Any, ...]:
    return ("EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.args)


async def run_pipelined(
    redis: Redis,
    calls: Sequence[Call[T]],
    pipe: Pipeline | None = None,
    before: list[Any] | None = None,
    direct: Direct | None = None,
) -> list[T]:
    """Run independent script calls in one round trip (a pipeline, not a transaction),
    without redis-py's ``SCRIPT EXISTS`` round trip first. ``pipe``
    may already hold other commands, sent in the same round trip (their replies go to
    ``before`` if given, else are dropped)."""
    if not calls and pipe is None:
        return []
    pipe = pipe if pipe is not None else redis.pipeline(transaction=False)
    first = len(pipe)
    if direct is not None:
        # The pipeline's own commands as they are (their replies unparsed: raw counts),
        # then the script calls, in one write on a connection of ``direct``'s.
        held = [args for args, _ in pipe.command_stack]
        await pipe.reset()
        commands = [*held, *map(_evalsha, calls)]
        every = await direct.execute(commands) if commands else []
    else:
        for call in calls:
            pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
        every = await pipe.execute(raise_on_error=False) if len(pipe) else []
    for i, reply in enumerate(every):  # any other error fails the call
        if isinstance(reply, Exception) and not (i >= first and isinstance(reply, NoScriptError)):
            raise reply
    replies = every[first:]
    if before is not None:
        before += every[:first]
    out: list[T] = []
    for call, reply in zip(calls, replies, strict=True):
        if isinstance(reply, NoScriptError):
            # Not run: AsyncScript loads the script and runs the call again.
            out.append(await call.run())
        else:
            out.append(call.parse(reply))
    return out
