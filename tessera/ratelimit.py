"""Per-key token buckets, for requests a peer can repeat at will (refused join attempts).

Invariant: memory is bounded by `max_keys`; when the table is full the least recently seen key is
forgotten and starts again with a full bucket. Only keys that spent a token are kept, so peers that
never spend one cannot push out the buckets of those that do.
"""

from __future__ import annotations

import ipaddress
import threading
import time
import urllib.parse
from collections import OrderedDict


class KeyedTokenBuckets:
    """`burst` attempts at once per key, refilled at `rate` per second."""

    def __init__(self, rate: float, burst: int, max_keys: int = 4096, clock=time.monotonic):
        self.rate = rate
        self.burst = burst
        self._max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    def take(self, key: str) -> float:
        """Spend one token for `key`: 0.0 when allowed, else the seconds until the next token."""
        now = self._clock()
        with self._lock:
            tokens, at = self._buckets.pop(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rate)
            if len(self._buckets) >= self._max_keys:
                self._buckets.popitem(last=False)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate

    def refund(self, key: str) -> None:
        """Give back a token spent on an attempt that turned out well (up to `burst`)."""
        with self._lock:
            if key in self._buckets:
                tokens, at = self._buckets[key]
                self._buckets[key] = (min(float(self.burst), tokens + 1.0), at)


def peer_host(peer: str) -> str:
    """The address a grpcio peer string ("ipv4:1.2.3.4:5678", "ipv6:%5B::1%5D:5678") comes from.

    IPv6 peers are keyed by their /64: one host commonly holds a whole /64, so a per-address limit
    would not limit it.
    """
    kind, _, rest = urllib.parse.unquote(peer).partition(":")  # grpc-core writes "ipv6:%5B::1%5D:5678"
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    if kind == "ipv6":
        host = rest.rpartition(":")[0].strip("[]").split("%")[0]
        try:
            addr = ipaddress.IPv6Address(host)
        except ValueError:
            return host
        if addr.ipv4_mapped is not None:  # an IPv4 peer on a dual-stack listener
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{addr}/64", strict=False))
    return kind or peer
