"""Certificate authorities for tests: an operator's CA written to files, and real issuer authorities on a store."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from issuer.ca.authorities import Authorities, AuthorityConfig
from issuer.ca.authority import SigningAuthority
from issuer.ca.keys import KeyEncryptionKey
from tessera import pem, safefs, x509svid


def write_root(directory: Path, trust_domain: str = "example.org", days: int = 365) -> SigningAuthority:
    """A self-signed root as an operator would keep it: ca.pem, and ca-key.pem at 0600. It can sign leaves directly
    too (as the one CA of earlier releases did)."""
    key = x509svid.new_key()
    cert = x509svid.build_ca(key, trust_domain, dt.timedelta(days=days))
    safefs.atomic_write(directory / "ca-key.pem", pem.key_pem(key), 0o600)
    safefs.atomic_write(directory / "ca.pem", pem.certs_pem([cert]), 0o644)
    return SigningAuthority(cert, key, trust_domain)


def make_authorities(store, data_dir: Path, trust_domain: str = "example.org", **cfg) -> Authorities:
    """Real authorities on `store`: a root created in `data_dir` (its KEK there too) and an active intermediate."""
    data_dir.mkdir(parents=True, exist_ok=True)
    return Authorities(store, KeyEncryptionKey.load(None, data_dir),
                       AuthorityConfig(trust_domain=trust_domain, data_dir=data_dir, **cfg))
