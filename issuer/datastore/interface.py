"""The datastore interface the issuer depends on, and the audit hash chain rule.

Every write that changes state takes the audit event describing it, and the
implementation appends that record in the same transaction: a change and its
evidence commit together or not at all. Writes return only once durable.
"""

from __future__ import annotations

import hashlib
import json
from typing import Iterable, Protocol, Sequence

from issuer.core.models import AuditEvent, AuditRecord, Entry, IssuedSerial, JoinToken, Revocation, Sidecar

GENESIS_HASH = "0" * 64


def audit_hash(prev_hash: str, seq: int, ts: float, action: str, actor: dict, decision: str,
               reason: str, subject: str, details: dict) -> str:
    """Each record commits to its content and to the previous record's hash."""
    body = json.dumps(
        {"seq": seq, "ts": ts, "action": action, "actor": actor, "decision": decision,
         "reason": reason, "subject": subject, "details": details, "prev": prev_hash},
        sort_keys=True, separators=(",", ":"),
    )
    return hashlib.sha256(body.encode()).hexdigest()


def _json_or_raw(text):
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return {"unparseable": text}


def audit_record_from_row(row) -> AuditRecord:
    """An audit row (seq, ts, action, actor, decision, reason, subject, details, prev_hash, hash)."""
    return AuditRecord(row[0], row[1], row[2], _json_or_raw(row[3]), row[4], row[5], row[6],
                       _json_or_raw(row[7]), row[8], row[9])


class Datastore(Protocol):
    # entries
    def create_entry(self, entry: Entry, audit: AuditEvent) -> None: ...
    def update_entry(self, entry: Entry, audit: AuditEvent) -> None: ...
    def delete_entry(self, entry_id: str, audit: AuditEvent) -> None: ...
    def list_entries(self, parent_id: str | None = None) -> list[Entry]: ...

    # join tokens and sidecars
    def create_join_token(self, token: JoinToken, audit: AuditEvent) -> None: ...
    def consume_join_token(self, token_hash: str, now: int) -> JoinToken: ...
    def upsert_sidecar(self, sidecar: Sidecar, audit: AuditEvent | None) -> None: ...
    def list_sidecars(self) -> list[Sidecar]: ...
    def touch_sidecar(self, sidecar_id: str, now: int) -> None: ...

    # issued serials
    def record_issued(self, serials: Sequence[IssuedSerial], audits: Sequence[AuditEvent]) -> None: ...
    def get_issued(self, serial: str) -> IssuedSerial | None: ...
    def revoke_serials(self, serials: Sequence[str], reason: str, now: int,
                       audit: AuditEvent | None) -> list[str]: ...
    def find_issued(self, *, entry_id: str | None = None, task_id: str | None = None,
                    spiffe_id: str | None = None, sidecar_id: str | None = None,
                    unexpired_at: int | None = None, revoked: bool | None = None) -> list[IssuedSerial]: ...

    # revocation log and CRL numbers
    def record_revocation(self, rec: Revocation) -> int: ...
    def revocations(self, kinds: Sequence[str] | None = None, since_seq: int = 0) -> list[Revocation]: ...
    def last_revocation_seq(self) -> int: ...
    def next_crl_number(self) -> int: ...
    def save_crl(self, number: int, this_update: int, next_update: int, der: bytes) -> None: ...

    # audit
    def append_audit(self, events: Iterable[AuditEvent]) -> None: ...
    def audit_records(self, since_seq: int = 0, limit: int | None = None) -> list[AuditRecord]: ...

    def close(self) -> None: ...
