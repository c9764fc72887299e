"""Authorities in-process: a root, rotating intermediates and JWT keys, sealed keys, taint and revoke, restarts.

Real keys, certificates and SQLite; the schedule is driven by passing `now` to tick()."""

from __future__ import annotations

import base64
import datetime as dt
import os
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from cautil import make_authorities, write_root
from issuer.ca.authority import SigningAuthority
from issuer.core.models import Actor
from issuer.datastore.sqlite import SQLiteDatastore
from tessera import pem, spiffeid, x509svid
from tessera.errors import ConfigError, FailedPrecondition, InvalidArgument, NotFound

OPERATOR = Actor("operator", "uid:0")
SID = spiffeid.parse("spiffe://example.org/agent/a")


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir(mode=0o700)
    return d


def reopen(store: SQLiteDatastore) -> SQLiteDatastore:
    store.close()
    return SQLiteDatastore(store.path)


def by_kind(authorities, kind: str, state: str | None = None):
    return [a for a in authorities.list() if a.kind == kind and (state is None or a.state == state)]


def leaf(authorities, ttl: int = 600):
    return authorities.signer().sign(x509svid.new_key().public_key(), SID, ttl)


def chains(signed, root: x509.Certificate) -> bool:
    leaf_cert, intermediate = signed.chain
    leaf_cert.verify_directly_issued_by(intermediate)
    intermediate.verify_directly_issued_by(root)
    return True


def test_first_start_creates_a_root_for_the_bundle_and_an_intermediate_that_signs(store, data_dir):
    a = make_authorities(store, data_dir)
    [root] = by_kind(a, "root", "active")
    [inter] = by_kind(a, "x509", "active")
    assert [c.public_bytes(Encoding.DER) for c in a.bundle] == [root.cert_der]  # roots only
    assert inter.parent == root.id and root.not_after - root.not_before > 9 * 365 * 86400
    signed = leaf(a)
    assert chains(signed, a.bundle[0])
    assert signed.authority == inter.id
    aki = signed.cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    assert aki.hex() == inter.id
    assert len(by_kind(a, "jwt", "active")) == 1


def test_no_svid_outlives_its_signer(store, data_dir):
    a = make_authorities(store, data_dir, ca_ttl=120)
    signed = leaf(a, ttl=3600)
    assert signed.not_after <= a.signer().not_after
    assert signed.not_after <= dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=121)


def test_the_successor_is_prepared_at_half_life_and_signs_from_two_thirds(store, data_dir):
    a = make_authorities(store, data_dir, ca_ttl=120)
    first = a.signer().id
    changes = []
    a.subscribe(changes.append)
    t0 = time.time()
    a.tick(t0 + 30)
    assert by_kind(a, "x509", "prepared") == [] and changes == []
    a.tick(t0 + 62)
    [prepared] = by_kind(a, "x509", "prepared")
    assert a.signer().id == first and changes == ["crl"]  # published (its CRL) before it signs
    a.tick(t0 + 82)
    assert a.signer().id == prepared.id and changes == ["crl", "signer"]
    [old] = [r for r in a.list() if r.id == first]
    assert old.state == "retired"
    assert {r.id for r, _, _ in a.crl_signers()} >= {first, prepared.id}  # the retired one's CRL stays out


def test_the_schedule_counts_from_creation_not_from_the_backdated_not_before(store, data_dir):
    # ca_ttl 60 s, certificate backdated 30 s: half-life is 30 s after creation, not 15 s (half of 90 s from notBefore).
    a = make_authorities(store, data_dir, ca_ttl=60)
    first = a.signer().id
    assert a.get(first).not_before < a.get(first).created_at  # backdated indeed
    t0 = a.get(first).created_at
    a.tick(t0 + 25)
    assert by_kind(a, "x509", "prepared") == []
    a.tick(t0 + 31)
    assert len(by_kind(a, "x509", "prepared")) == 1
    a.tick(t0 + 38)
    assert a.signer().id == first
    a.tick(t0 + 41)
    assert a.signer().id != first


def test_every_authority_change_is_audited(store, data_dir):
    a = make_authorities(store, data_dir, ca_ttl=120)
    a.tick(time.time() + 62)
    actions = [r.action for r in store.audit_records()]
    assert actions.count("ca.create") == 1 and "ca.prepare" in actions and "ca.activate" in actions


def test_keys_never_reach_the_datastore_in_plaintext(store, data_dir):
    a = make_authorities(store, data_dir)
    signer = a.signer()
    raw = signer.key.private_numbers().private_value.to_bytes(32, "big")
    der = pem.key_pkcs8_der(signer.key)
    blob = store.path.read_bytes() + (store.path.parent / (store.path.name + "-wal")).read_bytes()
    assert raw not in blob and der not in blob


def test_a_restart_keeps_the_root_and_the_active_intermediate(store, data_dir):
    a = make_authorities(store, data_dir)
    root, signer = a.bundle[0], a.signer().id
    store = reopen(store)
    again = make_authorities(store, data_dir)
    assert again.bundle == (root,) and again.signer().id == signer
    store.close()


def test_a_wrong_kek_is_one_clear_line_and_changes_nothing(store, data_dir, monkeypatch):
    make_authorities(store, data_dir)
    before = store.list_authorities()
    monkeypatch.setenv("TESSERA_KEK", base64.b64encode(os.urandom(32)).decode())
    with pytest.raises(ConfigError, match="wrong KEK"):
        make_authorities(store, data_dir)
    assert store.list_authorities() == before


def test_a_kek_that_is_not_32_bytes_of_base64_is_refused(store, data_dir, monkeypatch):
    monkeypatch.setenv("TESSERA_KEK", "not base64!")
    with pytest.raises(ConfigError, match="TESSERA_KEK is not base64"):
        make_authorities(store, data_dir)
    monkeypatch.setenv("TESSERA_KEK", base64.b64encode(b"short").decode())
    with pytest.raises(ConfigError, match="must hold 32 bytes"):
        make_authorities(store, data_dir)


def test_the_ca_of_an_earlier_release_becomes_the_root_and_its_svids_stay_valid(store, data_dir):
    old = write_root(data_dir)  # ca.pem and ca-key.pem, as the earlier release left them
    earlier = old.sign(x509svid.new_key().public_key(), SID, 600)
    from issuer.core.models import IssuedSerial
    store.record_issued([IssuedSerial(earlier.serial_hex, str(SID), "identity", "e1", "sc", 0, 2**31)])
    a = make_authorities(store, data_dir)
    assert a.bundle == (old.cert,)
    assert store.get_issued(earlier.serial_hex).authority == old.id  # its CRL lists it if it is revoked
    assert chains(leaf(a), old.cert)


def test_an_upstream_root_anchors_and_its_key_stays_in_its_file(store, data_dir, tmp_path):
    (tmp_path / "corp").mkdir()
    corp = write_root(tmp_path / "corp")
    a = make_authorities(store, data_dir, ca_cert=tmp_path / "corp" / "ca.pem", ca_key=tmp_path / "corp" / "ca-key.pem")
    [root] = by_kind(a, "root", "active")
    assert root.source == "upstream" and root.sealed_key == b"" and a.bundle == (corp.cert,)
    assert chains(leaf(a), corp.cert)


def test_an_upstream_key_that_does_not_match_its_certificate_is_refused(store, data_dir, tmp_path):
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        write_root(tmp_path / name)
    with pytest.raises(ConfigError, match="ca_key: does not match ca_cert"):
        make_authorities(store, data_dir, ca_cert=tmp_path / "one" / "ca.pem", ca_key=tmp_path / "two" / "ca-key.pem")


def offline_sign(corp: SigningAuthority, csr_path, days: int = 1) -> bytes:
    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    cert = x509svid.build_intermediate(csr.public_key(), "example.org",
                                       dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=days), corp.cert, corp.key)
    return pem.certs_pem([cert])


def test_an_offline_root_waits_for_its_signed_intermediate_and_then_signs(store, data_dir, tmp_path):
    (tmp_path / "corp").mkdir()
    corp = write_root(tmp_path / "corp")
    cfg = dict(ca_cert=tmp_path / "corp" / "ca.pem", ca_offline=True)
    with pytest.raises(ConfigError, match="offline root: no intermediate can sign; sign .*intermediate-.*csr"):
        make_authorities(store, data_dir, **cfg)
    [csr_path] = data_dir.glob("intermediate-*.csr")
    pending_id = csr_path.name[len("intermediate-"):-len(".csr")]
    (data_dir / f"intermediate-{pending_id}.pem").write_bytes(offline_sign(corp, csr_path))
    a = make_authorities(store, data_dir, **cfg)
    assert a.signer().id == pending_id and a.bundle == (corp.cert,)
    assert chains(leaf(a), corp.cert)


def offline_started(store, data_dir, tmp_path, **extra):
    """Authorities under an offline root (the enterprise CA made here), past their first start: the CSR the issuer
    wrote signed at the "offline CA" and dropped beside it. Returns (authorities, the root, its config)."""
    (tmp_path / "corp").mkdir()
    corp = write_root(tmp_path / "corp")
    cfg = dict(ca_cert=tmp_path / "corp" / "ca.pem", ca_offline=True)
    with pytest.raises(ConfigError):
        make_authorities(store, data_dir, **cfg)
    [csr_path] = data_dir.glob("intermediate-*.csr")
    (data_dir / csr_path.name.replace(".csr", ".pem")).write_bytes(offline_sign(corp, csr_path))
    return make_authorities(store, data_dir, **cfg, **extra), corp, cfg


def test_an_offline_prepare_gives_a_csr_and_activate_checks_the_certificate(store, data_dir, tmp_path):
    a, corp, cfg = offline_started(store, data_dir, tmp_path)
    [csr_path] = data_dir.glob("intermediate-*.csr")
    first = a.signer().id
    nxt, csr_pem = a.prepare("x509", OPERATOR, "next one")
    assert nxt.cert_der == b"" and b"CERTIFICATE REQUEST" in csr_pem
    (tmp_path / "next.csr").write_bytes(csr_pem)
    # A certificate for another key, or not signed by the root: refused, nothing changed.
    other = offline_sign(corp, csr_path)
    with pytest.raises(InvalidArgument, match="not for the prepared intermediate"):
        a.activate(nxt.id, other, OPERATOR, "wrong cert")
    (tmp_path / "rogue").mkdir()
    with pytest.raises(InvalidArgument, match="not signed by root"):
        a.activate(nxt.id, offline_sign(write_root(tmp_path / "rogue"), tmp_path / "next.csr"), OPERATOR, "rogue")
    assert a.signer().id == first and a.get(nxt.id).state == "prepared"
    a.activate(nxt.id, offline_sign(corp, tmp_path / "next.csr"), OPERATOR, "signed offline")
    assert a.signer().id == nxt.id and a.get(first).state == "retired"


def test_an_offline_root_cannot_revoke_what_it_signed_here(store, data_dir, tmp_path):
    a, corp, _ = offline_started(store, data_dir, tmp_path)
    first = a.signer().id
    nxt, csr_pem = a.prepare("x509", OPERATOR, "next")
    (tmp_path / "n.csr").write_bytes(csr_pem)
    a.activate(nxt.id, offline_sign(corp, tmp_path / "n.csr"), OPERATOR, "next")
    with pytest.raises(FailedPrecondition, match="offline root"):
        a.revoke(first, True, OPERATOR, "compromised")


def test_taint_activates_a_successor_at_once_and_marks_the_tainted_one(store, data_dir):
    a = make_authorities(store, data_dir)
    first = a.signer().id
    changes = []
    a.subscribe(changes.append)
    assert a.taint(first, OPERATOR, "key exposed in a backup") == [first]
    assert a.signer().id != first and a.get(first).state == "tainted" and changes == ["taint"]
    assert first in {r.id for r, _, _ in a.crl_signers()}  # still publishes its CRL until revoked
    with pytest.raises(FailedPrecondition, match="already tainted"):
        a.taint(first, OPERATOR, "again")


def test_revoke_is_refused_while_active_or_depended_on_unless_forced(store, data_dir):
    from issuer.core.models import IssuedSerial

    a = make_authorities(store, data_dir)
    first = a.signer().id
    with pytest.raises(FailedPrecondition, match="active .*taint it first"):
        a.revoke(first, False, OPERATOR, "compromised")
    signed = leaf(a)
    store.record_issued([IssuedSerial(signed.serial_hex, str(SID), "identity", "e1", "sc", int(time.time()),
                                      int(signed.not_after.timestamp()), authority=first)])
    a.taint(first, OPERATOR, "compromised")
    with pytest.raises(FailedPrecondition, match="1 unexpired certificates depend on"):
        a.revoke(first, False, OPERATOR, "compromised")
    assert a.get(first).state == "tainted"
    revoked = a.revoke(first, True, OPERATOR, "compromised")
    assert revoked.state == "revoked" and a.signer().id != first
    # Its own CRL goes on until it expires (verifiers ask for it before reaching the root's, which withdraws it).
    assert first in {r.id for r, _, _ in a.crl_signers()}


def test_the_only_root_cannot_be_revoked_or_tainted_without_a_successor(store, data_dir):
    a = make_authorities(store, data_dir)
    [root] = by_kind(a, "root")
    with pytest.raises(FailedPrecondition):
        a.revoke(root.id, True, OPERATOR, "no")
    with pytest.raises(FailedPrecondition, match="prepare a new root"):
        a.taint(root.id, OPERATOR, "no")
    assert a.get(root.id).state == "active"


def test_root_rotation_publishes_the_new_root_before_it_signs(store, data_dir):
    a = make_authorities(store, data_dir)
    old_root = a.bundle[0]
    new, _ = a.prepare("root", OPERATOR, "yearly rotation")
    assert len(a.bundle) == 2 and chains(leaf(a), old_root)  # in the bundle, not signing yet
    a.activate(new.id, b"", OPERATOR, "reached every sidecar")
    new_root = a.certificate(new.id)
    assert chains(leaf(a), new_root) and old_root in a.bundle  # both trusted while both in the bundle
    old_id = x509svid.authority_id(old_root.public_key())
    a.revoke(old_id, True, OPERATOR, "rotation done")
    assert a.bundle == (new_root,)


def test_unknown_authority_ids_are_not_found(store, data_dir):
    a = make_authorities(store, data_dir)
    for call in (lambda: a.taint("ffff", OPERATOR, "x"), lambda: a.revoke("00" * 20, False, OPERATOR, "x"),
                 lambda: a.activate("nope", b"", OPERATOR, "x")):
        with pytest.raises(NotFound):
            call()


def test_a_restart_at_every_step_loses_nothing(store, data_dir):
    a = make_authorities(store, data_dir)
    first = a.signer().id
    prepared, _ = a.prepare("x509", OPERATOR, "next")
    store = reopen(store)
    a = make_authorities(store, data_dir)
    assert a.get(prepared.id).state == "prepared" and a.signer().id == first
    a.activate(prepared.id, b"", OPERATOR, "go")
    store = reopen(store)
    a = make_authorities(store, data_dir)
    assert a.signer().id == prepared.id
    a.taint(prepared.id, OPERATOR, "exposed")
    after_taint = a.signer().id
    store = reopen(store)
    a = make_authorities(store, data_dir)
    assert a.get(prepared.id).state == "tainted" and a.signer().id == after_taint
    store.close()


def test_a_root_that_has_expired_refuses_the_start(store, data_dir, tmp_path):
    key = x509svid.new_key()
    cert = x509svid.build_ca(key, "example.org", dt.timedelta(seconds=-5))
    (tmp_path / "corp").mkdir()
    (tmp_path / "corp" / "ca.pem").write_bytes(pem.certs_pem([cert]))
    (tmp_path / "corp" / "ca-key.pem").write_bytes(pem.key_pem(key))
    (tmp_path / "corp" / "ca-key.pem").chmod(0o600)
    with pytest.raises(ConfigError, match="expired"):
        make_authorities(store, data_dir, ca_cert=tmp_path / "corp" / "ca.pem", ca_key=tmp_path / "corp" / "ca-key.pem")


def test_a_taint_that_cannot_name_a_successor_changes_nothing(store, data_dir, tmp_path):
    a, _, _ = offline_started(store, data_dir, tmp_path)
    first = a.signer().id
    before = store.list_authorities()
    with pytest.raises(ConfigError, match="offline root: no intermediate can sign"):
        a.taint(first, OPERATOR, "exposed")  # the successor it prepares needs the offline root's signature first
    assert a.get(first).state == "active" and a.signer().id == first
    assert [r for r in store.list_authorities() if r.id != first and r.state == "prepared"] == []
    assert [(r.id, r.state) for r in store.list_authorities()] == [(r.id, r.state) for r in before]


def test_under_an_offline_root_one_request_waits_at_a_time(store, data_dir, tmp_path):
    a, _, _ = offline_started(store, data_dir, tmp_path, ca_ttl=120)
    a.tick(time.time() + 200)  # past half-life (a day's certificate, but the schedule reads its own lifetime)
    a.tick(time.time() + 86400 * 0.6)
    [waiting] = [r for r in a.list() if r.kind == "x509" and r.state == "prepared"]
    assert (data_dir / f"intermediate-{waiting.id}.csr").exists()  # the schedule wrote its request
    again, csr_pem = a.prepare("x509", OPERATOR, "operator asks")
    assert again.id == waiting.id and b"CERTIFICATE REQUEST" in csr_pem


def test_a_new_upstream_root_signs_a_new_intermediate_and_the_old_root_stays_trusted_until_revoked(store, data_dir,
                                                                                                    tmp_path):
    for name in ("old", "new"):
        (tmp_path / name).mkdir()
    old, new = write_root(tmp_path / "old"), write_root(tmp_path / "new")
    files = lambda n: dict(ca_cert=tmp_path / n / "ca.pem", ca_key=tmp_path / n / "ca-key.pem")  # noqa: E731
    a = make_authorities(store, data_dir, **files("old"))
    before = a.signer().id
    store = reopen(store)
    a = make_authorities(store, data_dir, **files("new"))  # the operator configured the new enterprise root
    assert a.signer().id != before and chains(leaf(a), new.cert)
    assert set(a.bundle) == {old.cert, new.cert}  # SVIDs under the old one still verify until it is revoked
    a.revoke(x509svid.authority_id(old.cert.public_key()), True, OPERATOR, "rotated")
    assert a.bundle == (new.cert,)
    store.close()
