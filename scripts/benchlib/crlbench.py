"""CRL figures: tessera/crl.py building and signing a CRL of N serials, and the verifier's revocation lookup."""

from __future__ import annotations

import datetime as dt
import secrets
import time

from agent_sidecar.verifier import PeerPolicy, Verifier, revoked_serial
from benchlib import authority
from issuer.ca.authority import SigningAuthority
from tessera import crl, spiffeid, x509svid


def revoked_entries(n: int, now: int) -> list[crl.Revoked]:
    # Serials as the issuer makes them (random, positive, < 2^159), mixed reasons as operators give them.
    reasons = ("unspecified", "keyCompromise", "cessationOfOperation")
    return [crl.Revoked(format(secrets.randbits(159) | 1 << 150, "x"), now - i, reasons[i % 3]) for i in range(n)]


def build_ms(ca: SigningAuthority, n: int, now: int, runs: int) -> tuple[float, float, bytes, list]:
    """(cold, rebuild, DER, records): best wall times of crl.build (encode + sign to DER) over n serials.

    cold: every run from fresh records, as at issuer start. rebuild: the issuer's steady state, its
    records kept between CRLs, after one more revocation (the new entry is the only one built).
    """
    cold = rebuild = float("inf")
    der, entries = b"", []
    t = time.time()
    for number in range(1, runs + 1):
        entries = revoked_entries(n, now)
        t0 = time.perf_counter()
        der = crl.build(ca.cert, ca.key, entries, 2 * number, t, t + 3600)
        cold = min(cold, (time.perf_counter() - t0) * 1000)
        entries = entries + revoked_entries(1, now)
        t0 = time.perf_counter()
        der = crl.build(ca.cert, ca.key, entries, 2 * number + 1, t, t + 3600)
        rebuild = min(rebuild, (time.perf_counter() - t0) * 1000)
    return cold, rebuild, der, entries


def lookup_ns(ca: SigningAuthority, der: bytes, revoked: list[crl.Revoked], rounds: int = 200_000) -> float:
    """ns per `verifier.revoked_serial` on certificates, half listed in the CRL, after Verifier.update applied it."""
    v = Verifier(PeerPolicy.trust_domain(ca.trust_domain))
    v.update(bundle=(ca.cert,), crls=[der])
    state = v.state
    if len(state.revoked) != len(revoked):
        raise RuntimeError(f"the verifier holds {len(state.revoked)} revoked serials, expected {len(revoked)}")
    sid = spiffeid.parse(f"spiffe://{ca.trust_domain}/bench/crl")
    cap = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)
    certs = [ca.sign(x509svid.new_key().public_key(), sid, 600, not_after_cap=cap).cert for _ in range(8)]
    listed = crl.build(ca.cert, ca.key, [crl.Revoked(x509svid.serial_hex(c.serial_number), 0) for c in certs[:4]]
                       + revoked, crl.number_of(crl.load(der)) + 1, time.time(), time.time() + 3600)
    v.update(crls=[listed])
    state = v.state
    if [revoked_serial(state, c) is not None for c in certs] != [True] * 4 + [False] * 4:
        raise RuntimeError("the verifier's lookup disagrees with the CRL")
    n = 0
    t0 = time.perf_counter()
    for _ in range(rounds // len(certs)):
        for c in certs:
            revoked_serial(state, c)
        n += len(certs)
    return (time.perf_counter() - t0) / n * 1e9


def measure(sizes: tuple[int, ...], runs: int) -> dict:
    out = {}
    ca = authority.root()
    now = int(time.time())
    der, entries = b"", []
    for n in sizes:
        cold, rebuild, der, entries = build_ms(ca, n, now, runs)
        out[n] = {"build_ms": cold, "rebuild_ms": rebuild, "der_bytes": len(der)}
    out["lookup_ns"] = lookup_ns(ca, der, entries)
    return out
