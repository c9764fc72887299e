"""Task requests waiting for a human: pending for a bounded time, then approved, denied or expired.

Pending requests live in memory only: the caller holds a stream open while it
waits, so an issuer restart ends both the stream and the request (the caller
sees UNAVAILABLE and may ask again). Every state change is audited durably
before anyone is told of it.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

from issuer import metrics
from issuer.datastore import Datastore
from issuer.models import ISSUER, Actor, AuditEvent
from tessera.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable


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


@dataclass
class _Slot:
    req: ApprovalRequest
    done: threading.Event = field(default_factory=threading.Event)


class Approvals:
    def __init__(self, store: Datastore, timeout: int):
        self.store = store
        self.timeout = timeout
        self._lock = threading.Lock()
        self._slots: dict[str, _Slot] = {}
        # Finished before their caller came to wait (decided or withdrawn right after the caller was told
        # it is pending): kept until collected, or until they would have expired anyway.
        self._finished: dict[str, ApprovalRequest] = {}
        self._closed = False

    def submit(self, req: ApprovalRequest, actor: Actor) -> ApprovalRequest:
        """Record a request as pending (id and times are set here)."""
        if self._closed:
            raise Unavailable("the issuer is stopping; ask again once it is back")
        now = int(time.time())
        req = replace(req, id=secrets.token_hex(8), created_at=now, expires_at=now + self.timeout, state="pending")
        self.store.append_audit([AuditEvent("task.approval_request", actor, "pending", reason=req.reason,
                                            subject=req.spiffe_id, details=req.details())])
        with self._lock:
            self._slots[req.id] = _Slot(req)
            metrics.set_pending_approvals(len(self._slots))
            closed = self._closed
        if closed:  # close() ran meanwhile and may not have seen this one
            self.cancel(req.id, "issuer stopping")
            raise Unavailable("the issuer is stopping; ask again once it is back")
        return req

    def list(self) -> list[ApprovalRequest]:
        with self._lock:
            return sorted((s.req for s in self._slots.values()), key=lambda r: (r.created_at, r.id))

    def _finish(self, approval_id: str, state: str, by: str, why: str, audit: AuditEvent) -> ApprovalRequest:
        """Move a pending request to its final state (audited first); NotFound if it is not pending."""
        with self._lock:
            slot = self._slots.get(approval_id)
            if slot is None:
                raise NotFound(f"no pending approval {approval_id!r} (it may have been decided or expired)")
            # Commit under the lock so a decision and an expiry can never both be recorded.
            self.store.append_audit([audit])
            slot.req = replace(slot.req, state=state, decided_by=by, decision_reason=why)
            del self._slots[approval_id]
            metrics.set_pending_approvals(len(self._slots))
            now = time.time()
            self._finished = {k: r for k, r in self._finished.items() if r.expires_at > now}
            self._finished[approval_id] = slot.req
        slot.done.set()
        return slot.req

    def decide(self, approval_id: str, approve: bool, actor: Actor, reason: str) -> ApprovalRequest:
        if not reason.strip():
            raise InvalidArgument("a reason is required to approve or deny (--reason)")
        with self._lock:
            slot = self._slots.get(approval_id)
            if slot is not None and slot.req.expires_at <= time.time():
                slot = None
        if slot is None:
            raise NotFound(f"no pending approval {approval_id!r} (it may have been decided or expired)")
        state = "approved" if approve else "denied"
        return self._finish(approval_id, state, actor.id, reason.strip(), AuditEvent(
            "task.approve" if approve else "task.approval_deny", actor, "allow" if approve else "deny",
            reason=reason.strip(), subject=slot.req.spiffe_id, details=slot.req.details()))

    def wait(self, req: ApprovalRequest) -> ApprovalRequest:
        """Block until the request is decided or expires; returns it in its final state."""
        with self._lock:
            slot = self._slots.get(req.id)
            final = self._finished.pop(req.id, None) if slot is None else None
        if final is not None:
            return final
        if slot is None:
            raise FailedPrecondition(f"approval {req.id} is not pending")
        if not slot.done.wait(max(0.0, req.expires_at - time.time())):
            try:
                return self._finish(req.id, "expired", "issuer", "nobody decided in time", AuditEvent(
                    "task.approval_expire", ISSUER, "deny",
                    reason=f"no decision within {self.timeout}s", subject=req.spiffe_id, details=req.details()))
            except NotFound:
                pass  # decided at the last moment
        with self._lock:
            self._finished.pop(req.id, None)
        return slot.req

    def cancel(self, approval_id: str, why: str) -> None:
        """The caller went away: stop waiting (audited), unless already decided."""
        with self._lock:
            slot = self._slots.get(approval_id)
        if slot is None:
            return
        try:
            self._finish(approval_id, "cancelled", "caller", why, AuditEvent(
                "task.approval_cancel", ISSUER, "done", reason=why,
                subject=slot.req.spiffe_id, details=slot.req.details()))
        except NotFound:
            pass

    def close(self) -> None:
        """The issuer is stopping: refuse new requests and end every wait (their callers get an answer)."""
        with self._lock:
            self._closed = True
        for req in self.list():
            self.cancel(req.id, "issuer stopping")
