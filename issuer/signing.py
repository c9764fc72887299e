"""Signing X.509-SVIDs for a sidecar's entries, batched, each serial recorded before it leaves.

A sidecar may obtain only the identities of entries whose parent it is, and only
while the entry is active and unexpired.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from cryptography.hazmat.primitives.serialization import Encoding

from issuer.ca import CertificateAuthority
from issuer.datastore import Datastore
from issuer.models import Actor, AuditEvent, IssuedSerial, Sidecar
from issuer.registration import Registry
from tessera import spiffeid, x509svid
from tessera.errors import Code, InvalidArgument, PermissionDenied, TesseraError

MAX_BATCH = 1000


@dataclass(frozen=True)
class SignResult:
    entry_id: str
    spiffe_id: str = ""
    cert_der: bytes = b""
    serial: str = ""
    expires_at: int = 0
    code: int = 0
    error: str = ""


class SvidSigner:
    def __init__(self, store: Datastore, ca: CertificateAuthority, registry: Registry,
                 identity_ttl: Callable[[str, int], int] = lambda tier, ttl: ttl):
        self.store = store
        self.ca = ca
        self.registry = registry
        self.identity_ttl = identity_ttl  # (tier, x509_ttl) -> TTL capped by the tier's max identity TTL

    def sign_batch(self, sidecar: Sidecar, items: Sequence[tuple[str, bytes]]) -> list[SignResult]:
        if len(items) > MAX_BATCH:
            raise InvalidArgument(f"at most {MAX_BATCH} CSRs per call")
        now = int(time.time())
        actor = Actor("sidecar", sidecar.id)
        results: list[SignResult] = []
        issued: list[IssuedSerial] = []
        audits: list[AuditEvent] = []
        for entry_id, csr_der in items:
            try:
                entry = self.registry.get(entry_id)
                # Same answer for "no such entry" and "not yours": a sidecar learns nothing of others' entries.
                if entry is None or entry.parent_id != sidecar.id:
                    raise PermissionDenied(f"entry {entry_id!r} is not registered to {sidecar.id}")
                if entry.state != "active":
                    raise PermissionDenied(f"entry {entry_id} is {entry.state}")
                if entry.expires_at <= now:
                    raise PermissionDenied(f"entry {entry_id} expired")
                self.check_entry_allowed(entry)
                try:
                    public_key = x509svid.load_csr(csr_der).public_key()
                except ValueError as e:
                    raise InvalidArgument(f"invalid CSR for entry {entry_id}: {e}") from None
                signed = self.ca.sign(
                    public_key, spiffeid.parse(entry.spiffe_id), self.identity_ttl(entry.tier, entry.x509_ttl),
                    not_after_cap=dt.datetime.fromtimestamp(entry.expires_at, dt.timezone.utc),
                )
                not_after = int(signed.not_after.timestamp())
                issued.append(IssuedSerial(signed.serial_hex, entry.spiffe_id, "identity", entry.id,
                                           sidecar.id, now, not_after))
                audits.append(AuditEvent(
                    "svid.issue", actor, "allow", reason="entry active, unexpired, parent is the caller",
                    subject=entry.spiffe_id, details={
                    "serial": signed.serial_hex, "entry_id": entry.id, "sidecar_id": sidecar.id,
                    "ttl": not_after - now, "kind": "identity"}))
                results.append(SignResult(entry.id, entry.spiffe_id, signed.cert.public_bytes(Encoding.DER),
                                          signed.serial_hex, not_after))
            except TesseraError as e:
                if e.code == Code.PERMISSION_DENIED:
                    audits.append(AuditEvent("svid.deny", actor, "deny", reason=e.message, subject=entry_id))
                results.append(SignResult(entry_id, code=int(e.code), error=e.message))
        if issued or audits:
            self.store.record_issued(issued, audits)
        return self.recheck_issued(results) if issued else results

    def check_entry_allowed(self, entry) -> None:
        """Hook for the revocation service: refuse entries whose identity is revoked."""

    def recheck_issued(self, results: list[SignResult]) -> list[SignResult]:
        """Hook for the revocation service: an entry revoked while its batch was signed must not get through."""
        return results
