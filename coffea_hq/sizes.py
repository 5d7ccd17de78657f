"""Memory sizes as people write them: ``"2GiB"``, ``"500MB"``, ``"1.5G"``, or bytes."""

from __future__ import annotations

import re

__all__ = ["format_size", "parse_memory"]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_memory(value: int | float | str | None) -> int | None:
    """Bytes in ``value`` (``None`` stays ``None``: no limit).

    >>> parse_memory("2GiB"), parse_memory("500MB"), parse_memory(1024)
    (2147483648, 500000000, 1024)
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"a memory size must be bytes or a text like '2GiB', got {value!r}")
    if isinstance(value, int | float):
        size = int(value)
    else:
        match = _SIZE.match(value)
        unit = match.group(2).lower() if match else ""
        if match is None or unit not in _UNITS:
            raise ValueError(
                f"cannot read {value!r} as a memory size: write bytes or a number with a unit "
                "such as '2GiB', '1500MiB', '2GB' or '2G'"
            )
        size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"a memory size must be positive, got {value!r}")
    return size


def format_size(size: int) -> str:
    """``size`` bytes for people: ``"2.0 GiB"``."""
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor:
            return f"{size / factor:.1f} {unit}"
    return f"{size} B"
