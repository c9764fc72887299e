"""Certificate encodings: PEM files and the concatenated DER of the Workload API."""

from __future__ import annotations

import os
from typing import Iterable, Sequence

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from tessera import der, safefs


def der_concat(certs: Iterable[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.DER) for c in certs)


def split_der(blob: bytes) -> list[x509.Certificate]:
    """Parse DER certificates laid back to back; ValueError if they are not."""
    certs = []
    i = 0
    while i < len(blob):
        try:
            _, end = der.read_header(blob, i, 0x30)
        except ValueError as e:
            raise ValueError(f"malformed DER certificate sequence: {e}") from None
        try:
            certs.append(x509.load_der_x509_certificate(blob[i:end]))
        except x509.InvalidVersion as e:  # not a ValueError: the documented error is
            raise ValueError(f"malformed DER certificate sequence: {e}") from None
        i = end
    return certs


def certs_pem(certs: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def read_certs(path: str | os.PathLike, key: str) -> tuple[x509.Certificate, ...]:
    """PEM certificates from a file; ConfigError naming the config `key` if unreadable or empty."""
    from tessera.errors import ConfigError

    try:
        return tuple(x509.load_pem_x509_certificates(safefs.read_regular(path, key)))
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path}: {e.strerror}") from None
    except ValueError:
        raise ConfigError(f"{key}: {path} holds no PEM certificate") from None


def key_pkcs8_der(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def key_pem_from_der(key_der: bytes) -> bytes:
    """A DER PKCS#8 private key (as the Workload API carries it) as the PEM that files and ssl take;
    ValueError if it is not an unencrypted private key of a supported type."""
    try:
        return key_pem(serialization.load_der_private_key(key_der, password=None))
    except (TypeError, UnsupportedAlgorithm) as e:  # encrypted, or an algorithm this build lacks
        raise ValueError(f"not a usable private key: {e}") from None
