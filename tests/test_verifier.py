"""Tessera's verifier for services: the peer rules, CRL updates, files from the sidecar, and the gRPC interceptor."""

import datetime as dt
import time
from concurrent import futures

import grpc
import pytest
from cryptography import x509

from agent_sidecar.verifier import (OwnSVID, PeerPolicy, Rejected, TrustState, Verifier, check_certificate,
                                     revoked_serial)
from harness import wait_for
from tessera import crl, pem, spiffeid, x509svid

TD = "example.org"


class CA:
    def __init__(self):
        self.key = x509svid.new_key()
        self.cert = x509svid.build_ca(self.key, TD, dt.timedelta(days=1))
        self.aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key())
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
        return crl.der(crl.build(self.cert, self.key, revoked, self.number, time.time(), time.time() + 600))


@pytest.fixture
def ca():
    return CA()


def state(ca, *revoked) -> TrustState:
    return TrustState((ca.cert,), b"", None, frozenset(x509svid.serial_hex(c.serial_number) for c in revoked))


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
    assert v.state.crl_number == 1
    with pytest.raises(Rejected, match="revoked"):
        v.check(cert)
    older, newer = ca.crl(), ca.crl(cert)
    v.update(None, [newer])
    v.update(None, [older])  # lower number, nothing revoked: ignored
    assert v.state.crl_number == 3
    with pytest.raises(Rejected, match="revoked"):
        v.check(cert)
    ca.number -= 1
    v.update(None, [ca.crl()])  # the current number again, with nothing revoked: ignored
    assert v.state.crl_number == 3
    with pytest.raises(Rejected, match="revoked"):
        v.check(cert)


def test_file_source_follows_the_sidecars_atomic_replacements(ca, tmp_path):
    cert, _ = ca.leaf("/agent/a")
    pem.write_atomic(tmp_path / "bundle.pem", pem.certs_pem([ca.cert]))
    pem.write_atomic(tmp_path / "crl.pem", crl.pem(crl.load(ca.crl())))
    v = Verifier.from_files(tmp_path / "bundle.pem", tmp_path / "crl.pem", PeerPolicy.trust_domain(TD), poll=0.05)
    try:
        assert v.check(cert) == "spiffe://example.org/agent/a"
        pem.write_atomic(tmp_path / "crl.pem", crl.pem(crl.load(ca.crl(cert))))
        wait_for(lambda: x509svid.serial_hex(cert.serial_number) in v.state.revoked, 5, what="new crl.pem read")
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


def test_crl_entries_keep_their_serial_date_and_reason(ca):
    t = int(time.time())
    items = [crl.Revoked("abc123", t - 60, "keyCompromise"), crl.Revoked("ff", t - 60, "unspecified"),
             crl.Revoked("10", t, "cessationOfOperation"), crl.Revoked("11", t, "keyCompromise")]
    built = crl.load(crl.der(crl.build(ca.cert, ca.key, items, 7, t, t + 600)))
    assert crl.verify(built, [ca.cert]) == ca.cert and crl.number_of(built) == 7
    got = {}
    for r in built:
        reasons = [e.value.reason for e in r.extensions if isinstance(e.value, x509.CRLReason)]
        got[x509svid.serial_hex(r.serial_number)] = (int(r.revocation_date_utc.timestamp()), reasons)
    assert got == {"abc123": (t - 60, [x509.ReasonFlags.key_compromise]), "ff": (t - 60, []),
                   "10": (t, [x509.ReasonFlags.cessation_of_operation]), "11": (t, [x509.ReasonFlags.key_compromise])}


def test_rebuilding_with_kept_records_lists_the_same_entries_plus_the_new_one(ca):
    t = int(time.time())
    items = [crl.Revoked(format(i + 1, "x"), t - i, ("keyCompromise", "unspecified")[i % 2]) for i in range(50)]
    first = crl.load(crl.der(crl.build(ca.cert, ca.key, items, 1, t, t + 600)))
    assert items[0] == crl.Revoked("1", t, "keyCompromise")  # the kept entry is not part of the value
    more = items + [crl.Revoked("ffff", t, "cessationOfOperation")]
    second = crl.load(crl.der(crl.build(ca.cert, ca.key, more, 2, t, t + 600)))

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
