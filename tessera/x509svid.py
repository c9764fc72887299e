"""The one X.509-SVID certificate profile, and reading SPIFFE IDs back from certificates.

Leaf: exactly one URI SAN (the SPIFFE ID), cA=false, critical keyUsage
digitalSignature, EKU serverAuth+clientAuth (spiffe-tls mTLS needs both),
random 159-bit serial, notBefore backdated for clock skew.
"""

from __future__ import annotations

import datetime as dt
from typing import Sequence

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from tessera import der, spiffeid
from tessera.der import tlv

CLOCK_SKEW = dt.timedelta(seconds=30)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def serial_hex(serial: int) -> str:
    return format(serial, "x")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def authority_id(public_key) -> str:
    """An authority's id: its key's subject key identifier (RFC 5280 4.2.1.2, method 1) in hex, which every
    certificate and CRL it signs carries as the authority key identifier."""
    return x509.SubjectKeyIdentifier.from_public_key(public_key).digest.hex()


_CA_KU = x509.KeyUsage(
    digital_signature=False, content_commitment=False, key_encipherment=False,
    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
    encipher_only=False, decipher_only=False,
)


def _authority_name(role: str, trust_domain: str, public_key) -> x509.Name:
    # Each authority gets its own name: CRLs and chains are matched to their signer by name first.
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tessera"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"Tessera {role} {trust_domain} {authority_id(public_key)[:16]}"),
    ])


def _ca_builder(subject: x509.Name, issuer: x509.Name, public_key, trust_domain: str, not_before: dt.datetime,
                not_after: dt.datetime, path_length: int | None) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_CA_KU, critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]),
                       critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def build_ca(key: ec.EllipticCurvePrivateKey, trust_domain: str, ttl: dt.timedelta) -> x509.Certificate:
    """A self-signed root: what bundles hold. It signs intermediates (pathLen 1 leaves room for exactly them)."""
    now = _now()
    name = _authority_name("root", trust_domain, key.public_key())
    return _ca_builder(name, name, key.public_key(), trust_domain, now - CLOCK_SKEW, now + ttl, 1).sign(
        key, hashes.SHA256())


def build_intermediate(public_key, trust_domain: str, not_after: dt.datetime, root_cert: x509.Certificate,
                       root_key) -> x509.Certificate:
    """A signing authority under `root_cert`: it signs SVIDs and its own CRL, never another CA (pathLen 0)."""
    now = _now()
    b = _ca_builder(_authority_name("signing", trust_domain, public_key), root_cert.subject, public_key,
                    trust_domain, now - CLOCK_SKEW, min(not_after, root_cert.not_valid_after_utc), 0)
    b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False)
    return b.sign(root_key, hashes.SHA256())


def intermediate_csr(key: ec.EllipticCurvePrivateKey, trust_domain: str) -> x509.CertificateSigningRequest:
    """The request an offline root signs: the subject and extensions Tessera would give the intermediate."""
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_authority_name("signing", trust_domain, key.public_key()))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_KU, critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]),
                       critical=False)
        .sign(key, hashes.SHA256())
    )


_LEAF_KU = x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=False,
    data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
    encipher_only=False, decipher_only=False,
)
_LEAF_EKU = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
_LEAF_BC = x509.BasicConstraints(ca=False, path_length=None)
# A leaf's TBSCertificate is written here in DER and signed by `cryptography` (der.signed): handing
# CertificateBuilder its Python objects cost a signing worker ~40 us per leaf beyond the signature itself.
# The values are `cryptography`'s own encodings; test_leaf_is_what_the_builder_setters_build pins the
# result byte for byte to what CertificateBuilder builds from the same fields.
_V3 = tlv(0xA0, der.integer(2))
_EMPTY_NAME_DER = tlv(0x30, b"")
# Every leaf's first three extensions, in order, with their criticality (the SAN and the AKI follow).
_LEAF_EXTENSIONS = b"".join([
    der.extension(der.oid(ExtensionOID.BASIC_CONSTRAINTS.dotted_string), _LEAF_BC.public_bytes(), critical=True),
    der.extension(der.oid(ExtensionOID.KEY_USAGE.dotted_string), _LEAF_KU.public_bytes(), critical=True),
    der.extension(der.oid(ExtensionOID.EXTENDED_KEY_USAGE.dotted_string), _LEAF_EKU.public_bytes()),
])
_OID_SAN = der.oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME.dotted_string)
_OID_AKI = der.oid(ExtensionOID.AUTHORITY_KEY_IDENTIFIER.dotted_string)
_MAX_SERIAL = 1 << 159  # RFC 5280 4.1.2.2: at most 20 octets, positive


class LeafIssuer:
    """What every leaf one authority signs repeats, in DER, computed once: its name, its key identifier
    extension, its notAfter (a leaf never outlives its signer)."""

    __slots__ = ("key", "name_der", "aki_der", "not_after")

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey,
                 aki: x509.AuthorityKeyIdentifier):
        self.key = key
        self.name_der = cert.subject.public_bytes()
        self.aki_der = der.extension(_OID_AKI, aki.public_bytes())
        self.not_after = cert.not_valid_after_utc


def _ia5(text: str) -> bytes:
    try:
        return text.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError(f"{text!r} is not ASCII (an IA5String); DNS names go in as A-labels") from None


def leaf_der(
    issuer: LeafIssuer,
    *,
    public_key,
    spiffe_id: spiffeid.SpiffeId,
    not_after: dt.datetime,
    serial: int,
    dns_names: Sequence[str] = (),
    extra_extensions: Sequence[x509.ExtensionType] = (),
) -> tuple[bytes, int]:
    """Sign an X.509-SVID for `spiffe_id`: its DER and its notAfter (unix seconds). The subject is empty, so the
    SAN is critical."""
    if not 0 < serial < _MAX_SERIAL:
        raise ValueError("a leaf's serial must be positive and at most 159 bits")
    now = _now()
    # Backdate for clock skew, but never by more than a tenth of the lifetime: a short-lived SVID
    # must not spend most of its validity in the past.
    backdate = min(CLOCK_SKEW, max(dt.timedelta(0), (not_after - now) / 10))
    last = int(min(not_after, issuer.not_after).timestamp())  # X.509 times count whole seconds
    sans = tlv(0x86, _ia5(str(spiffe_id))) + b"".join([tlv(0x82, _ia5(d)) for d in dns_names])
    extensions = [_LEAF_EXTENSIONS, der.extension(_OID_SAN, tlv(0x30, sans), critical=True), issuer.aki_der]
    extensions += [der.extension(der.oid(e.oid.dotted_string), e.public_bytes()) for e in extra_extensions]
    tbs = tlv(0x30, b"".join([
        _V3,
        der.integer(serial),
        der.ECDSA_WITH_SHA256,
        issuer.name_der,
        tlv(0x30, der.time(int((now - backdate).timestamp())) + der.time(last)),
        _EMPTY_NAME_DER,
        public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo),
        tlv(0xA3, tlv(0x30, b"".join(extensions))),
    ]))
    return der.signed(tbs, issuer.key), last


def build_leaf(
    *,
    public_key,
    spiffe_id: spiffeid.SpiffeId,
    not_after: dt.datetime,
    ca_cert: x509.Certificate,
    ca_key,
    serial: int,
    ca_aki: x509.AuthorityKeyIdentifier,
    dns_names: Sequence[str] = (),
    extra_extensions: Sequence[x509.ExtensionType] = (),
) -> x509.Certificate:
    """leaf_der for a CA given by its certificate and key, as a parsed certificate."""
    cert_der, _ = leaf_der(LeafIssuer(ca_cert, ca_key, ca_aki), public_key=public_key, spiffe_id=spiffe_id,
                           not_after=not_after, serial=serial, dns_names=dns_names,
                           extra_extensions=extra_extensions)
    return x509.load_der_x509_certificate(cert_der)


def spiffe_id_of(cert: x509.Certificate) -> spiffeid.SpiffeId:
    """The SPIFFE ID in a leaf's single URI SAN; ValueError if there is not exactly one."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise ValueError("certificate has no SAN extension") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise ValueError(f"certificate must have exactly one URI SAN, has {len(uris)}")
    try:
        return spiffeid.parse(uris[0])
    except spiffeid.InvalidSpiffeId as e:  # callers (verifier, issuer peer check) catch ValueError
        raise ValueError(f"certificate URI SAN is not a SPIFFE ID: {e.message}") from None


def verified_key(csr_der: bytes) -> ec.EllipticCurvePublicKey:
    """The public key of a DER CSR whose self-signature verifies (proof of key possession); ValueError naming the
    problem otherwise. The key is loaded once: loading it again cost a signing worker ~6 us per CSR."""
    try:
        csr = x509.load_der_x509_csr(csr_der)
    except x509.InvalidVersion as e:  # not a ValueError, and a peer chooses it
        raise ValueError(f"CSR version is not supported: {e}") from None
    try:
        valid = csr.is_signature_valid
        pub = csr.public_key()
    except UnsupportedAlgorithm as e:  # an unknown curve or key type: the peer's input, not our fault
        raise ValueError(f"CSR key or signature algorithm is not supported: {e}") from None
    if not valid:
        raise ValueError("CSR signature does not verify")
    if not isinstance(pub, ec.EllipticCurvePublicKey) or not isinstance(pub.curve, (ec.SECP256R1, ec.SECP384R1)):
        raise ValueError("CSR key must be ECDSA P-256 or P-384")
    return pub


def csr_public_key(csr_der: bytes):
    """The public key of a verified CSR; InvalidArgument naming the problem otherwise."""
    from tessera.errors import InvalidArgument

    if not csr_der:
        raise InvalidArgument("csr is required")
    try:
        return verified_key(csr_der)
    except ValueError as e:
        raise InvalidArgument(f"invalid CSR: {e}") from None


def make_csr(key) -> bytes:
    """A minimal CSR: the issuer takes only the key from it; identity comes from the entry."""
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    return csr.public_bytes(Encoding.DER)
