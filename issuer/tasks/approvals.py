"""Task requests waiting for a human: pending for a bounded time, then approved, denied, expired or withdrawn.

Pending requests live in the datastore (its `approvals` table), so every issuer on one database lists and
decides them, whichever issuer the caller waits on. The caller waits on the issuer it asked, holding its
stream open; that issuer learns the outcome directly when it decided, and from the change feed (an
`approval` change, applied by issuer/peers.py) when another issuer did.

Invariants:
- A waiting caller holds no thread: it awaits an asyncio future on its event loop, which an outcome learnt
  on another thread (the admin API, the change feed's follower) resolves through call_soon_threadsafe.
- A request leaves `pending` exactly once: every outcome is a compare-and-set in the store (pending ->
  approved | denied | expired | cancelled) committed with its audit record and its change, so of two issuers
  deciding at once one wins and the other is told it is no longer pending. A decision after expires_at is
  refused; an expiry before it is refused.
- A decision or an expiry is audited durably before the caller is told. A withdrawal (the caller went away)
  takes effect here at once, waiting for no thread: list() hides it and this issuer's next request records it
  first (so it makes room under the caps at once); one writer thread records withdrawals in batches; close()
  records its withdrawals before it answers the callers.
- Pending requests are capped overall, per sidecar, per entry and per workload (policy.Limits), counted in
  the store under its write lock, so issuers together never pass a cap: one past a cap is refused with
  RESOURCE_EXHAUSTED naming the cap, and nothing is recorded. The counts are over every issuer's pending,
  unexpired requests.
- A request whose issuer died (its caller gone with it) is not listed once it has expired, and the writer
  thread of every issuer expires such stale requests (audited) every SWEEP_INTERVAL; the issuer a caller waits
  on expires its own at expires_at.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from dataclasses import dataclass, replace

from issuer import metrics
from issuer.core.models import ISSUER, Actor, ApprovalCap, ApprovalRequest, AuditEvent
from issuer.datastore.interface import Datastore
from issuer.tasks import policy as pol
from tessera import logs
from tessera.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, Unavailable

__all__ = ["ApprovalRequest", "Approvals", "caps"]

log = logs.get("approvals")
_refusals = logs.Throttled(log)

SWEEP_INTERVAL = 10.0  # seconds between two sweeps for stale requests (their issuer died before they expired)
STALE_AFTER = 5  # seconds past expires_at before a sweep expires a request: its own issuer, if alive, does it first
RETRY_INTERVAL = 1.0  # seconds before the writer tries again to record withdrawals (the database was down)


def caps(req: ApprovalRequest, limits: pol.Limits) -> list[ApprovalCap]:
    """Each cap a pending request counts against."""
    wl = pol.workload_key(req.sidecar_id, req.workload)
    return [ApprovalCap("max_pending", (), limits.max_pending, "the issuer"),  # every issuer's together
            ApprovalCap("max_pending_per_sidecar", (("sidecar_id", req.sidecar_id),), limits.max_pending_per_sidecar,
                        f"sidecar {req.sidecar_id}"),
            ApprovalCap("max_pending_per_entry", (("entry_id", req.entry_id),), limits.max_pending_per_entry,
                        f"entry {req.entry_id}"),
            ApprovalCap("max_pending_per_workload", (("sidecar_id", wl[0]), ("uid", wl[1])),
                        limits.max_pending_per_workload, pol.describe_workload(wl))]


@dataclass(eq=False)
class _Slot:
    """A request submitted through this issuer whose caller has not collected its outcome yet."""

    req: ApprovalRequest
    final: ApprovalRequest | None = None
    waiter: asyncio.Future | None = None


def _resolve(waiter: asyncio.Future, final: ApprovalRequest) -> None:
    if not waiter.done():
        waiter.set_result(final)


def _not_pending(approval_id: str, found: ApprovalRequest | None, now: float) -> Exception:
    """Why a request cannot be decided: unknown, decided (by whom), or expired."""
    if found is None:
        return NotFound(f"no pending approval {approval_id!r}: no request has that id")
    if found.state != "pending":
        return FailedPrecondition(f"no pending approval {approval_id!r}: it was {found.state} by {found.decided_by}"
                                  + (f" ({found.decision_reason})" if found.decision_reason else ""))
    if found.expires_at <= now:
        return FailedPrecondition(f"no pending approval {approval_id!r}: it expired (nobody decided within "
                                  f"{found.expires_at - found.created_at}s)")
    return FailedPrecondition(f"no pending approval {approval_id!r}: its caller went away")


class Approvals:
    def __init__(self, store: Datastore, timeout: int, limits: pol.Limits = pol.Limits(),
                 sweep_interval: float = SWEEP_INTERVAL):
        self.store = store
        self.timeout = timeout
        self.limits = limits
        self._lock = threading.Lock()  # guards memory only, never a commit: the event loop may take it
        self._slots: dict[str, _Slot] = {}
        self._closed = False
        # Withdrawn here and not yet recorded in the store: list() hides them; the writer (or the next submit)
        # records them.
        self._withdrawn: dict[str, tuple[ApprovalRequest, str]] = {}
        self._flushing = threading.Lock()  # one recorder of withdrawals at a time
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._sweep_interval = sweep_interval
        self._writer = threading.Thread(target=self._run, name="approval-writer", daemon=True)
        self._writer.start()

    def _count(self) -> None:
        """Under the lock: this issuer's callers still waiting for an outcome (the gauge)."""
        metrics.set_pending_approvals(sum(1 for s in self._slots.values() if s.final is None))

    # -- the operations -----------------------------------------------------------------------------

    def submit(self, req: ApprovalRequest, actor: Actor) -> ApprovalRequest:
        """Record a request as pending (id and times are set here). Blocks: a commit."""
        now = int(time.time())
        req = replace(req, id=secrets.token_hex(8), created_at=now, expires_at=now + self.timeout, state="pending")
        self._record_withdrawals()  # a withdrawal made here makes room under the caps at once
        slot = _Slot(req)
        with self._lock:
            if self._closed:
                raise Unavailable("the issuer is stopping; ask again once it is back")
            # Before the commit: a decision made elsewhere the moment it is visible finds its slot.
            self._slots[req.id] = slot
            self._count()
        try:
            full = self.store.create_approval(req, caps(req, self.limits), AuditEvent(
                "task.approval_request", actor, "pending", reason=req.reason, subject=req.spiffe_id,
                details=req.details()))
        except BaseException:
            self._forget(req.id)
            raise
        if full is not None:
            self._forget(req.id)
            _refusals.log(f"{full.setting}:{full.where}", "approval request refused: cap reached", cap=full.setting,
                          limit=full.limit, who=full.who, entry_id=req.entry_id, task_id=req.task_id)
            raise ResourceExhausted(f"{full.who} already has {full.limit} task requests waiting for approval "
                                    f"(policy {full.setting}); wait for a decision or withdraw one")
        with self._lock:
            closed = self._closed
        if closed:  # close() ran meanwhile and may not have found it in the store yet
            self._forget(req.id)
            self._finish([self._withdrawal(req, "issuer stopping")])
            raise Unavailable("the issuer is stopping; ask again once it is back")
        return req

    def _forget(self, approval_id: str) -> None:
        with self._lock:
            self._slots.pop(approval_id, None)
            self._count()

    def list(self) -> list[ApprovalRequest]:
        """Every issuer's pending, unexpired requests, oldest first (but those withdrawn here a moment ago)."""
        found = self.store.list_approvals(int(time.time()))
        with self._lock:
            return [r for r in found if r.id not in self._withdrawn]

    def decide(self, approval_id: str, approve: bool, actor: Actor, reason: str) -> ApprovalRequest:
        """An operator's decision, on any issuer. Blocks: a commit."""
        if not reason.strip():
            raise InvalidArgument("a reason is required to approve or deny (--reason)")
        req = self.store.get_approval(approval_id)
        now = time.time()
        with self._lock:
            withdrawn = approval_id in self._withdrawn
        if req is None or req.state != "pending" or req.expires_at <= now or withdrawn:
            raise _not_pending(approval_id, req, now)
        final = replace(req, state="approved" if approve else "denied", decided_by=actor.id,
                        decision_reason=reason.strip())
        won = self.store.finish_approvals([final], [AuditEvent(
            "task.approve" if approve else "task.approval_deny", actor, "allow" if approve else "deny",
            reason=reason.strip(), subject=final.spiffe_id, details=final.details())], int(now))
        if not won:  # another issuer (or the expiry, or the caller leaving) was first
            raise _not_pending(approval_id, self.store.get_approval(approval_id), time.time())
        self.settle(won[0])
        return won[0]

    def settle(self, final: ApprovalRequest) -> None:
        """An outcome committed (here, or by another issuer: issuer/peers.py): hand it to the waiting caller if it
        waits on this issuer, or keep it until the caller comes to wait. Never blocks."""
        if final.state == "pending":
            return
        with self._lock:
            slot = self._slots.get(final.id)
            if slot is None or slot.final is not None:
                return
            slot.final = final
            waiter = slot.waiter
            if waiter is not None:
                del self._slots[final.id]
            now = time.time()
            for k in [k for k, s in self._slots.items() if s.final and s.waiter is None and s.req.expires_at <= now]:
                del self._slots[k]  # a caller that never came to wait
            self._count()
        if waiter is not None:
            try:
                waiter.get_loop().call_soon_threadsafe(_resolve, waiter, final)
            except RuntimeError:
                pass  # the caller's loop is closed: nobody is waiting any more

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
            # A short commit, the one step of an expiry that needs a thread. It settles there too, so a caller
            # that leaves meanwhile leaves nothing half done.
            await loop.run_in_executor(None, self._expire, req)
            if not waiter.done():  # never expected (the store lost the row?): look again shortly, not in a spin
                await asyncio.wait({waiter}, timeout=1.0)
        return waiter.result()

    def _expire(self, req: ApprovalRequest) -> None:
        """Expire the request, or learn the outcome that was first (another issuer's decision, a sweep)."""
        won = self._finish([(replace(req, state="expired", decided_by="issuer",
                                     decision_reason="nobody decided in time"),
                             self._expiry(req, f"no decision within {req.expires_at - req.created_at}s"))])
        found = won[0] if won else self.store.get_approval(req.id)
        if found is not None:
            self.settle(found)

    @staticmethod
    def _expiry(req: ApprovalRequest, why: str) -> AuditEvent:
        return AuditEvent("task.approval_expire", ISSUER, "deny", reason=why, subject=req.spiffe_id,
                          details=req.details())

    @staticmethod
    def _withdrawal(req: ApprovalRequest, why: str) -> tuple[ApprovalRequest, AuditEvent]:
        return (replace(req, state="cancelled", decided_by="caller", decision_reason=why),
                AuditEvent("task.approval_cancel", ISSUER, "done", reason=why, subject=req.spiffe_id,
                           details=req.details()))

    def _finish(self, outcomes: list[tuple[ApprovalRequest, AuditEvent]]) -> list[ApprovalRequest]:
        if not outcomes:
            return []
        return self.store.finish_approvals([f for f, _ in outcomes], [a for _, a in outcomes], int(time.time()))

    def withdraw(self, approval_id: str, why: str) -> None:
        """The caller went away: the request is withdrawn here at once (recorded right after), unless already final.

        Never blocks, so the event loop calls it directly.
        """
        with self._lock:
            slot = self._slots.pop(approval_id, None)
            if slot is None or slot.final is not None:
                self._count()
                return
            self._withdrawn[approval_id] = (slot.req, why)
            self._count()
        if slot.waiter is not None:
            final = replace(slot.req, state="cancelled", decided_by="caller", decision_reason=why)
            try:
                slot.waiter.get_loop().call_soon_threadsafe(_resolve, slot.waiter, final)
            except RuntimeError:
                pass  # the caller's loop is closed
        self._wake.set()

    def _record_withdrawals(self) -> None:
        """Every withdrawal made here so far, in one commit; on failure they stay queued (the writer retries)."""
        with self._flushing:
            with self._lock:
                batch = list(self._withdrawn.values())
            if not batch:
                return
            try:
                self._finish([self._withdrawal(req, why) for req, why in batch])
            except Exception as e:  # noqa: BLE001 - withdrawn here either way; recorded once the store is back
                _refusals.log("record-withdrawals", "could not record withdrawn approval requests; retrying",
                              count=len(batch), error=repr(e))
                return
            with self._lock:  # recorded, or already final in the store (decided elsewhere): no longer pending
                for req, _ in batch:
                    self._withdrawn.pop(req.id, None)

    def sweep(self) -> int:
        """Expire the requests still pending STALE_AFTER past their expiry (their issuer died, or their caller
        left and its withdrawal was never recorded), audited; returns how many. Blocks: a commit."""
        stale = self.store.list_approvals(int(time.time()) - STALE_AFTER, expired=True)
        won = self._finish([(replace(r, state="expired", decided_by="issuer",
                                     decision_reason="nobody decided in time"),
                             self._expiry(r, f"no decision within {r.expires_at - r.created_at}s "
                                             "(expired by a sweep: its caller was gone)"))
                            for r in stale])
        for final in won:
            self.settle(final)
        return len(won)

    def _run(self) -> None:
        """The writer thread: withdrawals as they come (batched), and a sweep every sweep_interval."""
        next_sweep = time.monotonic() + self._sweep_interval
        while not self._stop.is_set():
            self._wake.wait(min(RETRY_INTERVAL if self._withdrawn else self._sweep_interval,
                                max(0.0, next_sweep - time.monotonic())))
            self._wake.clear()
            self._record_withdrawals()
            if time.monotonic() >= next_sweep and not self._stop.is_set():
                next_sweep = time.monotonic() + self._sweep_interval
                try:
                    self.sweep()
                except Exception as e:  # noqa: BLE001 - the next sweep tries again
                    _refusals.log("sweep", "could not expire stale approval requests", error=repr(e))

    def close(self) -> None:
        """The issuer is stopping: refuse new requests and end every wait (their callers get an answer)."""
        with self._lock:
            self._closed = True
            slots = [s for s in self._slots.values() if s.final is None]
        self._stop.set()
        self._wake.set()
        self._writer.join(timeout=10)
        self._record_withdrawals()
        won: dict[str, ApprovalRequest] = {}
        try:
            won = {f.id: f for f in self._finish([self._withdrawal(s.req, "issuer stopping") for s in slots])}
        except Exception as e:  # noqa: BLE001 - the callers get their answer all the same
            log.error("could not record approval requests withdrawn at stop", count=len(slots), error=repr(e))
        for s in slots:
            self.settle(won.get(s.req.id) or self._withdrawal(s.req, "issuer stopping")[0])
