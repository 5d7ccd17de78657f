"""The server's cheaper redis-py path (server/fastredis.py): hiredis packing byte for byte
as redis-py packs, and pipelined script calls without a SCRIPT EXISTS round trip that
still run when the store has forgotten the scripts (a restarted or flushed store)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from coffea_hq.server.fastredis import Direct, PackedConnection, packed_pool
from coffea_hq.server.keys import Keys
from coffea_hq.server.store import Report, Store
from redis.asyncio.connection import Connection, ConnectionPool
from redis.exceptions import DataError, ResponseError

from coffea_hq import protocol
from coffea_hq.embedded import EmbeddedRedis
from coffea_hq.protocol import CompleteStatus, Outcome

from .conftest import FUNCTION_BLOB

FN = protocol.blob_name(FUNCTION_BLOB)


@pytest.fixture
async def packed_store(store: EmbeddedRedis, prefix: str) -> AsyncIterator[Store]:
    """A Store as hq-server makes one: connections packing with hiredis, hot calls on
    connections of its own (fastredis.Direct)."""
    pool = packed_pool(ConnectionPool.from_url(store.url))
    client = aioredis.Redis.from_pool(pool)
    direct = Direct(pool, 4)
    try:
        queue = Store(client, Keys(prefix), lease_timeout=30.0, result_ttl=60, direct=direct)
        await queue.put_blob(FN, FUNCTION_BLOB)
        yield queue
    finally:
        await direct.aclose()
        await client.aclose()


def test_hiredis_packs_what_redis_py_packs() -> None:
    ours, theirs = PackedConnection(), Connection()
    for args in [
        ("EVALSHA", "ab" * 20, 2, "k1", b"k2", 0, -7, 2**70, 1.5, 0.1, 1e20, "é", b"\x00\xff"),
        ("SCRIPT LOAD", "return 1"),
        (b"CONFIG GET", "maxmemory-policy"),
        ("SET", "k", memoryview(b"value")),
    ]:
        assert b"".join(ours.pack_command(*args)) == b"".join(
            bytes(x) for x in theirs.pack_command(*args)
        ), args
    with pytest.raises(DataError, match="Invalid input of type: 'bool'"):
        ours.pack_command("SET", "k", True)


async def _script_exists_calls(redis: aioredis.Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_script|exists", {}).get("calls", 0))


async def test_a_report_is_one_round_trip_and_survives_a_flushed_store(
    packed_store: Store,
) -> None:
    store = packed_store
    job = "fast"
    await store.create_job(job, function=FN, max_attempts=3, fail_fast=True, label="", user="")
    await store.submit(job, ["0", "1"], [b"p0", b"p1"])
    await store.seal(job, 2)
    leased = await store.lease("w1", 2)
    assert sorted(t.task for t in leased) == ["0", "1"]
    before = await _script_exists_calls(store.redis)
    ok0 = Report(job, "0", leased[0].attempt, Outcome.OK, None, b"r0")
    assert await store.complete("w1", [ok0]) == [CompleteStatus.ACCEPTED]
    assert await _script_exists_calls(store.redis) == before  # no SCRIPT EXISTS first

    # The store forgets every script (SCRIPT FLUSH, as a restart without them does): the
    # pipelined calls answer NOSCRIPT, are loaded and run once more, and count once.
    await store.redis.script_flush()
    assert await store.heartbeat("w1", {}, [(job, "1", 1)]) == []
    await store.redis.script_flush()
    ok1 = Report(job, "1", 1, Outcome.OK, None, b"r1")
    assert await store.complete("w1", [ok1, ok0]) == [
        CompleteStatus.ACCEPTED,
        CompleteStatus.DUPLICATE,
    ]
    summary = await store.summary(job)
    assert (summary["done"], summary["failed"], summary["state"]) == (2, 0, "done")


async def test_direct_connections_ride_out_a_dropped_connection(packed_store: Store) -> None:
    """A connection the store closed (a restart, an idle timeout) is replaced at its next
    use, and an error reply comes back as an error, the other replies standing."""
    direct = packed_store.direct
    assert direct is not None
    (mine,) = await direct.execute([("CLIENT", "ID")])
    await packed_store.redis.execute_command("CLIENT", "KILL", "ID", mine)
    got = await direct.execute([("PING",), ("NOSUCHCOMMAND",), ("ECHO", "x")])
    assert got[0] == b"PONG" and got[2] == b"x"
    assert isinstance(got[1], ResponseError) and "unknown command" in str(got[1])
