"""Signing authorities for the in-process benches: a root, and an intermediate under it as the issuer signs with."""

from __future__ import annotations

import datetime as dt

from issuer.ca.authority import SigningAuthority
from tessera import x509svid

TRUST_DOMAIN = "example.org"


def root() -> SigningAuthority:
    key = x509svid.new_key()
    return SigningAuthority(x509svid.build_ca(key, TRUST_DOMAIN, dt.timedelta(days=365)), key, TRUST_DOMAIN)


def intermediate() -> SigningAuthority:
    """What the issuer's active authority is: leaves it signs carry it as their chain."""
    top = root()
    key = x509svid.new_key()
    cert = x509svid.build_intermediate(key.public_key(), TRUST_DOMAIN,
                                       dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=7), top.cert, top.key)
    return SigningAuthority(cert, key, TRUST_DOMAIN)
