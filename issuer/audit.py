"""The audit trail outside the database: chain verification, record filters, and the JSON-lines file.

The database is the source of truth (each record commits with the change it
describes). The JSON-lines file is a second, append-only copy apart from the
operational logs, for shipping to a SIEM: a background thread appends and
fsyncs it, and at start it catches up from the database, so a crash between
the database commit and the file write loses nothing and duplicates nothing.
"""

from __future__ import annotations

import json
import os
import queue
import re
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from issuer.datastore import GENESIS_HASH, audit_hash, audit_record_from_row
from issuer.models import AuditRecord
from tessera import logs

log = logs.get("issuer.audit")


# -- verification (pure) ---------------------------------------------------------------


@dataclass(frozen=True)
class ChainCheck:
    ok: bool
    records: int  # how many records were checked
    last_seq: int
    last_hash: str
    bad_seq: int = 0  # the first record that breaks the chain (0 when ok)
    problem: str = ""


def verify_chain(records: Iterable[AuditRecord]) -> ChainCheck:
    """Recompute the chain from the genesis hash; stop at the first record that breaks it.

    A record breaks the chain when its content no longer matches its hash (edited), when it
    does not point at its predecessor's hash (reordered or a predecessor was replaced), or
    when its seq is not one more than its predecessor's (deleted or inserted).
    """
    prev_seq, prev_hash, n = 0, GENESIS_HASH, 0
    for r in records:
        n += 1
        if r.seq != prev_seq + 1:
            return ChainCheck(False, n, prev_seq, prev_hash, r.seq,
                              f"record {r.seq} follows record {prev_seq}: records are missing or inserted")
        if r.prev_hash != prev_hash:
            return ChainCheck(False, n, prev_seq, prev_hash, r.seq,
                              f"record {r.seq} does not point at the hash of record {prev_seq}")
        expected = audit_hash(prev_hash, r.seq, r.ts, r.action, r.actor, r.decision, r.reason, r.subject, r.details)
        if r.hash != expected:
            return ChainCheck(False, n, prev_seq, prev_hash, r.seq,
                              f"record {r.seq} ({r.action}) was altered: its content does not match its hash")
        prev_seq, prev_hash = r.seq, r.hash
    return ChainCheck(True, n, prev_seq, prev_hash)


# -- record shapes ---------------------------------------------------------------------------


def record_dict(r: AuditRecord) -> dict:
    return {"seq": r.seq, "ts": r.ts, "action": r.action, "actor": r.actor, "decision": r.decision,
            "reason": r.reason, "subject": r.subject, "details": r.details, "prev_hash": r.prev_hash,
            "hash": r.hash}


def record_from_dict(d: dict) -> AuditRecord:
    return AuditRecord(seq=d["seq"], ts=d["ts"], action=d["action"], actor=d["actor"], decision=d["decision"],
                       reason=d["reason"], subject=d["subject"], details=d["details"], prev_hash=d["prev_hash"],
                       hash=d["hash"])


def record_line(r: AuditRecord) -> str:
    return json.dumps(record_dict(r), sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class AuditFilter:
    """Which records an operator asked for; every given field must match."""

    action: str = ""  # exact, or a prefix ending in "." (e.g. "svid.")
    decision: str = ""
    actor: str = ""  # substring of the actor id
    subject: str = ""  # substring of the subject
    since_ts: float = 0.0

    def matches(self, r: AuditRecord) -> bool:
        if self.action and not (r.action == self.action or
                                (self.action.endswith(".") and r.action.startswith(self.action))):
            return False
        if self.decision and r.decision != self.decision:
            return False
        if self.actor and self.actor not in str(r.actor.get("id", "")):
            return False
        if self.subject and self.subject not in r.subject:
            return False
        return r.ts >= self.since_ts


def read_sqlite(path: str | Path, since_ts: float = 0.0) -> Iterator[AuditRecord]:
    """Audit records (from `since_ts` on) straight from an issuer database over a read-only connection.

    Used by `tessera audit verify --db`, and by the issuer's own verification and report so a long
    scan never holds the store's write lock (WAL lets readers run beside the writer).
    """
    db = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True)
    try:
        for row in db.execute("SELECT seq, ts, action, actor, decision, reason, subject, details, prev_hash, hash"
                              " FROM audit WHERE ts >= ? ORDER BY seq", (since_ts,)):
            yield audit_record_from_row(row)
    finally:
        db.close()


def newest_seq_sqlite(path: str | Path) -> int:
    db = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True)
    try:
        return db.execute("SELECT COALESCE(MAX(seq), 0) FROM audit").fetchone()[0]
    finally:
        db.close()


def read_jsonl(path: str | Path) -> Iterator[AuditRecord]:
    """Records from an audit JSON-lines file; a torn last line (crash mid-write) is skipped."""
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                return
            yield record_from_dict(json.loads(raw))


_NOISE = (
    (re.compile(r"spiffe://\S+"), "<spiffe-id>"),
    (re.compile(r"'[^']*'|\"[^\"]*\""), "<value>"),
    (re.compile(r"\b[0-9a-f]{8,}\b|\b[0-9a-f]{8}-[0-9a-f-]{27,}\b"), "<id>"),
    (re.compile(r"\b\d+\b"), "<n>"),
)


def denial_reason(record: AuditRecord) -> str:
    """A bounded label for why something was denied.

    The policy rule's name when the decision names one (details["rule"]); otherwise the
    reason text with identifiers, quoted values and numbers replaced, so that label values
    stay few ("entry <value> is not registered to <spiffe-id>").
    """
    rule = record.details.get("rule") if isinstance(record.details, dict) else None
    if rule:
        return str(rule)[:64]
    text = record.reason or "unspecified"
    for pattern, repl in _NOISE:
        text = pattern.sub(repl, text)
    return text[:96]


# -- the JSON-lines file ----------------------------------------------------------------------


_STOP = object()


class AuditFile:
    """Appends committed audit records, in seq order, to a JSON-lines file (mode 0600).

    At start the file catches up with what the database committed while no writer ran;
    after that the datastore hands over every record once, in seq order
    (SQLiteDatastore.notify), so the file only appends what it has not written yet.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._queue: "queue.SimpleQueue" = queue.SimpleQueue()
        self.written_seq = self._repair_and_last_seq()
        self._file = open(self.path, "ab")
        os.chmod(self.path, 0o600)
        self._thread: threading.Thread | None = None

    def _repair_and_last_seq(self) -> int:
        """The last seq in the file, after cutting a torn final line left by a crash."""
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
            return 0
        with open(self.path, "r+b") as f:
            size = f.seek(0, os.SEEK_END)
            # Read backwards until the tail holds the last complete line and the newline before it.
            chunk, tail = 65536, b""
            while True:
                start = max(0, size - len(tail) - chunk)
                f.seek(start)
                tail = f.read(size - start)
                end = tail.rfind(b"\n") + 1
                if start == 0 or (end and tail.rfind(b"\n", 0, end - 1) >= 0):
                    break
            if end != len(tail):  # a torn final line from a crash mid-write
                f.truncate(start + end)
                f.flush()
                os.fsync(f.fileno())
            lines = tail[:end].splitlines()
        return json.loads(lines[-1])["seq"] if lines else 0

    def catch_up(self, records: Callable[[int], list[AuditRecord]]) -> int:
        """Write what the database committed but the file lacks; `records(since_seq)` reads the store."""
        with self._lock:
            missing = records(self.written_seq)
            self._write(missing)
        return len(missing)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="audit-file", daemon=True)
        self._thread.start()

    def __call__(self, records: list[AuditRecord]) -> None:
        """A datastore audit listener: hand off, never block the committing thread."""
        if records:
            self._queue.put(records)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            batch = [item]
            while not self._queue.empty():  # one fsync for everything already waiting
                batch.append(self._queue.get())
            stop = _STOP in batch
            with self._lock:
                run = [r for records in batch if records is not _STOP for r in records if r.seq > self.written_seq]
                try:
                    self._write(run)
                except OSError as e:
                    # The database still holds the record; the next start's catch_up writes it.
                    log.error("cannot append to the audit file", path=str(self.path), error=str(e))
            if stop:
                return

    def _write(self, records: list[AuditRecord]) -> None:
        if not records:
            return
        self._file.write(b"".join(record_line(r).encode() + b"\n" for r in records))
        self._file.flush()
        os.fsync(self._file.fileno())
        self.written_seq = records[-1].seq

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout=10)
        self._file.close()
