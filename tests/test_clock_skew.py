"""Clock skew between sidecar and issuer: real daemons, the sidecar's clock moved by libfaketime.

An SVID that arrives already expired, or not yet valid, by the sidecar's clock is not
stored or served; the sidecar logs the skew it measured and asks again with a growing,
bounded delay, so a skewed clock costs a handful of certificates, not a storm.
"""

import asyncio
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from cryptography import x509

from harness import wait_for
from tessera import pem

AGENT_UID = 4243
LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")

needs_faketime = pytest.mark.skipif(not LIBFAKETIME.exists() or shutil.which("faketime") is None,
                                    reason="libfaketime is not installed (apt-get install faketime)")


def start_skewed_sidecar(d, name: str, offset: str, monkeypatch):
    """The sidecar with its clock `offset` (libfaketime syntax, e.g. "+2h") from the issuer's."""
    token = d.token(name)
    with monkeypatch.context() as m:
        for k, v in skewed_env(offset).items():
            m.setenv(k, v)
        return d.start_sidecar(name, token=token)


def skewed_env(offset: str) -> dict[str, str]:
    # Monotonic time is left alone so timers run at the real pace.
    return {"LD_PRELOAD": str(LIBFAKETIME), "FAKETIME": offset, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


def issued_count(d) -> int:
    db = d.db()
    try:
        return db.execute("SELECT COUNT(*) FROM issued").fetchone()[0]
    finally:
        db.close()


@needs_faketime
def test_sidecar_clock_ahead_of_the_issuer_mints_a_handful_of_certificates_and_logs_the_skew(deployment,
                                                                                              monkeypatch):
    d = deployment
    d.start_issuer()
    d.entry("/agent/a", "host-a", f"unix:uid:{AGENT_UID}")
    sidecar = start_skewed_sidecar(d, "host-a", "+2h", monkeypatch)
    log = d.sidecar_dir("host-a") / "sidecar.log"
    before = issued_count(d)
    time.sleep(6)
    minted = issued_count(d) - before
    # Delays of 2, 4, 8 s for the one entry and for the sidecar's own SVID: at most a few each.
    assert minted <= 6, f"{minted} certificates signed in 6 s for one entry:\n{sidecar.log()}"
    wait_for(lambda: "SVID arrived outside its validity" in log.read_text(), 15,
             what="the sidecar naming the clock skew of an entry's SVID")
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    skews = [x for x in lines if "clock skew" in x["event"]]
    assert {x["event"].split(":")[0] for x in skews} == {"SVID arrived outside its validity by this host's clock",
                                                         "this sidecar's own SVID is outside its validity by "
                                                         "this host's clock"}, skews
    assert all(-7300 < x["skew_seconds"] < -7100 for x in skews), skews  # the issuer is 2 h behind
    assert d.fetch("host-a", uid=AGENT_UID)["event"] == "error"  # nothing expired is served


@needs_faketime
def test_sidecar_clock_behind_the_issuer_mints_nothing_and_says_to_check_the_clocks(deployment):
    d = deployment
    d.start_issuer()
    d.entry("/agent/a", "host-a", f"unix:uid:{AGENT_UID}")
    sidecar = d.start_sidecar("host-a")  # joins with the right time, then its clock is set back
    sidecar.stop()
    before = issued_count(d)
    sidecar.env = {**os.environ, **skewed_env("-2h")}
    sidecar.ready = None  # the issuer's TLS certificate is not valid yet by its clock: it may never sync
    sidecar.start()
    log = d.sidecar_dir("host-a") / "sidecar.log"
    wait_for(lambda: "check the clock skew" in log.read_text(), 15, what="the sidecar hinting at clock skew")
    wait_for(lambda: "own SVID is outside its validity" in log.read_text(), 15,
             what="the sidecar naming the skew of its own SVID")
    own = [json.loads(x) for x in log.read_text().splitlines() if "own SVID is outside" in x][0]
    assert 7100 < own["skew_seconds"] < 7300, own  # the issuer is 2 h ahead
    time.sleep(3)
    assert issued_count(d) == before


async def test_svid_arriving_not_yet_valid_is_not_served_and_asked_for_again_with_a_growing_delay(monkeypatch):
    import datetime as dt

    from agent_sidecar.cache import CacheManager
    from tessera import spiffeid, x509svid
    from tessera.v1 import issuer_pb2, types_pb2

    ca_key = x509svid.new_key()
    ca = x509svid.build_ca(ca_key, "example.org", dt.timedelta(days=1))
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    issuer_now = lambda: dt.datetime.now(dt.timezone.utc).replace(microsecond=0) + dt.timedelta(hours=2)  # noqa: E731
    monkeypatch.setattr(x509svid, "_now", issuer_now)  # the signing side's clock is 2 h ahead
    calls: list[float] = []

    async def sign(csrs):  # what the issuer answers: real certificates, signed with its own clock
        calls.append(time.monotonic())
        out = []
        for entry_id, csr in csrs:
            cert = x509svid.build_leaf(public_key=x509svid.csr_public_key(csr),
                                       spiffe_id=spiffeid.parse("spiffe://example.org/agent/a"),
                                       not_after=issuer_now() + dt.timedelta(minutes=10), ca_cert=ca, ca_key=ca_key,
                                       serial=x509.random_serial_number(), ca_aki=aki)
            out.append(issuer_pb2.SignedSVID(entry_id=entry_id, spiffe_id="spiffe://example.org/agent/a",
                                             cert_chain=pem.der_concat([cert]),
                                             serial=x509svid.serial_hex(cert.serial_number)))
        return out

    cache = CacheManager(sign)
    entries = [types_pb2.Entry(id=f"e{i}", spiffe_id="spiffe://example.org/agent/a", state="active", revision=1,
                               selectors=["unix:uid:1"], expires_at=int(time.time()) + 3600) for i in range(3)]
    cache.apply_snapshot(entries, b"")
    task = asyncio.create_task(cache.run())
    try:
        await asyncio.sleep(7.5)
    finally:
        task.cancel()
    assert cache.svids == {}  # nothing out of its validity is served
    # Asked at once, then after 2 s and 4 s more (one entry per probe after the first batch), not in a loop;
    # a loaded machine may push the third call past the end.
    gaps = [round(b - a, 2) for a, b in zip(calls, calls[1:])]
    assert 1 <= len(gaps) <= 2 and gaps[0] >= 1.9 and all(g >= 3.9 for g in gaps[1:]), gaps
