"""Checks on request fields: each failure is a 400 with a sentence naming the field."""

from __future__ import annotations

from typing import Any

from coffea_hq import protocol

from .store import StoreError


class BadRequest(StoreError):
    status = 400
    code = "bad_request"


def obj(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object")
    return value


def ident(value: Any, what: str) -> str:
    if not protocol.valid_id(value):
        raise BadRequest(
            f"{what} must be 1-{protocol.ID_MAX_LENGTH} characters: letters, digits, '-', '_', '.'"
        )
    return str(value)


def integer(value: Any, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(f"{what} must be an integer from {low} to {high}")
    return value


def number(value: Any, what: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise BadRequest(f"{what} must be a number from {low} to {high}")
    return float(value)


def string(value: Any, what: str, max_length: int = 256) -> str:
    if not isinstance(value, str) or len(value) > max_length:
        raise BadRequest(f"{what} must be a string of at most {max_length} characters")
    return value


def boolean(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"{what} must be true or false")
    return value


def array(value: Any, what: str, max_length: int) -> list[Any]:
    if not isinstance(value, list) or len(value) > max_length:
        raise BadRequest(f"{what} must be a list of at most {max_length} entries")
    return value


def lease_ref(value: Any, what: str) -> tuple[str, str, int]:
    """A ``[job, task, attempt]`` triple."""
    if not isinstance(value, list) or len(value) != 3:
        raise BadRequest(f"{what} must be [job, task, attempt]")
    return (
        ident(value[0], f"{what} job"),
        ident(value[1], f"{what} task"),
        integer(value[2], f"{what} attempt", 1, 1_000_000),
    )


def query_number(query: Any, name: str, default: float, low: float, high: float) -> float:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        return number(float(raw), f"query parameter {name!r}", low, high)
    except ValueError as e:
        raise BadRequest(f"query parameter {name!r} must be a number") from e


def cursor(value: str | None, what: str) -> str | None:
    """A Redis stream id ``<ms>-<seq>`` (or ``0``)."""
    if value is None:
        return None
    ms, _, seq = value.partition("-")
    if not ms.isdigit() or (seq and not seq.isdigit()) or len(value) > 41:
        raise BadRequest(f"{what} must be a result cursor from an earlier response")
    return value
