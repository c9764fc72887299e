"""Tessera's verifier for services: the peer rules, CRL updates, files from the sidecar, and the gRPC interceptor."""

import datetime as dt
import subprocess
import time
from concurrent import futures

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent_sidecar.verifier import (OwnSVID, PeerPolicy, Rejected, TrustState, Verifier, check_certificate,
                                     revoked_serial)
from harness import openssl_says_revoked, openssl_verify, wait_for
from tessera import crl, pem, safefs, spiffeid, x509svid

TD = "example.org"


class CA:
    def __init__(self):
        self.key = x509svid.new_key()
        self.cert = x509svid.build_ca(self.key, TD, dt.timedelta(days=1))
        self.aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key())
        self.id = x509svid.authority_id(self.key.public_key())
        self.number = 0

    def leaf(self, path: str, ttl: int = 600, dns=(), extensions=()):
        key = x509svid.new_key()
        cert = x509svid.build_leaf(public_key=key.public_key(), spiffe_id=spiffeid.parse(f"spiffe://{TD}{path}"),
                                   not_after=dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=ttl),
                                   ca_cert=self.cert, ca_key=self.key, serial=x509.random_serial_number(),
                                   ca_aki=self.aki, dns_names=dns, extra_extensions=extensions)
        return cert, key

    def crl(self, *certs) -> bytes:
        self.number += 1
        revoked = [crl.Revoked(x509svid.serial_hex(c.serial_number), int(time.time())) for c in certs]
        return crl.build(self.cert, self.key, revoked, self.number, time.time(), time.time() + 600)


@pytest.fixture
def ca():
    return CA()


def state(ca, *revoked) -> TrustState:
    return TrustState((ca.cert,), revoked=frozenset(c.serial_number for c in revoked))


def test_peer_from_the_trust_domain_is_accepted(ca):
    cert, _ = ca.leaf("/agent/a")
    assert check_certificate(state(ca), cert, PeerPolicy.trust_domain(TD)) == "spiffe://example.org/agent/a"


def test_peer_from_another_ca_is_rejected(ca):
    cert, _ = CA().leaf("/agent/a")
    with pytest.raises(Rejected, match="does not chain"):
        check_certificate(state(ca), cert, PeerPolicy.trust_domain(TD))


def test_revoked_peer_is_rejected(ca):
    cert, _ = ca.leaf("/agent/a")
    with pytest.raises(Rejected, match="revoked"):
        check_certificate(state(ca, cert), cert, PeerPolicy.trust_domain(TD))


def test_spiffe_id_must_match_exactly_or_be_in_an_allowed_trust_domain(ca):
    cert, _ = ca.leaf("/agent/a")
    assert check_certificate(state(ca), cert, PeerPolicy.exact("spiffe://example.org/agent/a"))
    with pytest.raises(Rejected, match="not allowed"):
        check_certificate(state(ca), cert, PeerPolicy.exact("spiffe://example.org/agent/b"))
    with pytest.raises(Rejected, match="not allowed"):
        check_certificate(state(ca), cert, PeerPolicy.trust_domain("other.org"))


def test_expired_peer_is_rejected(ca):
    cert, _ = ca.leaf("/agent/a", ttl=60)
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=120)
    with pytest.raises(Rejected, match="expired"):
        check_certificate(state(ca), cert, PeerPolicy.trust_domain(TD), now=later)


def test_required_scopes_need_a_task_credential_covering_them(ca):
    cert, _ = ca.leaf("/agent/a")
    pol = PeerPolicy.trust_domain(TD, required_scopes=["db:read", "db:write"])
    with pytest.raises(Rejected, match="task credential is required"):
        check_certificate(state(ca), cert, pol, task_scopes=lambda c: None)
    with pytest.raises(Rejected, match="does not cover db:write"):
        check_certificate(state(ca), cert, pol, task_scopes=lambda c: frozenset({"db:read"}))
    assert check_certificate(state(ca), cert, pol, task_scopes=lambda c: frozenset({"db:read", "db:write", "x"}))


def test_scopes_are_read_from_the_task_binding_extension(ca):
    from tessera import taskext

    binding = taskext.TaskBinding("t-1", ("db:read", "db:write"), "entry-1", "alice")
    task_cert, _ = ca.leaf("/agent/a", extensions=[taskext.encode(binding)])
    identity_cert, _ = ca.leaf("/agent/a")
    pol = PeerPolicy.trust_domain(TD, required_scopes=["db:write"])
    assert check_certificate(state(ca), task_cert, pol) == "spiffe://example.org/agent/a"
    with pytest.raises(Rejected, match="task credential is required"):
        check_certificate(state(ca), identity_cert, pol)
    with pytest.raises(Rejected, match="does not cover"):
        check_certificate(state(ca), task_cert, PeerPolicy.trust_domain(TD, required_scopes=["db:admin"]))


def test_verifier_ignores_forged_and_older_crls(ca):
    cert, _ = ca.leaf("/agent/a")
    v = Verifier(PeerPolicy.trust_domain(TD))
    v.update([ca.cert], [ca.crl(cert)])
    forger = CA()
    forger.number = 100
    v.update(None, [forger.crl()])  # a higher number, nothing revoked, wrong key: ignored
    assert v.state.crls[ca.id].number == 1
    with pytest.raises(Rejected, match="revoked"):
        v.check(cert)
    older, newer = ca.crl(), ca.crl(cert)
    v.update(None, [newer])
    v.update(None, [older])  # lower number, nothing revoked: ignored
    assert v.state.crls[ca.id].number == 3
    with pytest.raises(Rejected, match="revoked"):
        v.check(cert)
    ca.number -= 1
    v.update(None, [ca.crl()])  # the current number again, with nothing revoked: ignored
    assert v.state.crls[ca.id].number == 3
    with pytest.raises(Rejected, match="revoked"):
        v.check(cert)


def test_file_source_follows_the_sidecars_atomic_replacements(ca, tmp_path):
    cert, _ = ca.leaf("/agent/a")
    safefs.atomic_write(tmp_path / "bundle.pem", pem.certs_pem([ca.cert]))
    safefs.atomic_write(tmp_path / "crl.pem", crl.pem(crl.load(ca.crl())))
    v = Verifier.from_files(tmp_path / "bundle.pem", tmp_path / "crl.pem", PeerPolicy.trust_domain(TD), poll=0.05)
    try:
        assert v.check(cert) == "spiffe://example.org/agent/a"
        safefs.atomic_write(tmp_path / "crl.pem", crl.pem(crl.load(ca.crl(cert))))
        wait_for(lambda: cert.serial_number in v.state.revoked, 5, what="new crl.pem read")
        with pytest.raises(Rejected, match="revoked"):
            v.check(cert)
    finally:
        v.close()


def test_grpc_interceptor_refuses_revoked_and_unknown_callers(ca):
    server_cert, server_key = ca.leaf("/svc/api", dns=["svc.test"])
    good, good_key = ca.leaf("/agent/good")
    bad, bad_key = ca.leaf("/agent/revoked")
    v = Verifier(PeerPolicy.trust_domain(TD))
    v.update([ca.cert], [ca.crl(bad)], OwnSVID("spiffe://example.org/svc/api", (server_cert,),
                                               pem.key_pkcs8_der(server_key)))
    handler = grpc.method_handlers_generic_handler("test.Echo", {
        "Say": grpc.unary_unary_rpc_method_handler(lambda req, ctx: b"echo:" + req)})
    server = grpc.server(futures.ThreadPoolExecutor(4), interceptors=[v.interceptor()], handlers=[handler])
    port = server.add_secure_port("127.0.0.1:0", v.grpc_server_credentials())
    server.start()
    try:
        def call(cert, key):
            creds = grpc.ssl_channel_credentials(pem.certs_pem([ca.cert]), pem.key_pem(key), pem.certs_pem([cert]))
            with grpc.secure_channel(f"127.0.0.1:{port}", creds,
                                     options=[("grpc.ssl_target_name_override", "svc.test")]) as ch:
                return ch.unary_unary("/test.Echo/Say")(b"hi", timeout=10)

        assert call(good, good_key) == b"echo:hi"
        with pytest.raises(grpc.RpcError) as e:
            call(bad, bad_key)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "revoked" in e.value.details()
        v.policy = PeerPolicy.exact("spiffe://example.org/agent/other")
        with pytest.raises(grpc.RpcError) as e:
            call(good, good_key)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "not allowed" in e.value.details()
    finally:
        server.stop(0)


Y2050 = int(dt.datetime(2050, 1, 1, tzinfo=dt.timezone.utc).timestamp())  # first GeneralizedTime second


def utc(t: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc)


def varied(t: int) -> list[crl.Revoked]:
    """Small, high-bit (0x00-padded) and longest serials; UTCTime and GeneralizedTime dates; every reason."""
    serials = ["1", "80", "ff" * 19, "7f" + "ff" * 19, "abc123", "10000"]
    dates = [t, Y2050 - 1, Y2050, 0, 2**33, t - 60]
    return [crl.Revoked(s, d, r) for s, d, r in zip(serials, dates, crl.REASON_CODES, strict=True)]


def entries_of(c: x509.CertificateRevocationList) -> list[tuple]:
    return [(x509svid.serial_hex(r.serial_number), int(r.revocation_date_utc.timestamp()),
             [(e.critical, e.value.reason) for e in r.extensions]) for r in c]


def test_crl_entries_keep_their_serial_date_and_reason(ca):
    t = int(time.time())
    items = varied(t)
    built = crl.load(crl.build(ca.cert, ca.key, items, 7, t, Y2050 + 600))
    assert crl.verify(built, [ca.cert]) == ca.cert and crl.number_of(built) == 7
    assert (built.last_update_utc, built.next_update_utc) == (utc(t), utc(Y2050 + 600))
    assert built.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value == ca.aki
    # RFC 5280 5.3.1: no reason code extension for "unspecified"; the others are non-critical.
    assert entries_of(built) == [(r.serial, r.revoked_at, [] if r.reason_code == "unspecified"
                                  else [(False, crl.REASON_CODES[r.reason_code])]) for r in items]


def test_crl_is_encoded_as_cryptographys_builder_encodes_it(ca):
    from cryptography.hazmat.primitives import hashes

    t = int(time.time())

    def builder(items, number, this, next_):
        entries = [x509.RevokedCertificateBuilder(
            int(r.serial, 16), utc(r.revoked_at),
            [] if r.reason_code == "unspecified" else
            [x509.Extension(x509.CRLReason.oid, False, x509.CRLReason(crl.REASON_CODES[r.reason_code]))]).build()
            for r in items]
        exts = [x509.Extension(x509.CRLNumber.oid, False, x509.CRLNumber(number)),
                x509.Extension(x509.AuthorityKeyIdentifier.oid, False, ca.aki)]
        return x509.CertificateRevocationListBuilder(ca.cert.subject, utc(this), utc(next_), exts, entries)

    cases = [(varied(t), 1, t, t + 600), ([], 0, Y2050 - 1, Y2050), (varied(t), 2**70, Y2050, Y2050 + 1)]
    for items, number, this, next_ in cases:
        ours = crl.load(crl.build(ca.cert, ca.key, items, number, this, next_))
        theirs = builder(items, number, this, next_).sign(ca.key, hashes.SHA256())
        assert ours.tbs_certlist_bytes == theirs.tbs_certlist_bytes
        assert ours.signature_algorithm_oid == theirs.signature_algorithm_oid
        assert ours.is_signature_valid(ca.cert.public_key())


def test_same_input_gives_the_same_crl_bytes(ca):
    t = int(time.time())
    items = varied(t)
    first = crl.build(ca.cert, ca.key, items, 3, t, t + 600)
    kept = crl.build(ca.cert, ca.key, items, 3, t, t + 600)  # the records' kept entry encodings
    fresh = crl.build(ca.cert, ca.key, varied(t), 3, t, t + 600)  # new records, encoded again
    assert first == kept == fresh
    assert crl.build(ca.cert, ca.key, items, 4, t, t + 600) != first


def test_crl_with_nothing_revoked_lists_nothing_and_verifies(ca):
    t = int(time.time())
    built = crl.load(crl.build(ca.cert, ca.key, [], 1, t, t + 600))
    assert len(built) == 0 and crl.verify(built, [ca.cert]) == ca.cert and crl.serials(built) == frozenset()


@pytest.mark.parametrize("serial", ["0", "80" + "00" * 19])
def test_crl_refuses_a_serial_that_is_not_positive_or_longer_than_159_bits(ca, serial):
    with pytest.raises(ValueError, match="159 bits"):
        crl.build(ca.cert, ca.key, [crl.Revoked(serial, int(time.time()))], 1, time.time(), time.time() + 600)


def test_openssl_reads_the_crl_and_refuses_only_the_certificates_it_lists(ca, tmp_path):
    listed, _ = ca.leaf("/agent/listed")
    other, _ = ca.leaf("/agent/other")
    t = int(time.time())
    items = varied(t) + [crl.Revoked(x509svid.serial_hex(listed.serial_number), t, "keyCompromise")]
    der = crl.build(ca.cert, ca.key, items, 9, t, t + 600)
    (tmp_path / "crl.der").write_bytes(der)
    text = subprocess.run(["openssl", "crl", "-inform", "DER", "-in", str(tmp_path / "crl.der"), "-noout", "-text"],
                          capture_output=True, text=True, check=True).stdout

    def after(label):
        return [line.split(label, 1)[1].strip() for line in text.splitlines() if label in line]

    # openssl shows a serial's magnitude octets (no 0x00 sign pad).
    assert after("Serial Number:") == [r.serial.upper().zfill(len(r.serial) + len(r.serial) % 2) for r in items]
    assert after("Revocation Date:") == [utc(r.revoked_at).strftime("%b %e %H:%M:%S %Y GMT") for r in items]
    assert text.split("X509v3 CRL Number:")[1].split()[0] == "9"
    shown = ("Unspecified", "Key Compromise", "Affiliation Changed", "Superseded", "Cessation Of Operation",
             "Privilege Withdrawn")
    assert [text.count(name) for name in shown] == [0, 2, 1, 1, 1, 1]
    safefs.atomic_write(tmp_path / "crl.pem", crl.pem(crl.load(der)))
    safefs.atomic_write(tmp_path / "bundle.pem", pem.certs_pem([ca.cert]))
    for name, cert in (("listed", listed), ("other", other)):
        safefs.atomic_write(tmp_path / f"{name}.pem", pem.certs_pem([cert]))
    assert openssl_says_revoked(tmp_path / "bundle.pem", tmp_path / "listed.pem", tmp_path / "crl.pem")
    assert openssl_verify(tmp_path / "bundle.pem", tmp_path / "other.pem", tmp_path / "crl.pem").returncode == 0


def test_rebuilding_with_kept_records_lists_the_same_entries_plus_the_new_one(ca):
    t = int(time.time())
    items = [crl.Revoked(format(i + 1, "x"), t - i, ("keyCompromise", "unspecified")[i % 2]) for i in range(50)]
    first = crl.load(crl.build(ca.cert, ca.key, items, 1, t, t + 600))
    assert items[0] == crl.Revoked("1", t, "keyCompromise")  # the kept entry is not part of the value
    more = items + [crl.Revoked("ffff", t, "cessationOfOperation")]
    second = crl.load(crl.build(ca.cert, ca.key, more, 2, t, t + 600))

    def entries(c):
        return {(r.serial_number, r.revocation_date_utc, tuple(e.value for e in r.extensions)) for r in c}

    added = (0xFFFF, dt.datetime.fromtimestamp(t, dt.timezone.utc),
             (x509.CRLReason(x509.ReasonFlags.cessation_of_operation),))
    assert entries(second) - entries(first) == {added}
    assert entries(first) <= entries(second) and crl.number_of(second) == 2


def test_revoked_serial_names_only_certificates_the_crl_lists(ca):
    listed, _ = ca.leaf("/agent/a")
    other, _ = ca.leaf("/agent/b")
    st = state(ca, listed)
    assert revoked_serial(st, listed) == x509svid.serial_hex(listed.serial_number)
    assert revoked_serial(st, other) is None


def test_a_peer_accepted_before_is_refused_once_revoked_expired_or_its_ca_leaves_the_bundle(ca):
    cert, _ = ca.leaf("/agent/a")
    presented = pem.certs_pem([cert])  # the same bytes on every call, as a TLS peer presents them
    v = Verifier(PeerPolicy.trust_domain(TD))
    v.update([ca.cert])
    assert v.check(presented) == "spiffe://example.org/agent/a"
    assert v.check(presented, PeerPolicy.exact("spiffe://example.org/agent/a"))
    with pytest.raises(Rejected, match="not allowed"):  # the policy is checked on every call
        v.check(presented, PeerPolicy.exact("spiffe://example.org/agent/b"))
    v.update(crls=[ca.crl(cert)])
    with pytest.raises(Rejected, match="revoked"):
        v.check(presented)
    short, _ = ca.leaf("/agent/s", ttl=3)
    v.check(pem.certs_pem([short]))
    time.sleep(max(0.0, short.not_valid_after_utc.timestamp() - time.time()) + 0.2)  # X.509 times are whole seconds
    with pytest.raises(Rejected, match="expired"):
        v.check(pem.certs_pem([short]))
    fresh = pem.certs_pem([ca.leaf("/agent/f")[0]])
    v.check(fresh)
    v.update([CA().cert])  # the trust domain's CA was replaced: what chained before is checked again, and fails
    with pytest.raises(Rejected, match="does not chain"):
        v.check(fresh)


def test_an_update_resending_the_same_cas_keeps_the_checks_made_against_them(ca):
    cert, _ = ca.leaf("/agent/a")
    v = Verifier(PeerPolicy.trust_domain(TD))
    v.update([ca.cert])
    v.check(pem.certs_pem([cert]))
    before = v.state.bundle
    v.update([x509.load_der_x509_certificate(ca.cert.public_bytes(serialization.Encoding.DER))], crls=[ca.crl()])
    assert v.state.bundle is before and v.state.crls[ca.id].number == 1


# -- paths through intermediates ----------------------------------------------------------------------

@pytest.fixture
def h():
    from hierarchy import Hierarchy

    return Hierarchy()


def _chain_der(signed) -> bytes:
    return signed.chain_der  # leaf, then its intermediate: what a peer presents


def test_a_peer_signed_by_an_intermediate_is_accepted_and_one_signed_by_the_root_still_is(h):
    a = h.intermediate()
    v = Verifier(PeerPolicy.trust_domain(TD))
    v.update([h.root.cert])
    assert v.check(_chain_der(a.leaf("/agent/new"))) == "spiffe://example.org/agent/new"
    assert v.check(h.root.leaf("/agent/upgraded").cert) == "spiffe://example.org/agent/upgraded"


def test_an_intermediate_that_is_no_ca_expired_or_under_another_root_gives_no_path(h):
    from hierarchy import Hierarchy
    from tessera import chain

    a, foreign = h.intermediate(), Hierarchy().intermediate()
    leaf = a.leaf().cert
    assert chain.path(leaf, [h.root.cert], [a.cert]) == (leaf, a.cert, h.root.cert)
    with pytest.raises(chain.ChainError, match="not signed by a bundle root"):
        chain.path(foreign.leaf().cert, [h.root.cert], [foreign.cert])
    later = a.cert.not_valid_after_utc + dt.timedelta(seconds=1)
    with pytest.raises(chain.ChainError, match="expired"):
        chain.path(leaf, [h.root.cert], [a.cert], now=later)
    # A leaf of the root's, passed off as an intermediate with a leaf "signed" by its key.
    fake_ca_key = x509svid.new_key()
    fake_ca = h.root.signer.sign(fake_ca_key.public_key(), spiffeid.parse(f"spiffe://{TD}/agent/x"), 600).cert
    under_fake = x509svid.build_leaf(public_key=x509svid.new_key().public_key(),
                                     spiffe_id=spiffeid.parse(f"spiffe://{TD}/agent/y"),
                                     not_after=dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=5),
                                     ca_cert=fake_ca, ca_key=fake_ca_key, serial=x509.random_serial_number(),
                                     ca_aki=x509.AuthorityKeyIdentifier.from_issuer_public_key(fake_ca_key.public_key()))
    with pytest.raises(chain.ChainError, match="not a CA"):
        chain.path(under_fake, [h.root.cert], [fake_ca])


def test_the_leaf_is_checked_against_its_intermediates_crl_and_the_intermediate_against_the_roots(h):
    a, withdrawn = h.intermediate(), h.intermediate()
    good, revoked, under_withdrawn = a.leaf("/agent/good"), a.leaf("/agent/revoked"), withdrawn.leaf("/agent/w")
    v = Verifier(PeerPolicy.trust_domain(TD))
    # As the Workload API sends them: every CRL, no intermediate certificates.
    v.update([h.root.cert], [h.root.crl(withdrawn.cert), a.crl(revoked.cert), withdrawn.crl()])
    assert v.check(_chain_der(good)) == "spiffe://example.org/agent/good"
    with pytest.raises(Rejected, match=f"certificate {revoked.serial_hex} is revoked"):
        v.check(_chain_der(revoked))
    with pytest.raises(Rejected, match="certificate's issuer .* is revoked"):
        v.check(_chain_der(under_withdrawn))
    # The intermediate's CRLs stay per authority and never go back: a lower number is ignored.
    v.update(None, [h.root.crl(withdrawn.cert), a.crl(number=1), withdrawn.crl()])
    with pytest.raises(Rejected, match="is revoked"):
        v.check(_chain_der(revoked))
    later = a.leaf("/agent/later")
    v.update(None, [h.root.crl(withdrawn.cert), a.crl(revoked.cert, later.cert), withdrawn.crl()])
    with pytest.raises(Rejected, match="is revoked"):
        v.check(_chain_der(later))


def test_a_peer_presenting_its_leaf_alone_is_placed_under_an_intermediate_the_verifier_has_seen(h):
    a = h.intermediate()
    own_key = x509svid.new_key()
    own = a.leaf("/svc/api", key=own_key)
    peer = a.leaf("/agent/peer")
    stranger = Verifier(PeerPolicy.trust_domain(TD))
    stranger.update([h.root.cert])
    with pytest.raises(Rejected, match="does not chain"):
        stranger.check(peer.cert)
    v = Verifier(PeerPolicy.trust_domain(TD))
    v.update([h.root.cert], [a.crl()], OwnSVID("spiffe://example.org/svc/api", own.chain, pem.key_pkcs8_der(own_key)))
    assert v.check(peer.cert) == "spiffe://example.org/agent/peer"


def test_tls_handshake_gives_the_verifier_the_peers_intermediate_and_its_crl_is_enforced(h):
    import socket
    import threading

    a, b = h.intermediate(), h.intermediate()  # the server's SVID is b's; clients' are a's
    server_key = x509svid.new_key()
    server = b.leaf("/svc/api", key=server_key)
    v = Verifier(PeerPolicy.trust_domain(TD))
    revoked = a.leaf("/agent/revoked", key=(revoked_key := x509svid.new_key()))
    good = a.leaf("/agent/good", key=(good_key := x509svid.new_key()))
    v.update([h.root.cert], [a.crl(revoked.cert), b.crl()],
             OwnSVID("spiffe://example.org/svc/api", server.chain, pem.key_pkcs8_der(server_key)))
    client_verifier = Verifier(PeerPolicy.trust_domain(TD))

    def handshake(client, key):
        client_verifier.update([h.root.cert], svid=OwnSVID("spiffe://example.org/agent/x", client.chain,
                                                           pem.key_pkcs8_der(key)))
        s1, s2 = socket.socketpair()
        out = {}

        def serve():
            with v.server_context().wrap_socket(s1, server_side=True) as conn:
                try:
                    out["peer"] = v.check_peer(conn)
                except Rejected as e:
                    out["rejected"] = str(e)

        t = threading.Thread(target=serve)
        t.start()
        with client_verifier.client_context().wrap_socket(s2) as conn:
            client_verifier.check_peer(conn)  # the server's path runs through b, which the client never saw
        t.join(10)
        return out

    assert handshake(good, good_key) == {"peer": "spiffe://example.org/agent/good"}
    assert "is revoked" in handshake(revoked, revoked_key)["rejected"]


def test_grpc_interceptor_sees_the_callers_intermediate_and_refuses_what_its_crl_lists(h):
    a, b = h.intermediate(), h.intermediate()
    server_key = x509svid.new_key()
    server = b.signer.sign(server_key.public_key(), spiffeid.parse(f"spiffe://{TD}/svc/api"), 600,
                           dns_names=["svc.test"])
    good = a.leaf("/agent/good", key=(good_key := x509svid.new_key()))
    bad = a.leaf("/agent/revoked", key=(bad_key := x509svid.new_key()))
    v = Verifier(PeerPolicy.trust_domain(TD))
    v.update([h.root.cert], [a.crl(bad.cert)], OwnSVID("spiffe://example.org/svc/api", server.chain,
                                                       pem.key_pkcs8_der(server_key)))
    handler = grpc.method_handlers_generic_handler("test.Echo", {
        "Say": grpc.unary_unary_rpc_method_handler(lambda req, ctx: b"echo:" + req)})
    srv = grpc.server(futures.ThreadPoolExecutor(4), interceptors=[v.interceptor()], handlers=[handler])
    port = srv.add_secure_port("127.0.0.1:0", v.grpc_server_credentials())
    srv.start()
    try:
        def call(signed, key):
            creds = grpc.ssl_channel_credentials(h.bundle_pem(), pem.key_pem(key), pem.certs_pem(signed.chain))
            with grpc.secure_channel(f"127.0.0.1:{port}", creds,
                                     options=[("grpc.ssl_target_name_override", "svc.test")]) as ch:
                return ch.unary_unary("/test.Echo/Say")(b"hi", timeout=10)

        assert call(good, good_key) == b"echo:hi"
        with pytest.raises(grpc.RpcError) as e:
            call(bad, bad_key)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "is revoked" in e.value.details()
    finally:
        srv.stop(0)


def test_file_source_reads_every_crl_in_crl_pem(h, tmp_path):
    a = h.intermediate()
    revoked = a.leaf()
    safefs.atomic_write(tmp_path / "bundle.pem", h.bundle_pem())
    safefs.atomic_write(tmp_path / "crl.pem", crl.pem_all([crl.load(h.root.crl()), crl.load(a.crl(revoked.cert))]))
    v = Verifier.from_files(tmp_path / "bundle.pem", tmp_path / "crl.pem", PeerPolicy.trust_domain(TD), poll=0.05)
    try:
        assert v.check(_chain_der(a.leaf())) == "spiffe://example.org/agent/a"
        with pytest.raises(Rejected, match="is revoked"):
            v.check(_chain_der(revoked))
    finally:
        v.close()


def test_an_intermediate_presented_as_the_peer_is_not_an_svid(h):
    a = h.intermediate()
    v = Verifier(PeerPolicy.trust_domain(TD))
    v.update([h.root.cert])
    with pytest.raises(Rejected, match="CA certificate is not an X.509-SVID"):
        v.check(a.cert)  # it chains to the root and carries the trust domain's ID
