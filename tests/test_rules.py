"""Pure rules: SPIFFE ID syntax, selectors, durations, and the X.509-SVID profile."""

import datetime as dt

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from cautil import write_root
from tessera import spiffeid, taskext, x509svid
from tessera.durations import parse_duration
from tessera.errors import InvalidArgument
from tessera.selectors import matches, parse_selector


@pytest.mark.parametrize("value", [
    "spiffe://example.org/a", "spiffe://example.org", "spiffe://a.b-c_d/x/Y.z-_", "spiffe://td/" + "a" * 2000,
])
def test_valid_spiffe_ids_parse(value):
    assert str(spiffeid.parse(value)) == value


@pytest.mark.parametrize("value", [
    "", "spiffe://", "spiffe://Example.org/a", "spiffe://example.org/", "spiffe://example.org//a",
    "spiffe://example.org/a/./b", "spiffe://example.org/a/../b", "spiffe://example.org/a%20b",
    "spiffe://user@example.org/a", "spiffe://example.org:443/a", "spiffe://example.org/a?q=1",
    "spiffe://example.org/a#f", "SPIFFE://example.org/a", "spiffe://td/" + "a" * 2050,
])
def test_invalid_spiffe_ids_are_rejected(value):
    with pytest.raises(InvalidArgument):
        spiffeid.parse(value)


def test_workload_ids_need_a_path():
    with pytest.raises(InvalidArgument, match="needs a path"):
        spiffeid.parse("spiffe://example.org", require_path=True)


def test_selectors_are_canonical_and_match_only_as_a_whole_set():
    assert parse_selector("unix:sha256:" + "AB" * 32) == "unix:sha256:" + "ab" * 32
    assert parse_selector("unix:path:/usr/bin/python3:odd") == "unix:path:/usr/bin/python3:odd"
    have = frozenset({"unix:uid:1000", "unix:gid:1000"})
    assert matches(("unix:uid:1000",), have)
    assert not matches(("unix:uid:1000", "unix:user:bob"), have)
    assert not matches((), have)


@pytest.mark.parametrize("text, seconds", [("30s", 30), ("10m", 600), ("24h", 86400), ("30d", 2592000), (45, 45)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "10", "-5m", "0s", "1w", "1.5h", True])
def test_bad_durations(text):
    with pytest.raises(InvalidArgument):
        parse_duration(text)


def test_leaf_profile_matches_the_x509_svid_standard(tmp_path):
    ca = write_root(tmp_path)
    key = x509svid.new_key()
    signed = ca.sign(key.public_key(), spiffeid.parse("spiffe://example.org/agent/a"), 600)
    cert = signed.cert
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and san.value.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://example.org/agent/a"]
    assert cert.subject == x509.Name([])
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign and not ku.value.crl_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.serial_number.bit_length() >= 64
    now = dt.datetime.now(dt.timezone.utc)
    assert cert.not_valid_before_utc < now - dt.timedelta(seconds=10)  # backdated for clock skew
    assert abs((cert.not_valid_after_utc - now).total_seconds() - 600) < 5
    cert.verify_directly_issued_by(ca.cert)


_TASK = taskext.TaskBinding("task-1", ("read:docs", "write:notes"), "entry-1", "team-a")
_FAR = dt.datetime(2050, 1, 1, 0, 0, 5, tzinfo=dt.timezone.utc)  # GeneralizedTime from 2050 on


@pytest.mark.parametrize("dns_names,extra,serial,not_after", [
    ((), (), None, None),
    (("issuer.example.org",), (), None, None),
    (("a.example.org", "b.example.org"), (), 0x80, None),  # a serial whose top bit needs a leading 0x00
    ((), (taskext.encode(_TASK),), 1, None),
    ((), (taskext.encode(_TASK),), (1 << 159) - 1, _FAR),
])
def test_leaf_is_what_the_builder_setters_build(tmp_path, dns_names, extra, serial, not_after):
    """build_leaf writes the TBSCertificate in DER itself: it must be byte for byte the one CertificateBuilder's
    documented setters build from the same values, whatever the SANs, extensions, serial and dates."""
    from cryptography.hazmat.primitives import hashes

    ca = write_root(tmp_path, days=40 * 366)
    key = x509svid.new_key()
    sid = "spiffe://example.org/agent/a"
    serial = serial or x509.random_serial_number()
    not_after = not_after or dt.datetime.now(dt.timezone.utc).replace(microsecond=0) + dt.timedelta(seconds=600)
    cert = x509svid.build_leaf(public_key=key.public_key(), spiffe_id=spiffeid.parse(sid), not_after=not_after,
                               ca_cert=ca.cert, ca_key=ca.key, serial=serial, ca_aki=ca._aki, dns_names=dns_names,
                               extra_extensions=extra)
    reference = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(sid),
                                                    *(x509.DNSName(d) for d in dns_names)]), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    for ext in extra:
        reference = reference.add_extension(ext, critical=False)
    reference = reference.sign(ca.key, hashes.SHA256())
    assert cert.tbs_certificate_bytes == reference.tbs_certificate_bytes
    assert cert.signature_algorithm_oid == reference.signature_algorithm_oid
    cert.verify_directly_issued_by(ca.cert)
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc) > dt.timedelta(0)


def test_leaf_with_a_dns_name_that_is_not_ascii_is_refused(tmp_path):
    ca = write_root(tmp_path)
    with pytest.raises(ValueError, match="not ASCII"):
        ca.sign(x509svid.new_key().public_key(), spiffeid.parse("spiffe://example.org/a"), 600,
                dns_names=["bücher.example"])


SID_A = "spiffe://example.org/a"


@pytest.mark.parametrize("serial", [-5, 0, 1 << 159])
def test_leaf_serial_outside_what_the_builder_setter_allows_is_refused(tmp_path, serial):
    ca = write_root(tmp_path)
    with pytest.raises(ValueError, match="serial"):
        x509svid.build_leaf(public_key=x509svid.new_key().public_key(), spiffe_id=spiffeid.parse(SID_A),
                            not_after=dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=60), ca_cert=ca.cert,
                            ca_key=ca.key, serial=serial, ca_aki=ca._aki)


def test_leaf_lifetime_never_exceeds_the_cap(tmp_path):
    ca = write_root(tmp_path)
    cap = dt.datetime.now(dt.timezone.utc).replace(microsecond=0) + dt.timedelta(seconds=60)
    signed = ca.sign(x509svid.new_key().public_key(), spiffeid.parse("spiffe://example.org/a"), 3600,
                     not_after_cap=cap)
    assert signed.not_after == cap


def test_kek_file_is_private_and_keys_in_the_store_are_sealed(tmp_path, store):
    from cautil import make_authorities

    authorities = make_authorities(store, tmp_path / "data")
    assert (tmp_path / "data" / "kek").stat().st_mode & 0o777 == 0o600
    for a in store.list_authorities():
        assert a.sealed_key and b"PRIVATE KEY" not in a.sealed_key
    root = next(a for a in authorities.list() if a.kind == "root")
    cert = authorities.certificate(root.id)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
