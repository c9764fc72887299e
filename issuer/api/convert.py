"""Translation between the issuer's records and tessera.v1 protobuf messages."""

from __future__ import annotations

from issuer.core.models import Entry, Sidecar
from issuer.revocation.service import CrlSet
from tessera.v1 import issuer_pb2, types_pb2


def entry_pb(e: Entry) -> types_pb2.Entry:
    return types_pb2.Entry(
        id=e.id, spiffe_id=e.spiffe_id, parent_id=e.parent_id, selectors=list(e.selectors),
        owner=e.owner, purpose=e.purpose, tier=e.tier, scopes=list(e.scopes),
        x509_ttl_seconds=e.x509_ttl, expires_at=e.expires_at, state=e.state, created_by=e.created_by,
        created_at=e.created_at, updated_at=e.updated_at, revision=e.revision,
    )


def sidecar_pb(s: Sidecar, connected: bool) -> types_pb2.Sidecar:
    return types_pb2.Sidecar(
        id=s.id, name=s.name, state=s.state, attested_at=s.attested_at, last_seen=s.last_seen,
        svid_serial=s.svid_serial, svid_expires_at=s.svid_expires_at, connected=connected,
    )


def crl_set_pb(published: CrlSet) -> issuer_pb2.CrlSet:
    return issuer_pb2.CrlSet(crls=[c.der for c in published.crls], intermediates=list(published.intermediates))
