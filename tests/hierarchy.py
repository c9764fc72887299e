"""A trust domain's authorities built from real keys for the sidecar's and verifier's tests: a root (what bundles
hold), intermediates under it (tessera.x509svid.build_intermediate), leaves signed by an intermediate with the
issuer's own SigningAuthority (chain = leaf, intermediate), and CRLs signed with tessera.crl.build."""

from __future__ import annotations

import datetime as dt
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from issuer.ca.authority import SignedCert, SigningAuthority
from tessera import crl, pem, spiffeid, x509svid

TD = "example.org"


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


class Authority:
    """A CA certificate with its key, numbering the CRLs it signs."""

    def __init__(self, cert: x509.Certificate, key):
        self.cert, self.key = cert, key
        self.id = x509svid.authority_id(key.public_key())
        self.signer = SigningAuthority(cert, key, TD)
        self.number = 0
        self._built: dict[tuple, bytes] = {}

    def leaf(self, path: str = "/agent/a", ttl: int = 600, key=None) -> SignedCert:
        key = key or x509svid.new_key()
        return self.signer.sign(key.public_key(), spiffeid.parse(f"spiffe://{TD}{path}"), ttl)

    def crl(self, *revoked: x509.Certificate, number: int | None = None) -> bytes:
        """A CRL listing `revoked`, numbered one past the last unless `number` is given. Asking again for a number
        already built with the same list gives the same bytes, as an issuer resending its CRL does: a re-signing a
        second later would be a different CRL under a reused number, which a sidecar rightly refuses."""
        self.number = self.number + 1 if number is None else number
        key = (self.number, tuple(sorted(c.serial_number for c in revoked)))
        if key not in self._built:
            entries = [crl.Revoked(x509svid.serial_hex(c.serial_number), int(time.time())) for c in revoked]
            self._built[key] = crl.build(self.cert, self.key, entries, self.number, time.time(), time.time() + 600)
        return self._built[key]


class Hierarchy:
    """One root and the intermediates made under it."""

    def __init__(self, days: int = 30):
        key = x509svid.new_key()
        self.root = Authority(x509svid.build_ca(key, TD, dt.timedelta(days=days)), key)

    def intermediate(self, days: int = 7, starts_in: dt.timedelta | None = None) -> Authority:
        """An intermediate signed by the root; `starts_in`: its notBefore that far ahead (an issuer whose clock
        runs ahead of this host's)."""
        key = x509svid.new_key()
        not_after = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=days)
        cert = x509svid.build_intermediate(key.public_key(), TD, not_after, self.root.cert, self.root.key)
        if starts_in is not None:
            start = cert.not_valid_before_utc + starts_in
            b = (x509.CertificateBuilder().subject_name(cert.subject).issuer_name(cert.issuer)
                 .public_key(cert.public_key()).serial_number(cert.serial_number)
                 .not_valid_before(start).not_valid_after(cert.not_valid_after_utc + starts_in))
            for ext in cert.extensions:
                b = b.add_extension(ext.value, ext.critical)
            cert = b.sign(self.root.key, hashes.SHA256())
        return Authority(cert, key)

    @property
    def bundle_der(self) -> bytes:
        return der(self.root.cert)

    def bundle_pem(self) -> bytes:
        return pem.certs_pem([self.root.cert])
