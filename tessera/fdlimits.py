"""File descriptors: a daemon takes all it is allowed, and the issuer splits them between its listeners.

Invariant: the listeners' connection caps plus `RESERVED` never exceed the descriptor limit, so a flood
of connections to any listener is refused by that listener's cap before the process runs out of
descriptors; the database, the audit file, the signing workers and the admin socket always have theirs.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

from tessera.errors import ConfigError

# Descriptors kept out of every TCP listener's reach: the issuer's own files and pipes (about 35 measured:
# database, WAL, lock, audit file, signing-worker pipes, event loops, metrics) and ADMIN_MAX_CONNECTIONS.
RESERVED = 96
# The operator CLI opens one connection per command; one admin uid may hold a quarter of them.
ADMIN_MAX_CONNECTIONS = 32
ADMIN_MAX_CONNECTIONS_PER_UID = ADMIN_MAX_CONNECTIONS // 4
# Joins are rare; past this a flood of the bootstrap port only waits for its handshake timeout.
BOOTSTRAP_MAX_CONNECTIONS = 1024
# Connected sidecars each hold one connection; a pending handshake costs memory in grpc-core, so even a
# huge descriptor limit does not mean an unbounded number of them.
SIDECAR_MAX_CONNECTIONS = 50_000
MIN_USABLE = 64


def raise_nofile_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open") as f:  # the most a process may have when "unlimited"
                hard_value = int(f.read())
        except (OSError, ValueError):
            hard_value = max(soft, 65536) if soft != resource.RLIM_INFINITY else 65536
    else:
        hard_value = hard
    if soft == resource.RLIM_INFINITY or soft >= hard_value:
        return hard_value
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard_value, hard))
    return hard_value


@dataclass(frozen=True)
class ConnectionCaps:
    sidecar: int  # the mTLS listen_address
    bootstrap: int
    admin: int
    admin_per_uid: int


def connection_caps(nofile: int) -> ConnectionCaps:
    """The caps for a descriptor limit: usable = nofile - RESERVED;
    bootstrap = min(1024, max(8, usable // 8)); sidecar = min(50000, usable - bootstrap)."""
    usable = nofile - RESERVED
    if usable < MIN_USABLE:
        raise ConfigError(f"the open-files limit (RLIMIT_NOFILE) is {nofile}: the issuer needs at least "
                          f"{RESERVED + MIN_USABLE} (raise the hard limit, e.g. LimitNOFILE= in its unit)")
    bootstrap = min(BOOTSTRAP_MAX_CONNECTIONS, max(8, usable // 8))
    return ConnectionCaps(sidecar=min(SIDECAR_MAX_CONNECTIONS, usable - bootstrap), bootstrap=bootstrap,
                          admin=ADMIN_MAX_CONNECTIONS, admin_per_uid=ADMIN_MAX_CONNECTIONS_PER_UID)
