"""The one CRL helper: build the issuer's signed X.509 v2 CRL, and parse and verify it on any host.

Building passes every revoked entry to the builder at once: adding them one by
one through `CertificateRevocationListBuilder.add_revoked_certificate` copies the
list each time (quadratic; seconds at 100k serials). Readers turn a CRL into a
set of hex serials once, so a check is a set lookup, never a scan of the CRL.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Iterable, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtensionOID

from tessera import x509svid

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

    def _build_entry(self, dates: dict, reasons: dict) -> x509.RevokedCertificate:
        """This record's CRL entry, built once and kept on the record (it never changes)."""
        when = dates.get(self.revoked_at)
        if when is None:
            when = dates[self.revoked_at] = _utc(self.revoked_at).replace(tzinfo=None)
        exts = reasons.get(self.reason_code)
        if exts is None:
            flag = reason_flag(self.reason_code)
            # RFC 5280 5.3.1: the reason code extension should be absent rather than "unspecified".
            exts = reasons[self.reason_code] = (
                [] if flag is x509.ReasonFlags.unspecified
                else [x509.Extension(x509.CRLReason.oid, False, x509.CRLReason(flag))])
        # One constructor call: the chained builder methods would copy the builder three times.
        entry = x509.RevokedCertificateBuilder(int(self.serial, 16), when, exts).build()
        object.__setattr__(self, "_entry", entry)  # a cache, not part of the value (eq/hash ignore it)
        return entry


def reason_flag(name: str) -> x509.ReasonFlags:
    return REASON_CODES.get(name, x509.ReasonFlags.unspecified)


def _utc(t: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(int(t), dt.timezone.utc)


def build(ca_cert: x509.Certificate, ca_key, revoked: Sequence[Revoked], number: int, this_update: float,
          next_update: float) -> x509.CertificateRevocationList:
    """A signed v2 CRL with CRL number, authority key identifier and a reason code per entry."""
    # At 100k entries the per-entry Python cost dominates. Each Revoked builds its CRL entry once and
    # keeps it (the issuer holds its Revoked records between rebuilds, so a rebuild after one more
    # revocation builds one entry, not all of them); new entries share their date and reason
    # extension objects, which repeat.
    dates: dict[int, dt.datetime] = {}
    reasons: dict[str, list[x509.Extension]] = {}
    entries = []
    for r in revoked:
        entry = r.__dict__.get("_entry")
        if entry is None:
            entry = r._build_entry(dates, reasons)
        entries.append(entry)
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    builder = x509.CertificateRevocationListBuilder(
        issuer_name=ca_cert.subject,
        last_update=_utc(this_update),
        next_update=_utc(next_update),
        extensions=[
            x509.Extension(ExtensionOID.CRL_NUMBER, False, x509.CRLNumber(number)),
            x509.Extension(ExtensionOID.AUTHORITY_KEY_IDENTIFIER, False, aki),
        ],
        revoked_certificates=entries,  # the whole list in one step (see the module docstring)
    )
    return builder.sign(ca_key, hashes.SHA256())


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
    """The bundle CA that signed `crl`; CrlError if none did."""
    for ca in bundle:
        if ca.subject != crl.issuer:
            continue
        try:
            if crl.is_signature_valid(ca.public_key()):
                return ca
        except (InvalidSignature, TypeError, ValueError):
            continue
    raise CrlError("CRL signature does not verify against the trust bundle")


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
    serials: frozenset[str]
    crl: x509.CertificateRevocationList


def accept(data: bytes, bundle: Iterable[x509.Certificate], current_number: int | None,
           current_der: bytes | None) -> Accepted | None:
    """The one rule for taking a CRL over the one held: signed by the bundle and not older.

    None when it is the CRL already held; CrlError when it must be refused (unparsable, signed by
    another key, a lower number, or the current number reused with other content).
    """
    parsed = load(data)
    verify(parsed, bundle)
    number = check_newer(parsed, current_number)
    encoded = der(parsed)
    if number == current_number:
        if encoded != current_der:
            raise CrlError(f"CRL number {number} reused with different content")
        return None
    return Accepted(encoded, number, frozenset(serials(parsed)), parsed)
