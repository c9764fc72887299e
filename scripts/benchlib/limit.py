"""The in-Python limit for one core: the issuer's per-CSR work in a tight loop, no RPC, no storage."""

from __future__ import annotations

import datetime as dt
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding

from issuer.ca import CertificateAuthority
from tessera import spiffeid, x509svid


def make_csrs(n: int) -> list[bytes]:
    return [x509svid.make_csr(x509svid.new_key()) for _ in range(n)]


def sign_per_s(seconds: float, csrs: list[bytes]) -> tuple[float, int]:
    """CSRs per second through parse + verify (load_csr), CertificateAuthority.sign (build_leaf) and DER."""
    with tempfile.TemporaryDirectory() as d:
        ca = CertificateAuthority.load_or_create("example.org", Path(d))
    sid = spiffeid.parse("spiffe://example.org/bench/limit")
    cap = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=30)
    n = 0
    start = time.perf_counter()
    end = start + seconds
    while True:
        for csr in csrs:
            public_key = x509svid.load_csr(csr).public_key()
            ca.sign(public_key, sid, 600, not_after_cap=cap).cert.public_bytes(Encoding.DER)
        n += len(csrs)
        now = time.perf_counter()
        if now >= end:
            return n / (now - start), n
