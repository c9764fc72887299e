"""The in-Python limit for one core: the issuer's per-CSR work in a tight loop, no RPC, no storage."""

from __future__ import annotations

import datetime as dt
import time


from benchlib import authority
from tessera import spiffeid, x509svid


def make_csrs(n: int) -> list[bytes]:
    return [x509svid.make_csr(x509svid.new_key()) for _ in range(n)]


def sign_per_s(bursts: int, burst_seconds: float, csrs: list[bytes]) -> float:
    """CSRs per second through parse + verify (verified_key), SigningAuthority.sign_der (leaf_der, the chain in DER).

    The best of several short bursts: the machine may be shared, and the limit is what one
    uncontended core can do.
    """
    ca = authority.intermediate()
    sid = spiffeid.parse("spiffe://example.org/bench/limit")
    cap = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=30)
    rates = []
    for _ in range(bursts):
        n = 0
        start = time.perf_counter()
        while time.perf_counter() - start < burst_seconds:
            for csr in csrs:
                public_key = x509svid.verified_key(csr)
                ca.sign_der(public_key, sid, 600, not_after_cap=cap)  # the leaf and its chain, as a worker does
            n += len(csrs)
        rates.append(n / (time.perf_counter() - start))
    return max(rates)
