"""The certificate authority: its key and certificate, and signing SVIDs from CSRs."""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tessera import pem, safefs, spiffeid, x509svid
from tessera.errors import ConfigError


@dataclass(frozen=True)
class SignedCert:
    cert: x509.Certificate
    serial: int
    not_after: dt.datetime

    @property
    def serial_hex(self) -> str:
        return x509svid.serial_hex(self.serial)


class CertificateAuthority:
    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, trust_domain: str):
        if cert.public_key().public_numbers() != key.public_key().public_numbers():
            raise ConfigError("CA certificate and key do not match")
        self.cert = cert
        self.key = key
        self.trust_domain = trust_domain
        self.bundle = (cert,)
        self.bundle_der = pem.der_concat(self.bundle)
        self.bundle_pem = pem.certs_pem(self.bundle)
        self._aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())

    @classmethod
    def load_or_create(
        cls,
        trust_domain: str,
        data_dir: Path,
        ca_cert: Path | None = None,
        ca_key: Path | None = None,
        ca_ttl_seconds: int = 365 * 86400,
    ) -> "CertificateAuthority":
        """Use the configured CA files, else the one in data_dir, else create one there."""
        if ca_cert or ca_key:
            if not (ca_cert and ca_key):
                raise ConfigError("ca_cert and ca_key must be given together")
            return cls(_current(_read_cert(ca_cert, "ca_cert"), ca_cert), _read_key(ca_key, "ca_key"), trust_domain)
        cert_path, key_path = data_dir / "ca.pem", data_dir / "ca-key.pem"
        if os.path.lexists(cert_path) or os.path.lexists(key_path):  # a link there is refused, not ignored
            return cls(_current(_read_cert(cert_path, "ca_cert"), cert_path), _read_key(key_path, "ca_key"),
                       trust_domain)
        key = x509svid.new_key()
        cert = x509svid.build_ca(key, trust_domain, dt.timedelta(seconds=ca_ttl_seconds))
        # Key first, 0600 from the first byte; the cert's presence then means both exist.
        safefs.atomic_write(key_path, pem.key_pem(key), 0o600, "data_dir")
        safefs.atomic_write(cert_path, pem.certs_pem([cert]), 0o644, "data_dir")
        return cls(cert, key, trust_domain)

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
        now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
        not_after = now + dt.timedelta(seconds=ttl_seconds)
        if not_after_cap is not None:
            not_after = min(not_after, not_after_cap)
        serial = x509.random_serial_number()
        cert = x509svid.build_leaf(
            public_key=public_key,
            spiffe_id=spiffe_id,
            not_after=not_after,
            ca_cert=self.cert,
            ca_key=self.key,
            serial=serial,
            ca_aki=self._aki,
            dns_names=dns_names,
            extra_extensions=extra_extensions,
        )
        return SignedCert(cert, serial, cert.not_valid_after_utc)


def _current(cert: x509.Certificate, path: Path) -> x509.Certificate:
    """A CA certificate that can sign now: one that expired or is not yet valid is one line, not a failed signing."""
    now = dt.datetime.now(dt.timezone.utc)
    if cert.not_valid_after_utc <= now:
        raise ConfigError(f"ca_cert: {path} expired at {cert.not_valid_after_utc.isoformat()}; renew the CA")
    if cert.not_valid_before_utc > now + x509svid.CLOCK_SKEW:
        raise ConfigError(f"ca_cert: {path} is not valid before {cert.not_valid_before_utc.isoformat()}; "
                          "check this host's clock")
    return cert


def _read_cert(path: Path, key: str) -> x509.Certificate:
    return pem.read_certs(path, key)[0]


def _read_key(path: Path, key: str) -> ec.EllipticCurvePrivateKey:
    """The CA key: a regular file, not a link, owned by root or this uid, no group or other bits, in a
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
