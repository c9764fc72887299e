"""What every engine shares: records to rows and back, the audit chain's next records, group commit.

Rows are read by column name (sqlite3.Row or psycopg's dict rows); JSON columns are
text, so an audit row reads back exactly as it was hashed.
"""

from __future__ import annotations

import dataclasses
import json
import operator
import threading
import time
from typing import Callable, Sequence

from issuer.core.models import (APPROVAL_CAP_COLUMNS, APPROVAL_FIELDS, APPROVAL_JSON_FIELDS, AUDIT_FIELDS,
                                AUDIT_JSON_FIELDS, AUTHORITY_FIELDS, ISSUED_FIELDS, ApprovalCap, ApprovalRequest,
                                AuditEvent, AuditRecord, Authority, Entry, IssuedSerial, Sidecar, audit_hash)
from tessera.errors import FailedPrecondition


_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"))  # one kept: json.dumps makes one per call


def dumps(v) -> str:
    return _JSON.encode(v)


def change_payload(obj) -> str:
    return dumps(dataclasses.asdict(obj))


def entry_from(row) -> Entry:
    return Entry(
        id=row["id"], spiffe_id=row["spiffe_id"], parent_id=row["parent_id"],
        selectors=tuple(json.loads(row["selectors"])), owner=row["owner"], purpose=row["purpose"],
        tier=row["tier"], scopes=tuple(json.loads(row["scopes"])), x509_ttl=row["x509_ttl"],
        expires_at=row["expires_at"], state=row["state"], created_by=row["created_by"],
        created_at=row["created_at"], updated_at=row["updated_at"], revision=row["revision"],
    )


def entry_row(entry: Entry) -> tuple:
    """The entries table's columns, in order."""
    return (entry.id, entry.spiffe_id, entry.parent_id, dumps(list(entry.selectors)), entry.owner, entry.purpose,
            entry.tier, dumps(list(entry.scopes)), entry.x509_ttl, entry.expires_at, entry.state, entry.created_by,
            entry.created_at, entry.updated_at, entry.revision)


def sidecar_from(row) -> Sidecar:
    return Sidecar(**{k: row[k] for k in row.keys()})


def issued_from(row) -> IssuedSerial:
    return IssuedSerial(**{k: row[k] for k in row.keys()})


def authority_from(row) -> Authority:
    return Authority(**{k: (bytes(row[k]) if isinstance(row[k], (bytes, memoryview)) else row[k])
                        for k in AUTHORITY_FIELDS})


# The issued and authorities tables' rows, named column by column from the records' fields.
issued_row = operator.attrgetter(*ISSUED_FIELDS)
authority_row = operator.attrgetter(*AUTHORITY_FIELDS)

# The approvals table: ApprovalRequest's fields in order, then the workload's uid (what the per-workload cap counts).
APPROVAL_COLUMNS = (*APPROVAL_FIELDS, "uid")


def approval_row(req: ApprovalRequest) -> tuple:
    return (*(dumps(list(v) if isinstance(v, tuple) else v) if k in APPROVAL_JSON_FIELDS else v
              for k, v in ((k, getattr(req, k)) for k in APPROVAL_FIELDS)), req.uid)


def approval_from(row) -> ApprovalRequest:
    """From a row of the approvals table, or a change feed payload (JSON fields already parsed)."""
    values = {k: row[k] for k in APPROVAL_FIELDS}
    for k in APPROVAL_JSON_FIELDS:
        if isinstance(values[k], str):
            values[k] = json.loads(values[k])
    return ApprovalRequest(**{**values, "scopes": tuple(values["scopes"])})


def approval_still_open(state: str, now: int) -> str:
    """The SQL condition (beyond state = 'pending') under which a pending request may become `state` at `now`: a
    decision only before it expires, an expiry only after; a withdrawal at any time."""
    if state in ("approved", "denied"):
        return f"expires_at > {int(now)}"
    if state == "expired":
        return f"expires_at <= {int(now)}"
    if state == "cancelled":
        return "1 = 1"
    raise ValueError(f"not a final approval state: {state!r}")


def approval_cap_where(cap: ApprovalCap, now: int, mark: str) -> tuple[str, list]:
    """The WHERE clause counting the pending, unexpired requests `cap` limits (`mark`: the engine's placeholder)."""
    clauses, args = [f"state = 'pending' AND expires_at > {int(now)}"], []
    for column, value in cap.where:
        if column not in APPROVAL_CAP_COLUMNS:
            raise ValueError(f"approvals are not counted by {column!r}")
        clauses.append(f"{column} = {mark}")
        args.append(value)
    return " AND ".join(clauses), args


# The audit table's columns are AuditRecord's fields, in order; actor and details are JSON text.
# Each authority's CRL number is a row of `meta` keyed "crl_number:<authority id>" (both engines).
CRL_NUMBERS_QUERY = "SELECT substr(key, 12), value FROM meta WHERE substr(key, 1, 11) = 'crl_number:'"
AUDIT_COLUMNS = ", ".join(AUDIT_FIELDS)


def _json_or_raw(text):
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return {"unparseable": text}


_audit_values = operator.attrgetter(*AUDIT_FIELDS)
_AUDIT_JSON_AT = tuple(i for i, k in enumerate(AUDIT_FIELDS) if k in AUDIT_JSON_FIELDS)


def audit_row(r: AuditRecord) -> tuple:
    # One attrgetter and the JSON columns by position: a generator testing each field cost ~2 us per record.
    row = list(_audit_values(r))
    for i in _AUDIT_JSON_AT:
        row[i] = dumps(row[i])
    return tuple(row)


def audit_record(row) -> AuditRecord:
    """From a row of AUDIT_COLUMNS; JSON that no longer parses (a tampered row) is kept for the verifier to flag."""
    return AuditRecord(*(_json_or_raw(v) if k in AUDIT_JSON_FIELDS else v for k, v in zip(AUDIT_FIELDS, row)))


def chain(events: Sequence[AuditEvent], head_seq: int, head_hash: str) -> list[AuditRecord]:
    """The records `events` become after the chain's head (seq, hash): each links to the one before."""
    records = []
    for event in events:
        fields = (head_seq + 1, round(time.time(), 6), event.action, event.actor.as_dict(), event.decision,
                  event.reason, event.subject, event.details, head_hash)
        # Built twice rather than dataclasses.replace(), which costs twice a construction.
        r = AuditRecord(*fields, audit_hash(AuditRecord(*fields, "")))
        records.append(r)
        head_seq, head_hash = r.seq, r.hash
    return records


class Pending:
    """One record_issued call's serials and audit events."""

    __slots__ = ("serials", "audits")

    def __init__(self, serials, audits):
        self.serials = list(serials)
        self.audits = list(audits)


class _Group:
    """Serials from concurrent callers that commit together; `done` is set once they are durable."""

    __slots__ = ("items", "done", "error")

    def __init__(self):
        self.items: list[Pending] = []
        self.done = threading.Event()
        self.error: BaseException | None = None


class OwnChanges:
    """The feed positions this store object committed, so the issuer's follower skips the changes it already
    applied itself. A position is noted just before COMMIT (a follower on another thread can read the change the
    moment it is visible) and dropped again if the transaction does not commit: a position that was rolled back
    may be taken by another process's change. A COMMIT whose outcome is unknown drops its positions too, so a
    change that did commit is applied once more by the follower (an idempotent replay, not a miss)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._positions: set[int] = set()

    def note(self, positions: Sequence[int]) -> None:
        with self._lock:
            self._positions.update(positions)

    def drop(self, positions: Sequence[int]) -> None:
        with self._lock:
            self._positions.difference_update(positions)

    def mine(self, position: int) -> bool:
        with self._lock:
            return position in self._positions

    def forget_through(self, position: int) -> None:
        """The follower has passed `position`: nothing at or before it is asked about again."""
        with self._lock:
            self._positions = {p for p in self._positions if p > position}


class GroupCommit:
    """Concurrent record_issued callers share one transaction (and one flush to disk); each returns once its
    rows are durable, or raises what the group's commit raised.

    Leader/follower: while a group is being written, later callers gather in the next one; when the writer
    finishes, one of them writes that whole group. An idle store is written by the caller itself: no hand-off
    to another thread, which under load costs more than the flush (each wake-up waits for a CPU)."""

    def __init__(self, write: Callable[[list[Pending]], None]):
        self._write = write  # commits a group's rows in one transaction
        self._group = _Group()
        self._cond = threading.Condition(threading.Lock())
        self._committing = False  # a caller is writing a group
        self._closing = False

    def submit(self, mine: Pending) -> None:
        with self._cond:
            if self._closing:
                raise RuntimeError("datastore is closed")
            group = self._group
            group.items.append(mine)
            while self._committing and not group.done.is_set():
                self._cond.wait()
            if not group.done.is_set():
                self._committing = True
                self._group = _Group()
                leader = True
            else:
                leader = False
        if leader:
            try:
                self._write(group.items)
            except BaseException as e:  # noqa: BLE001 - every caller in the group gets it
                group.error = e
            with self._cond:
                self._committing = False
                group.done.set()
                self._cond.notify_all()
        if group.error is not None:
            raise group.error

    def close(self) -> None:
        """Refuse new callers; those already waiting get their commit first."""
        with self._cond:
            self._closing = True
            while self._committing or self._group.items:
                self._cond.wait()


def check_schema_version(found: int, known: int, where: str) -> None:
    """A store written by a newer release is refused: this code would not know its tables (never downgraded)."""
    if found > known:
        raise FailedPrecondition(f"the datastore {where} has schema version {found}, newer than this issuer knows "
                                 f"({known}): run the release that wrote it, or a newer one")
