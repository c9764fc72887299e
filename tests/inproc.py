"""The issuer's services wired in-process over a real SQLite store and CA, for tests of their own rules
(the races and checks no real sidecar can be made to hit on cue)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from issuer.identity.attestation import SidecarAttestor
from issuer.ca.authority import CertificateAuthority
from issuer.core.events import EventHub
from issuer.core.models import Actor
from issuer.identity.registration import Registry
from issuer.revocation.service import RevocationService
from issuer.datastore.sqlite import SQLiteDatastore
from tessera import x509svid

TD = "example.org"
OPERATOR = Actor("operator", "uid:0")


@dataclass
class IssuerServices:
    store: SQLiteDatastore
    ca: CertificateAuthority
    hub: EventHub
    registry: Registry
    attestor: SidecarAttestor
    revocation: RevocationService


def issuer_services(root: Path, sidecars: tuple[str, ...] = ("h",), tier_names=None) -> IssuerServices:
    """The services as issuer/server.py wires them; `sidecars` are really attested (join token + CSR),
    as every issuing path requires."""
    store = SQLiteDatastore(root / "tessera.db")
    ca = CertificateAuthority.load_or_create(TD, root)
    hub = EventHub()
    registry = Registry(store, hub, TD, 600, tier_names=tier_names)
    attestor = SidecarAttestor(store, ca, 3600, 600, is_revoked=lambda serial: revocation.is_revoked(serial))
    revocation = RevocationService(store, ca, registry, attestor, hub, 600)
    for name in sidecars:
        token, _, _ = attestor.create_token(name, 600, OPERATOR)
        attestor.attest(token, x509svid.make_csr(x509svid.new_key()), "test")
    return IssuerServices(store, ca, hub, registry, attestor, revocation)
