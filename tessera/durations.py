"""Durations as people write them in config and flags: 30s, 10m, 24h, 30d."""

from __future__ import annotations

import re

from tessera.errors import InvalidArgument

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_RE = re.compile(r"^\s*(\d+)\s*([smhd])\s*$")


def parse_duration(value: str | int) -> int:
    """Seconds in `value`; a bare integer means seconds. Raises InvalidArgument."""
    if isinstance(value, bool):
        raise InvalidArgument(f"invalid duration {value!r}: use a number with s, m, h or d")
    if isinstance(value, int):
        if value <= 0:
            raise InvalidArgument(f"invalid duration {value!r}: must be positive")
        return value
    m = _RE.match(str(value))
    if not m:
        raise InvalidArgument(f"invalid duration {value!r}: use a number with s, m, h or d (e.g. 30s, 10m, 24h, 30d)")
    seconds = int(m.group(1)) * _UNITS[m.group(2)]
    if seconds <= 0:
        raise InvalidArgument(f"invalid duration {value!r}: must be positive")
    return seconds


def format_duration(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
