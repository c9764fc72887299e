"""The key-encryption key: authorities' private keys are sealed under it before they reach the datastore.

AES-256-GCM, a fresh 96-bit nonce per seal, and the authority's id as associated data, so a sealed key
copied onto another authority's row does not open. The KEK comes from the environment
(TESSERA_KEK, base64 of 32 bytes), else from `kek_file`, else from data_dir/kek, created 0600 on first
start. Issuers sharing one database (several hosts) must be given the same KEK.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tessera import safefs
from tessera.errors import ConfigError

KEK_ENV = "TESSERA_KEK"
KEK_BYTES = 32
_NONCE = 12


class KeyEncryptionKey:
    def __init__(self, key: bytes, origin: str):
        if len(key) != KEK_BYTES:
            raise ConfigError(f"kek: {origin} must hold {KEK_BYTES} bytes (base64), not {len(key)}")
        self._aead = AESGCM(key)
        self.origin = origin
        # Names the KEK without revealing it, so a wrong one is reported as such rather than as corruption.
        self.id = hashlib.sha256(b"tessera kek id\0" + key).hexdigest()[:16]

    @classmethod
    def load(cls, kek_file: Path | None, data_dir: Path) -> "KeyEncryptionKey":
        env = os.environ.get(KEK_ENV)
        if env is not None:
            return cls(_decode(env, KEK_ENV), KEK_ENV)
        path = kek_file or data_dir / "kek"
        try:
            data = safefs.read_regular(path, "kek_file", key=True)
        except FileNotFoundError:
            if kek_file is not None:
                raise ConfigError(f"kek_file: {path} does not exist") from None
            data = base64.b64encode(os.urandom(KEK_BYTES)) + b"\n"
            safefs.atomic_write(path, data, 0o600, "data_dir")
        except OSError as e:
            raise ConfigError(f"kek_file: cannot read {path}: {e.strerror}") from None
        return cls(_decode(data.decode("ascii", "replace"), str(path)), str(path))

    def seal(self, authority_id: str, key: ec.EllipticCurvePrivateKey) -> bytes:
        der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        nonce = os.urandom(_NONCE)
        return nonce + self._aead.encrypt(nonce, der, _aad(authority_id))

    def unseal(self, authority_id: str, kek_id: str, sealed: bytes) -> ec.EllipticCurvePrivateKey:
        if kek_id != self.id:
            raise ConfigError(f"kek: authority {authority_id} is sealed under key-encryption key {kek_id}, "
                              f"but {self.origin} holds key {self.id}: wrong KEK")
        try:
            der = self._aead.decrypt(sealed[:_NONCE], sealed[_NONCE:], _aad(authority_id))
        except (InvalidTag, ValueError):
            raise ConfigError(f"kek: the sealed key of authority {authority_id} does not open with {self.origin}: "
                              "wrong KEK or a damaged record") from None
        key = serialization.load_der_private_key(der, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"kek: authority {authority_id} does not hold an ECDSA key")
        return key


def _aad(authority_id: str) -> bytes:
    return b"tessera authority key\0" + authority_id.encode()


def _decode(text: str, origin: str) -> bytes:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"kek: {origin} is not base64 of {KEK_BYTES} bytes") from None
