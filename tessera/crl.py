"""The one CRL helper: build the issuer's signed X.509 v2 CRL, and parse and verify it on any host.

Building encodes the TBSCertList in DER here and has `cryptography` sign it: at 100k
serials, `cryptography`'s CRL builder (one Python object per entry, then re-encoding
them all) took longer than the issuer's 500 ms budget. The structure written here is
narrow and fully specified (RFC 5280 5.1); extension values come from `cryptography`'s
own encoders, and tests/test_verifier.py checks the result byte for byte against the
builder's and with openssl. Readers turn a CRL into a set of serials once, so a
check is a set lookup, never a scan of the CRL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from tessera import der as x690, x509svid  # (this module has its own der())
from tessera.der import tlv

# RFC 5280 CRLReason names accepted from operators (removeFromCRL and certificateHold are for
# suspensions, which Tessera does not do).
REASON_CODES: dict[str, x509.ReasonFlags] = {
    "unspecified": x509.ReasonFlags.unspecified,
    "keyCompromise": x509.ReasonFlags.key_compromise,
    "affiliationChanged": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessationOfOperation": x509.ReasonFlags.cessation_of_operation,
    "privilegeWithdrawn": x509.ReasonFlags.privilege_withdrawn,
}


class CrlError(ValueError):
    """A CRL that must not be applied: unparsable, wrongly signed, or older than the one held."""


@dataclass(frozen=True)
class Revoked:
    serial: str  # lowercase hex
    revoked_at: int  # unix seconds
    reason_code: str = "unspecified"


# -- DER (X.690) for the TBSCertList ---------------------------------------------------------

_OID_CRL_NUMBER = x690.oid("2.5.29.20")
_OID_REASON_CODE = x690.oid("2.5.29.21")
_OID_AUTHORITY_KEY_IDENTIFIER = x690.oid("2.5.29.35")


def _extension(oid: bytes, value: x509.ExtensionType) -> bytes:
    """A non-critical Extension holding `value`'s DER (as `cryptography` encodes it)."""
    return x690.extension(oid, value.public_bytes())


# RFC 6979: the same TBSCertList always gets the same signature, so the same input gives the same CRL.
_ECDSA = ec.ECDSA(hashes.SHA256(), deterministic_signing=True)
_VERSION_2 = b"\x02\x01\x01"
# crlEntryExtensions per reason; RFC 5280 5.3.1: absent rather than "unspecified" (as for an unknown name).
_REASON_EXTENSIONS: dict[str, bytes] = {
    name: b"" if flag is x509.ReasonFlags.unspecified
    else tlv(0x30, _extension(_OID_REASON_CODE, x509.CRLReason(flag)))
    for name, flag in REASON_CODES.items()
}
_MAX_SERIAL = 1 << 159  # RFC 5280 4.1.2.2: at most 20 octets, positive
_SECONDS = [b"%02dZ" % s for s in range(60)]  # how every Time ends


def _entry_der(r: Revoked, minutes: dict[int, bytes]) -> bytes:
    """r's revokedCertificates element, encoded once and kept on the record (it never changes).

    `minutes` holds each revocation minute's Time encoding without its "SSZ" (one gmtime per minute
    instead of one per entry: formatting dates is most of the cost of a cold build).
    """
    n = int(r.serial, 16)
    if not 0 < n < _MAX_SERIAL:
        raise ValueError(f"serial {r.serial!r} is not a positive number of at most 159 bits")
    serial = n.to_bytes(n.bit_length() // 8 + 1, "big")  # room for the sign bit: 0x00 pad when needed
    minute, second = divmod(int(r.revoked_at), 60)
    head = minutes.get(minute)
    if head is None:
        head = minutes[minute] = x690.time(minute * 60)[:-3]
    body = (b"\x02" + bytes((len(serial),)) + serial + head + _SECONDS[second]
            + _REASON_EXTENSIONS.get(r.reason_code, b""))
    encoded = bytes((0x30, len(body))) + body  # at most 22 + 17 + 14 octets: a one-octet length
    r.__dict__["_der"] = encoded  # a cache, not part of the value (eq/hash ignore it); frozen guards fields only
    return encoded


def build(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, revoked: Sequence[Revoked], number: int,
          this_update: float, next_update: float) -> bytes:
    """The DER of a signed v2 CRL with CRL number, authority key identifier and a reason code per entry.

    Each Revoked encodes its entry once and keeps it: the issuer holds its records between rebuilds,
    so a rebuild after one more revocation encodes one entry and signs. Same input, same bytes.
    """
    minutes: dict[int, bytes] = {}
    entries = b"".join([getattr(r, "_der", None) or _entry_der(r, minutes) for r in revoked])
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    extensions = (_extension(_OID_CRL_NUMBER, x509.CRLNumber(number))
                  + _extension(_OID_AUTHORITY_KEY_IDENTIFIER, aki))
    tbs = tlv(0x30, b"".join([
        _VERSION_2,
        x690.ECDSA_WITH_SHA256,
        ca_cert.subject.public_bytes(),
        x690.time(int(this_update)),
        x690.time(int(next_update)),
        tlv(0x30, entries) if entries else b"",  # RFC 5280 5.1.2.6: absent when nothing is revoked
        tlv(0xA0, tlv(0x30, extensions)),
    ]))
    return x690.signed(tbs, ca_key, _ECDSA)


def der(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(Encoding.DER)


def pem(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(Encoding.PEM)


def load(data: bytes) -> x509.CertificateRevocationList:
    """DER or PEM; CrlError if it is neither."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError as e:
        raise CrlError(f"not a CRL: {e}") from None


def number_of(crl: x509.CertificateRevocationList) -> int:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        raise CrlError("CRL has no CRL number") from None


def verify(crl: x509.CertificateRevocationList, bundle: Iterable[x509.Certificate]) -> x509.Certificate:
    """The CA of `bundle` (roots, or roots and validated intermediates) that signed `crl`; CrlError if none did."""
    try:
        issuer = crl.issuer  # parsed lazily: a malformed Name surfaces here
    except ValueError as e:
        raise CrlError(f"CRL issuer name is malformed: {e}") from None
    for ca in bundle:
        if ca.subject != issuer:
            continue
        try:
            if crl.is_signature_valid(ca.public_key()):
                return ca
        except (InvalidSignature, TypeError, ValueError):
            continue
    raise CrlError("CRL signature does not verify against the trust bundle or a known intermediate")


def serials(crl: x509.CertificateRevocationList) -> frozenset[str]:
    """Revoked serials as lowercase hex, for set lookups."""
    return frozenset(x509svid.serial_hex(r.serial_number) for r in crl)


def check_newer(crl: x509.CertificateRevocationList, current_number: int | None) -> int:
    """The CRL's number if it may replace a CRL numbered `current_number`; CrlError if lower."""
    n = number_of(crl)
    if current_number is not None and n < current_number:
        raise CrlError(f"CRL number {n} is lower than the current {current_number}")
    return n


@dataclass(frozen=True)
class Accepted:
    der: bytes
    number: int
    serials: frozenset  # in the form the caller asked for (see accept)
    crl: x509.CertificateRevocationList
    authority: str  # id of the signer (x509svid.authority_id): CRLs are held one per authority
    signer: x509.Certificate


def accept(data: bytes, signers: Sequence[x509.Certificate], held: Mapping[str, Accepted],
           serial_set: Callable[[x509.CertificateRevocationList], frozenset] = serials) -> Accepted:
    """The one rule for taking a CRL: signed by one of `signers` and not older than the CRL `held` from
    the same authority (held: authority id -> Accepted).

    Returns the held Accepted itself when `data` is a CRL already held (every resync resends them: nothing
    is parsed or verified again); CrlError when it must be refused (unparsable, signed by no signer, a
    lower number, or the held number reused with other content). `serial_set` turns the CRL into the set
    its reader looks serials up in (hex strings by default), built once.
    """
    for a in held.values():
        if a.der == data:
            return a
    parsed = load(data)
    signer = verify(parsed, signers)
    authority = x509svid.authority_id(signer.public_key())
    current = held.get(authority)
    number = check_newer(parsed, current.number if current is not None else None)
    encoded = der(parsed)
    if current is not None and number == current.number:
        if encoded != current.der:
            raise CrlError(f"CRL number {number} reused with different content")
        return current
    return Accepted(encoded, number, serial_set(parsed), parsed, authority, signer)


_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.S)


def load_all(data: bytes) -> list[x509.CertificateRevocationList]:
    """Every CRL in PEM text (one after another, as crl.pem holds them; text between them, such as `tessera crl
    show`'s headings, is skipped), or the one CRL in DER; CrlError if one of them is not a CRL."""
    if b"-----BEGIN" not in data:
        return [load(data)]
    blocks = _PEM_CRL.findall(data)
    if not blocks:
        raise CrlError("no PEM CRL found")
    return [load(b) for b in blocks]


def pem_all(crls: Iterable[x509.CertificateRevocationList]) -> bytes:
    """CRLs as PEM, one after another: what crl.pem holds and openssl's -CRLfile and nginx's ssl_crl read."""
    return b"".join(pem(c) for c in crls)
