"""Selectors: "type:key:value" strings that workload attestation produces.

Only the kernel-derived unix selectors exist; nothing a caller sends is a selector.
"""

from __future__ import annotations

import re
from typing import Iterable

from tessera.errors import InvalidArgument

UID_MAX = 2**32 - 2  # uid_t and gid_t are 32 bits; (uid_t)-1 means "no id" and never names a process
_VALIDATORS = {
    "uid": re.compile(r"^(0|[1-9][0-9]{0,9})\Z", re.ASCII),
    "gid": re.compile(r"^(0|[1-9][0-9]{0,9})\Z", re.ASCII),
    "user": re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._-]*\$?$"),
    "group": re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._-]*\$?$"),
    "path": re.compile(r"^/.*$"),
    "sha256": re.compile(r"^[0-9a-f]{64}$"),
}
SELECTOR_TYPES = tuple(f"unix:{k}" for k in _VALIDATORS)


def parse_selector(value: str) -> str:
    """Validate and return the canonical form of one selector."""
    parts = (value or "").split(":", 2)
    if len(parts) != 3 or not all(parts):
        raise InvalidArgument(f"invalid selector {value!r}: use TYPE:KEY:VALUE, e.g. unix:uid:1000")
    typ, key, val = parts
    if typ != "unix" or key not in _VALIDATORS:
        raise InvalidArgument(
            f"unknown selector type {typ}:{key!r} in {value!r}: known types are {', '.join(SELECTOR_TYPES)}"
        )
    if key == "sha256":
        val = val.lower()
    if not _VALIDATORS[key].match(val) or (key in ("uid", "gid") and int(val) > UID_MAX):
        raise InvalidArgument(f"invalid selector {value[:200]!r}: bad value for unix:{key}")
    return f"unix:{key}:{val}"


def parse_selectors(values: Iterable[str]) -> tuple[str, ...]:
    out = sorted({parse_selector(v) for v in values})
    if not out:
        raise InvalidArgument("an entry needs at least one selector")
    return tuple(out)


def matches(entry_selectors: Iterable[str], workload_selectors: frozenset[str]) -> bool:
    """An entry matches when all of its selectors are among the workload's."""
    sels = tuple(entry_selectors)
    return bool(sels) and all(s in workload_selectors for s in sels)
