"""Durations as people write them in config and flags: 30s, 10m, 24h, 30d.

Invariant: every duration Tessera accepts is a positive whole number of seconds no larger
than MAX_DURATION (ten years), or a smaller cap the caller names, so anything derived from it
(a certificate's notAfter, a database integer, a protobuf int64) stays in range. Digits and
spaces are ASCII only: "１０m" (full-width) is refused, not read as 10m.
"""

from __future__ import annotations

import re

from tessera.errors import InvalidArgument

DAY = 86400
MAX_DURATION = 3650 * DAY  # ten years: the longest anything in Tessera may live (an entry, a CA)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": DAY}
# At most 40 digits (and 64 characters): int() never sees a long string; the bound check does the rest.
_RE = re.compile(r"[ \t]*([0-9]{1,40})[ \t]*([smhd])[ \t]*", re.ASCII)


def parse_duration(value: str | int, maximum: int = MAX_DURATION) -> int:
    """Seconds in `value` (a bare integer means seconds), at most `maximum`. Raises InvalidArgument."""
    if isinstance(value, bool):
        raise InvalidArgument(f"invalid duration {value!r}: use a number with s, m, h or d")
    if isinstance(value, int):
        seconds = value
    else:
        m = _RE.fullmatch(str(value)) if len(str(value)) <= 64 else None
        if not m:
            raise InvalidArgument(f"invalid duration {_shown(value)!r}: use a number with s, m, h or d "
                                  "(e.g. 30s, 10m, 24h, 30d)")
        seconds = int(m.group(1)) * _UNITS[m.group(2)]
    if seconds <= 0:
        raise InvalidArgument(f"invalid duration {_shown(value)!r}: must be positive")
    if seconds > maximum:
        raise InvalidArgument(f"duration {_shown(value)!r} is too long: at most {format_duration(maximum)}")
    return seconds


def _shown(value) -> str:
    text = str(value)
    return text if len(text) <= 64 else text[:61] + "..."


def check_seconds(name: str, seconds: int, minimum: int, maximum: int) -> int:
    """A duration given as a number of seconds (an API field): InvalidArgument naming `name` unless in range."""
    if isinstance(seconds, bool) or not isinstance(seconds, int) or not minimum <= seconds <= maximum:
        raise InvalidArgument(f"{name} must be between {format_duration(minimum)} and {format_duration(maximum)}, "
                              f"got {seconds!r}")
    return seconds


def format_duration(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
