"""The datastore contract: everything the issuer does with its store goes through these protocols.

Every write that changes state takes the audit event describing it, and the
implementation appends that record in the same transaction: a change and its
evidence commit together or not at all. Writes return only once durable. Each
committed audit record is published to the store's AuditRelay (given to its
constructor). Changes other issuer processes must see (entries, sidecars and their
bans, revocations, authorities, approvals) are appended to the change feed in the same
transaction; feed positions strictly increase in commit order.

A store makes no authorization decisions: it stores, finds and atomically
updates; the services decide. The engine (SQLite or PostgreSQL) is known only to
its own module; tests/contract/ is the suite every engine must pass.
"""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager
from typing import Callable, Iterable, Iterator, Mapping, Protocol, Sequence

from issuer.audit.relay import AuditRelay
from issuer.core.models import (ApprovalCap, ApprovalRequest, AuditEvent, AuditRecord, Authority, Change, Entry, Heads,
                                IssuedSerial, JoinToken, Revocation, Sidecar)
from issuer.datastore.rows import OwnChanges


DUPLICATE_SERIAL = "a serial recorded as issued was recorded before"  # AlreadyExists: the whole call recorded nothing


def live_task_message(task_id: str) -> str:
    """Why a task that has a live credential gets no second one (from record_task_issued, and the task
    service's own check before it asks a human)."""
    return f"task {task_id!r} already has a live credential; end it first"


class AuditReader(Protocol):
    """Read-only audit reads; what `tessera audit verify --db` opens (datastore.open_reader)."""

    def audit_records(self, since_seq: int = 0, limit: int | None = None) -> list[AuditRecord]: ...
    def audit_since(self, since_ts: float = 0.0) -> Iterator[AuditRecord]: ...
    def newest_audit_seq(self) -> int: ...
    def heads(self) -> Heads:
        """The change feed's, revocation log's and audit chain's last positions and every CRL number (0 for what the
        database does not hold yet): what the issuer's high-water mark is checked against."""
        ...
    def close(self) -> None: ...


class Opener(Protocol):
    """A picklable recipe for opening a store on the same data from another process (a signing worker)."""

    def open(self, relay: AuditRelay | None = None) -> Datastore: ...


class Datastore(AuditReader, Protocol):
    relay: AuditRelay  # where committed audit records are published

    def transaction(self) -> AbstractContextManager[None]:
        """Every store call this thread makes inside commits once, durably, or not at all (an exception
        inside rolls it all back); nested uses join the outer one."""
        ...

    # entries
    def create_entry(self, entry: Entry, audit: AuditEvent) -> None: ...  # AlreadyExists
    def update_entry(self, entry: Entry, audit: AuditEvent) -> None: ...  # NotFound
    def delete_entry(self, entry_id: str, audit: AuditEvent) -> None: ...  # NotFound
    def list_entries(self, parent_id: str | None = None) -> list[Entry]: ...

    # join tokens and sidecars
    def create_join_token(self, token: JoinToken, audit: AuditEvent) -> None: ...
    def consume_join_token(self, token_hash: str, now: int) -> JoinToken | None:
        """The token as it was (None if unknown), marked used at `now` if it was unused; the caller decides."""
        ...
    def upsert_sidecar(self, sidecar: Sidecar, audit: AuditEvent | None) -> None: ...
    def list_sidecars(self) -> list[Sidecar]: ...
    def touch_sidecar(self, sidecar_id: str, now: int) -> None: ...

    # issued serials
    def record_issued(self, serials: Sequence[IssuedSerial], audits: Sequence[AuditEvent]) -> None: ...
    def record_task_issued(self, serial: IssuedSerial, audit: AuditEvent) -> None:
        """Record a task credential's serial, or raise AlreadyExists (recording nothing) if its task (entry_id,
        task_id) has a live one: unexpired at serial.issued_at and not revoked. Checked and written under the
        write lock, so issuers racing for one task record one credential."""
        ...
    def get_issued(self, serial: str) -> IssuedSerial | None: ...
    def revoke_serials(self, serials: Sequence[str], reason: str, now: int,
                       audit: AuditEvent | None) -> list[str]: ...
    def find_issued(self, *, entry_id: str | None = None, task_id: str | None = None,
                    spiffe_id: str | None = None, sidecar_id: str | None = None,
                    unexpired_at: int | None = None, revoked: bool | None = None,
                    serials: Sequence[str] | None = None) -> list[IssuedSerial]: ...
    def last_issued_by_entry(self) -> dict[str, int]: ...

    # revocation log and CRL numbers
    def record_revocation(self, rec: Revocation) -> int: ...
    def revocations(self, kinds: Sequence[str] | None = None, since_seq: int = 0) -> list[Revocation]: ...
    def last_revocation_seq(self) -> int: ...
    def next_crl_number(self, authority: str) -> int: ...
    def raise_crl_numbers(self, floors: Mapping[str, int], audit: AuditEvent) -> None:
        """Move each authority's CRL number up to at least its floor (the next one taken is higher), never down, in
        one transaction with `audit` (an issuer accepting a restored database, issuer/datastore/highwater.py)."""
        ...

    # authorities (roots, intermediates, JWT keys); keys only sealed (issuer/ca/keys.py)
    def put_authority(self, authority: Authority, audit: AuditEvent | None, *,
                      expect_state: str | None = None) -> bool: ...
    def list_authorities(self) -> list[Authority]: ...
    def adopt_unattributed(self, authority: str) -> int: ...
    def count_outstanding(self, authority: str, now: int) -> int: ...

    # approvals: task requests waiting for a human (issuer/tasks/approvals.py), shared by every issuer
    def create_approval(self, req: ApprovalRequest, caps: Sequence[ApprovalCap],
                        audit: AuditEvent) -> ApprovalCap | None:
        """Store `req` (pending) with its audit record and an `approval` change, unless a cap is full: each counts the
        requests pending and unexpired at req.created_at, under the write lock, so two issuers cannot both pass one.
        Returns the first full cap (nothing written), or None once stored."""
        ...
    def finish_approvals(self, finals: Sequence[ApprovalRequest], audits: Sequence[AuditEvent],
                         now: int) -> list[ApprovalRequest]:
        """Compare-and-set, in one transaction: each request still pending takes finals[i]'s state, decided_by and
        decision_reason, with audits[i] and an `approval` change, where `now` allows it (approved or denied only
        before expires_at, expired only from then, cancelled at any time). Returns those that moved, as stored:
        of two stores finishing one request at once, one wins."""
        ...
    def get_approval(self, approval_id: str) -> ApprovalRequest | None: ...
    def list_approvals(self, now: int, expired: bool = False) -> list[ApprovalRequest]:
        """Pending requests unexpired at `now`, oldest first; expired=True: those still pending past expires_at."""
        ...

    # the change feed
    def changes_after(self, position: int, limit: int = 1000) -> list[Change]: ...
    def last_change_position(self) -> int: ...
    own_changes: OwnChanges  # the feed positions committed through this object (its process's own changes)
    poll_interval: float  # seconds between a follower's reads of the feed when nothing woke it
    def watch_changes(self, wake: Callable[[], None], stop: threading.Event) -> None:
        """Call wake() when another process committed a change, until stop is set (blocks; may return at once when
        the engine cannot notify)."""

    # audit (reads are AuditReader's)
    def append_audit(self, events: Iterable[AuditEvent]) -> None: ...

    def opener(self) -> Opener: ...
    def close(self) -> None: ...
