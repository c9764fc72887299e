"""The one SPIFFE ID parser (rules from the SPIFFE ID standard).

Invariant: an accepted ID holds only the standard's characters and prints back exactly as given;
anything else raises InvalidSpiffeId (an InvalidArgument). Patterns use fullmatch, since `$` would
let a trailing newline through.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tessera.errors import InvalidArgument

_TD = re.compile(r"[a-z0-9._-]{1,255}")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_MAX_LEN = 2048
_SCHEME = "spiffe://"


class InvalidSpiffeId(InvalidArgument):
    pass


@dataclass(frozen=True, order=True)
class SpiffeId:
    trust_domain: str
    path: str  # "" or "/seg/seg"

    def __str__(self) -> str:
        return f"{_SCHEME}{self.trust_domain}{self.path}"

    def member_of(self, trust_domain: str) -> bool:
        return self.trust_domain == trust_domain


def validate_trust_domain(td: str) -> str:
    if not _TD.fullmatch(td or ""):
        raise InvalidSpiffeId(
            f"invalid trust domain {td!r}: use 1-255 lowercase letters, digits, '.', '-' or '_'"
        )
    return td


def parse(value: str, *, require_path: bool = False) -> SpiffeId:
    if not isinstance(value, str) or not value:
        raise InvalidSpiffeId("invalid SPIFFE ID: empty")
    if len(value.encode("utf-8", "surrogatepass")) > _MAX_LEN:  # argv may hold lone surrogates
        raise InvalidSpiffeId(f"invalid SPIFFE ID: longer than {_MAX_LEN} bytes")
    if not value.startswith(_SCHEME):
        raise InvalidSpiffeId(f"invalid SPIFFE ID {value!r}: must start with spiffe://")
    rest = value[len(_SCHEME):]
    td, slash, path = rest.partition("/")
    if any(c in td for c in "@:?#"):
        raise InvalidSpiffeId(f"invalid SPIFFE ID {value!r}: no userinfo, port, query or fragment allowed")
    try:
        validate_trust_domain(td)
    except InvalidSpiffeId as e:
        raise InvalidSpiffeId(f"invalid SPIFFE ID {value!r}: {e.message}") from None
    path = slash + path
    if path:
        if path.endswith("/"):
            raise InvalidSpiffeId(f"invalid SPIFFE ID {value!r}: trailing '/' not allowed")
        for seg in path[1:].split("/"):
            if seg == "":
                raise InvalidSpiffeId(f"invalid SPIFFE ID {value!r}: empty path segment")
            if seg in (".", ".."):
                raise InvalidSpiffeId(f"invalid SPIFFE ID {value!r}: '.' and '..' segments not allowed")
            if not _SEGMENT.fullmatch(seg):
                raise InvalidSpiffeId(
                    f"invalid SPIFFE ID {value!r}: path segment {seg!r} may hold only letters, digits, '.', '-', '_'"
                )
    elif require_path:
        raise InvalidSpiffeId(f"invalid SPIFFE ID {value!r}: a workload ID needs a path")
    return SpiffeId(td, path)


MAX_SIDECAR_NAME = 253  # a fully qualified host name fits


def sidecar_id(trust_domain: str, name: str) -> SpiffeId:
    """The SPIFFE ID a sidecar named `name` holds."""
    if len(name or "") > MAX_SIDECAR_NAME:
        raise InvalidArgument(f"invalid sidecar name {name[:40]!r}...: longer than {MAX_SIDECAR_NAME} characters")
    if not _SEGMENT.fullmatch(name or "") or name in (".", ".."):
        raise InvalidArgument(
            f"invalid sidecar name {name!r}: use letters, digits, '.', '-' or '_'"
        )
    return SpiffeId(trust_domain, f"/tessera/sidecar/{name}")


SIDECAR_PREFIX = "/tessera/sidecar/"


def sidecar_name(sid: SpiffeId) -> str | None:
    if sid.path.startswith(SIDECAR_PREFIX) and "/" not in sid.path[len(SIDECAR_PREFIX):]:
        return sid.path[len(SIDECAR_PREFIX):]
    return None
