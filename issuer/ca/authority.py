"""A signing authority (an intermediate, or a root that signed leaves before intermediates existed): its key
and certificate, and signing SVIDs from public keys. Which authority signs is decided by
issuer/ca/authorities.py; this module only signs."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from tessera import pem, safefs, spiffeid, x509svid
from tessera.errors import ConfigError


@dataclass(frozen=True)
class SignedCert:
    cert: x509.Certificate
    serial: int
    not_after: dt.datetime
    chain: tuple[x509.Certificate, ...]  # the leaf, then the authority's certificate (roots stay out)
    authority: str  # id of the authority that signed it

    @property
    def serial_hex(self) -> str:
        return x509svid.serial_hex(self.serial)

    @property
    def chain_der(self) -> bytes:
        return pem.der_concat(self.chain)


class SigningAuthority:
    """Signs leaves with one key. `chain` is what follows a leaf on the wire: the intermediate itself."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, trust_domain: str,
                 chain: Sequence[x509.Certificate] | None = None):
        if cert.public_key().public_numbers() != key.public_key().public_numbers():
            raise ConfigError("CA certificate and key do not match")
        self.cert = cert
        self.key = key
        self.trust_domain = trust_domain
        self.id = x509svid.authority_id(key.public_key())
        self.chain = tuple(chain) if chain is not None else (cert,)
        self._chain_der = tuple(c.public_bytes(Encoding.DER) for c in self.chain)
        self._aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())
        self._leaf_issuer = x509svid.LeafIssuer(cert, key, self._aki)

    @property
    def not_after(self) -> dt.datetime:
        return self.cert.not_valid_after_utc

    def portable(self) -> tuple[str, bytes, bytes, str]:
        """What a signing worker rebuilds this authority from (it crosses the worker's pipe, never a disk)."""
        return (self.id, pem.certs_pem(self.chain), pem.key_pem(self.key), self.trust_domain)

    @classmethod
    def from_portable(cls, portable: tuple[str, bytes, bytes, str]) -> "SigningAuthority":
        _, chain_pem, key_pem, trust_domain = portable
        chain = x509.load_pem_x509_certificates(chain_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        return cls(chain[0], key, trust_domain, chain)  # type: ignore[arg-type]

    def sign(
        self,
        public_key,
        spiffe_id: spiffeid.SpiffeId,
        ttl_seconds: int,
        *,
        not_after_cap: dt.datetime | None = None,
        dns_names: Sequence[str] = (),
        extra_extensions: Sequence[x509.ExtensionType] = (),
    ) -> SignedCert:
        """A leaf that never outlives this authority (leaf_der caps it at the authority's notAfter)."""
        cert_der, serial, _ = self._leaf(public_key, spiffe_id, ttl_seconds, not_after_cap, dns_names,
                                         extra_extensions)
        cert = x509.load_der_x509_certificate(cert_der)
        return SignedCert(cert, serial, cert.not_valid_after_utc, (cert, *self.chain), self.id)

    def sign_der(self, public_key, spiffe_id: spiffeid.SpiffeId, ttl_seconds: int, *,
                 not_after_cap: dt.datetime | None = None) -> tuple[bytes, int, int]:
        """(chain DER, serial, notAfter) for the signing workers' hot path: no certificate object, the chain's
        tail encoded once."""
        cert_der, serial, not_after = self._leaf(public_key, spiffe_id, ttl_seconds, not_after_cap)
        return cert_der + b"".join(self._chain_der), serial, not_after

    def _leaf(self, public_key, spiffe_id: spiffeid.SpiffeId, ttl_seconds: int, not_after_cap: dt.datetime | None,
              dns_names: Sequence[str] = (), extra_extensions: Sequence[x509.ExtensionType] = ()
              ) -> tuple[bytes, int, int]:
        now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
        not_after = now + dt.timedelta(seconds=ttl_seconds)
        if not_after_cap is not None:
            not_after = min(not_after, not_after_cap)
        serial = x509.random_serial_number()
        cert_der, last = x509svid.leaf_der(self._leaf_issuer, public_key=public_key, spiffe_id=spiffe_id,
                                           not_after=not_after, serial=serial, dns_names=dns_names,
                                           extra_extensions=extra_extensions)
        return cert_der, serial, last


def current(cert: x509.Certificate, what: str) -> x509.Certificate:
    """A CA certificate that can sign now: one that expired or is not yet valid is one line, not a failed signing."""
    now = dt.datetime.now(dt.timezone.utc)
    if cert.not_valid_after_utc <= now:
        raise ConfigError(f"{what} expired at {cert.not_valid_after_utc.isoformat()}; renew it")
    if cert.not_valid_before_utc > now + x509svid.CLOCK_SKEW:
        raise ConfigError(f"{what} is not valid before {cert.not_valid_before_utc.isoformat()}; "
                          "check this host's clock")
    return cert


def read_cert(path: Path, key: str) -> x509.Certificate:
    return pem.read_certs(path, key)[0]


def read_key(path: Path, key: str) -> ec.EllipticCurvePrivateKey:
    """A CA key file: a regular file, not a link, owned by root or this uid, no group or other bits, in a
    directory only they can change (tessera.safefs)."""
    try:
        data = safefs.read_regular(path, key, key=True)
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path}: {e.strerror}") from None
    try:
        k = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"{key}: {path} is not an unencrypted PEM private key") from None
    if not isinstance(k, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{key}: {path} must hold an ECDSA key")
    return k
