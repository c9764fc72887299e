"""Revocation end to end: real issuer and sidecar processes, unmodified SPIFFE clients, openssl.

Where the issue states a bound ("within 1 s"), the tests wait with exactly that deadline,
counted from the moment `tessera revoke` returned.
"""

import asyncio
import json
import os
import socket
import sqlite3
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509

import harness
from harness import one_line_error, wait_for
from agent_sidecar.verifier import PeerPolicy, Rejected, Verifier
from tessera import chain
from tessera import crl as crl_mod

AGENT_UID = 4242  # the agent runs as another user, so its entry matches it alone
BOUND = 1.0


# -- helpers --------------------------------------------------------------------------------

def start(deployment, *names):
    deployment.start_issuer()
    for n in names:
        deployment.start_sidecar(n, output_dir=str(out_dir(deployment, n)))
    return deployment


def out_dir(d, name) -> Path:
    return d.root / f"out-{name}"


def write(tmp: Path, name: str, text: str) -> Path:
    p = tmp / name
    p.write_text(text)
    return p


def openssl_says_revoked(out: Path, leaf_pem: Path) -> bool:
    return harness.openssl_says_revoked(out / "bundle.pem", leaf_pem, out / "crl.pem")


def mtls_attempt(verifier: Verifier, cert: Path, key: Path) -> str:
    """One real mTLS handshake: a client presenting cert/key to a server using Tessera's verifier.

    Returns the peer's SPIFFE ID, or "rejected: <why>" / "handshake: <error>".
    """
    ctx = verifier.server_context()
    result: list[str] = []
    with socket.create_server(("127.0.0.1", 0)) as lst:
        port = lst.getsockname()[1]

        def serve():
            conn, _ = lst.accept()
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    try:
                        result.append(verifier.check_peer(tls))
                    except Rejected as e:
                        result.append(f"rejected: {e}")
            except (ssl.SSLError, OSError) as e:
                result.append(f"handshake: {e}")

        t = threading.Thread(target=serve)
        t.start()
        cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        cctx.check_hostname = False
        cctx.verify_mode = ssl.CERT_NONE
        cctx.load_cert_chain(str(cert), str(key))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                with cctx.wrap_socket(raw) as c:
                    c.sendall(b"x")
        except (ssl.SSLError, OSError):
            pass
        t.join(5)
    return result[0] if result else "handshake: no result"


def agent_stream(d, sidecar="host-a"):
    reader = d.stream(sidecar, uid=AGENT_UID)
    first = reader.next(timeout=20)
    assert first["event"] == "update", first
    return reader, first["svids"][0]


def service_verifier(d, sidecar="host-a") -> Verifier:
    d.entry("/svc/checker", sidecar, f"unix:uid:{os.getuid()}")
    v = Verifier.from_sidecar(str(d.socket(sidecar)), PeerPolicy.trust_domain(d.td))
    v.wait_ready(15, need_svid=True)
    return v


def crl_der(d) -> bytes:
    return d.cli_bytes("crl", "show", "--der")


def signer_of(svid_pem: str) -> str:
    """The id of the authority that signed an SVID (its leaf's authority key identifier)."""
    return chain.authority_key_id(x509.load_pem_x509_certificates(svid_pem.encode())[0])


def crl_number_in(path: Path, authority: str) -> int:
    """The number of `authority`'s CRL among those in a crl.pem."""
    [number] = [crl_mod.number_of(c) for c in crl_mod.load_all(path.read_bytes()) if chain.authority_key_id(c) == authority]
    return number


def crl_serials(d) -> set[str]:
    return set(crl_mod.serials(crl_mod.load(crl_der(d))))


def revoke(d, *args) -> float:
    d.cli("revoke", *args, "--reason", "test")
    return time.monotonic()


def until(deadline: float, pred, what: str):
    return wait_for(pred, timeout=max(0.0, deadline - time.monotonic()), interval=0.01,
                    what=f"{what}, within {BOUND}s of revoke returning")


# -- acceptance -----------------------------------------------------------------------------------

def test_revoked_entry_is_denied_rejected_and_listed_within_a_second(deployment, tmp_path):
    d = start(deployment, "host-a")
    entry = d.entry("/agent/a", "host-a", f"unix:uid:{AGENT_UID}")
    reader, svid = agent_stream(d)
    cert, key = write(tmp_path, "leaf.pem", svid["svid_pem"]), write(tmp_path, "key.pem", svid["key_pem"])
    v = service_verifier(d)
    try:
        # Before: every check accepts the certificate, so the assertions below can fail.
        assert mtls_attempt(v, cert, key) == "spiffe://example.org/agent/a"
        wait_for(lambda: (out_dir(d, "host-a") / "crl.pem").exists(), 5, what="crl.pem")
        out = out_dir(d, "host-a")
        assert harness.openssl_verify(out / "bundle.pem", cert, out / "crl.pem").returncode == 0

        t0 = revoke(d, "--entry", entry)
        deadline = t0 + BOUND
        err = reader.until(lambda m: m["event"] == "error", timeout=max(0.01, deadline - time.monotonic()))
        assert "PERMISSION_DENIED" in err["error"] or "revoked" in err["error"], err
        until(deadline, lambda: mtls_attempt(v, cert, key).startswith("rejected: certificate"),
              "verifier rejects the old certificate")
        until(deadline, lambda: openssl_says_revoked(out_dir(d, "host-a"), cert), "openssl -crl_check says revoked")
    finally:
        v.close()
    # Nothing more is served for the identity, and the issuer will not sign it again.
    assert d.fetch("host-a", uid=AGENT_UID)["event"] == "error"
    assert json.loads(d.cli("entry", "show", entry, "--output", "json").stdout)["state"] == "revoked"


def test_revoking_one_serial_replaces_it_while_the_identity_stays_trusted(deployment, tmp_path):
    d = start(deployment, "host-a")
    d.entry("/agent/a", "host-a", f"unix:uid:{AGENT_UID}")
    reader, svid = agent_stream(d)
    revoke(d, "--serial", svid["serial"])
    fresh = reader.until(lambda m: m["event"] != "update" or m["svids"][0]["serial"] != svid["serial"], timeout=10)
    assert fresh["event"] == "update", fresh
    assert fresh["svids"][0]["spiffe_id"] == "spiffe://example.org/agent/a"
    assert svid["serial"] in crl_serials(d) and fresh["svids"][0]["serial"] not in crl_serials(d)


def test_issuer_killed_right_after_revoke_still_lists_the_serial(deployment):
    d = start(deployment, "host-a")
    d.entry("/agent/a", "host-a", f"unix:uid:{AGENT_UID}")
    svid = d.fetch("host-a", uid=AGENT_UID)["svids"][0]
    d.cli("revoke", "--serial", svid["serial"], "--reason", "stolen")
    d.restart_issuer(kill9=True)
    assert svid["serial"] in crl_serials(d)


def workload_api_crl_serials(d, sidecar="host-a") -> set[str]:
    """The serials in the `crl` fields of a Workload API answer to this process (plain grpcio)."""
    import grpc
    from agent_sidecar.workload_client import HEADER
    from tessera.workload import workload_pb2, workload_pb2_grpc

    with grpc.insecure_channel(f"unix://{d.socket(sidecar)}") as ch:
        call = workload_pb2_grpc.SpiffeWorkloadAPIStub(ch).FetchX509SVID(
            workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=10)
        first = next(iter(call))
        call.cancel()
    return {s for der in first.crl for s in crl_mod.serials(crl_mod.load(der))}


def test_revocation_acknowledged_then_issuer_killed_is_enforced_by_the_sidecar_also_after_its_restart(
        deployment, tmp_path):
    d = start(deployment, "host-a")
    d.entry("/agent/a", "host-a", f"unix:uid:{AGENT_UID}")
    d.entry("/svc/reader", "host-a", f"unix:uid:{os.getuid()}")  # this test reads the Workload API too
    svid = d.fetch("host-a", uid=AGENT_UID)["svids"][0]
    serial, cert = svid["serial"], write(tmp_path, "leaf.pem", svid["svid_pem"])
    out = out_dir(d, "host-a")
    wait_for(lambda: (out / "crl.pem").exists(), 5, what="crl.pem")
    assert not openssl_says_revoked(out, cert) and serial not in workload_api_crl_serials(d)

    d.cli("revoke", "--serial", serial, "--reason", "stolen")
    d.issuer.kill9()  # before it could sign anything more

    def refused_everywhere(what: str) -> None:
        wait_for(lambda: openssl_says_revoked(out, cert), 5, what=f"crl.pem lists the serial ({what})")
        v = Verifier.from_files(out / "bundle.pem", out / "crl.pem", PeerPolicy.trust_domain(d.td))
        try:
            with pytest.raises(Rejected, match="revoked"):
                v.check(svid["svid_pem"].encode())
        finally:
            v.close()

    refused_everywhere("issuer down")
    assert serial in workload_api_crl_serials(d)
    d.sidecars["host-a"].stop()
    (out / "crl.pem").unlink()  # rewritten from data_dir at start
    d.sidecars["host-a"].start()
    refused_everywhere("sidecar restarted, issuer still down")
    # Entries are not kept across a restart, so until it syncs the Workload API serves nothing at all.
    with pytest.raises(Exception, match="UNAVAILABLE"):
        workload_api_crl_serials(d)
    # What the issuer acknowledged is committed: the serial marked, the revocation logged, and the number of
    # the CRL it pushed (the next CRL, signed at start from these, is numbered above it).
    db = sqlite3.connect(d.issuer_dir / "tessera.db")
    try:
        (revoked_at,) = db.execute("SELECT revoked_at FROM issued WHERE serial = ?", (serial,)).fetchone()
        (logged,) = db.execute("SELECT serials FROM revocations ORDER BY seq DESC").fetchone()
        (number,) = db.execute("SELECT value FROM meta WHERE key = ?", (f"crl_number:{signer_of(svid['svid_pem'])}",)
                               ).fetchone()
    finally:
        db.close()
    assert revoked_at and serial in json.loads(logged)
    assert number == crl_number_in(out / "crl.pem", signer_of(svid["svid_pem"]))


def test_sidecar_offline_during_revocation_enforces_it_within_a_second_of_reconnecting(deployment, tmp_path):
    d = start(deployment, "host-a", "host-b")
    d.entry("/agent/b", "host-b", f"unix:uid:{AGENT_UID}")
    svid = d.fetch("host-b", uid=AGENT_UID)["svids"][0]
    cert = write(tmp_path, "leaf.pem", svid["svid_pem"])
    d.sidecars["host-b"].stop()
    revoke(d, "--serial", svid["serial"])
    d.start_sidecar("host-b", output_dir=str(out_dir(d, "host-b")))  # returns when its socket is up
    deadline = time.monotonic() + BOUND
    until(deadline, lambda: openssl_says_revoked(out_dir(d, "host-b"), cert), "crl.pem on host-b lists the serial")
    v = Verifier.from_files(out_dir(d, "host-b") / "bundle.pem", out_dir(d, "host-b") / "crl.pem",
                            PeerPolicy.trust_domain(d.td))
    try:
        with pytest.raises(Rejected, match="revoked"):
            v.check(svid["svid_pem"].encode())
    finally:
        v.close()


def test_sidecar_keeps_its_last_good_crl_while_the_issuer_is_down_across_a_restart_or_goes_backwards(deployment, tmp_path):
    d = start(deployment, "host-a")
    d.entry("/agent/a", "host-a", f"unix:uid:{AGENT_UID}")
    entry = d.entry("/agent/gone", "host-a", f"unix:uid:{AGENT_UID + 1}")
    first = d.fetch("host-a", uid=AGENT_UID)["svids"][0]
    cert = write(tmp_path, "leaf.pem", first["svid_pem"])
    revoke(d, "--serial", first["serial"])
    revoke(d, "--entry", entry)
    out = out_dir(d, "host-a")
    wait_for(lambda: openssl_says_revoked(out, cert), 5, what="crl.pem lists the serial")

    signer = signer_of(first["svid_pem"])

    def settled():  # the sidecar holds the issuer's latest CRL (both revocations may take two)
        latest = crl_mod.number_of(crl_mod.load(crl_der(d)))  # the active signer's (it signed `first`)
        return latest if crl_number_in(out / "crl.pem", signer) == latest else None

    number = wait_for(settled, 5, what="the sidecar holding the latest CRL")

    # Issuer down: the sidecar keeps enforcing (revoked identity denied, CRL still on disk).
    d.issuer.stop()
    time.sleep(0.5)
    assert d.fetch("host-a", uid=AGENT_UID + 1)["event"] == "error"
    assert openssl_says_revoked(out, cert)

    # The sidecar restarted while the issuer is still down: its saved CRL is back in crl.pem before it
    # serves (the socket exists once start() returns), for the services that check peers with it.
    (out / "crl.pem").unlink()
    d.sidecars["host-a"].stop()
    d.sidecars["host-a"].start()
    assert openssl_says_revoked(out, cert)
    assert crl_number_in(out / "crl.pem", signer) == number

    # The issuer comes back with its CRL number rolled back (a restored old database) and, with it, its data_dir's
    # high-water mark (else the issuer itself refuses to start, tests/test_restored_database.py): the sidecar refuses.
    db = sqlite3.connect(d.issuer_dir / "tessera.db")
    db.execute("UPDATE meta SET value = 0 WHERE key = ?", (f"crl_number:{signer}",))
    db.commit()
    db.close()
    (d.issuer_dir / "high-water.json").unlink()
    d.issuer.start()
    log = d.sidecar_dir("host-a") / "sidecar.log"
    wait_for(lambda: "lower than the current" in log.read_text(), 20, what="sidecar refusing the lower CRL number")
    assert crl_number_in(out / "crl.pem", signer) == number
    assert openssl_says_revoked(out, cert)


def test_every_revoke_form_answers_with_one_clear_line(deployment):
    d = start(deployment, "host-a", "host-b")
    e1 = d.entry("/agent/one", "host-a", f"unix:uid:{AGENT_UID}", owner="bob")
    d.entry("/agent/two", "host-a", f"unix:uid:{AGENT_UID + 1}", owner="carol")
    d.entry("/agent/three", "host-b", f"unix:uid:{AGENT_UID}", owner="dave")
    svid = d.fetch("host-a", uid=AGENT_UID)["svids"][0]

    def run(*args):
        return d.cli("revoke", *args, check=False)

    bad = [
        (("--serial", "ab", "--entry", e1, "--reason", "x"), "not allowed with"),
        (("--entry", e1), "required: --reason"),
        (("--entry", e1, "--reason", " "), "--reason must not be empty"),
        (("--serial", "abcdef0123", "--reason", "x"), "no certificate with serial abcdef0123"),
        (("--serial", "xyz", "--reason", "x"), "invalid serial"),
        (("--entry", "no-such-entry", "--reason", "x"), "no entry"),
        (("--owner", "nobody", "--reason", "x"), "no entry is owned by"),
        (("--spiffe-id", "not-a-spiffe-id", "--reason", "x"), "spiffe"),
        (("--task", "no-such-task", "--reason", "x"), "no credential was issued for task"),
        (("--sidecar", "no-such-host", "--reason", "x"), "no sidecar"),
        (("--reason", "x"), "one of the arguments"),
    ]
    for args, text in bad:
        r = run(*args)
        assert text.lower() in one_line_error(r).lower() and r.stdout == "", (args, r.stderr)

    good = [
        (("--serial", svid["serial"], "--reason", "x"), f"revoked serial {svid['serial']}: 1 certificate revoked"),
        (("--entry", e1, "--reason", "x"), "entry revoked"),
        (("--owner", "carol", "--reason", "x"), "1 entry revoked"),
        (("--spiffe-id", "spiffe://example.org/agent/three", "--reason", "x"), "1 entry revoked"),
        (("--sidecar", "host-b", "--reason", "x"), "revoked sidecar host-b"),
    ]
    for args, text in good:
        r = run(*args)
        assert r.returncode == 0 and len(r.stdout.strip().splitlines()) == 1 and text in r.stdout, (args, r)
    r = run("--serial", svid["serial"], "--reason", "again", "--output", "json")
    assert json.loads(r.stdout)["count"] == 0


def test_banned_sidecar_is_cut_off_and_everything_it_obtained_is_revoked(deployment):
    d = start(deployment, "host-a", "host-b")
    d.entry("/agent/b", "host-b", f"unix:uid:{AGENT_UID}")
    reader, svid = agent_stream(d, "host-b")
    sidecar_serial = json.loads(d.cli("sidecar", "show", "host-b", "--output", "json").stdout)["svid_serial"]
    r = d.cli("sidecar", "ban", "host-b", "--reason", "host compromised", "--output", "json")
    revoked = set(json.loads(r.stdout)["serials"])
    assert {svid["serial"], sidecar_serial} <= revoked
    # Its sync stream is closed and it stops serving: the workload is told to drop its SVIDs.
    err = reader.until(lambda m: m["event"] == "error", timeout=5)
    assert "PERMISSION_DENIED" in err["error"] or "revoked" in err["error"], err
    wait_for(lambda: {svid["serial"], sidecar_serial} <= crl_serials(d), 5, what="serials in the CRL")
    shown = json.loads(d.cli("sidecar", "show", "host-b", "--output", "json").stdout)
    assert shown["state"] == "banned"
    # No re-attestation under that name.
    r = d.cli("token", "create", "--sidecar", "host-b", check=False)
    one_line_error(r, "banned")
    # The other sidecar is untouched.
    d.entry("/agent/a", "host-a", f"unix:uid:{AGENT_UID}")
    assert d.fetch("host-a", uid=AGENT_UID)["event"] == "update"


def test_revoking_a_sidecars_own_svid_cuts_it_off(deployment):
    d = start(deployment, "host-a")
    d.entry("/agent/a", "host-a", f"unix:uid:{AGENT_UID}")
    reader, _ = agent_stream(d)
    serial = json.loads(d.cli("sidecar", "show", "host-a", "--output", "json").stdout)["svid_serial"]
    revoke(d, "--serial", serial)
    err = reader.until(lambda m: m["event"] == "error", timeout=5)
    assert "PERMISSION_DENIED" in err["error"] or "revoked" in err["error"], err
    assert d.fetch("host-a", uid=AGENT_UID)["event"] == "error"


def test_crl_show_prints_each_authority_s_signed_v2_crl_with_number_and_authority_key_id(deployment, tmp_path):
    d = start(deployment)
    listed = json.loads(d.cli("ca", "list", "--output", "json").stdout)
    certs = write(tmp_path, "authorities.pem", "".join(a["cert_pem"] for a in listed if a["kind"] != "jwt"))
    crls = crl_mod.load_all(d.cli("crl", "show").stdout.encode())
    publishing = {a["id"] for a in listed if a["kind"] != "jwt" and a["state"] != "revoked"}
    assert {chain.authority_key_id(c) for c in crls} == publishing  # the root's, and each intermediate's
    for c in crls:
        p = write(tmp_path, "crl.pem", crl_mod.pem(c).decode())
        r = subprocess.run(["openssl", "crl", "-in", str(p), "-noout", "-text", "-CAfile", str(certs)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert "verify OK" in r.stderr + r.stdout
        assert "Version 2" in r.stdout and "CRL Number" in r.stdout and "Authority Key Identifier" in r.stdout
        assert "Next Update" in r.stdout
    assert crl_mod.der(crls[0]) == crl_der(d)  # --der: the active intermediate's


# -- the issuer's revocation service in-process (task credentials, the EndTask entry point) ---------

from inproc import OPERATOR, issuer_services  # noqa: E402
from issuer.core.models import Actor, AuditEvent, IssuedSerial  # noqa: E402
from tessera import pem, spiffeid, x509svid  # noqa: E402
from tessera.errors import PermissionDenied, Unavailable  # noqa: E402

HOST = "spiffe://example.org/tessera/sidecar/h"


class Issuer:
    def __init__(self, root: Path):
        self.root = root
        s = issuer_services(root)  # HOST ("h") really attested
        self.store, self.authorities, self.hub, self.registry = s.store, s.authorities, s.hub, s.registry
        self.attestor, self.revocation = s.attestor, s.revocation

    def issue(self, kind="identity", task_id=None, path="/agent/a", entry_id="e1") -> str:
        signed = self.authorities.signer().sign(x509svid.new_key().public_key(),
                                                spiffeid.parse(f"spiffe://example.org{path}"), 600)
        now = int(time.time())
        self.store.record_issued([IssuedSerial(signed.serial_hex, f"spiffe://example.org{path}", kind, entry_id, HOST,
                                               now, int(signed.not_after.timestamp()), task_id=task_id,
                                               authority=signed.authority)])
        return signed.serial_hex

    def crl(self):
        """The active intermediate's CRL (it signed what issue() issued)."""
        return crl_mod.load(self.revocation.rebuild_crl().crls[0].der)

    def close(self):
        self.store.close()


@pytest.fixture
def issuer(tmp_path):
    i = Issuer(tmp_path)
    yield i
    i.close()


async def test_revoking_a_task_ends_only_that_tasks_certificates(issuer):
    identity = issuer.issue()
    t1 = [issuer.issue("task", "t1"), issuer.issue("task", "t1")]
    t2 = issuer.issue("task", "t2")
    sub = issuer.hub.subscribe(HOST)  # a sync stream's subscription, on this test's event loop
    # Revoking commits and publishes from another thread, as the admin socket's loop does.
    result = await asyncio.to_thread(issuer.revocation.revoke, "task", "t1", "task aborted", OPERATOR)
    assert sorted(result.serials) == sorted(t1)
    assert crl_mod.serials(issuer.crl()) == set(t1)
    assert not issuer.revocation.is_revoked(identity) and not issuer.revocation.is_revoked(t2)
    kind, event, _ = await sub.get(timeout=1)
    assert kind == "revocation" and sorted(event.serials) == sorted(t1) and event.seq == result.seq
    # The CRL entries say why: a task ending is cessationOfOperation.
    entry = issuer.crl().get_revoked_certificate_by_serial_number(int(t1[0], 16))
    assert entry.extensions.get_extension_for_class(crl_mod.x509.CRLReason).value.reason.name == \
        "cessation_of_operation"


def test_revoke_serials_revokes_known_serials_once_and_skips_unknown_ones(issuer):
    t = issuer.issue("task", "t9")
    result = issuer.revocation.revoke_serials([t, "abc123"], "task ended", Actor("workload", "pid:1"))
    assert result.serials == (t,) and issuer.store.get_issued(t).revoked_at is not None
    assert issuer.revocation.revoke_serials([t], "again", OPERATOR).serials == ()


def test_crl_number_and_revoked_set_survive_a_restart(issuer):
    s = issuer.issue()
    issuer.revocation.revoke("serial", s, "stolen", OPERATOR)
    before = crl_mod.number_of(issuer.crl())
    issuer.close()
    again = Issuer(issuer.root)
    try:
        assert again.revocation.is_revoked(s)
        c = crl_mod.load(again.revocation.crl_der())
        assert crl_mod.number_of(c) > before and s in crl_mod.serials(c)
    finally:
        again.close()


async def test_revoke_returns_after_a_crl_listing_it_is_committed_and_pushed(issuer):
    s = issuer.issue()
    sub = issuer.hub.subscribe(HOST)
    result = await asyncio.to_thread(issuer.revocation.revoke, "serial", s, "stolen", OPERATOR)
    info = issuer.revocation.crl_info()
    assert s in crl_mod.serials(crl_mod.load(info.der)) and crl_mod.number_of(crl_mod.load(info.der)) == info.number
    assert issuer.store.next_crl_number(info.authority) == info.number + 1  # committed before it was pushed
    pushed = [sub.queue.get_nowait() for _ in range(2)]  # both were queued before revoke returned
    assert [k for k, _, _ in pushed] == ["revocation", "crls"] and pushed[0][1].seq == result.seq
    assert pushed[1][1].crls[0].der == info.der


def test_a_revocation_whose_crl_cannot_be_signed_is_kept_and_its_crl_retried(issuer, monkeypatch):
    s = issuer.issue()
    number = issuer.revocation.crl_info().number

    def no_signature(*args, **kwargs):
        raise RuntimeError("the CA key is unavailable")

    with monkeypatch.context() as m:
        m.setattr(crl_mod, "build", no_signature)
        with pytest.raises(Unavailable, match="recorded and pushed to sidecars, but signing the CRL failed"):
            issuer.revocation.revoke("serial", s, "stolen", OPERATOR)
    # Committed and enforced by the issuer itself; the CRL in force is the last good one until the retry.
    assert issuer.store.get_issued(s).revoked_at is not None and issuer.revocation.is_revoked(s)
    assert issuer.revocation.crl_info().number == number
    issuer.revocation.rebuild_crl()  # what the CRL thread does when it retries
    assert s in crl_mod.serials(crl_mod.load(issuer.revocation.crl_der()))


def test_an_entry_revocation_commits_once_with_its_serials_or_not_at_all(issuer, monkeypatch):
    e = issuer.registry.create(spiffe_id="spiffe://example.org/agent/once", parent=HOST, selectors=["unix:uid:1"],
                               owner="bob", purpose="p", expires_at=int(time.time()) + 3600, actor=OPERATOR)
    s = issuer.issue(path="/agent/once", entry_id=e.id)
    position, seq = issuer.store.last_change_position(), issuer.store.last_revocation_seq()

    def disk_full(*args, **kwargs):
        raise Unavailable("the datastore's disk is full")

    with monkeypatch.context() as m:
        m.setattr(issuer.store, "record_revocation", disk_full)  # fails after the entry and its serials were written
        with pytest.raises(Unavailable, match="disk is full"):
            issuer.revocation.revoke("entry", e.id, "compromised", OPERATOR)
    # Nothing of it committed: the entry is active in the store and in the registry, its serial not revoked.
    assert issuer.registry.get(e.id).state == "active"
    assert [x.state for x in issuer.store.list_entries() if x.id == e.id] == ["active"]
    assert issuer.store.get_issued(s).revoked_at is None and not issuer.revocation.is_revoked(s)
    assert issuer.store.last_change_position() == position and issuer.store.last_revocation_seq() == seq

    issuer.revocation.revoke("entry", e.id, "compromised", OPERATOR)
    assert issuer.registry.get(e.id).state == "revoked" and issuer.revocation.is_revoked(s)
    # The entry's state and the revocation, one after the other on the change feed.
    changes = issuer.store.changes_after(position, 100)
    assert [(c.kind, c.op) for c in changes] == [("entry", "update"), ("revocation", "create")]
    assert changes[0].payload["state"] == "revoked"


def test_concurrent_revocations_share_crl_builds_and_each_returns_covered(issuer, monkeypatch):
    serials = [issuer.issue() for _ in range(24)]
    first = crl_mod.number_of(crl_mod.load(issuer.revocation.crl_der()))
    covered: list[bool] = []
    build = crl_mod.build

    def slow_build(*args, **kwargs):  # as a CRL of many serials is: revocations commit while it is signed
        time.sleep(0.05)
        return build(*args, **kwargs)

    monkeypatch.setattr(crl_mod, "build", slow_build)

    def one(s):
        issuer.revocation.revoke("serial", s, "burst", OPERATOR)
        covered.append(s in crl_mod.serials(crl_mod.load(issuer.revocation.crl_der())))

    threads = [threading.Thread(target=one, args=(s,)) for s in serials]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert covered == [True] * len(serials)
    builds = crl_mod.number_of(crl_mod.load(issuer.revocation.crl_der())) - first
    assert 1 <= builds < len(serials), builds  # grouped: fewer CRLs signed than revocations
    assert set(serials) <= crl_mod.serials(crl_mod.load(issuer.revocation.crl_der()))


def test_revoked_identity_gets_no_new_certificates_even_from_a_new_entry(issuer):
    e = issuer.registry.create(spiffe_id="spiffe://example.org/agent/x", parent=HOST, selectors=["unix:uid:1"],
                               owner="bob", purpose="p", expires_at=int(time.time()) + 3600, actor=OPERATOR)
    issuer.revocation.revoke("spiffe_id", e.spiffe_id, "compromised", OPERATOR)
    assert issuer.registry.get(e.id).state == "revoked"
    later = issuer.registry.create(spiffe_id=e.spiffe_id, parent=HOST, selectors=["unix:uid:1"], owner="carol",
                                   purpose="p", expires_at=int(time.time()) + 3600, actor=OPERATOR)
    with pytest.raises(PermissionDenied, match="revoked"):
        issuer.revocation.check_entry(later)


# -- races on the issuer (the sidecar's CRL rules are in tests/test_sidecar_crls.py) ----------------

def test_svid_signed_while_its_entry_was_being_revoked_is_revoked_and_withheld(issuer):
    from issuer.core.models import SignResult

    e = issuer.registry.create(spiffe_id="spiffe://example.org/agent/r", parent=HOST, selectors=["unix:uid:1"],
                               owner="bob", purpose="p", expires_at=int(time.time()) + 3600, actor=OPERATOR)
    racing = issuer.issue(path="/agent/r")  # recorded by a batch that checked the entry before the revocation
    issuer.registry.set_state(e.id, "revoked", OPERATOR, "revoked meanwhile")
    out = issuer.revocation.recheck_issued([SignResult(e.id, e.spiffe_id, b"der", racing, 1)], HOST)
    assert out[0].code == 7 and not out[0].serial and "is revoked" in out[0].error
    assert issuer.revocation.is_revoked(racing) and racing in crl_mod.serials(issuer.crl())


def test_svid_signed_while_its_sidecar_was_being_banned_is_revoked_and_withheld(issuer):
    from issuer.core.models import SignResult

    e = issuer.registry.create(spiffe_id="spiffe://example.org/agent/r", parent=HOST, selectors=["unix:uid:1"],
                               owner="bob", purpose="p", expires_at=int(time.time()) + 3600, actor=OPERATOR)
    fine = issuer.issue(path="/agent/r")
    assert issuer.revocation.recheck_issued([SignResult(e.id, e.spiffe_id, b"der", fine, 1)], HOST)[0].code == 0
    racing = issuer.issue(path="/agent/r")  # its sidecar was authenticated just before the ban
    issuer.attestor.set_banned(issuer.attestor.get(HOST), AuditEvent("sidecar.ban", OPERATOR, "done"))
    out = issuer.revocation.recheck_issued([SignResult(e.id, e.spiffe_id, b"der", racing, 1)], HOST)
    assert out[0].code == 7 and "banned" in out[0].error
    assert issuer.revocation.is_revoked(racing)


def test_a_banned_sidecar_cannot_renew_even_after_it_was_authenticated(issuer):
    caller = issuer.attestor.get(HOST)  # authenticated before the ban
    issuer.attestor.set_banned(caller, AuditEvent("sidecar.ban", OPERATOR, "done"))
    issuer.attestor.touch(HOST)  # a late touch must not bring the old "active" state back
    with pytest.raises(PermissionDenied, match="banned"):
        issuer.attestor.renew(caller, x509svid.make_csr(x509svid.new_key()))
    assert issuer.attestor.get(HOST).state == "banned"


def test_a_sidecar_whose_svid_serial_is_revoked_fails_authentication(issuer):
    token, _, _ = issuer.attestor.create_token("host-r", 600, OPERATOR)
    svid = issuer.attestor.attest(token, x509svid.make_csr(x509svid.new_key()), "test")
    presented = pem.certs_pem([svid.chain[0]])
    assert issuer.attestor.authenticate(presented, issuer.revocation).id == svid.sidecar_id
    issuer.revocation.revoke("serial", x509svid.serial_hex(svid.chain[0].serial_number), "key leaked", OPERATOR)
    with pytest.raises(PermissionDenied, match="revoked"):
        issuer.attestor.authenticate(presented, issuer.revocation)


