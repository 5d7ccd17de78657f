"""The least a Redis ACL user must be allowed for hq-server to run: the commands the
server and its Lua scripts send, on keys and pub/sub channels under its prefix only.

``acl_rules(prefix)`` is what ``ACL SETUSER <user> on >password`` takes after it (docs/
deploy.md, "Store ACL", shows it for the default prefix and a test runs a job as such a
user). Commands run inside a Lua script are checked against the ACL too, so the list
holds those as well. Not granted: ``CONFIG`` (hq-server then only warns that it cannot
see ``maxmemory-policy``: check it yourself), ``CLIENT``, and everything that reads or changes other
keys, other users or the server itself.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import Final

# What server/store.py, server/app.py and redis-py send outside scripts (redis-py runs
# scripts by EVALSHA, loading them with SCRIPT EXISTS / SCRIPT LOAD when the store lacks
# them). Not CLIENT SETINFO, by which redis-py names its connections where the store
# knows it (Redis 7.2+): refused, it is skipped, and older stores refuse the rule.
CLIENT_COMMANDS: Final = (
    "ping",
    "info",
    "evalsha",
    "script|exists",
    "script|load",
    "get",
    "set",
    "exists",
    "expire",
    "del",
    "echo",
    "hgetall",
    "hmget",
    "hset",
    "hdel",
    "llen",
    "xread",
    "zadd",
    "zrem",
    "zcard",
    "zcount",
    "zscore",
    "zrange",
    "zrangebyscore",
    "subscribe",
    # Sent by code on its way in from parallel branches (task output capture, quotas):
    # granted now so the merged server runs as this user; the ACL test names any missing.
    "hget",
    "hvals",
    "lrange",
    "ltrim",
    "memory|usage",
    "rpush",
    "zremrangebyrank",
    "sismember",  # kept results (GET JOB_KEPT)
    "hexists",
)
# What the Lua scripts call, read from their source (the text the server loads), so a
# command a script starts to use is granted with it.
_SCRIPT_CALL: Final = re.compile(r"(?:redis\.p?call|call_sliced(?:_collect)?)\(\s*'([A-Z]+)'")


def script_commands() -> set[str]:
    """Every command the server's Lua scripts call, lower case."""
    folder = resources.files(__package__).joinpath("lua")
    found: set[str] = set()
    for lua in folder.iterdir():
        if lua.name.endswith(".lua"):
            found.update(c.lower() for c in _SCRIPT_CALL.findall(lua.read_text()))
    return found


def acl_rules(prefix: str = "hq") -> str:
    """The ACL rules (after ``ACL SETUSER <user> on >password``) of a user that can run
    hq-server with ``--prefix prefix`` and nothing more."""
    commands = " ".join(f"+{c}" for c in sorted({*CLIENT_COMMANDS, *script_commands()}))
    return f"resetkeys ~{prefix}:* resetchannels &{prefix}:* -@all {commands}"
