"""The embedded datastore: one SQLite file in WAL mode, synchronous=FULL.

One connection guarded by a lock; writes are serialised, and `transaction()`
lets a caller group several writes (and their audit records) into one commit.
Issued serials use group commit: concurrent callers of `record_issued` share
one transaction and one fsync, and each returns only after its rows are durable.
One caller writes each group while the others sleep on a condition, instead of
queueing one by one on the connection lock; an idle store commits in the caller's thread.

More than one process may write the file: the issuer's signing workers record what
they sign through their own `SQLiteDatastore`. A writer first takes this process's
writer lock, then an flock on a lock file beside the database (polled with sub-
millisecond back-off, where SQLite's busy handler sleeps in steps of milliseconds),
then the connection; readers only ever take the connection, so they never wait
behind another process's commit. Each write transaction reads the audit chain's
head once it holds the write lock, so records from every process form one chain.
Committed audit records are published to the store's AuditRelay (issuer/audit/relay.py).

Every change other issuer processes must see (entries, sidecars, revocations,
authorities, approvals) also appends a row to `changes` in its own transaction; the rowid is the
feed position, so positions increase in commit order (one writer at a time, and
AUTOINCREMENT never reuses a position).

Only this module knows the store is SQLite: the rest of the issuer reaches it through
the Datastore protocol, `SQLiteOpener` (what a signing worker is given to open its
own store) and `open_reader` (a read-only view for `tessera audit verify --db`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from issuer.audit.relay import AuditRelay
from issuer.core.models import (APPROVAL_FINAL_OPS, AUDIT_FIELDS, AUTHORITY_FIELDS, GENESIS_HASH, ISSUED_FIELDS,
                                ApprovalCap, ApprovalRequest, AuditEvent, AuditRecord, Authority, Change, Entry,
                                Heads, IssuedSerial, JoinToken, Revocation, Sidecar)
from issuer.datastore.interface import DUPLICATE_SERIAL, live_task_message
from issuer.datastore.rows import (APPROVAL_COLUMNS, AUDIT_COLUMNS, CRL_NUMBERS_QUERY, GroupCommit, OwnChanges,
                                   check_schema_version, Pending, approval_cap_where, approval_from, approval_row, approval_still_open,
                                   audit_record, audit_row, authority_from,
                                   authority_row, chain, change_payload, dumps, entry_from, entry_row, issued_from,
                                   issued_row, sidecar_from)
from tessera import logs, safefs
from tessera.errors import AlreadyExists, FailedPrecondition, NotFound, Unavailable

log = logs.get("datastore")
# A full or failing disk hits every write until it is fixed: one line per minute, repeats counted.
_disk_log = logs.Throttled(log, window=60, level="error")

_DUPLICATE = (sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY, sqlite3.SQLITE_CONSTRAINT_UNIQUE)
WRITE_LOCK_TIMEOUT = 30.0  # seconds, as SQLite's own busy timeout below

# The schema grows by forward migrations only: step N brings a store at version N-1 to version N, in one
# transaction with the version it records (schema_version). A store written before versions were kept has no
# schema_version table and is version 0: every step runs, each written to find an earlier release's tables as
# they are (IF NOT EXISTS, columns looked at first), so nothing already stored is lost.
_V1_BASE = (
    """CREATE TABLE IF NOT EXISTS entries (
        id TEXT PRIMARY KEY,
        spiffe_id TEXT NOT NULL,
        parent_id TEXT NOT NULL,
        selectors TEXT NOT NULL,
        owner TEXT NOT NULL,
        purpose TEXT NOT NULL,
        tier TEXT NOT NULL,
        scopes TEXT NOT NULL,
        x509_ttl INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        state TEXT NOT NULL,
        created_by TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        revision INTEGER NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS entries_parent ON entries(parent_id)",
    """CREATE TABLE IF NOT EXISTS sidecars (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        state TEXT NOT NULL,
        attested_at INTEGER NOT NULL,
        last_seen INTEGER NOT NULL,
        svid_serial TEXT NOT NULL,
        svid_expires_at INTEGER NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS join_tokens (
        token_hash TEXT PRIMARY KEY,
        sidecar_name TEXT NOT NULL,
        expires_at INTEGER NOT NULL,
        created_by TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        used_at INTEGER)""",
    """CREATE TABLE IF NOT EXISTS issued (
        serial TEXT PRIMARY KEY,
        spiffe_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        entry_id TEXT,
        sidecar_id TEXT,
        task_id TEXT,
        issued_at INTEGER NOT NULL,
        not_after INTEGER NOT NULL,
        revoked_at INTEGER,
        revocation_reason TEXT)""",
    "CREATE INDEX IF NOT EXISTS issued_entry ON issued(entry_id)",
    "CREATE INDEX IF NOT EXISTS issued_not_after ON issued(not_after)",
    "CREATE INDEX IF NOT EXISTS issued_task ON issued(task_id)",
    "CREATE INDEX IF NOT EXISTS issued_spiffe ON issued(spiffe_id)",
    """CREATE TABLE IF NOT EXISTS revocations (
        seq INTEGER PRIMARY KEY,
        ts INTEGER NOT NULL,
        kind TEXT NOT NULL,
        target TEXT NOT NULL,
        reason TEXT NOT NULL,
        reason_code TEXT NOT NULL,
        serials TEXT NOT NULL,
        entry_ids TEXT NOT NULL)""",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    # The last signed CRL was kept here but never read: a CRL is derived from the revoked serials and the
    # durable CRL number (meta), and the issuer signs a fresh one at start.
    "DROP TABLE IF EXISTS crl",
    """CREATE TABLE IF NOT EXISTS changes (
        position INTEGER PRIMARY KEY AUTOINCREMENT,
        ts REAL NOT NULL,
        kind TEXT NOT NULL,
        op TEXT NOT NULL,
        key TEXT NOT NULL,
        payload TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS audit (
        seq INTEGER PRIMARY KEY,
        ts REAL NOT NULL,
        action TEXT NOT NULL,
        actor TEXT NOT NULL,
        decision TEXT NOT NULL,
        reason TEXT NOT NULL,
        subject TEXT NOT NULL,
        details TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL)""",
)


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {r[1] for r in db.execute(f"PRAGMA table_info({table})")}


def _v1_base(db: sqlite3.Connection) -> None:
    for statement in _V1_BASE:
        db.execute(statement)


def _v2_authorities(db: sqlite3.Connection) -> None:
    if "fingerprint" in _columns(db, "authorities"):
        db.execute("DROP TABLE authorities")  # it only noted CA fingerprints; the authorities table replaces it
    if "authority" not in _columns(db, "issued"):
        db.execute("ALTER TABLE issued ADD COLUMN authority TEXT")  # NULL: signed by the one CA of then
    db.execute("""CREATE TABLE IF NOT EXISTS authorities (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        state TEXT NOT NULL,
        source TEXT NOT NULL,
        parent TEXT,
        public_der BLOB NOT NULL,
        cert_der BLOB NOT NULL,
        sealed_key BLOB NOT NULL,
        kek_id TEXT NOT NULL,
        not_before INTEGER NOT NULL,
        not_after INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        activated_at INTEGER,
        retired_at INTEGER,
        tainted_at INTEGER,
        revoked_at INTEGER)""")
    db.execute("CREATE INDEX IF NOT EXISTS issued_authority ON issued(authority)")


def _v3_approvals(db: sqlite3.Connection) -> None:
    """Pending approvals move from one issuer's memory to the store, so every issuer sees and decides them."""
    db.execute(_APPROVALS_TABLE)
    db.execute("CREATE INDEX IF NOT EXISTS approvals_pending ON approvals(state, expires_at)")


_APPROVALS_TABLE = """CREATE TABLE IF NOT EXISTS approvals (
    id TEXT PRIMARY KEY,
    task_id TEXT NOT NULL,
    entry_id TEXT NOT NULL,
    spiffe_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    tier TEXT NOT NULL,
    scopes TEXT NOT NULL,
    ttl INTEGER NOT NULL,
    context TEXT NOT NULL,
    sidecar_id TEXT NOT NULL,
    workload TEXT NOT NULL,
    reason TEXT NOT NULL,
    rule TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    state TEXT NOT NULL,
    decided_by TEXT NOT NULL,
    decision_reason TEXT NOT NULL,
    uid INTEGER NOT NULL)"""

MIGRATIONS = (_v1_base, _v2_authorities, _v3_approvals)  # MIGRATIONS[n - 1] brings a store to version n
SCHEMA_VERSION = len(MIGRATIONS)


def _migrate(db: sqlite3.Connection, path: Path) -> None:
    """Bring the store to SCHEMA_VERSION; a store of a newer release is refused, never changed."""
    # IMMEDIATE: one process migrates, another opening the store at once waits (busy timeout) and finds it done.
    db.execute("BEGIN IMMEDIATE")
    try:
        # An earlier release's store (tables, no schema_version) is an upgrade worth a line; a new one is not.
        existing = db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='entries'").fetchone()
        db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = db.execute("SELECT version FROM schema_version").fetchone()
        version = row[0] if row else 0
        check_schema_version(version, SCHEMA_VERSION, str(path))
        for n in range(version + 1, SCHEMA_VERSION + 1):
            MIGRATIONS[n - 1](db)
        if existing and version != SCHEMA_VERSION:
            log.info("datastore schema migrated", path=str(path), version_from=version, version=SCHEMA_VERSION)
        if row is None:
            db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
        elif version != SCHEMA_VERSION:
            db.execute("UPDATE schema_version SET version=?", (SCHEMA_VERSION,))
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


_INSERT_AUTHORITY = (f"INSERT INTO authorities ({', '.join(AUTHORITY_FIELDS)}) "
                     f"VALUES ({', '.join('?' * len(AUTHORITY_FIELDS))})")
_INSERT_ISSUED = f"INSERT INTO issued ({', '.join(ISSUED_FIELDS)}) VALUES ({', '.join('?' * len(ISSUED_FIELDS))})"
_INSERT_APPROVAL = (f"INSERT INTO approvals ({', '.join(APPROVAL_COLUMNS)}) "
                    f"VALUES ({', '.join('?' * len(APPROVAL_COLUMNS))})")
_AUDIT_INSERT = f"INSERT INTO audit ({AUDIT_COLUMNS}) VALUES ({', '.join('?' * len(AUDIT_FIELDS))})"


@contextlib.contextmanager
def _connect_ro(path: str | Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection: it reads beside the writer (WAL), never under a store's lock, so a long scan
    holds up no commit. SQLite's errors become FailedPrecondition (not a database, unreadable, ...)."""
    try:
        db = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True)
    except sqlite3.Error as e:
        raise FailedPrecondition(f"cannot open it as a database: {e}") from None
    try:
        yield db
    except sqlite3.Error as e:
        raise FailedPrecondition(f"not a readable issuer database: {e}") from None
    finally:
        db.close()


def _audit_after(path: Path, since_seq: int, limit: int | None) -> list[AuditRecord]:
    q, args = f"SELECT {AUDIT_COLUMNS} FROM audit WHERE seq > ? ORDER BY seq", (since_seq,)
    if limit is not None:
        q, args = q + " LIMIT ?", args + (limit,)
    with _connect_ro(path) as db:
        return [audit_record(r) for r in db.execute(q, args)]


def _audit_since(path: Path, since_ts: float) -> Iterator[AuditRecord]:
    with _connect_ro(path) as db:
        for row in db.execute(f"SELECT {AUDIT_COLUMNS} FROM audit WHERE ts >= ? ORDER BY seq", (since_ts,)):
            yield audit_record(row)


def _newest_audit_seq(path: Path) -> int:
    with _connect_ro(path) as db:
        return db.execute("SELECT COALESCE(MAX(seq), 0) FROM audit").fetchone()[0]


def _heads(path: Path) -> Heads:
    """The database's heads; a table it lacks (an empty file, an older release's store) counts as 0."""
    with _connect_ro(path) as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}

        def top(table: str, column: str) -> int:
            return db.execute(f"SELECT COALESCE(MAX({column}), 0) FROM {table}").fetchone()[0] if table in tables else 0

        crl = dict(db.execute(CRL_NUMBERS_QUERY)) if "meta" in tables else {}
        return Heads(top("changes", "position"), top("revocations", "seq"), top("audit", "seq"), crl)


class _AuditReads:
    """The audit reads, over read-only connections of their own: a long scan holds up no commit."""

    path: Path

    def audit_records(self, since_seq: int = 0, limit: int | None = None) -> list[AuditRecord]:
        return _audit_after(self.path, since_seq, limit)

    def audit_since(self, since_ts: float = 0.0) -> Iterator[AuditRecord]:
        """Every audit record with ts >= since_ts, in seq order (read lazily)."""
        return _audit_since(self.path, since_ts)

    def newest_audit_seq(self) -> int:
        return _newest_audit_seq(self.path)

    def heads(self) -> Heads:
        return _heads(self.path)


class SQLiteReader(_AuditReads):
    """Read-only audit reads of an issuer database (for `tessera audit verify --db`); opens nothing for writing,
    creates nothing, and may run beside a live issuer."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise NotFound(f"{path} does not exist")

    def close(self) -> None:
        pass  # each read opens and closes its own connection


@dataclasses.dataclass(frozen=True)
class SQLiteOpener:
    """What a signing worker is handed to open its own store on the issuer's database (picklable)."""

    path: str

    def open(self, relay: AuditRelay | None = None) -> "SQLiteDatastore":
        return SQLiteDatastore(self.path, relay=relay)


class SQLiteDatastore(_AuditReads):
    def __init__(self, path: str | Path, relay: AuditRelay | None = None):
        """`relay` is given every audit record this store commits (default: a relay of its own, with no
        subscribers); in the issuer it also gets the signing workers' records, and reads gaps back from here."""
        self.path = Path(path)
        # SQLite opens the file, its -wal and -shm by name, following links: their directory must be one only
        # root or this uid can change, and the database a regular file of ours (made 0600 here: SQLite gives
        # the -wal and -shm the database's mode).
        safefs.make_dir(self.path.parent, "data_dir", create=False)
        os.close(safefs.open_regular(self.path, os.O_RDWR | os.O_CREAT, 0o600, what="data_dir"))
        self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk (not only in the OS cache) before we acknowledge it.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        _migrate(self._db, self.path)
        # Released by the kernel if the holder dies, unlike a semaphore: a killed worker cannot wedge the issuer.
        self._write_lock = safefs.open_regular(f"{self.path}.write-lock", os.O_RDWR | os.O_CREAT, 0o600,
                                               what="data_dir")
        self._writer = threading.Lock()  # one writing thread in this process (the flock orders processes)
        self._lock = threading.RLock()  # the connection
        self._depth = 0
        self._owner: int | None = None  # the thread inside transaction()
        self._group = GroupCommit(self._commit_issued)
        self.own_changes = OwnChanges()  # feed positions committed through this object (rows.OwnChanges)
        self._positions: list[int] = []
        self._audit_seq, self._audit_hash = 0, GENESIS_HASH  # the chain's head, read in each write transaction
        self._closed = False
        self.relay = relay if relay is not None else AuditRelay()
        # Looked up at each read-back, not bound now: the relay follows this store as it is when a gap lasts.
        self.relay.attach(self.newest_audit_seq(), lambda after, n: self.audit_records(after, n))

    # -- transactions ---------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One durable commit for every store call made inside (by this thread); nested uses join the outer one.
        An exception inside rolls all of it back."""
        with self._tx():
            yield

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        if self._owner == threading.get_ident():  # only this thread ever sets it to this thread
            with self._lock:
                self._depth += 1
                try:
                    yield self._db
                finally:
                    self._depth -= 1
            return
        with self._writer:
            if self._closed:
                raise RuntimeError("datastore is closed")
            self._lock_file()
            try:
                with self._lock:
                    self._depth = 1
                    self._owner = threading.get_ident()
                    self._new_records: list[AuditRecord] = []
                    self._positions: list[int] = []  # the feed positions this transaction appended
                    try:
                        self._db.execute("BEGIN IMMEDIATE")
                        try:
                            row = self._db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
                            self._audit_seq, self._audit_hash = (row[0], row[1]) if row else (0, GENESIS_HASH)
                            yield self._db
                            self.own_changes.note(self._positions)
                            self._db.execute("COMMIT")
                        except BaseException:
                            self.own_changes.drop(self._positions)
                            if self._db.in_transaction:  # after SQLITE_FULL, SQLite has rolled back itself
                                self._db.execute("ROLLBACK")
                            raise
                    except sqlite3.Error as e:
                        raise self._disk_error(e) or e
                    finally:
                        self._depth = 0
                        self._owner = None
                    records, self._new_records = self._new_records, []
            finally:
                fcntl.flock(self._write_lock, fcntl.LOCK_UN)
        self.relay.publish(records)

    def _disk_error(self, e: sqlite3.Error) -> Unavailable | None:
        """Unavailable for a full or failing disk (nothing was written; the caller may retry later)."""
        if (getattr(e, "sqlite_errorcode", 0) & 0xFF) not in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR):
            return None
        _disk_log.log(f"disk:{self.path}", "the database cannot be written: writes fail until the disk has room",
                      path=str(self.path), error=str(e))
        return Unavailable(f"the issuer cannot write its database ({e}); try again later")

    def _lock_file(self) -> None:
        """The inter-process write lock, or Unavailable once another writer held it for WRITE_LOCK_TIMEOUT."""
        deadline, delay = None, 0.00005
        while True:
            try:
                fcntl.flock(self._write_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            now = time.monotonic()
            deadline = deadline or now + WRITE_LOCK_TIMEOUT
            if now > deadline:
                raise Unavailable(f"the database {self.path.name} stayed locked by another writer for "
                                  f"{WRITE_LOCK_TIMEOUT:.0f}s")
            time.sleep(delay)  # another process's commit: typically well under a millisecond
            delay = min(delay * 2, 0.001)

    def _audit(self, db: sqlite3.Connection, event: AuditEvent | None) -> None:
        if event is not None:
            self._audit_many(db, [event])

    def _audit_many(self, db: sqlite3.Connection, events: Sequence[AuditEvent]) -> None:
        """Chain and insert audit records; one statement for many keeps the group commit short."""
        records = chain(events, self._audit_seq, self._audit_hash)
        if records:
            db.executemany(_AUDIT_INSERT, [audit_row(r) for r in records])
            self._new_records.extend(records)
            self._audit_seq, self._audit_hash = records[-1].seq, records[-1].hash

    def _change(self, db: sqlite3.Connection, kind: str, op: str, key: str, payload: dict[str, Any] | str) -> None:
        """Append to the change feed, in the caller's transaction: the change and its feed row commit together."""
        text = payload if isinstance(payload, str) else dumps(payload)
        cur = db.execute("INSERT INTO changes (ts, kind, op, key, payload) VALUES (?,?,?,?,?)",
                         (round(time.time(), 6), kind, op, key, text))
        self._positions.append(cur.lastrowid)

    def append_audit(self, events: Iterable[AuditEvent]) -> None:
        with self._tx() as db:
            for e in events:
                self._audit(db, e)

    # -- entries --------------------------------------------------------------------

    def create_entry(self, entry: Entry, audit: AuditEvent) -> None:
        with self._tx() as db:
            try:
                db.execute("INSERT INTO entries VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", entry_row(entry))
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"entry {entry.id} already exists") from None
            self._change(db, "entry", "create", entry.id, change_payload(entry))
            self._audit(db, audit)

    def update_entry(self, entry: Entry, audit: AuditEvent) -> None:
        with self._tx() as db:
            cur = db.execute(
                "UPDATE entries SET spiffe_id=?, parent_id=?, selectors=?, owner=?, purpose=?, tier=?,"
                " scopes=?, x509_ttl=?, expires_at=?, state=?, updated_at=?, revision=? WHERE id=?",
                (entry.spiffe_id, entry.parent_id, dumps(list(entry.selectors)), entry.owner,
                 entry.purpose, entry.tier, dumps(list(entry.scopes)), entry.x509_ttl, entry.expires_at,
                 entry.state, entry.updated_at, entry.revision, entry.id),
            )
            if cur.rowcount == 0:
                raise NotFound(f"no entry with id {entry.id}")
            self._change(db, "entry", "update", entry.id, change_payload(entry))
            self._audit(db, audit)

    def delete_entry(self, entry_id: str, audit: AuditEvent) -> None:
        with self._tx() as db:
            row = db.execute("SELECT * FROM entries WHERE id=?", (entry_id,)).fetchone()
            if row is None:
                raise NotFound(f"no entry with id {entry_id}")
            db.execute("DELETE FROM entries WHERE id=?", (entry_id,))
            self._change(db, "entry", "delete", entry_id, change_payload(entry_from(row)))
            self._audit(db, audit)

    def list_entries(self, parent_id: str | None = None) -> list[Entry]:
        with self._lock:
            if parent_id is None:
                rows = self._db.execute("SELECT * FROM entries ORDER BY created_at, id").fetchall()
            else:
                rows = self._db.execute(
                    "SELECT * FROM entries WHERE parent_id=? ORDER BY created_at, id", (parent_id,)
                ).fetchall()
        return [entry_from(r) for r in rows]

    # -- join tokens and sidecars ----------------------------------------------------------

    def create_join_token(self, token: JoinToken, audit: AuditEvent) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO join_tokens VALUES (?,?,?,?,?,NULL)",
                (token.token_hash, token.sidecar_name, token.expires_at, token.created_by, token.created_at),
            )
            self._audit(db, audit)

    def consume_join_token(self, token_hash: str, now: int) -> JoinToken | None:
        """The token as it was before this call (None if unknown), marked used at `now` if it was not used.

        No decision here: the caller decides whether what was found may join (used before, expired), inside
        its transaction, so raising there rolls the mark back."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM join_tokens WHERE token_hash=?", (token_hash,)).fetchone()
            if row is None:
                return None
            if row["used_at"] is None:
                db.execute("UPDATE join_tokens SET used_at=? WHERE token_hash=?", (now, token_hash))
            return JoinToken(**{k: row[k] for k in row.keys()})

    def upsert_sidecar(self, sidecar: Sidecar, audit: AuditEvent | None) -> None:
        with self._tx() as db:
            before = db.execute("SELECT state FROM sidecars WHERE id=?", (sidecar.id,)).fetchone()
            was_banned, banned = before is not None and before[0] == "banned", sidecar.state == "banned"
            op = "ban" if banned and not was_banned else "unban" if was_banned and not banned else "upsert"
            db.execute(
                "INSERT INTO sidecars VALUES (?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET"
                " state=excluded.state, attested_at=excluded.attested_at, last_seen=excluded.last_seen,"
                " svid_serial=excluded.svid_serial, svid_expires_at=excluded.svid_expires_at",
                (sidecar.id, sidecar.name, sidecar.state, sidecar.attested_at, sidecar.last_seen,
                 sidecar.svid_serial, sidecar.svid_expires_at),
            )
            self._change(db, "sidecar", op, sidecar.id, change_payload(sidecar))
            self._audit(db, audit)

    def list_sidecars(self) -> list[Sidecar]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM sidecars ORDER BY id").fetchall()
        return [sidecar_from(r) for r in rows]

    def touch_sidecar(self, sidecar_id: str, now: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE sidecars SET last_seen=? WHERE id=?", (now, sidecar_id))

    # -- issued serials ---------------------------------------------------------------

    def record_issued(self, serials: Sequence[IssuedSerial], audits: Sequence[AuditEvent] = ()) -> None:
        """Durably record issued serials before their certificates leave the issuer."""
        mine = Pending(serials, audits)
        if self._owner == threading.get_ident():
            with self._lock:
                # Inside this thread's own transaction: its commit is the one that counts.
                self._insert_issued(self._db, [mine])
                return
        self._group.submit(mine)

    def record_task_issued(self, serial: IssuedSerial, audit: AuditEvent) -> None:
        with self._tx() as db:
            if self.find_issued(entry_id=serial.entry_id, task_id=serial.task_id, unexpired_at=serial.issued_at,
                                revoked=False):  # inside the transaction: under the write lock
                raise AlreadyExists(live_task_message(serial.task_id))
            self._insert_issued(db, [Pending([serial], [audit])])

    def _commit_issued(self, group: list[Pending]) -> None:
        with self._tx() as db:
            self._insert_issued(db, group)

    def _insert_issued(self, db: sqlite3.Connection, group: list[Pending]) -> None:
        rows = [issued_row(s) for p in group for s in p.serials]
        if rows:
            try:
                db.executemany(_INSERT_ISSUED, rows)
            except sqlite3.IntegrityError as e:
                if getattr(e, "sqlite_errorcode", 0) not in _DUPLICATE:
                    raise
                raise AlreadyExists(DUPLICATE_SERIAL) from None
        self._audit_many(db, [a for p in group for a in p.audits])

    def get_issued(self, serial: str) -> IssuedSerial | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM issued WHERE serial=?", (serial,)).fetchone()
        return issued_from(row) if row else None

    def revoke_serials(self, serials: Sequence[str], reason: str, now: int,
                       audit: AuditEvent | None) -> list[str]:
        """Mark serials revoked, durably, with the audit record; returns those not revoked before."""
        with self._tx() as db:
            newly = []
            for serial in serials:
                cur = db.execute(
                    "UPDATE issued SET revoked_at=?, revocation_reason=? WHERE serial=? AND revoked_at IS NULL",
                    (now, reason, serial))
                if cur.rowcount:
                    newly.append(serial)
            self._audit(db, audit)
        return newly

    def find_issued(self, *, entry_id: str | None = None, task_id: str | None = None,
                    spiffe_id: str | None = None, sidecar_id: str | None = None,
                    unexpired_at: int | None = None, revoked: bool | None = None,
                    serials: Sequence[str] | None = None) -> list[IssuedSerial]:
        """Issued serials matching every given filter (`serials`: any of these)."""
        clauses, args = [], []
        if serials is not None:
            clauses.append("serial IN (SELECT value FROM json_each(?))")
            args.append(dumps(list(serials)))
        for col, val in (("entry_id", entry_id), ("task_id", task_id), ("spiffe_id", spiffe_id),
                         ("sidecar_id", sidecar_id)):
            if val is not None:
                clauses.append(f"{col}=?")
                args.append(val)
        if unexpired_at is not None:
            clauses.append("not_after>?")
            args.append(unexpired_at)
        if revoked is not None:
            clauses.append("revoked_at IS NOT NULL" if revoked else "revoked_at IS NULL")
        q = "SELECT * FROM issued" + (" WHERE " + " AND ".join(clauses) if clauses else "") + " ORDER BY issued_at"
        with self._lock:
            rows = self._db.execute(q, args).fetchall()
        return [issued_from(r) for r in rows]

    # -- revocation log and CRL numbers -------------------------------------------------------

    def record_revocation(self, rec: Revocation) -> int:
        """Append one revocation to the log (join the caller's transaction); returns its seq."""
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO revocations (ts, kind, target, reason, reason_code, serials, entry_ids)"
                " VALUES (?,?,?,?,?,?,?)",
                (rec.ts, rec.kind, rec.target, rec.reason, rec.reason_code, dumps(list(rec.serials)),
                 dumps(list(rec.entry_ids))))
            seq = cur.lastrowid
            self._change(db, "revocation", "create", str(seq), change_payload(dataclasses.replace(rec, seq=seq)))
            return seq

    def revocations(self, kinds: Sequence[str] | None = None, since_seq: int = 0) -> list[Revocation]:
        q, args = "SELECT * FROM revocations WHERE seq > ?", [since_seq]
        if kinds:
            q += f" AND kind IN ({','.join('?' * len(kinds))})"
            args += list(kinds)
        with self._lock:
            rows = self._db.execute(q + " ORDER BY seq", args).fetchall()
        return [Revocation(r["seq"], r["ts"], r["kind"], r["target"], r["reason"], r["reason_code"],
                           tuple(json.loads(r["serials"])), tuple(json.loads(r["entry_ids"]))) for r in rows]

    def last_revocation_seq(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM revocations").fetchone()[0]

    def next_crl_number(self, authority: str) -> int:
        """Take `authority`'s next CRL number, durably: a number is never handed out twice, even across crashes."""
        key = f"crl_number:{authority}"
        with self._tx() as db:
            db.execute("INSERT INTO meta VALUES (?, 1) ON CONFLICT(key) DO UPDATE SET value = value + 1", (key,))
            return db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()[0]

    def raise_crl_numbers(self, floors: Mapping[str, int], audit: AuditEvent) -> None:
        """Each authority's CRL number at least its floor (never lowered), with `audit`, in one transaction."""
        with self._tx() as db:
            db.executemany("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = MAX(value, excluded.value)",
                           [(f"crl_number:{a}", n) for a, n in sorted(floors.items())])
            self._audit(db, audit)

    # -- authorities --------------------------------------------------------------------

    def put_authority(self, authority: Authority, audit: AuditEvent | None, *,
                      expect_state: str | None = None) -> bool:
        """Add an authority (expect_state None; AlreadyExists if its id is taken) or replace one whose stored state
        is still `expect_state` (False, nothing written, when it is not): two issuers cannot both move it."""
        with self._tx() as db:
            if expect_state is None:
                try:
                    db.execute(_INSERT_AUTHORITY, authority_row(authority))
                except sqlite3.IntegrityError as e:
                    if e.sqlite_errorcode in _DUPLICATE:
                        raise AlreadyExists(f"authority {authority.id} already exists") from None
                    raise
                op = "add"
            else:
                cur = db.execute(f"UPDATE authorities SET ({', '.join(AUTHORITY_FIELDS)}) = "
                                 f"({', '.join('?' * len(AUTHORITY_FIELDS))}) WHERE id=? AND state=?",
                                 (*authority_row(authority), authority.id, expect_state))
                if not cur.rowcount:
                    return False
                op = "update"
            self._change(db, "authority", op, authority.id,
                         {"id": authority.id, "kind": authority.kind, "state": authority.state})
            self._audit(db, audit)
            return True

    def list_authorities(self) -> list[Authority]:
        with self._lock:
            return [authority_from(r) for r in self._db.execute("SELECT * FROM authorities ORDER BY created_at, id")]

    def adopt_unattributed(self, authority: str) -> int:
        """Name `authority` as the signer of the serials, and the owner of the CRL numbers, of a store written before
        authorities were tracked (the one CA of then); the number of serials it took."""
        with self._tx() as db:
            db.execute("INSERT INTO meta SELECT ?, value FROM meta WHERE key='crl_number' ON CONFLICT(key) DO NOTHING",
                       (f"crl_number:{authority}",))
            db.execute("DELETE FROM meta WHERE key='crl_number'")
            return db.execute("UPDATE issued SET authority=? WHERE authority IS NULL", (authority,)).rowcount

    def count_outstanding(self, authority: str, now: int) -> int:
        """Unexpired, unrevoked certificates `authority` signed."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM issued WHERE authority=? AND not_after > ?"
                                    " AND revoked_at IS NULL", (authority, now)).fetchone()[0]

    # -- approvals ------------------------------------------------------------------------

    def create_approval(self, req: ApprovalRequest, caps: Sequence[ApprovalCap],
                        audit: AuditEvent) -> ApprovalCap | None:
        with self._tx() as db:  # under the write lock: no other writer counts or inserts meanwhile
            for cap in caps:
                where, args = approval_cap_where(cap, req.created_at, "?")
                if db.execute(f"SELECT COUNT(*) FROM approvals WHERE {where}", args).fetchone()[0] >= cap.limit:
                    return cap
            try:
                db.execute(_INSERT_APPROVAL, approval_row(req))
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"approval {req.id} already exists") from None
            self._change(db, "approval", "create", req.id, change_payload(req))
            self._audit(db, audit)
            return None

    def finish_approvals(self, finals: Sequence[ApprovalRequest], audits: Sequence[AuditEvent],
                         now: int) -> list[ApprovalRequest]:
        won = []
        with self._tx() as db:
            for final, audit in zip(finals, audits, strict=True):
                row = db.execute(f"UPDATE approvals SET state=?, decided_by=?, decision_reason=? WHERE id=?"
                                 f" AND state='pending' AND {approval_still_open(final.state, now)} RETURNING *",
                                 (final.state, final.decided_by, final.decision_reason, final.id)).fetchone()
                if row is None:
                    continue
                stored = approval_from(row)
                self._change(db, "approval", APPROVAL_FINAL_OPS[final.state], final.id, change_payload(stored))
                self._audit(db, audit)
                won.append(stored)
        return won

    def get_approval(self, approval_id: str) -> ApprovalRequest | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM approvals WHERE id=?", (approval_id,)).fetchone()
        return approval_from(row) if row else None

    def list_approvals(self, now: int, expired: bool = False) -> list[ApprovalRequest]:
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM approvals WHERE state='pending'"
                                    f" AND expires_at {'<=' if expired else '>'} ? ORDER BY created_at, id",
                                    (now,)).fetchall()
        return [approval_from(r) for r in rows]

    # -- the change feed ------------------------------------------------------------------

    def changes_after(self, position: int, limit: int = 1000) -> list[Change]:
        """Committed changes after `position`, in position order, at most `limit`."""
        with _connect_ro(self.path) as db:
            rows = db.execute("SELECT position, ts, kind, op, key, payload FROM changes WHERE position > ?"
                              " ORDER BY position LIMIT ?", (position, limit)).fetchall()
        return [Change(p, ts, kind, op, key, json.loads(payload)) for p, ts, kind, op, key, payload in rows]

    # Several issuers on one SQLite file is not a deployment Tessera supports, but a follower works: it polls.
    poll_interval = 0.25

    def watch_changes(self, wake: Callable[[], None], stop: threading.Event) -> None:
        """SQLite cannot notify another process: nothing to watch, the follower's poll_interval is the wake-up."""
        return None

    def last_change_position(self) -> int:
        with _connect_ro(self.path) as db:
            return db.execute("SELECT COALESCE(MAX(position), 0) FROM changes").fetchone()[0]

    # -- evidence reads (read-only connections, as the audit reads inherited from _AuditReads) -----------

    def last_issued_by_entry(self) -> dict[str, int]:
        """Entry id -> when a certificate was last issued for it (aggregated by SQLite, not row by row here)."""
        with _connect_ro(self.path) as db:
            return dict(db.execute("SELECT entry_id, MAX(issued_at) FROM issued WHERE entry_id IS NOT NULL"
                                   " GROUP BY entry_id"))

    def opener(self) -> SQLiteOpener:
        """How another process opens a store on this same database (the signing workers)."""
        return SQLiteOpener(str(self.path))

    def close(self) -> None:
        self._group.close()  # callers already waiting get their commit
        self.relay.close()  # nothing more relayed; what still waits reaches the audit file at the next start
        self._closed = True  # no new transaction
        with self._writer, self._lock:  # a transaction under way finishes first
            self._db.close()
            if self._write_lock >= 0:  # closing twice is harmless, as it is for the connection
                os.close(self._write_lock)
                self._write_lock = -1
