"""Signing X.509-SVIDs for a sidecar's entries, batched, each serial recorded before it leaves.

A sidecar may obtain only the identities of entries whose parent it is, and only
while the entry is active and unexpired.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Sequence

from issuer.ca.authorities import Authorities
from issuer.core.models import Actor, AuditEvent, Entry, Sidecar, SignResult
from issuer.datastore.interface import Datastore
from issuer.identity.registration import Registry
from issuer.issuance.pool import Signed, SigningPool, SignJob, sign_and_record_jobs
from issuer.revocation.service import RevocationService
from tessera.errors import Code, InvalidArgument, TesseraError


MAX_BATCH = 1000



class SvidSigner:
    def __init__(self, store: Datastore, authorities: Authorities, registry: Registry,
                 revocation: RevocationService, pool: SigningPool | None = None,
                 identity_ttl: Callable[[str, int], int] = lambda tier, ttl: ttl):
        self.store = store
        self.authorities = authorities
        self.registry = registry
        # Identities revoked as a whole get no new SVIDs, and one revoked while its batch was signed
        # is withheld and revoked (see RevocationService.recheck_issued).
        self.check_entry_allowed = revocation.check_entry
        self.withhold_late = revocation.withhold_late
        self.revoke_late = revocation.revoke_late
        self.identity_ttl = identity_ttl  # (tier, x509_ttl) -> TTL capped by the tier's max identity TTL
        # The crypto runs in worker processes when there is a pool, else here; the same code either way.
        self._sign_and_record = pool.sign_and_record if pool is not None else self._sign_and_record_here

    async def _sign_and_record_here(self, jobs: list[SignJob], audits: list[AuditEvent]) -> list[Signed]:
        # Signing and the commit block: they run on the loop's executor, not on the loop.
        return await asyncio.to_thread(sign_and_record_jobs, self.authorities.signer(), self.store, jobs, audits)

    async def sign_batch(self, sidecar: Sidecar, items: Sequence[tuple[str, bytes]]) -> list[SignResult]:
        if len(items) > MAX_BATCH:
            raise InvalidArgument(f"at most {MAX_BATCH} CSRs per call")
        now = int(time.time())
        actor = Actor("sidecar", sidecar.id)
        # Authorize every item first; only the allowed ones go to the signers, all in one go. A denial's
        # audit record commits with the call's serials.
        outcomes: list[TesseraError | Entry] = []
        denials: list[AuditEvent] = []
        jobs: list[SignJob] = []
        for entry_id, csr_der in items:
            try:
                entry = self.registry.servable_for(entry_id, sidecar.id, now)
                self.check_entry_allowed(entry)
            except TesseraError as e:
                outcomes.append(e)
                if e.code == Code.PERMISSION_DENIED:
                    denials.append(AuditEvent("svid.deny", actor, "deny", reason=e.message, subject=entry_id))
                continue
            outcomes.append(entry)
            jobs.append(SignJob(csr_der, entry.spiffe_id, self.identity_ttl(entry.tier, entry.x509_ttl),
                                entry.expires_at, entry.id, sidecar.id, now))
        signed = iter(await self._sign_and_record(jobs, denials) if jobs or denials else ())
        results = [self._result(entry_id, outcome, signed) for (entry_id, _), outcome in zip(items, outcomes)]
        if not jobs:
            return results
        results, late = self.withhold_late(results, sidecar.id)
        if late:  # a revocation raced this call: revoking what was signed is a commit, off the loop
            await asyncio.to_thread(self.revoke_late, late)
        return results

    @staticmethod
    def _result(entry_id: str, outcome: TesseraError | Entry, signed) -> SignResult:
        if isinstance(outcome, TesseraError):
            return SignResult(entry_id, code=int(outcome.code), error=outcome.message)
        s: Signed = next(signed)  # the allowed items' certificates, in order
        if s.error:  # this item alone: its own status and message
            return SignResult(entry_id, code=s.code, error=s.error)
        return SignResult(outcome.id, outcome.spiffe_id, s.chain_der, s.serial_hex, s.not_after)
