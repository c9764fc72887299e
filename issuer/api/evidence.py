"""Admin API handlers for the evidence: reading and verifying the audit trail, and the trust-debt report.

A mixin of AdminService (which supplies `operator()` and the `evidence` attribute),
kept apart so the audit and report handlers live next to what they serve.
"""

from __future__ import annotations

import asyncio
import collections
import json
import threading
import time
from dataclasses import dataclass, field

from issuer.audit import report
from issuer.audit.records import AuditFilter, ChainCheck, verify_chain
from issuer.ca.authorities import Authorities
from issuer.core.events import EventHub
from issuer.core.models import AUDIT_JSON_FIELDS, AuditRecord, Entry, audit_record_dict
from issuer.datastore.interface import Datastore
from issuer.identity.attestation import SidecarAttestor
from issuer.identity.registration import Registry, bounded_ref
from issuer.tasks.policy import Policy, approval_covers
from issuer.tasks.service import entry_view
from tessera.errors import InvalidArgument
from tessera.rpc import grpclib_handler
from tessera.v1 import admin_pb2

FOLLOW_POLL = 1.0  # a missed wake-up costs at most this long
PAGE = 1000


class AuditFeed:
    """Wakes followers of the trail when records commit (an audit listener; called from any thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    def __call__(self, records: list[AuditRecord]) -> None:
        if not records:
            return
        with self._lock:
            waiters = list(self._waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:
                pass  # the admin loop is shutting down; a listener must never fail the commit

    def waiter(self) -> tuple[asyncio.AbstractEventLoop, asyncio.Event]:
        w = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._waiters.add(w)
        return w

    def forget(self, w) -> None:
        with self._lock:
            self._waiters.discard(w)


@dataclass
class Evidence:
    """What the evidence handlers read."""

    store: Datastore
    registry: Registry
    attestor: SidecarAttestor
    hub: EventHub
    policy: Policy
    authorities: Authorities
    feed: AuditFeed = field(default_factory=AuditFeed)

    def approval_covers(self, entry: Entry) -> bool:
        """Whether the policy puts this entry's tasks behind an operator's approval (the report counts them)."""
        return approval_covers(self.policy, entry_view(entry), time.time())

    # The store's audit reads run beside its writer, never under its write lock.
    def verify(self) -> ChainCheck:
        return verify_chain(self.store.audit_since())

    def newest_seq(self) -> int:
        return self.store.newest_audit_seq()

    def build_report(self, thresholds: report.Thresholds) -> dict:
        now = int(time.time())
        return report.build(
            entries=self.registry.list(), sidecars=self.attestor.list(), last_issued=self.store.last_issued_by_entry(),
            audit=list(self.store.audit_since(now - thresholds.unused_days * report.DAY)),
            connected=self.hub.connected(), now=now, thresholds=thresholds, approval_covers=self.approval_covers,
            authorities=self.authorities.list())


def record_pb(r: AuditRecord) -> admin_pb2.AuditRecord:
    """The record's fields; those held as JSON (actor, details) travel as `<name>_json` text."""
    return admin_pb2.AuditRecord(**{
        (f"{k}_json" if k in AUDIT_JSON_FIELDS else k): (json.dumps(v, sort_keys=True) if k in AUDIT_JSON_FIELDS else v)
        for k, v in audit_record_dict(r).items()})


def _positive(name: str, value: int, default: int, maximum: int) -> int:
    """A report threshold: 0 means the default; bounded, so the dates derived from it stay in range."""
    if not 0 <= value <= maximum:
        raise InvalidArgument(f"{name} must be between 0 (the default) and {maximum}, got {value}")
    return value or default


class EvidenceHandlers:
    evidence: Evidence  # set by AdminService's constructor

    @grpclib_handler
    async def ReadAudit(self, stream):
        req = await stream.recv_message()
        self.operator(stream)
        ev = self.evidence
        if req.last < 0 or req.since_seq < 0:
            raise InvalidArgument("last and since_seq must not be negative")
        flt = AuditFilter(action=bounded_ref("action", req.action), decision=bounded_ref("decision", req.decision),
                          actor=bounded_ref("actor", req.actor), subject=bounded_ref("subject", req.subject),
                          since_ts=req.since_ts)
        seq = req.since_seq
        if req.from_end:
            seq = await asyncio.to_thread(ev.newest_seq)
        elif req.last:
            if flt == AuditFilter():  # unfiltered: read only the last N, not the whole trail
                seq = max(seq, await asyncio.to_thread(ev.newest_seq) - req.last)
            last: collections.deque[AuditRecord] = collections.deque(maxlen=req.last)
            seq = await self._scan(ev, flt, seq, last.append)
            for r in last:
                await stream.send_message(record_pb(r))
        else:
            seq = await self._send_since(stream, ev, flt, seq)
        while req.follow:
            w = ev.feed.waiter()
            try:
                seq = await self._send_since(stream, ev, flt, seq)
                try:
                    await asyncio.wait_for(w[1].wait(), FOLLOW_POLL)
                except asyncio.TimeoutError:
                    pass
            finally:
                ev.feed.forget(w)

    async def _send_since(self, stream, ev: Evidence, flt: AuditFilter, seq: int) -> int:
        more = True
        while more:  # page by page: no read holds the store's lock for long, and sending starts at once
            matching: list[AuditRecord] = []
            seq, more = await self._page(ev, flt, seq, matching.append)
            for r in matching:
                await stream.send_message(record_pb(r))
        return seq

    async def _scan(self, ev: Evidence, flt: AuditFilter, seq: int, keep) -> int:
        """Every matching record after `seq` to `keep`, page by page; returns the last seq read."""
        more = True
        while more:
            seq, more = await self._page(ev, flt, seq, keep)
        return seq

    @staticmethod
    async def _page(ev: Evidence, flt: AuditFilter, seq: int, keep) -> tuple[int, bool]:
        page = await asyncio.to_thread(ev.store.audit_records, seq, PAGE)
        for r in page:
            if flt.matches(r):
                keep(r)
        return (page[-1].seq if page else seq), len(page) == PAGE

    @grpclib_handler
    async def VerifyAudit(self, stream):
        await stream.recv_message()
        self.operator(stream)
        ev = self.evidence
        check = await asyncio.to_thread(ev.verify)
        await stream.send_message(admin_pb2.AuditVerification(
            ok=check.ok, records=check.records, last_seq=check.last_seq, bad_seq=check.bad_seq,
            problem=check.problem))

    @grpclib_handler
    async def Report(self, stream):
        req = await stream.recv_message()
        self.operator(stream)
        ev = self.evidence
        d = report.Thresholds()
        th = report.Thresholds(unused_days=_positive("unused_days", req.unused_days, d.unused_days, 3650),
                               expiring_days=_positive("expiring_days", req.expiring_days, d.expiring_days, 3650),
                               silent_hours=_positive("silent_hours", req.silent_hours, d.silent_hours, 87600))
        data = await asyncio.to_thread(ev.build_report, th)
        await stream.send_message(admin_pb2.ReportResponse(json=json.dumps(data, sort_keys=True)))
