"""Checks on the parts of a request that are not its body: path and query parameters,
with the limits the route table (:mod:`coffea_hq.routes`) publishes. Bodies are decoded
and checked by their message types (:mod:`coffea_hq.messages`). Each failure is a 400
naming the parameter."""

from __future__ import annotations

import re
from typing import Any

from coffea_hq import protocol

from .store import StoreError


class BadRequest(StoreError):
    status = 400
    code = "bad_request"


class Forbidden(StoreError):
    status = 403
    code = "forbidden"


def ident(value: Any, what: str) -> str:
    if not protocol.valid_id(value):
        raise BadRequest(
            f"{what} must be 1-{protocol.ID_MAX_LENGTH} characters: letters, digits, '-', '_', '.'"
        )
    return str(value)


def query_number(query: Any, name: str, default: float, low: float, high: float) -> float:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError as e:
        raise BadRequest(f"query parameter {name!r} must be a number") from e
    if not low <= value <= high:
        raise BadRequest(f"query parameter {name!r} must be a number from {low} to {high}")
    return value


_CURSOR = re.compile(r"(\d{1,20})(?:-(\d{1,20}))?\Z", re.ASCII)
_U64 = 2**64 - 1


def cursor(value: str | None, what: str) -> str | None:
    """A Redis stream id ``<ms>-<seq>`` (or ``0``): ASCII digits, each part a u64."""
    if value is None:
        return None
    match = _CURSOR.match(value)
    if match is None or any(int(p) > _U64 for p in match.groups() if p is not None):
        raise BadRequest(f"{what} must be a result cursor from an earlier response")
    return value
