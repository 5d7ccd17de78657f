"""The Lua scripts behind every task state change, and one typed Python method per script.

The Python side is the one definition of the contract: each script's source is
``lua/common.lua`` and ``lua/<name>.lua`` behind a prelude generated here, which
declares the KEYS (from :class:`.keys.JobKeys`), the script's named ARGV (from
:data:`SPECS`) and every constant the scripts share with Python (job states,
statuses, outcome codes, meta and stream field names, the merge prefix). The
methods of :class:`Scripts` take keyword arguments and return enums or
dataclasses; a :class:`Call` runs alone or in a pipeline.
"""

from __future__ import annotations

import enum
from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Generic, TypeVar

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from coffea_hq import protocol
from coffea_hq.protocol import CompleteStatus, Counter, JobState, Outcome

from .keys import STORE_KEY_NAMES, Event, JobKeys, Keys, Meta

T = TypeVar("T")

# ARGV every job script receives first: the job id, the wake-up channel, the TTL (s) a
# finished job's keys get.
COMMON_ARGS = ("job", "channel", "ttl")

# What a script publishes on the wake-up channel when a job ends (cancelled, failed or
# done): parked heartbeats look again at their leases. Other messages count new work.
JOB_ENDED_MESSAGE = "ended"

# One letter per outcome in packed complete arguments.
OUTCOME_CODES: dict[Outcome, str] = {Outcome.OK: "o", Outcome.ERROR: "e", Outcome.CRASHED: "c"}


class CreateReply(enum.StrEnum):
    CREATED = "created"
    EXISTS = "exists"
    CONFLICT = "conflict"  # the id exists with another function
    NOT_YOURS = "not_yours"  # the id is another user's job


class SubmitReply(enum.StrEnum):
    OK = "ok"
    UNKNOWN = "unknown"
    FINISHED = "finished"
    SEALED = "sealed"  # a new task for a sealed job


class SealReply(enum.StrEnum):
    OK = "ok"
    UNKNOWN = "unknown"
    CONFLICT = "conflict"  # sealed before with another total
    MISMATCH = "mismatch"  # the total is not the number of tasks submitted


@dataclass(frozen=True)
class Spec:
    """A script's named ARGV after :data:`COMMON_ARGS`; ``rest`` names a variadic tail."""

    args: tuple[str, ...] = ()
    rest: str | None = None


SPECS: dict[str, Spec] = {
    "create": Spec(
        (
            "function_blob",
            "max_attempts",
            "fail_fast",
            "label",
            "user",
            "reducer_blob",
            "fanin",
            "share",
            "priority",
        )
    ),
    # tasks: comma-joined ids; sizes: comma-joined payload lengths; payloads: concatenated.
    # localities: comma-joined locality keys, one per task ('' for none), or '' for none.
    # keep: comma-joined tasks (of these) whose results stay in the store (KEPT).
    "submit": Spec(("tasks", "sizes", "payloads", "localities", "keep")),
    "seal": Spec(("total",)),
    # Store-wide: picks the job(s) by fair share among the `scan` oldest ready jobs.
    "lease": Spec(("prefix", "worker", "max", "lease_ms", "users", "scan")),
    # outcomes: one letter per task (OUTCOME_CODES); spent: comma-joined 'wall:cpu:rss'
    # of each task (seconds, seconds, bytes; '' where unknown); notes and outputs packed
    # with their sizes; rest: the error JSON of each task that is not ok, in order.
    "complete": Spec(
        (
            "worker",
            "tasks",
            "attempts",
            "outcomes",
            "sizes",
            "values",
            "spent",
            "spent_sums",
            "note_sizes",
            "notes",
            "output_sizes",
            "outputs",
        ),
        "errors",
    ),
    # rest: task, attempt, task, attempt, ...
    "heartbeat": Spec(("worker", "lease_ms"), "leases"),
    "release": Spec(("worker",), "leases"),
    "reap": Spec(("batch", "unsealed_ms")),
    "cancel": Spec(("reason",)),
    "ack": Spec(("cursor",)),
    # Store-wide (KEYS: keys.STORE_KEY_NAMES); the job id ARGV is unused.
    "worker_gone": Spec(("prefix", "worker", "session", "lost", "users")),
}
STORE_SCRIPTS = frozenset({"worker_gone", "lease"})

# The field of the passes hash (keys.Keys.passes) that holds the fair-share floor: no
# group name (a messages.Id, or '') contains a colon.
PASS_FLOOR = ":floor"


def _lua_string(value: str) -> str:
    if not all(c.isalnum() or c in "_.-:| " for c in value):
        raise ValueError(f"constant {value!r} is not a plain Lua string")
    return f"'{value}'"


def _lua_table(name: str, members: Iterable[tuple[str, str]]) -> str:
    body = ", ".join(f"{key} = {_lua_string(value)}" for key, value in members)
    return f"local {name} = {{{body}}}"


def _enum_table(name: str, cls: type[enum.StrEnum]) -> str:
    return _lua_table(name, ((m.name, m.value) for m in cls))


def _key_expression(template: str) -> str:
    """A job key name as Lua: ``template`` is the name for prefix \x01 and job \x02."""
    pieces: list[str] = []
    for i, chunk in enumerate(template.split("\x01")):
        if i:
            pieces.append("A.prefix")
        for j, part in enumerate(chunk.split("\x02")):
            if j:
                pieces.append("job")
            if part:
                if not all(c.isalnum() or c in ":{}_-." for c in part):
                    raise ValueError(f"key part {part!r} is not a plain Lua string")
                pieces.append(f"'{part}'")
    return " .. ".join(pieces)


def _store_keys_prelude() -> list[str]:
    """KEYS of a store-wide script, and use_job(job) that points the job key variables
    (which common.lua's helpers use) at one job's keys."""
    owned = [k.upper() for k in JobKeys.names()[: JobKeys.OWNED]]
    sample = Keys("\x01").job("\x02")
    store = [k.upper() for k in STORE_KEY_NAMES]
    return [
        f"local {', '.join(owned)}",
        f"local {', '.join(store)} = " + ", ".join(f"KEYS[{i}]" for i in range(1, len(store) + 1)),
        "local function use_job(job)",
        "  JOB = job",
        *(
            f"  {name.upper()} = {_key_expression(getattr(sample, name))}"
            for name in JobKeys.names()[: JobKeys.OWNED]
        ),
        "end",
    ]


def prelude(name: str) -> str:
    """The generated Lua that declares KEYS, ARGV and shared constants for script ``name``."""
    spec = SPECS[name]
    key_names = [k.upper() for k in JobKeys.names()]
    argv = [*COMMON_ARGS, *spec.args]
    store_wide = name in STORE_SCRIPTS
    lines = [
        # Dragonfly refuses keys a script does not declare unless told (a comment elsewhere).
        *(["--!df flags=allow-undeclared-keys"] if store_wide else []),
        "-- Generated by coffea_hq.server.scripts from the Python definitions: edit those.",
        *(
            []
            if store_wide
            else [
                f"local {', '.join(key_names)} = "
                + ", ".join(f"KEYS[{i}]" for i in range(1, len(key_names) + 1))
            ]
        ),
        "local JOB, CHANNEL, TTL = ARGV[1], ARGV[2], tonumber(ARGV[3])",
        "local A = {"
        + ", ".join(f"{a} = ARGV[{i}]" for i, a in enumerate(argv, 1) if a not in COMMON_ARGS)
        + "}",
        *(_store_keys_prelude() if store_wide else []),
        # The job's own keys by name (a store-wide script's KEYS are others).
        "local function owned_keys() return {"
        + ", ".join(k.upper() for k in JobKeys.names()[: JobKeys.OWNED])
        + "} end",
        f"local REST = {len(argv) + 1}  -- first ARGV of the variadic tail ({spec.rest})",
        _enum_table("STATE", JobState),
        _enum_table("STATUS", CompleteStatus),
        _enum_table("F", Meta),
        _enum_table("EV", Event),
        _enum_table("COUNT", Counter),
        _lua_table("OUTCOME", ((code, o.value) for o, code in OUTCOME_CODES.items())),
        f"local MERGE_PREFIX = {_lua_string(protocol.MERGE_PREFIX)}",
        f"local MAX_FANIN = {protocol.MAX_FANIN}",
        f"local JOB_LOG_LINES = {protocol.JOB_LOG_LINES}",
        "local DURATION_BUCKETS = {"
        + ", ".join(repr(float(b)) for b in protocol.TASK_DURATION_BUCKETS)
        + "}",
        f"local WORKER_LOST = {_lua_string(protocol.WORKER_LOST_TYPE)}",
        f"local WORKER_GONE_REASON = {_lua_string(protocol.WORKER_GONE_REASON)}",
        f"local JOB_ENDED_MESSAGE = {_lua_string(JOB_ENDED_MESSAGE)}",
        f"local PASS_FLOOR = {_lua_string(PASS_FLOOR)}",
        f"local PRIORITY_MAX = {protocol.PRIORITY_MAX}",
    ]
    for reply in (CreateReply, SubmitReply, SealReply):
        lines.append(_enum_table(reply.__name__.upper(), reply))
    return "\n".join(lines) + "\n"


def source(name: str) -> str:
    """A script's whole source: the prelude, ``common.lua``, then ``<name>.lua``."""
    folder = resources.files(__package__).joinpath("lua")
    common = folder.joinpath("common.lua").read_text()
    return prelude(name) + common + "\n" + folder.joinpath(f"{name}.lua").read_text()


@dataclass(frozen=True)
class Call(Generic[T]):
    """One prepared script call: ``await call.run()`` alone, or ``fastredis.run_pipelined``
    in a pipeline."""

    script: AsyncScript
    keys: list[str]
    args: list[Any]
    parse: Callable[[Any], T]

    async def run(self) -> T:
        return self.parse(await self.script(keys=self.keys, args=self.args))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True, slots=True)
class LeasedRaw:
    """A task as ``lease.lua`` hands it out."""

    task: str
    attempt: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class LeaseReply:
    """One job's tasks of a lease."""

    job: str
    function_blob: str
    reducer_blob: str
    tasks: list[LeasedRaw]


def _parse_lease(reply: list[Any]) -> list[LeaseReply]:
    out: list[LeaseReply] = []
    i = 0
    while i < len(reply):
        n = int(reply[i + 3])
        start = i + 4
        tasks = [
            LeasedRaw(_text(reply[k]), int(reply[k + 1]), bytes(reply[k + 2] or b""))
            for k in range(start, start + 3 * n, 3)
        ]
        out.append(LeaseReply(_text(reply[i]), _text(reply[i + 1]), _text(reply[i + 2]), tasks))
        i = start + 3 * n
    return out


def _pairs(items: Iterable[tuple[str, int]]) -> list[Any]:
    out: list[Any] = []
    for task, attempt in items:
        out += [task, attempt]
    return out


def _sizes(parts: Sequence[bytes]) -> str:
    """Packed sizes of optional parts: '' when every part is empty (complete.lua skips them)."""
    return ",".join(str(len(p)) for p in parts) if any(parts) else ""


def _spent(spent: Sequence[tuple[float, float, int] | None]) -> str:
    """Packed (wall, CPU, RSS) per task for complete.lua, '-:-:-' where unknown ('' if all are)."""
    if all(s is None for s in spent):
        return ""
    return ",".join("-:-:-" if s is None else f"{s[0]:.6f}:{s[1]:.6f}:{s[2]}" for s in spent)


def _spent_sums(spent: Sequence[tuple[float, float, int] | None]) -> str:
    """The batch's duration histogram and totals for complete.lua, which uses them when
    every report counts (it sums the per-task figures itself otherwise): 'count:wall
    s:CPU s:peak RSS' then ':bucket=n' per histogram bucket (1-based, as Lua's), '' if no
    task's figures are known. Summed here: tonumber per task is most of the script's time."""
    known = [s for s in spent if s is not None]
    if not known:
        return ""
    walls = [s[0] for s in known]
    buckets = Tally(bisect_left(protocol.TASK_DURATION_BUCKETS, w) + 1 for w in walls)
    head = f"{len(known)}:{sum(walls)!r}:{sum(s[1] for s in known)!r}:{max(s[2] for s in known)}"
    return head + "".join(f":{b}={n}" for b, n in sorted(buckets.items()))


class Scripts:
    """The scripts registered on one connection pool, each behind a typed method."""

    def __init__(self, redis: Redis, channel: str, ttl: int) -> None:
        self._scripts = {name: redis.register_script(source(name)) for name in SPECS}
        self._channel = channel
        self._ttl = ttl

    def _call(
        self, name: str, keys: JobKeys, job: str, parse: Callable[[Any], T], **kwargs: Any
    ) -> Call[T]:
        spec = SPECS[name]
        rest = list(kwargs.pop(spec.rest, ())) if spec.rest else []
        if set(kwargs) != set(spec.args):
            raise TypeError(f"script {name} takes {spec.args}, got {sorted(kwargs)}")
        args = [job, self._channel, self._ttl, *(kwargs[a] for a in spec.args), *rest]
        return Call(self._scripts[name], keys.script_keys, args, parse)

    def create(
        self,
        keys: JobKeys,
        job: str,
        *,
        function_blob: str,
        max_attempts: int,
        fail_fast: bool,
        label: str,
        user: str,
        reducer_blob: str,
        fanin: int,
        share: str = "",
        priority: int = 0,
    ) -> Call[CreateReply]:
        return self._call(
            "create",
            keys,
            job,
            lambda r: CreateReply(_text(r)),
            function_blob=function_blob,
            max_attempts=max_attempts,
            fail_fast=int(fail_fast),
            label=label,
            user=user,
            reducer_blob=reducer_blob,
            fanin=fanin,
            share=share,
            priority=priority,
        )

    def submit(
        self,
        keys: JobKeys,
        job: str,
        *,
        tasks: Sequence[str],
        payloads: Sequence[bytes],
        localities: Sequence[str] = (),
        keep: Sequence[str] = (),
    ) -> Call[tuple[SubmitReply, int]]:
        return self._call(
            "submit",
            keys,
            job,
            lambda r: (SubmitReply(_text(r[0])), int(r[1])),
            tasks=",".join(tasks),
            sizes=",".join(str(len(p)) for p in payloads),
            payloads=b"".join(payloads),
            localities=",".join(localities),
            keep=",".join(keep),
        )

    def seal(self, keys: JobKeys, job: str, *, total: int) -> Call[tuple[SealReply, int]]:
        return self._call(
            "seal", keys, job, lambda r: (SealReply(_text(r[0])), int(r[1])), total=total
        )

    def lease(
        self,
        keys: Keys,
        *,
        worker: str,
        maximum: int,
        lease_ms: int,
        users: Sequence[str] = (),
        scan: int,
    ) -> Call[list[LeaseReply]]:
        """Lease up to ``maximum`` tasks among the ``scan`` oldest ready jobs, by fair
        share; ``users``: only their jobs (empty: any job)."""
        args = [
            "",
            self._channel,
            self._ttl,
            keys.prefix,
            worker,
            maximum,
            lease_ms,
            f",{','.join(users)}," if users else "",
            scan,
        ]
        return Call(self._scripts["lease"], keys.store_keys, args, _parse_lease)

    def complete(
        self,
        keys: JobKeys,
        job: str,
        *,
        worker: str,
        tasks: Sequence[str],
        attempts: Sequence[int],
        outcomes: Sequence[Outcome],
        values: Sequence[bytes],
        errors: Sequence[str],
        notes: Sequence[bytes],
        outputs: Sequence[bytes],
        spent: Sequence[tuple[float, float, int] | None] = (),
    ) -> Call[list[CompleteStatus]]:
        """``spent``: each task's (wall s, CPU s, peak RSS bytes), None where unknown: the
        duration histogram, the job's totals, and notes of jobs that keep resources."""
        # A constant number of script arguments whatever the batch size: packing thousands
        # of arguments one by one is most of redis-py's cost here.
        return self._call(
            "complete",
            keys,
            job,
            lambda r: [CompleteStatus(_text(s)) for s in r],
            worker=worker,
            tasks=",".join(tasks),
            attempts=",".join(map(str, attempts)),
            outcomes="".join(OUTCOME_CODES[o] for o in outcomes),
            sizes=",".join(str(len(v)) for v in values),
            values=b"".join(values),
            note_sizes=_sizes(notes),
            notes=b"".join(notes),
            output_sizes=_sizes(outputs),
            outputs=b"".join(outputs),
            spent=_spent(spent),
            spent_sums=_spent_sums(spent),
            errors=errors,
        )

    def heartbeat(
        self,
        keys: JobKeys,
        job: str,
        *,
        worker: str,
        lease_ms: int,
        leases: Iterable[tuple[str, int]],
    ) -> Call[list[tuple[str, int]]]:
        """Extend the worker's leases; returns the (task, attempt) leases it no longer holds."""
        return self._call(
            "heartbeat",
            keys,
            job,
            lambda r: [(_text(r[i]), int(r[i + 1])) for i in range(0, len(r), 2)],
            worker=worker,
            lease_ms=lease_ms,
            leases=_pairs(leases),
        )

    def release(
        self, keys: JobKeys, job: str, *, worker: str, leases: Iterable[tuple[str, int]]
    ) -> Call[int]:
        return self._call("release", keys, job, int, worker=worker, leases=_pairs(leases))

    def reap(
        self, keys: JobKeys, job: str, *, batch: int, unsealed_ms: int
    ) -> Call[tuple[int, int]]:
        return self._call(
            "reap",
            keys,
            job,
            lambda r: (int(r[0]), int(r[1])),
            batch=batch,
            unsealed_ms=unsealed_ms,
        )

    def cancel(self, keys: JobKeys, job: str, *, reason: str = "") -> Call[JobState | None]:
        return self._call(
            "cancel", keys, job, lambda r: JobState(_text(r)) if r else None, reason=reason
        )

    def ack(self, keys: JobKeys, job: str, *, cursor: str) -> Call[int]:
        return self._call("ack", keys, job, int, cursor=cursor)

    def worker_gone(
        self, keys: Keys, *, worker: str, session: str, lost: bool, users: Sequence[str] = ()
    ) -> Call[tuple[bool, int, int]]:
        """End ``worker``'s presence ``session`` (fenced); if ``lost``, requeue its leases
        (only of ``users``' jobs if given: what the presence's token may reach).
        Returns (whether the session was current, requeued, failed)."""
        args = [
            "",
            self._channel,
            self._ttl,
            keys.prefix,
            worker,
            session,
            "1" if lost else "0",
            f",{','.join(users)}," if users else "",
        ]
        return Call(
            self._scripts["worker_gone"],
            keys.store_keys,
            args,
            lambda r: (bool(int(r[0])), int(r[1]), int(r[2])),
        )
