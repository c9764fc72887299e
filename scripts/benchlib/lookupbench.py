"""Per-call lookups on the workload side: the verifier's check of a presented certificate, and which
entries a workload's selectors match in the sidecar's cache."""

from __future__ import annotations

import time

from agent_sidecar.cache import CacheManager
from agent_sidecar.verifier import PeerPolicy, Verifier
from benchlib import authority
from tessera import pem, spiffeid, x509svid
from tessera.v1 import types_pb2


def verifier_check_us(rounds: int = 20_000) -> float:
    """µs per Verifier.check on the PEM a TLS peer presents, the same certificate on every call."""
    ca = authority.root()
    cert = ca.sign(x509svid.new_key().public_key(), spiffeid.parse("spiffe://example.org/bench/peer"), 600).cert
    v = Verifier(PeerPolicy.trust_domain("example.org"))
    v.update(bundle=(ca.cert,))
    presented = pem.certs_pem([cert])
    if v.check(presented) != "spiffe://example.org/bench/peer":
        raise RuntimeError("the verifier refused a good certificate")
    t0 = time.perf_counter()
    for _ in range(rounds):
        v.check(presented)
    return (time.perf_counter() - t0) / rounds * 1e6


def match_us(entries: int = 1000, rounds: int = 20_000) -> float:
    """µs per CacheManager.matching for a workload's selectors with `entries` entries on the host (1 in 50 its own)."""
    now = int(time.time())
    cache = CacheManager(sign=None)
    cache.apply_snapshot([types_pb2.Entry(id=f"e{i}", spiffe_id=f"spiffe://example.org/agent/{i}", state="active",
                                          selectors=[f"unix:uid:{1000 + i % 50}", "unix:path:/usr/bin/python3"],
                                          expires_at=now + 3600, created_at=now) for i in range(entries)], b"")
    mine = frozenset({"unix:uid:1003", "unix:gid:1003", "unix:path:/usr/bin/python3"})
    if len(cache.matching(mine)) != entries // 50:
        raise RuntimeError("unexpected match count")
    t0 = time.perf_counter()
    for _ in range(rounds):
        cache.matching(mine)
    return (time.perf_counter() - t0) / rounds * 1e6
