"""Task credentials: decide by policy (and a human where required), sign with the task binding, revoke on end.

A sidecar may request tasks only for entries whose parent it is, and only for
workloads whose kernel-attested selectors (which it forwards) match the entry.
Each issued task serial is recorded (kind "task") before the credential leaves.

A request runs on the issuer's event loop. Its blocking steps take a thread in turns: per workload
(a uid on a sidecar, policy.workload_key) and per sidecar, a few at once and a bounded number
queued, so one agent's burst delays only itself. A wait for a human holds no thread and no turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Hashable

from cryptography.exceptions import InvalidSignature

from issuer.ca.authorities import Authorities
from issuer.core.models import Actor, ApprovalRequest, AuditEvent, Entry, IssuedSerial, Sidecar, SignResult
from issuer.datastore.interface import Datastore, live_task_message
from issuer.identity.registration import Registry, validate_scopes
from issuer.revocation.service import RevocationService
from issuer.tasks import policy as pol
from issuer.tasks.approvals import Approvals
from tessera import selectors as sel
from tessera import pem, spiffeid, taskext, x509svid
from tessera.errors import (AlreadyExists, DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied,
                            ResourceExhausted, Unavailable)
from tessera.taskspec import TaskSpec

_TASK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}$")
_CONTEXT_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
MAX_CONTEXT = 32
MAX_CONTEXT_VALUE = 256


@dataclass(frozen=True)
class TaskSVID:
    entry_id: str
    spiffe_id: str
    task_id: str
    scopes: tuple[str, ...]
    chain_der: bytes  # DER, the leaf then its signer
    serial: str
    expires_at: int


def validate_context(context: dict[str, str]) -> dict[str, str]:
    if len(context) > MAX_CONTEXT:
        raise InvalidArgument(f"at most {MAX_CONTEXT} context entries")
    for k, v in context.items():
        if not _CONTEXT_KEY.match(k):
            raise InvalidArgument(f"invalid context key {k!r}: use letters, digits and _ (not first a digit)")
        if len(v) > MAX_CONTEXT_VALUE:
            raise InvalidArgument(f"context value for {k!r} is longer than {MAX_CONTEXT_VALUE} characters")
    return dict(context)


@dataclass(eq=False)
class _Ticket:
    """One task request's progress, filled in by its blocking steps and read by its coroutine's cleanup."""

    started: float
    key: tuple[str, str] | None = None  # (entry id, task id), held in _in_flight
    approval: ApprovalRequest | None = None
    svid: TaskSVID | None = None
    public_key: Any = None
    actor: Actor | None = None
    decision: pol.Decision | None = None
    spec: TaskSpec | None = None  # the request once its scopes and context are checked
    details: dict = field(default_factory=dict)


async def _on_thread(fn, *args) -> None:
    """fn(*args) on the loop's executor. If the caller goes away meanwhile, the step still finishes (a thread
    cannot be stopped) and is waited for, so the turn it holds and what it recorded are cleaned up after it."""
    step = asyncio.get_running_loop().run_in_executor(None, fn, *args)
    try:
        await asyncio.shield(step)
    except asyncio.CancelledError:
        await asyncio.wait({step})
        raise


class Turns:
    """Per key (a workload, a sidecar): at most `threads` callers at once in their blocking steps, at most
    `limit` holding or waiting for a turn; one more is refused with RESOURCE_EXHAUSTED naming `setting`
    (unless `refuse` is false: a request a human approved waits its turn but is never turned away).
    A caller waiting for its turn holds no thread. Event loop only."""

    def __init__(self, setting: str, limit: int, threads: int):
        self.setting, self.limit, self.threads = setting, limit, threads
        self._count: Counter = Counter()
        self._turns: dict[Hashable, asyncio.Semaphore] = {}

    @contextlib.asynccontextmanager
    async def turn(self, key: Hashable, who: str, refuse: bool = True):
        if refuse and self._count[key] >= self.limit:
            raise ResourceExhausted(f"{who} already has {self.limit} task requests in progress "
                                    f"(policy {self.setting}); retry when they are answered")
        self._count[key] += 1
        sem = self._turns.setdefault(key, asyncio.Semaphore(self.threads))
        try:
            async with sem:
                yield
        finally:
            self._count[key] -= 1
            if not self._count[key]:
                del self._count[key], self._turns[key]


def entry_view(e: Entry) -> dict[str, Any]:
    """What policy rules see of an entry."""
    return {"id": e.id, "spiffe_id": e.spiffe_id, "owner": e.owner, "purpose": e.purpose, "tier": e.tier,
            "scopes": list(e.scopes), "selectors": list(e.selectors), "state": e.state,
            "expires_at": e.expires_at, "parent_id": e.parent_id}


class TaskService:
    def __init__(self, store: Datastore, authorities: Authorities, registry: Registry,
                 policy: pol.Policy, approvals: Approvals, revocation: RevocationService):
        self.store = store
        self.authorities = authorities
        self.registry = registry
        self.policy = policy
        self.approvals = approvals
        # Refuses revoked entries, closes the sign/revoke race and ends tasks (durable, in the CRL, pushed
        # to sidecars), as for identity SVIDs.
        self.revocation = revocation
        self._lock = threading.Lock()
        self._in_flight: set[tuple[str, str]] = set()
        limits = policy.limits
        self._workload_turns = Turns("max_task_requests_per_workload", limits.max_task_requests_per_workload,
                                     limits.task_threads_per_workload)
        self._sidecar_turns = Turns("max_task_requests_per_sidecar", limits.max_task_requests_per_sidecar,
                                    limits.task_threads_per_sidecar)

    def _entry_for(self, sidecar: Sidecar, spec: TaskSpec, now: float) -> Entry:
        entry = self.registry.servable_for(spec.entry_id, sidecar.id, now)
        if not sel.matches(entry.selectors, spec.selectors):
            raise PermissionDenied(f"the calling workload does not match the selectors of entry {entry.id}")
        self.revocation.check_entry(entry)
        return entry

    @contextlib.asynccontextmanager
    async def _turn(self, sidecar: Sidecar, spec: TaskSpec, refuse: bool = True):
        """A turn at the issuer's threads for this workload and sidecar (waited for without a thread)."""
        wl = pol.workload_key(sidecar.id, spec.workload)
        async with self._workload_turns.turn(wl, pol.describe_workload(wl), refuse), \
                self._sidecar_turns.turn(sidecar.id, f"sidecar {sidecar.id}", refuse):
            yield

    async def request(self, sidecar: Sidecar, spec: TaskSpec) -> AsyncIterator[tuple[str, Any]]:
        """Yields ("pending", ApprovalRequest) while a human decides, then ("svid", TaskSVID). Raises on refusal.

        Runs on the event loop; only its short blocking steps (checks, policy, commits, signing) take a
        thread, in turns per workload and sidecar. A wait for a human takes none. A caller that goes
        away (the coroutine is cancelled or closed) withdraws its approval request at once.
        """
        ticket = _Ticket(time.monotonic())
        try:
            async with self._turn(sidecar, spec):
                await _on_thread(self._admit, sidecar, spec, ticket)
            if ticket.approval is not None:
                yield "pending", ticket.approval
                final = await self.approvals.wait(ticket.approval)
                if final.state == "denied":
                    raise PermissionDenied(f"approval {final.id} denied by {final.decided_by}: {final.decision_reason}")
                if final.state == "expired":
                    raise DeadlineExceeded(f"approval {final.id} expired: nobody decided within "
                                           f"{self.approvals.timeout}s")
                if final.state != "approved":  # withdrawn: the issuer is stopping
                    raise Unavailable(f"approval {final.id} was withdrawn: {final.decision_reason}")
                async with self._turn(sidecar, spec, refuse=False):
                    await _on_thread(self._issue_approved, sidecar, spec, ticket, final)
            yield "svid", ticket.svid
        finally:
            if ticket.approval is not None:
                self.approvals.withdraw(ticket.approval.id, "caller went away")  # nothing if already final
            if ticket.key is not None:
                with self._lock:
                    self._in_flight.discard(ticket.key)

    def _admit(self, sidecar: Sidecar, spec: TaskSpec, ticket: "_Ticket") -> None:
        """Check and decide; issue at once when policy allows, or submit for approval. Blocks."""
        if not _TASK_ID.match(spec.task_id or ""):
            raise InvalidArgument("invalid task_id: use 1-128 letters, digits and . _ : @ / -")
        spec = ticket.spec = replace(spec, scopes=validate_scopes(spec.scopes, per="task"),  # all go into the cert
                                     context=validate_context(spec.context))
        if spec.ttl <= 0:
            raise InvalidArgument("ttl_seconds must be positive")
        ticket.public_key = x509svid.csr_public_key(spec.csr)
        now = time.time()
        try:
            entry = self._entry_for(sidecar, spec, now)
        except PermissionDenied as e:
            self.store.append_audit([AuditEvent(
                "task.deny", Actor("workload", "unknown", {**spec.workload, "sidecar_id": sidecar.id}), "deny",
                reason=e.message, subject=spec.entry_id, details={**spec.audit_details(), "rule": "entry"})])
            raise
        ticket.actor = Actor("workload", entry.spiffe_id, {**spec.workload, "sidecar_id": sidecar.id})
        key = (entry.id, spec.task_id)
        with self._lock:
            if key in self._in_flight:
                raise AlreadyExists(f"task {spec.task_id!r} is already being requested")
            self._in_flight.add(key)
            ticket.key = key
        req = pol.TaskRequest(entry_view(entry), {"id": sidecar.id, "name": sidecar.name}, dict(spec.workload),
                              spec.task_id, spec.scopes, spec.ttl, spec.context, now)
        decision = ticket.decision = pol.evaluate(self.policy, req)
        ticket.details = {**spec.audit_details(), "rule": decision.rule}
        if decision.effect == "deny":
            self.store.append_audit([AuditEvent("task.deny", ticket.actor, "deny", reason=decision.reason,
                                                subject=entry.spiffe_id, details=ticket.details)])
            raise PermissionDenied(f"task denied by rule {decision.rule}: {decision.reason}")
        if decision.effect == "require_approval":
            self._refuse_live(entry.id, spec.task_id, int(now))  # before a human is asked; again when recording
            ticket.approval = self.approvals.submit(ApprovalRequest(
                "", spec.task_id, entry.id, entry.spiffe_id, entry.owner, entry.tier, spec.scopes, decision.ttl,
                dict(spec.context), sidecar.id, dict(spec.workload), decision.reason, decision.rule, 0, 0), ticket.actor)
            return
        ticket.svid = self._issue(sidecar, entry, spec.task_id, ticket)

    def _refuse_live(self, entry_id: str, task_id: str, now: int) -> None:
        if self.store.find_issued(entry_id=entry_id, task_id=task_id, unexpired_at=now, revoked=False):
            raise AlreadyExists(live_task_message(task_id))

    def _issue_approved(self, sidecar: Sidecar, spec: TaskSpec, ticket: "_Ticket", final: ApprovalRequest) -> None:
        entry = self._entry_for(sidecar, spec, time.time())  # it may have changed while a human decided
        ticket.details = {**ticket.details, "approval_id": final.id, "approved_by": final.decided_by}
        ticket.svid = self._issue(sidecar, entry, spec.task_id, ticket)

    def _issue(self, sidecar: Sidecar, entry: Entry, task_id: str, ticket: "_Ticket") -> TaskSVID:
        binding = ticket.spec.binding(entry.owner)
        signed = self.authorities.signer().sign(ticket.public_key, spiffeid.parse(entry.spiffe_id), ticket.decision.ttl,
                              not_after_cap=dt.datetime.fromtimestamp(entry.expires_at, dt.timezone.utc),
                              extra_extensions=[taskext.encode(binding)])
        now = int(time.time())
        not_after = int(signed.not_after.timestamp())
        latency_ms = round((time.monotonic() - ticket.started) * 1000, 3)
        record = IssuedSerial(signed.serial_hex, entry.spiffe_id, "task", entry.id, sidecar.id, now, not_after,
                              task_id=task_id, authority=signed.authority)
        # Refused if the task has a live credential: checked as it is recorded, under the write lock, so one
        # credential even when two issuers race for the task (and no read of its own before).
        self.store.record_task_issued(
            record, AuditEvent("task.issue", ticket.actor, "allow", reason=ticket.decision.reason,
                               subject=entry.spiffe_id,
                               details={**ticket.details, **record.audit_details(), "latency_ms": latency_ms}))
        [checked] = self.revocation.recheck_issued(
            [SignResult(entry.id, entry.spiffe_id, b"", signed.serial_hex, not_after)], sidecar.id)
        if checked.code:
            raise PermissionDenied(checked.error)
        return TaskSVID(entry.id, entry.spiffe_id, task_id, ticket.spec.scopes,
                        signed.chain_der, signed.serial_hex, not_after)

    def reissue(self, sidecar: Sidecar, chain_der: bytes, csr_der: bytes) -> TaskSVID:
        """A task credential signed by a tainted authority, signed again by the active one: the same task binding and
        notAfter for a new key, without asking policy or a human again (the task was granted; only its signer
        changed). Only for the sidecar it was issued to, while it is unexpired and unrevoked."""
        public_key = x509svid.csr_public_key(csr_der)
        try:
            old = pem.split_der(chain_der)[0]
        except (ValueError, IndexError):
            raise InvalidArgument("cert_chain must be DER certificates, the task credential first") from None
        serial = x509svid.serial_hex(old.serial_number)
        issued = self.store.get_issued(serial)
        if issued is None or issued.kind != "task" or issued.sidecar_id != sidecar.id:
            raise PermissionDenied(f"certificate {serial} is not a task credential issued to {sidecar.id}")
        signer_cert = self.authorities.certificate(issued.authority or "")
        try:
            if signer_cert is None:
                raise ValueError("unknown signer")
            old.verify_directly_issued_by(signer_cert)  # the very certificate recorded, not one naming its serial
        except (ValueError, TypeError, InvalidSignature):
            raise PermissionDenied(f"certificate {serial} was not signed by this issuer") from None
        now = int(time.time())
        if issued.revoked_at is not None:
            raise PermissionDenied(f"task credential {serial} is revoked")
        if issued.not_after <= now:
            raise FailedPrecondition(f"task credential {serial} has expired")
        if self.authorities.get(issued.authority or "").state != "tainted":
            raise FailedPrecondition(f"task credential {serial} was not signed by a tainted authority; it is renewed "
                                     "by asking for the task again")
        binding = taskext.read(old)
        entry = self.registry.get(issued.entry_id or "")
        if binding is None or entry is None:
            raise PermissionDenied(f"certificate {serial} carries no task binding for a known entry")
        if entry.state != "active":
            raise PermissionDenied(f"entry {entry.id} is {entry.state}")
        self.revocation.check_entry(entry)
        signed = self.authorities.signer().sign(public_key, spiffeid.parse(entry.spiffe_id), issued.not_after - now,
                                                not_after_cap=old.not_valid_after_utc,
                                                extra_extensions=[taskext.encode(binding)])
        not_after = int(signed.not_after.timestamp())
        record = IssuedSerial(signed.serial_hex, entry.spiffe_id, "task", entry.id, sidecar.id, now, not_after,
                              task_id=issued.task_id, authority=signed.authority)
        self.store.record_issued([record], [AuditEvent(
            "task.reissue", Actor("sidecar", sidecar.id), "allow", reason=f"its signer {issued.authority} is tainted",
            subject=entry.spiffe_id, details={**record.audit_details(), "replaces": serial,
                                              "task_id": issued.task_id, "entry_id": entry.id})])
        [checked] = self.revocation.recheck_issued(
            [SignResult(entry.id, entry.spiffe_id, b"", signed.serial_hex, not_after)], sidecar.id)
        if checked.code:
            raise PermissionDenied(checked.error)
        return TaskSVID(entry.id, entry.spiffe_id, issued.task_id or "", tuple(binding.scopes), signed.chain_der,
                        signed.serial_hex, not_after)

    def end(self, sidecar: Sidecar, task_id: str, entry_id: str, reason: str, actor: Actor) -> list[str]:
        """Revoke the live credentials of one of this sidecar's tasks; returns the serials revoked now."""
        if not task_id:
            raise InvalidArgument("task_id is required")
        issued = self.store.find_issued(task_id=task_id, sidecar_id=sidecar.id, entry_id=entry_id or None)
        if not issued:
            raise NotFound(f"no task {task_id!r} was issued through {sidecar.id}")
        live = [i for i in issued if i.revoked_at is None]
        if not live:
            return []
        return self.revocation.end_task(live, reason or "task ended", actor, task_id)
