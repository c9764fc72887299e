"""Signing X.509-SVIDs for a sidecar's entries, batched, each serial recorded before it leaves.

A sidecar may obtain only the identities of entries whose parent it is, and only
while the entry is active and unexpired.
"""

from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from issuer.ca import CertificateAuthority
from issuer.datastore import Datastore
from issuer.models import Actor, AuditEvent, Entry, IssuedSerial, Sidecar
from issuer.registration import Registry
from issuer.signing_pool import Signed, SigningPool, SignJob, sign_jobs
from tessera.errors import Code, InvalidArgument, TesseraError

if TYPE_CHECKING:  # the revocation service imports SignResult from here
    from issuer.revocation import RevocationService

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
                 revocation: RevocationService, pool: SigningPool | None = None,
                 identity_ttl: Callable[[str, int], int] = lambda tier, ttl: ttl):
        self.store = store
        self.ca = ca
        self.registry = registry
        # Identities revoked as a whole get no new SVIDs, and one revoked while its batch was signed
        # is withheld and revoked (see RevocationService.recheck_issued).
        self.check_entry_allowed = revocation.check_entry
        self.withhold_late = revocation.withhold_late
        self.revoke_late = revocation.revoke_late
        self.identity_ttl = identity_ttl  # (tier, x509_ttl) -> TTL capped by the tier's max identity TTL
        # The crypto runs in worker processes when there is a pool, else here; the same code either way.
        self._sign_and_record = pool.sign_and_record if pool is not None else self._sign_and_record_here

    def _sign_and_record_blocking(self, jobs: list[SignJob], finish):
        issued, audits, answer = finish(sign_jobs(self.ca, jobs))
        if issued or audits:
            self.store.record_issued(issued, audits)
        return answer

    async def _sign_and_record_here(self, jobs: list[SignJob], finish):
        # Signing and the commit block: they run on the loop's executor, not on the loop.
        return await asyncio.get_running_loop().run_in_executor(None, self._sign_and_record_blocking, jobs, finish)

    async def sign_batch(self, sidecar: Sidecar, items: Sequence[tuple[str, bytes]]) -> list[SignResult]:
        if len(items) > MAX_BATCH:
            raise InvalidArgument(f"at most {MAX_BATCH} CSRs per call")
        now = int(time.time())
        # Authorize every item first; only the allowed ones go to the signers, all in one go.
        outcomes: list[TesseraError | tuple[Entry, Signed]] = []
        allowed: list[tuple[int, Entry]] = []
        jobs: list[SignJob] = []
        for entry_id, csr_der in items:
            try:
                entry = self.registry.servable_for(entry_id, sidecar.id, now)
                self.check_entry_allowed(entry)
            except TesseraError as e:
                outcomes.append(e)
                continue
            allowed.append((len(outcomes), entry))
            outcomes.append(InvalidArgument("not signed"))  # replaced below by the signer's answer
            jobs.append(SignJob(csr_der, entry.spiffe_id, self.identity_ttl(entry.tier, entry.x509_ttl),
                                entry.expires_at))
        results = await self._sign_and_record(jobs, functools.partial(self._records, sidecar, items, now, outcomes,
                                                                allowed))
        if not jobs:
            return results
        results, late = self.withhold_late(results, sidecar.id)
        if late:  # a revocation raced this call: revoking what was signed is a commit, off the loop
            await asyncio.get_running_loop().run_in_executor(None, self.revoke_late, late)
        return results

    @staticmethod
    def _records(sidecar: Sidecar, items: Sequence[tuple[str, bytes]], now: int,
                 outcomes: list, allowed: list[tuple[int, Entry]], signed_jobs: list[Signed]):
        """The serials and audit events to commit for one call, and its answer (returned once committed)."""
        actor = Actor("sidecar", sidecar.id)
        for (i, entry), signed in zip(allowed, signed_jobs):
            outcomes[i] = (InvalidArgument(f"invalid CSR for entry {entry.id}: {signed.error}") if signed.error
                           else (entry, signed))
        results: list[SignResult] = []
        issued: list[IssuedSerial] = []
        audits: list[AuditEvent] = []
        for (entry_id, _), outcome in zip(items, outcomes):
            if isinstance(outcome, TesseraError):
                if outcome.code == Code.PERMISSION_DENIED:
                    audits.append(AuditEvent("svid.deny", actor, "deny", reason=outcome.message, subject=entry_id))
                results.append(SignResult(entry_id, code=int(outcome.code), error=outcome.message))
                continue
            entry, signed = outcome
            issued.append(IssuedSerial(signed.serial_hex, entry.spiffe_id, "identity", entry.id,
                                       sidecar.id, now, signed.not_after))
            audits.append(AuditEvent(
                "svid.issue", actor, "allow", reason="entry active, unexpired, parent is the caller",
                subject=entry.spiffe_id, details={
                "serial": signed.serial_hex, "entry_id": entry.id, "sidecar_id": sidecar.id,
                "ttl": signed.not_after - now, "kind": "identity"}))
            results.append(SignResult(entry.id, entry.spiffe_id, signed.cert_der, signed.serial_hex,
                                      signed.not_after))
        return issued, audits, results
