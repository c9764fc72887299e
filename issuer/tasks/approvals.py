"""Task requests waiting for a human: pending for a bounded time, then approved, denied, expired or withdrawn.

Pending requests live in memory only: the caller holds a stream open while it
waits, so an issuer restart ends both the stream and the request (the caller
sees UNAVAILABLE and may ask again).

Invariants:
- A waiting caller holds no thread: it awaits an asyncio future on its event loop, which a
  decision made on another thread (the admin API) resolves through call_soon_threadsafe.
- The lock guards memory only, never a commit, so the event loop may take it. A request leaves
  the pending set exactly once (decided, expired or withdrawn), and only whoever took it out
  records that outcome; if that record fails, the request is pending again.
- A decision or an expiry is audited durably before the caller is told. A withdrawal (the caller
  went away) takes effect at once, waiting for no thread, and is recorded right after by one
  writer thread that batches them; close() records its withdrawals before it answers the callers.
- Pending requests are capped overall, per sidecar, per entry and per workload (policy.Limits):
  one past a cap is refused with RESOURCE_EXHAUSTED naming the cap, and nothing is recorded.
"""

from __future__ import annotations

import asyncio
import queue
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

from issuer import metrics
from issuer.core.models import ISSUER, Actor, AuditEvent
from issuer.datastore.interface import Datastore
from issuer.tasks import policy as pol
from tessera import logs
from tessera.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, Unavailable

log = logs.get("approvals")
_refusals = logs.Throttled(log)


@dataclass(frozen=True)
class ApprovalRequest:
    id: str
    task_id: str
    entry_id: str
    spiffe_id: str
    owner: str
    tier: str
    scopes: tuple[str, ...]
    ttl: int
    context: dict[str, str]
    sidecar_id: str
    workload: dict[str, Any]
    reason: str  # why a human must decide
    rule: str
    created_at: int
    expires_at: int
    state: str = "pending"  # pending | approved | denied | expired | cancelled
    decided_by: str = ""
    decision_reason: str = ""

    def details(self) -> dict[str, Any]:
        return {"approval_id": self.id, "task_id": self.task_id, "entry_id": self.entry_id,
                "scopes": list(self.scopes), "ttl": self.ttl, "context": dict(self.context),
                "sidecar_id": self.sidecar_id, "rule": self.rule, "expires_at": self.expires_at}


def caps(req: ApprovalRequest, limits: pol.Limits) -> list[tuple[str, tuple, int, str]]:
    """(setting, counting key, limit, who) for each cap a pending request counts against."""
    wl = pol.workload_key(req.sidecar_id, req.workload)
    return [("max_pending", ("all",), limits.max_pending, "the issuer"),
            ("max_pending_per_sidecar", ("sidecar", req.sidecar_id), limits.max_pending_per_sidecar,
             f"sidecar {req.sidecar_id}"),
            ("max_pending_per_entry", ("entry", req.entry_id), limits.max_pending_per_entry, f"entry {req.entry_id}"),
            ("max_pending_per_workload", ("workload", *wl), limits.max_pending_per_workload,
             pol.describe_workload(wl))]


@dataclass(eq=False)
class _Slot:
    req: ApprovalRequest
    keys: tuple[tuple, ...]  # the caps it counts against while pending
    taken: bool = False  # out of the pending set: its outcome is being recorded, or is final
    final: ApprovalRequest | None = None
    waiter: asyncio.Future | None = None


def _resolve(waiter: asyncio.Future, final: ApprovalRequest) -> None:
    if not waiter.done():
        waiter.set_result(final)


class Approvals:
    def __init__(self, store: Datastore, timeout: int, limits: pol.Limits = pol.Limits()):
        self.store = store
        self.timeout = timeout
        self.limits = limits
        self._lock = threading.Lock()
        # Pending, being decided, or final and not yet collected by a caller that has not come to wait
        # (decided or withdrawn right after it was told it is pending; kept until it would have expired).
        self._slots: dict[str, _Slot] = {}
        self._counts: Counter = Counter()
        self._closed = False
        self._withdrawn: queue.SimpleQueue[AuditEvent | None] = queue.SimpleQueue()
        self._recorder = threading.Thread(target=self._record_withdrawals, name="approval-withdrawals", daemon=True)
        self._recorder.start()

    # -- the pending set (memory only, under the lock) ------------------------------------------

    def _reserve(self, req: ApprovalRequest) -> tuple[tuple, ...]:
        counted = caps(req, self.limits)
        with self._lock:
            if self._closed:
                raise Unavailable("the issuer is stopping; ask again once it is back")
            full = next(((setting, key, limit, who) for setting, key, limit, who in counted
                         if self._counts[key] >= limit), None)
            if full is None:
                keys = tuple(key for _, key, _, _ in counted)
                self._counts.update(keys)
                metrics.set_pending_approvals(self._counts[("all",)])
                return keys
        setting, key, limit, who = full
        _refusals.log(f"{setting}:{key}", "approval request refused: cap reached", cap=setting, limit=limit, who=who,
                      entry_id=req.entry_id, task_id=req.task_id)
        raise ResourceExhausted(f"{who} already has {limit} task requests waiting for approval "
                                f"(policy {setting}); wait for a decision or withdraw one")

    def _release(self, keys: tuple[tuple, ...]) -> None:
        """Under the lock."""
        self._counts.subtract(keys)
        for k in keys:
            if self._counts[k] <= 0:
                del self._counts[k]
        metrics.set_pending_approvals(self._counts[("all",)])

    def _take(self, approval_id: str, unexpired: bool = False) -> _Slot | None:
        """Take a request out of the pending set; None if it is not pending (or, with unexpired, has expired)."""
        with self._lock:
            slot = self._slots.get(approval_id)
            if slot is None or slot.taken or (unexpired and slot.req.expires_at <= time.time()):
                return None
            slot.taken = True
            self._release(slot.keys)
            return slot

    def _put_back(self, slot: _Slot) -> None:
        """Recording the outcome failed: the request is pending again."""
        with self._lock:
            slot.taken = False
            self._counts.update(slot.keys)
            metrics.set_pending_approvals(self._counts[("all",)])

    def _settle(self, slot: _Slot, final: ApprovalRequest, keep: bool = True) -> None:
        """The outcome is final: hand it to the waiting caller, or keep it (unless not `keep`: nobody will come)
        until the caller comes to wait."""
        with self._lock:
            slot.final = final
            waiter = slot.waiter
            if waiter is not None or not keep:
                del self._slots[final.id]
            now = time.time()
            for k in [k for k, s in self._slots.items() if s.final and s.waiter is None and s.req.expires_at <= now]:
                del self._slots[k]
        if waiter is not None:
            try:
                waiter.get_loop().call_soon_threadsafe(_resolve, waiter, final)
            except RuntimeError:
                pass  # the caller's loop is closed: nobody is waiting any more

    # -- the operations -----------------------------------------------------------------------------

    def submit(self, req: ApprovalRequest, actor: Actor) -> ApprovalRequest:
        """Record a request as pending (id and times are set here). Blocks: a commit."""
        now = int(time.time())
        req = replace(req, id=secrets.token_hex(8), created_at=now, expires_at=now + self.timeout, state="pending")
        keys = self._reserve(req)
        try:
            self.store.append_audit([AuditEvent("task.approval_request", actor, "pending", reason=req.reason,
                                                subject=req.spiffe_id, details=req.details())])
        except BaseException:
            with self._lock:
                self._release(keys)
            raise
        slot = _Slot(req, keys)
        with self._lock:
            closed = self._closed
            if not closed:
                self._slots[req.id] = slot
            else:  # close() ran meanwhile and did not see this one
                self._release(keys)
        if closed:
            self.store.append_audit([self._withdrawal(req, "issuer stopping")])
            raise Unavailable("the issuer is stopping; ask again once it is back")
        return req

    def list(self) -> list[ApprovalRequest]:
        with self._lock:
            return sorted((s.req for s in self._slots.values() if not s.taken), key=lambda r: (r.created_at, r.id))

    def decide(self, approval_id: str, approve: bool, actor: Actor, reason: str) -> ApprovalRequest:
        """An operator's decision. Blocks: a commit."""
        if not reason.strip():
            raise InvalidArgument("a reason is required to approve or deny (--reason)")
        slot = self._take(approval_id, unexpired=True)
        if slot is None:
            raise NotFound(f"no pending approval {approval_id!r} (it may have been decided or expired)")
        final = replace(slot.req, state="approved" if approve else "denied", decided_by=actor.id,
                        decision_reason=reason.strip())
        self._record(slot, AuditEvent("task.approve" if approve else "task.approval_deny", actor,
                                      "allow" if approve else "deny", reason=reason.strip(),
                                      subject=final.spiffe_id, details=final.details()))
        self._settle(slot, final)
        return final

    def _record(self, slot: _Slot, event: AuditEvent) -> None:
        try:
            self.store.append_audit([event])
        except BaseException:
            self._put_back(slot)
            raise

    async def wait(self, req: ApprovalRequest) -> ApprovalRequest:
        """Until the request is decided, expires or is withdrawn; returns it in its final state. Holds no thread."""
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        with self._lock:
            slot = self._slots.get(req.id)
            if slot is not None and slot.final is not None:
                del self._slots[req.id]
                return slot.final
            if slot is None:
                raise FailedPrecondition(f"approval {req.id} is not pending")
            slot.waiter = waiter
        while not waiter.done():
            left = req.expires_at - time.time()
            if left > 0:
                await asyncio.wait({waiter}, timeout=left)
                continue
            expiring = self._take(req.id)
            if expiring is None:  # someone is recording a decision or a withdrawal: it arrives on the waiter
                await asyncio.wait({waiter}, timeout=1.0)
                continue
            # A short commit, the one step of an expiry that needs a thread. It settles there too, so a caller
            # that leaves meanwhile leaves nothing half done.
            await loop.run_in_executor(None, self._expire, expiring)
        return waiter.result()

    def _expire(self, slot: _Slot) -> None:
        req = slot.req
        self._record(slot, AuditEvent("task.approval_expire", ISSUER, "deny",
                                      reason=f"no decision within {self.timeout}s", subject=req.spiffe_id,
                                      details=req.details()))
        self._settle(slot, replace(req, state="expired", decided_by="issuer", decision_reason="nobody decided in time"))

    @staticmethod
    def _withdrawal(req: ApprovalRequest, why: str) -> AuditEvent:
        return AuditEvent("task.approval_cancel", ISSUER, "done", reason=why, subject=req.spiffe_id,
                          details=req.details())

    def withdraw(self, approval_id: str, why: str) -> None:
        """The caller went away: the request stops counting at once (recorded right after), unless already final.

        Never blocks, so the event loop calls it directly.
        """
        slot = self._take(approval_id)
        if slot is None:
            return
        self._settle(slot, replace(slot.req, state="cancelled", decided_by="caller", decision_reason=why), keep=False)
        self._withdrawn.put(self._withdrawal(slot.req, why))

    def _record_withdrawals(self) -> None:
        """The writer thread: every withdrawal queued so far in one commit, until close() sends None."""
        while True:
            batch = [self._withdrawn.get()]
            while not self._withdrawn.empty():
                batch.append(self._withdrawn.get())
            events = [e for e in batch if e is not None]
            if events:
                try:
                    self.store.append_audit(events)
                except Exception as e:  # noqa: BLE001 - the requests are withdrawn either way; say so once
                    _refusals.log("record-withdrawals", "could not record withdrawn approval requests",
                                  count=len(events), error=repr(e))
            if None in batch:
                return

    def close(self) -> None:
        """The issuer is stopping: refuse new requests and end every wait (their callers get an answer)."""
        with self._lock:
            self._closed = True
            ids = [s.req.id for s in self._slots.values() if not s.taken]
        slots = [s for s in map(self._take, ids) if s is not None]
        try:
            if slots:
                self.store.append_audit([self._withdrawal(s.req, "issuer stopping") for s in slots])
        except Exception as e:  # noqa: BLE001 - the callers get their answer all the same
            log.error("could not record approval requests withdrawn at stop", count=len(slots), error=repr(e))
        for s in slots:
            self._settle(s, replace(s.req, state="cancelled", decided_by="caller", decision_reason="issuer stopping"))
        self._withdrawn.put(None)
        self._recorder.join(timeout=10)
