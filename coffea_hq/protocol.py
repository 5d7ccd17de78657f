"""The wire protocol shared by the client, the server and the worker.

Everything that crosses the network is defined here, once: route paths, the
binary framing, the serialisation of Python objects, limits and
defaults. This module imports nothing else of ours.

Binary payloads travel as *frames*: a small JSON header followed by raw byte
parts, so pickled data is never base64-encoded inside JSON::

    u32 header length | header JSON (with "sizes": [len(part), ...]) | part 0 | part 1 | ...

(the length big-endian; docs/api.md describes the format for implementers).
"""

from __future__ import annotations

import enum
import functools
import hashlib
import io
import ipaddress
import pickle
import re
import struct
import types
from collections import ChainMap
from collections.abc import Sequence
from typing import Any, Final, TypeVar, overload

import cloudpickle
import lz4.frame
import msgspec
import zstandard

API: Final = "/api/v1"
FRAMES_CONTENT_TYPE: Final = "application/x-hq-frames"
BLOB_CONTENT_TYPE: Final = "application/octet-stream"

# Routes (aiohttp path syntax); the client formats them with str.format.
HEALTH: Final = "/health"
QUEUE: Final = API + "/queue"
BLOB: Final = API + "/blobs/{sha}"
JOBS: Final = API + "/jobs"
JOB: Final = API + "/jobs/{job}"
JOB_TASKS: Final = API + "/jobs/{job}/tasks"
JOB_SEAL: Final = API + "/jobs/{job}/seal"
JOB_CANCEL: Final = API + "/jobs/{job}/cancel"
JOB_RESULTS: Final = API + "/jobs/{job}/results"
# A kept result (a task submitted with SubmitTasks.keep): workers fetch it for the tasks
# whose payloads name it (see KEPT_INPUTS_MAGIC).
JOB_KEPT: Final = API + "/jobs/{job}/kept/{task}"
LEASE: Final = API + "/lease"
COMPLETE: Final = API + "/complete"
RELEASE: Final = API + "/release"
HEARTBEAT: Final = API + "/heartbeat"
WORKERS: Final = API + "/workers"
TELEMETRY: Final = API + "/telemetry"  # the heartbeats' rolling windows, per worker and job
EVENTS: Final = API + "/events"  # Server-Sent Events: a DashboardState each EVENTS_EVERY s
EVENTS_CONTENT_TYPE: Final = "text/event-stream"
EVENTS_EVERY: Final = 1.0
EVENTS_MAX: Final = 600  # events one stream sends at most (``count``); the page reconnects
EVENTS_FAILURES_MAX: Final = 5  # failed tasks (with their tracebacks) shown per job
SHARES: Final = API + "/shares"
OPENAPI: Final = API + "/openapi.json"  # this API's OpenAPI 3.1 document
# A worker holds one request open here for its whole life (its presence): when the
# connection drops without a goodbye, the server requeues the worker's tasks after
# PRESENCE_GRACE seconds rather than after the lease timeout.
PRESENCE: Final = API + "/presence"
PRESENCE_CONTENT_TYPE: Final = "application/x-ndjson"
WORKER_LOGS: Final = API + "/workers/{worker}/logs"
JOB_LOGS: Final = API + "/jobs/{job}/logs"
DASHBOARD: Final = "/"  # a static page reading the JSON routes (server/dashboard.html)
# Prometheus scrapes here (the conventional path, outside the versioned API).
METRICS: Final = "/metrics"
JOBS_LIST_MAX: Final = 200  # unfinished jobs GET JOBS lists (the newest)
METRICS_CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
# Upper bounds (s) of the task duration histogram's buckets (GET METRICS). The complete
# script counts into them in the store, so every replica reports the same histogram.
TASK_DURATION_BUCKETS: Final = (
    0.01,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
)

# Defaults, overridable by command-line flags.
DEFAULT_PORT: Final = 8786
DEFAULT_LEASE_TIMEOUT: Final = 30.0
DEFAULT_MAX_ATTEMPTS: Final = 3
DEFAULT_MAX_REQUEST_SIZE: Final = 256 * 1024 * 1024
DEFAULT_RESULT_TTL: Final = 24 * 3600
LEASE_MAX_TASKS: Final = 4096
DEFAULT_FANIN: Final = 20  # results per merge task, as coffea's treereduction
# A merge's inputs cross one Lua call at once (Lua's unpack() stops near 8,000): bounded.
MAX_FANIN: Final = 1024
PRIORITY_MAX: Final = 10**6  # a job's priority is within +-PRIORITY_MAX
SHARE_WEIGHT_MAX: Final = 10**6  # a fair-share weight is in (0, SHARE_WEIGHT_MAX]
MERGE_PREFIX: Final = "m"  # task ids the server gives merge tasks; clients use other ids
DEFAULT_UNSEALED_TIMEOUT: Final = 600.0  # an unsealed job with no submit this long is abandoned
WORKER_LOST_TYPE: Final = "coffea_hq.errors.WorkerLost"
# A task over its memory or wall-time limit (HQExecutor(memory=, walltime=) or hq-worker
# --task-memory/--task-walltime) fails with its own error type: it is not retried as is
# (it would exceed again); HQExecutor splits a chunk over its memory limit.
MEMORY_EXCEEDED_TYPE: Final = "coffea_hq.errors.MemoryExceeded"
WALLTIME_EXCEEDED_TYPE: Final = "coffea_hq.errors.WalltimeExceeded"
LONG_POLL_MAX: Final = 60.0
# Store connections one hq-server replica opens at most, and how long a request waits for
# one when all are busy before it fails (503, which clients retry). Parked leases hold
# none; results long polls hold one each. More buys nothing from a single-threaded store
# and, under hundreds of workers, starts a storm of connects that time out.
STORE_CONNECTIONS: Final = 256
STORE_CONNECTION_WAIT: Final = 20.0
# A task's error travels as text (type, message, traceback) beside its pickled exception.
# Workers cut each text field to ERROR_TEXT_MAX characters and drop a pickled exception
# over ERROR_PICKLE_MAX bytes, so one huge error never makes a whole report too large; the
# server refuses a report item whose text is longer (the others stand).
ERROR_TEXT_MAX: Final = 64 * 1024
ERROR_PICKLE_MAX: Final = 1024 * 1024
ENV_URL: Final = "HQ_URL"
ENV_TOKEN: Final = "HQ_TOKEN"  # an access token itself
ENV_TOKEN_FILE: Final = "HQ_TOKEN_FILE"  # a file holding one (a JupyterHub or k8s Secret)
TOKEN_PREFIX: Final = "hq_"  # every token coffea-hq makes starts with it
# Quota refusals (429) and a full store (507) tell the client when to try again.
RETRY_AFTER_QUOTA: Final = 2
RETRY_AFTER_STORE_FULL: Final = 5
PRESENCE_GRACE: Final = 1.5  # seconds a dropped presence may take to reconnect unpunished
PRESENCE_PING: Final = 5.0  # seconds between keep-alive lines, both ways
WORKER_GONE_REASON: Final = "its connection to the server dropped: worker killed or lost"
# TLS files of clients and workers (PEM): the CA that signed the server's certificate,
# and a client certificate and its key where the server requires one (mutual TLS).
ENV_TLS_CA: Final = "HQ_TLS_CA"
ENV_TLS_CERT: Final = "HQ_TLS_CERT"
ENV_TLS_KEY: Final = "HQ_TLS_KEY"
# hq-server's password for the store (kept off the command line).
ENV_STORE_PASSWORD: Final = "HQ_STORE_PASSWORD"

# What a task tells its session beside its result (messages.TaskInfo), bounded per task so
# that a task warning once per event cannot swell a report: at most TASK_WARNINGS_MAX
# distinct warnings and TASK_LOGS_MAX log records (WARNING and above, TASK_LOG_LEVEL), each
# text cut to TASK_NOTE_TEXT_MAX characters, and the last TASK_OUTPUT_MAX characters of
# what it printed (stdout and stderr, C libraries included).
TASK_WARNINGS_MAX: Final = 32
TASK_LOGS_MAX: Final = 32
TASK_LOG_LEVEL: Final = 30  # logging.WARNING (this module does not import logging)
TASK_NOTE_TEXT_MAX: Final = 4096
TASK_OUTPUT_MAX: Final = 16 * 1024
# Ring buffers on the server (Redis lists cut with LTRIM): the last lines of a job's task
# output and of each worker's (its tasks' output and its own log lines).
JOB_LOG_LINES: Final = 2000
WORKER_LOG_LINES: Final = 2000
WORKER_LOG_TTL: Final = 24 * 3600  # seconds a silent worker's log lines are kept
HEARTBEAT_LOG_LINES: Final = 200  # worker log lines one heartbeat carries
TELEMETRY_SAMPLES: Final = 120  # heartbeat samples kept per worker and per job (a window)
TELEMETRY_TTL: Final = 3600  # seconds a window outlives its last sample
# Environment variables forwarded to a job's tasks (HQExecutor(env=...)): bounded.
ENV_MAX_VARS: Final = 256
ENV_MAX_BYTES: Final = 64 * 1024

# Per-task software environments (issue 14). A job with an environment or files has as its
# function blob a small "bound function" document (messages.BoundFunction) after this
# prefix; it names the real function blob, the environment spec blob and the file blobs.
BOUND_FUNCTION_MAGIC: Final = b"coffea-hq bound function 1\n"
# A task whose inputs include kept results of other tasks of its job has as its payload
# this prefix, a u32 length, the JSON messages.KeptInputs naming them, then its own
# payload. The worker fetches the named results (JOB_KEPT) and runs the task with the
# arguments (own payload, {task: kept result}), both as bytes: see with_kept_inputs().
KEPT_INPUTS_MAGIC: Final = b"coffea-hq kept inputs 1\n"
FILES_MAX: Final = 256  # files one job ships to its tasks' working directory
# Worker-side settings for offline facilities: a wheel directory every pip environment may
# install from, and "1" to never reach an index (uv --find-links / --no-index).
ENV_PIP_FIND_LINKS: Final = "HQ_PIP_FIND_LINKS"
ENV_PIP_NO_INDEX: Final = "HQ_PIP_NO_INDEX"
ENV_STEP_TIMEOUT: Final = 1800.0  # seconds one materialisation step may take (never a hang)
# Distributions whose versions the session and the environment must agree on.
VERSION_CHECKED: Final = ("python", "cloudpickle", "coffea", "awkward", "uproot", "numpy")

# Identifiers chosen by clients and workers end up inside Redis key names.
ID_MAX_LENGTH: Final = 64


class JobState(enum.StrEnum):
    """Where a job is in its life."""

    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self is not JobState.RUNNING


class Role(enum.StrEnum):
    """What an access token may do (``coffea-hq token create --role``)."""

    USER = "user"  # create jobs, and see, cancel, delete, read the results of its own
    WORKER = "worker"  # lease, heartbeat, complete, release, fetch blobs
    ADMIN = "admin"  # everything: every user's jobs, the workers list, queue statistics


class Outcome(enum.StrEnum):
    """How a worker reports one task."""

    OK = "ok"  # the function returned; the part holds its pickled value
    ERROR = "error"  # the function raised; the header carries the error, the part the exception
    CRASHED = "crashed"  # the subprocess died (segfault, os._exit, OOM kill); retried


class ResultOutcome(enum.StrEnum):
    """How a result reaches the client (``GET JOB_RESULTS`` items)."""

    OK = "ok"  # the part holds the pickled value
    ERROR = "error"  # the part holds the pickled exception (may be empty); see ``errors``
    MERGED = "merged"  # merged into a merge task on a worker: no part


class CompleteStatus(enum.StrEnum):
    """The server's verdict on one reported task."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"  # the same worker and attempt reported it already: harmless retry
    REQUEUED = "requeued"  # a crash below the attempt limit: back in the queue
    NOT_LEASED = "not_leased"  # the lease expired, moved on, or never was this worker's
    UNKNOWN = "unknown"  # no such job or task
    JOB_FINISHED = "job_finished"  # the job was cancelled or failed meanwhile
    INVALID = "invalid"  # the item itself is malformed: refused, the batch's others stand

    @property
    def refused(self) -> bool:
        """The server kept nothing of this item."""
        return self in (CompleteStatus.NOT_LEASED, CompleteStatus.UNKNOWN, CompleteStatus.INVALID)


class Counter(enum.StrEnum):
    """The server's own task accounting, kept in the store (``GET QUEUE`` ``counters``)."""

    TASKS_OK = "tasks_ok"  # client tasks whose result was accepted
    TASKS_FAILED = "tasks_failed"  # client tasks failed for good (raised, or lost every attempt)
    MERGES_OK = "merges_ok"  # merge tasks whose result was accepted
    MERGES_FAILED = "merges_failed"
    REQUEUED = "requeued"  # attempts that crashed or expired and went back to the queue
    RELEASED = "released"  # leases handed back unstarted (draining workers, lost replies)
    DUPLICATES = "duplicates"  # reports of an already-accepted attempt (harmless retries)
    REFUSED = "refused"  # reports of leases not held (expired, moved on, never this worker's)
    KEPT = "kept"  # results kept in the store for other tasks (never sent to the client)
    KEPT_BYTES = "kept_bytes"  # ... their sizes added up
    KEPT_FETCHED = "kept_fetched"  # kept results fetched by workers


_ID_MATCH: Final = re.compile(rf"[A-Za-z0-9_.\-]{{1,{ID_MAX_LENGTH}}}\Z", re.ASCII).match


def package_version() -> str:
    """The installed coffea-hq distribution's version (what every command's --version says)."""
    import importlib.metadata  # here: slow to import, and a slot subprocess never asks

    try:
        return importlib.metadata.version("coffea-hq")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "unknown"


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine (where a server may run without tokens)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def valid_id(value: object) -> bool:
    """Whether ``value`` may be used as a job, task or worker identifier."""
    return isinstance(value, str) and _ID_MATCH(value) is not None


def is_merge(task: str) -> bool:
    """Whether ``task`` is a merge task the server made (``MERGE_PREFIX`` + sha1 of its inputs)."""
    return task.startswith(MERGE_PREFIX)


# --------------------------------------------------------------------------- serialisation

_RAW: Final = b"\x00"
_LZ4: Final = b"\x01"
_ZSTD: Final = b"\x02"
_COMPRESS_MIN: Final = 1024  # small payloads cost more to compress than they save


class Codec(enum.StrEnum):
    """Compression applied to pickled payloads (the first byte of a payload names it)."""

    NONE = "none"
    LZ4 = "lz4"
    ZSTD = "zstd"


_zstd_c = zstandard.ZstdCompressor(level=3)
_zstd_d = zstandard.ZstdDecompressor()


_DYNAMIC_CODE: Final = "<dynamic-code>"
_cloudpickle_code_reduce: Final = cloudpickle.Pickler.dispatch_table[types.CodeType]


@functools.lru_cache(maxsize=4096)
def _filename_setter(filename: str) -> functools.partial[types.CodeType]:
    # One object per file name, so a pickle holding many functions of one file carries
    # the setter once (pickle's memo).
    return functools.partial(types.CodeType.replace, co_filename=filename)


def _reduce_code(code: types.CodeType) -> tuple[Any, ...]:
    if code.co_filename == _DYNAMIC_CODE:
        return _cloudpickle_code_reduce(code)
    # cloudpickle (3.1.3 on) ships every code object as "<dynamic-code>", which leaves
    # remote tracebacks without file names. Ship a renamed copy (a different object, so
    # pickle's memo does not see the code inside its own reduction) and the call that
    # puts the true name back: functools, the code type and cloudpickle's own reduction
    # are all the loading side needs.
    return _filename_setter(code.co_filename), (code.replace(co_filename=_DYNAMIC_CODE),)


class CodePickler(cloudpickle.Pickler):
    """cloudpickle, but code pickled by value keeps its file name."""

    dispatch_table = ChainMap({types.CodeType: _reduce_code}, cloudpickle.Pickler.dispatch_table)


def cloud_dumps(obj: Any) -> bytes:
    """Pickle ``obj`` with :class:`CodePickler` (functions and code pickled by value)."""
    buffer = io.BytesIO()
    CodePickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


def dumps(obj: Any, codec: Codec = Codec.LZ4) -> bytes:
    """Pickle ``obj`` (plain pickle, cloudpickle for what it cannot) and compress it."""
    try:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, AttributeError, TypeError):
        data = cloud_dumps(obj)
    return compress(data, codec)


def loads(data: bytes | memoryview) -> Any:
    """Inverse of :func:`dumps`."""
    return pickle.loads(decompress(data))


def compress(data: bytes, codec: Codec = Codec.LZ4) -> bytes:
    if codec is Codec.NONE or len(data) < _COMPRESS_MIN:
        return _RAW + data
    if codec is Codec.ZSTD:
        return _ZSTD + _zstd_c.compress(data)
    return _LZ4 + lz4.frame.compress(data)


def decompress(data: bytes | memoryview) -> bytes:
    view = memoryview(data)
    tag, body = bytes(view[:1]), view[1:]
    if tag == _RAW:
        return bytes(body)
    if tag == _LZ4:
        return lz4.frame.decompress(body)
    if tag == _ZSTD:
        return _zstd_d.decompress(body)
    raise ValueError(f"unknown payload codec byte {tag!r}: not a coffea-hq payload")


def blob_name(data: bytes) -> str:
    """The content address of a blob: the hex sha256 of its bytes."""
    return hashlib.sha256(data).hexdigest()


def valid_blob_name(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


# --------------------------------------------------------------------------- framing

_LEN: Final = struct.Struct("!I")


H = TypeVar("H")


class FrameError(ValueError):
    """A request or response body is not well-formed frames."""


def pack(header: dict[str, Any] | msgspec.Struct, parts: Sequence[bytes] = ()) -> bytes:
    """Frame a JSON header (a dict or a message of :mod:`coffea_hq.messages`) and raw byte
    parts into one body."""
    sizes = [len(p) for p in parts]
    if isinstance(header, msgspec.Struct):  # every frame header message has 'sizes'
        encoded = msgspec.json.encode(msgspec.structs.replace(header, sizes=sizes))
    else:
        encoded = msgspec.json.encode({**header, "sizes": sizes})
    return b"".join([_LEN.pack(len(encoded)), encoded, *parts])


@overload
def unpack(body: bytes) -> tuple[dict[str, Any], list[memoryview]]: ...
@overload
def unpack(body: bytes, kind: type[H]) -> tuple[H, list[memoryview]]: ...
def unpack(body: bytes, kind: Any = None) -> tuple[Any, list[memoryview]]:
    """Split a body made by :func:`pack`; raises :class:`FrameError` on malformed input.

    With ``kind`` (a frame header message of :mod:`coffea_hq.messages`) the header is
    decoded as one, in the same pass (a header that is not one raises
    :class:`msgspec.ValidationError`, naming the field)."""
    if len(body) < _LEN.size:
        raise FrameError("body too short to hold a frame header")
    (head_len,) = _LEN.unpack_from(body)
    end = _LEN.size + head_len
    if end > len(body):
        raise FrameError("frame header length exceeds the body")
    raw = body[_LEN.size : end]
    try:
        header = msgspec.json.decode(raw) if kind is None else msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as e:  # a 400 naming the field, like a JSON body's
        raise msgspec.ValidationError(f"frame header: {e}") from None
    except msgspec.DecodeError as e:
        raise FrameError(f"frame header is not JSON: {e}") from e
    except RecursionError as e:
        raise FrameError("frame header is JSON nested too deeply") from e
    if kind is None:
        if not isinstance(header, dict):
            raise FrameError("frame header must be a JSON object")
        sizes = header.get("sizes")
    else:
        sizes = header.sizes
    if not isinstance(sizes, list) or not all(isinstance(s, int) and s >= 0 for s in sizes):
        raise FrameError("frame header needs 'sizes': a list of part lengths")
    if end + sum(sizes) != len(body):
        raise FrameError("part sizes do not add up to the body length")
    view = memoryview(body)
    parts = []
    for size in sizes:
        parts.append(view[end : end + size])
        end += size
    return header, parts


# --------------------------------------------------------------------------- message shapes
#
# Every request and response body is a msgspec.Struct in coffea_hq.messages; the routes
# that carry them are listed once in coffea_hq.routes (which the server registers its
# handlers from and the OpenAPI document is generated from: see docs/api.md).


_PART_LEN: Final = struct.Struct(">I")


def split_merge_payload(data: bytes | memoryview) -> list[memoryview]:
    """A merge task's payload: its inputs' results, each prefixed by a u32 length."""
    view = memoryview(data)
    parts, at = [], 0
    while at < len(view):
        (size,) = _PART_LEN.unpack_from(view, at)
        at += _PART_LEN.size
        parts.append(view[at : at + size])
        at += size
    return parts


def kept_inputs_payload(refs: bytes, payload: bytes) -> bytes:
    """A task payload that names kept results (``refs``: JSON messages.KeptInputs)."""
    return KEPT_INPUTS_MAGIC + _PART_LEN.pack(len(refs)) + refs + payload


def split_kept_inputs(payload: bytes) -> tuple[bytes, bytes] | None:
    """(JSON messages.KeptInputs, own payload) of a payload that names kept results, else
    None. Raises ValueError on a truncated one."""
    if not payload.startswith(KEPT_INPUTS_MAGIC):
        return None
    at = len(KEPT_INPUTS_MAGIC)
    if len(payload) < at + _PART_LEN.size:
        raise ValueError("a kept-inputs payload is truncated")
    (size,) = _PART_LEN.unpack_from(payload, at)
    at += _PART_LEN.size
    if len(payload) < at + size:
        raise ValueError("a kept-inputs payload is truncated")
    return payload[at : at + size], payload[at + size :]


def with_kept_inputs(payload: bytes, results: dict[str, bytes]) -> bytes:
    """What the worker hands the slot for such a task: its own payload and the fetched
    results, as bytes (nothing of the user's is unpickled in the worker)."""
    return dumps((payload, results), Codec.NONE)


_CUT_NOTE_ROOM: Final = 48  # the longest "[... N characters cut ...]" note, and its newlines


def cut_text(text: str, limit: int = ERROR_TEXT_MAX) -> str:
    """``text`` if it fits in ``limit`` characters, else its head and tail around a note
    saying how much was cut (both ends matter: the outer frames and the exception line)."""
    if len(text) <= limit:
        return text
    keep = max(limit - _CUT_NOTE_ROOM, 0)
    head, tail = text[: keep // 2], text[len(text) - (keep - keep // 2) :]
    return f"{head}\n[... {len(text) - len(head) - len(tail):,} characters cut ...]\n{tail}"


def cut_error(error: dict[str, Any]) -> dict[str, Any]:
    """An error description with every text field cut to :data:`ERROR_TEXT_MAX`."""
    return {k: cut_text(v) if isinstance(v, str) else v for k, v in error.items()}


def error_info(exc: BaseException, traceback_text: str) -> dict[str, str]:
    """The JSON description of a task's exception that travels beside the pickled exception."""
    return {
        "type": cut_text(f"{type(exc).__module__}.{type(exc).__qualname__}"),
        "message": cut_text(_message(exc)),
        "traceback": cut_text(traceback_text),
    }


def _message(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception as e:  # an exception whose __str__ raises still fails its task cleanly
        return f"<exception str() failed: {type(e).__name__}: {e!r}>"
