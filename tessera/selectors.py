"""Selectors: "type:key:value" strings that workload attestation produces.

Only the kernel-derived unix selectors exist; nothing a caller sends is a selector.
Invariant: a canonical selector is one the sidecar can derive from the kernel (ASCII digits within
the 32-bit id range, no control characters in a path); others are refused rather than stored as
entries that could never match. Patterns use fullmatch, since `$` would let a trailing newline through.
"""

from __future__ import annotations

import re
from typing import Iterable

from tessera.errors import InvalidArgument

UID_MAX = 2**32 - 2  # uid_t and gid_t are 32 bits; (uid_t)-1 means "no id" and never names a process
_VALIDATORS = {
    "uid": re.compile(r"[0-9]{1,10}"),  # \d would take full-width and other Unicode digits
    "gid": re.compile(r"[0-9]{1,10}"),
    "user": re.compile(r"[A-Za-z0-9._][A-Za-z0-9._-]*\$?"),
    "group": re.compile(r"[A-Za-z0-9._][A-Za-z0-9._-]*\$?"),
    "path": re.compile(r"/[^\x00-\x1f\x7f]{0,4095}"),  # PATH_MAX; no NUL, newline or other control
    "sha256": re.compile(r"[0-9a-f]{64}"),
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
    if not _VALIDATORS[key].fullmatch(val) or (key in ("uid", "gid") and int(val) > UID_MAX):
        raise InvalidArgument(f"invalid selector {value[:200]!r}: bad value for unix:{key}")
    if key in ("uid", "gid"):
        val = str(int(val))  # the kernel's form: "01000" would never match "1000"
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
