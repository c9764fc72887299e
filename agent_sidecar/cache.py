"""The sidecar's cache manager: the entries it may serve and an SVID for each.

Entries arrive pushed from the issuer. For every servable entry the cache keeps
an SVID whose key was generated here (keys never leave the host), minting
missing ones and rotating at half-life in batched CSR calls. Every change bumps
`version`; open Workload API streams wait on it and resend the new state.

An SVID that arrives already expired or not yet valid by this host's clock (the
issuer's clock is off from ours) is neither stored nor served: that would make it due
again at once, a re-mint loop that signs certificates as fast as the issuer can. The
skew is logged, and minting asks again for one entry only, after a delay that doubles
up to SKEW_RETRY_MAX, until an SVID arrives valid.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable


from tessera import chain, logs, pem, x509svid
from tessera import selectors as sel
from tessera.v1 import issuer_pb2, types_pb2

log = logs.get("sidecar.cache")

BATCH = 500
RETRY_SECONDS = 1.0
MATCHED_MAX = 4096
SKEW_RETRY_MIN, SKEW_RETRY_MAX = 2.0, 300.0  # seconds between attempts while SVIDs arrive out of validity


def clock_skew(not_before: float, not_after: float, now: float) -> float | None:
    """For a certificate the issuer just signed: None if it is valid at `now`, else roughly how far the
    issuer's clock is ahead of ours (negative: behind), in seconds. notBefore is the issuer's "now"
    backdated by at most tessera.x509svid.CLOCK_SKEW, so the figure is that close."""
    if not_before <= now < not_after:
        return None
    return not_before - now


class SkewBackoff:
    """The growing, bounded delay between attempts while certificates arrive out of validity."""

    def __init__(self):
        self.delay = 0.0  # 0: no skew seen since the last valid certificate

    def skewed(self) -> float:
        """Note one more out-of-validity certificate; returns how long to wait before asking again."""
        self.delay = min(SKEW_RETRY_MAX, max(SKEW_RETRY_MIN, self.delay * 2))
        return self.delay

    def valid(self) -> None:
        self.delay = 0.0


@dataclass(frozen=True)
class CachedSVID:
    entry_id: str
    spiffe_id: str
    cert_der: bytes  # the leaf and any intermediates, DER, as the issuer returned them
    key_der: bytes
    serial: str
    not_before: float
    not_after: float
    revision: int
    received_at: float
    authorities: frozenset[str] = frozenset()  # ids of the authorities above it (tessera.chain.signers)
    asked_at: float = 0.0  # when its CSR was sent: one asked for before a taint arrived may be signed under it

    @property
    def rotate_at(self) -> float:
        # Half of the lifetime left when it arrived (notBefore is backdated for clock skew).
        start = max(self.not_before, min(self.received_at, self.not_after))
        return start + (self.not_after - start) / 2


def servable(entry: types_pb2.Entry, now: float) -> bool:
    return entry.state == "active" and entry.expires_at > now


Signer = Callable[[list[tuple[str, bytes]]], Awaitable[list[issuer_pb2.SignedSVID]]]


class CacheManager:
    def __init__(self, sign: Signer):
        self._sign = sign
        self.entries: dict[str, types_pb2.Entry] = {}
        self.svids: dict[str, CachedSVID] = {}
        self.bundle_der: bytes = b""
        self.ready = False
        self.cut = False  # banned: nothing is served any more
        self.version = 0
        # Selector set -> the entries it matches, sorted; dropped whenever the entries change. Matching
        # scans every entry (2 ms at 1,000), and every Workload API fetch and task call asks.
        self._matched: dict[frozenset[str], list[types_pb2.Entry]] = {}
        self._changed = asyncio.Event()
        self._wake = asyncio.Event()
        self._skew = SkewBackoff()
        self._skew_retry_at = 0.0  # while SVIDs arrive out of validity: no minting before this time
        # Authority id -> when its taint arrived: SVIDs under it asked for before then are due now.
        self.tainted: dict[str, float] = {}

    # -- change notification ----------------------------------------------------------

    def bump(self) -> None:
        self.version += 1
        ev, self._changed = self._changed, asyncio.Event()
        ev.set()

    async def wait_change(self, version: int, timeout: float | None = None) -> bool:
        """Wait until `version` is stale; False on timeout."""
        while self.version == version:
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except asyncio.TimeoutError:
                return False
        return True

    # -- entries from the issuer ---------------------------------------------------------

    def apply_snapshot(self, entries: Iterable[types_pb2.Entry], bundle_der: bytes) -> None:
        self.entries = {e.id: e for e in entries}
        self.cut = False  # the issuer accepts this sidecar again
        if bundle_der:
            self.bundle_der = bundle_der
        self.ready = True
        self._changed_entries()

    def apply_upsert(self, entry: types_pb2.Entry) -> None:
        self.entries[entry.id] = entry
        self._changed_entries()

    def apply_delete(self, entry_id: str) -> None:
        self.entries.pop(entry_id, None)
        self._changed_entries()  # drops its SVID with every other unservable one

    def apply_bundle(self, bundle_der: bytes) -> None:
        if bundle_der and bundle_der != self.bundle_der:
            self.bundle_der = bundle_der
            self.bump()

    def drop_revoked(self, is_revoked: Callable[[str], bool]) -> None:
        """Drop SVIDs whose serial is revoked; the minting loop replaces those whose entry is still servable."""
        gone = [eid for eid, s in self.svids.items() if is_revoked(s.serial)]
        for eid in gone:
            del self.svids[eid]
        if gone:
            self._changed_svids()  # the entries did not change: what selector sets match stays valid

    def taint(self, authority_ids: Iterable[str], now: float | None = None) -> int:
        """Re-mint at once every SVID held that one of `authority_ids` signed; returns how many. The old ones
        are served until their replacements arrive: a tainted authority is being replaced, not revoked."""
        now = time.time() if now is None else now
        ids = {a.lower() for a in authority_ids}
        for a in ids:
            self.tainted[a] = now
        due = sum(1 for s in self.svids.values() if s.authorities & ids)
        if due:
            self._wake.set()
        return due

    def _tainted(self, s: CachedSVID) -> bool:
        return any(s.asked_at <= self.tainted[a] for a in s.authorities if a in self.tainted)

    def cut_off(self) -> None:
        """This sidecar is banned (or its own SVID revoked): serve nothing more."""
        self.cut = True
        self.entries.clear()
        self._changed_entries()

    def entry_revoked(self, entry_id: str) -> bool:
        e = self.entries.get(entry_id)
        return e is not None and e.state == "revoked"

    def _changed_entries(self) -> None:
        self._matched.clear()
        self._changed_svids()

    def _changed_svids(self) -> None:
        self._drop_unservable(time.time())
        self.bump()
        self._wake.set()

    def _drop_unservable(self, now: float) -> bool:
        dropped = False
        for eid in list(self.svids):
            e = self.entries.get(eid)
            svid = self.svids[eid]
            if e is None or not servable(e, now) or svid.not_after <= now:
                del self.svids[eid]
                dropped = True
        return dropped

    # -- what a workload gets -------------------------------------------------------------

    def matching(self, selectors: frozenset[str], now: float | None = None) -> list[types_pb2.Entry]:
        now = time.time() if now is None else now
        matched = self._matched.get(selectors)
        if matched is None:
            if len(self._matched) >= MATCHED_MAX:  # bounded: one per distinct workload selector set
                self._matched.clear()
            matched = self._matched[selectors] = sorted(
                (e for e in self.entries.values() if sel.matches(e.selectors, selectors)),
                key=lambda e: (e.created_at, e.id))
        return [e for e in matched if servable(e, now)]  # expiry depends on the time, so it is checked each call

    def view(self, selectors: frozenset[str]) -> tuple[list[types_pb2.Entry], list[CachedSVID]]:
        now = time.time()
        entries = self.matching(selectors, now)
        svids = [s for e in entries if (s := self.svids.get(e.id)) is not None and s.not_after > now]
        return entries, svids

    # -- minting and rotation -----------------------------------------------------------------

    def _due(self, now: float) -> list[types_pb2.Entry]:
        due = []
        for e in self.entries.values():
            if not servable(e, now):
                continue
            s = self.svids.get(e.id)
            if s is None or now >= s.rotate_at or s.revision != e.revision or self._tainted(s):
                due.append(e)
        return due

    def _next_wake(self, now: float) -> float:
        times = [self._skew_retry_at] + [s.rotate_at for s in self.svids.values()]
        times += [s.not_after for s in self.svids.values()]
        times += [e.expires_at for e in self.entries.values() if e.expires_at > now]
        future = [t for t in times if t > now]
        return min(future) - now if future else 60.0

    async def mint(self, entries: list[types_pb2.Entry]) -> int:
        """Mint SVIDs for `entries` in batches; returns how many were stored."""
        stored = 0
        for i in range(0, len(entries), BATCH):
            chunk = entries[i:i + BATCH]
            keys = {e.id: x509svid.new_key() for e in chunk}
            asked_at = time.time()
            results = await self._sign([(e.id, x509svid.make_csr(keys[e.id])) for e in chunk])
            asked = {e.id: e for e in chunk}
            skewed: list = []  # (skew, result, certificate) of those that arrived out of validity
            for r in results:
                if r.status_code != 0:
                    log.warning("issuer refused an SVID", entry_id=r.entry_id, error=r.error)
                    continue
                current = self.entries.get(r.entry_id)
                if current is None or not servable(current, time.time()):
                    continue  # deleted or disabled while we waited
                certs = pem.split_der(r.cert_chain)  # parsed for dates and signers; served as the DER received
                cert = certs[0]
                not_before, not_after = cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()
                received_at = time.time()
                skew = clock_skew(not_before, not_after, received_at)
                if skew is not None:
                    skewed.append((skew, r, cert))
                    continue
                self._skew.valid()
                self._skew_retry_at = 0.0
                self.svids[r.entry_id] = CachedSVID(
                    entry_id=r.entry_id, spiffe_id=r.spiffe_id,
                    cert_der=r.cert_chain, key_der=pem.key_pkcs8_der(keys[r.entry_id]),
                    serial=r.serial, not_before=not_before, not_after=not_after,
                    revision=asked[r.entry_id].revision, received_at=received_at,
                    authorities=chain.signers(certs), asked_at=asked_at)
                stored += 1
            if results:
                self.bump()
            if skewed:
                self._note_skew(skewed)
                break  # the rest would arrive skewed too
        return stored

    def _note_skew(self, skewed: list) -> None:
        """SVIDs of one batch arrived out of validity: log it once and hold minting for a growing delay."""
        skew, r, cert = skewed[0]
        wait = self._skew.skewed()
        self._skew_retry_at = time.time() + wait
        log.error("SVID arrived outside its validity by this host's clock: clock skew between this host and "
                  "the issuer; fix the clocks (NTP). Not served; asking again later", skew_seconds=round(skew),
                  svids=len(skewed), entry_id=r.entry_id, serial=r.serial,
                  not_before=cert.not_valid_before_utc.isoformat(),
                  not_after=cert.not_valid_after_utc.isoformat(), retry_in=wait)

    async def run(self) -> None:
        """Keep every servable entry's SVID present and fresh, until cancelled."""
        while True:
            self._wake.clear()
            now = time.time()
            if self._drop_unservable(now):
                self.bump()
            due = self._due(now) if self.ready and now >= self._skew_retry_at else []
            if due and self._skew.delay:
                due = due[:1]  # SVIDs arrived out of validity: one probe, not a batch, until one is valid
            delay = self._next_wake(now)
            if due:
                try:
                    if await self.mint(due) == len(due):
                        continue
                    # Some were refused or arrived out of validity; do not hammer the issuer.
                    delay = max(RETRY_SECONDS, self._skew_retry_at - time.time())
                except Exception as e:  # noqa: BLE001 - issuer unreachable: keep serving what is still valid
                    log.warning("minting failed; will retry", error=str(e), entries=len(due))
                    delay = RETRY_SECONDS
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=max(0.05, delay))
            except asyncio.TimeoutError:
                pass
